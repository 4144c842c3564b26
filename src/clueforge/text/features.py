"""Word / sentence starts and POS ids per token of one text, as the corpus build aligns them.

``corpus.build.encode_documents`` stores these side channels for pretraining; a model that reads
them (``ModelConfig.linguistic_inputs``) gets the same features for a task text at fine-tuning and
prediction time from ``token_features``: one rjieba ``tag`` call on the text, words aligned to
tokens through the tokens' start characters, the text's first token a word and sentence start
(``tests/test_arch.py`` checks equality with the shard builder on the same text).
"""

from __future__ import annotations

import numpy as np

from clueforge.text.normalize import sentence_starts
from clueforge.text.segment import POS_ID, Segmenter


def token_features(seg: Segmenter, text: str, tok_char) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(word_start, sent_start, pos)`` for the tokens of ``text`` starting at characters
    ``tok_char`` (ascending; a truncated prefix of the text's tokens is fine): (N,) bool, bool, uint8."""
    tok_char = np.asarray(tok_char, dtype=np.int64)
    n = tok_char.size
    tagged = seg.tag(text)
    ws, ts = zip(*tagged) if tagged else ((), ())
    lens = list(map(len, ws))
    if sum(lens) != len(text):  # as the corpus build: keep alignment safe, one word per character
        lens, ts = [1] * len(text), ["x"] * len(text)
    wlen = np.asarray(lens, dtype=np.int64)
    char_word_start = np.zeros(len(text) + 1, dtype=bool)
    char_word_start[np.cumsum(wlen) - wlen] = True
    char_pos = np.repeat(np.asarray([POS_ID.get(t, 0) for t in ts], dtype=np.uint8), wlen)
    word_start = char_word_start[tok_char] if n else np.zeros(0, dtype=bool)
    sent_start = np.zeros(n, dtype=bool)
    if n:
        sent_tok = np.searchsorted(tok_char, np.asarray(sentence_starts(text), dtype=np.int64))
        sent_start[sent_tok[sent_tok < n]] = True
        word_start[0] = sent_start[0] = True
    pos = char_pos[tok_char] if n else np.zeros(0, dtype=np.uint8)
    return word_start, sent_start, pos
