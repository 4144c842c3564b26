"""Train a WordPiece vocabulary from a corpus, Chinese characters kept whole.

``handle_chinese_chars`` makes every CJK character its own pre-token, so the vocabulary holds
single characters for Chinese and WordPiece sub-words for Latin script and digits, as in the
Chinese BERT vocabulary. No ``##中`` entries are needed: word boundaries live in the corpus side
channel, not in the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers.implementations import BertWordPieceTokenizer

from clueforge.text.tokenizer import SPECIAL_TOKENS


def build_vocab(texts: Iterable[str], out: str | Path, *, vocab_size: int = 21128, min_frequency: int = 2) -> int:
    """Train and write ``out`` (a vocab.txt). Returns the vocabulary size."""
    if vocab_size > 65535:
        raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 shard format")
    wp = BertWordPieceTokenizer(lowercase=True, handle_chinese_chars=True, strip_accents=None, clean_text=True)
    wp.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=20000,
        wordpieces_prefix="##",
        show_progress=False,
    )
    vocab = wp.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    tmp.replace(out)
    return len(tokens)
