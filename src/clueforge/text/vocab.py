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
from clueforge.utils import UserError, atomic_write


def build_vocab(texts: Iterable[str], out: str | Path, *, vocab_size: int = 21128, min_frequency: int = 2) -> int:
    """Train and write ``out`` (a vocab.txt). Returns the vocabulary size."""
    if vocab_size > 65535:
        raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 shard format")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: give a file name such as {out / 'vocab.txt'}")
    counted = _Counted(texts)
    wp = BertWordPieceTokenizer(lowercase=True, handle_chinese_chars=True, strip_accents=None, clean_text=True)
    wp.train_from_iterator(
        counted,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=20000,
        wordpieces_prefix="##",
        show_progress=False,
    )
    vocab = wp.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if counted.n == 0 or len(tokens) <= len(SPECIAL_TOKENS):
        raise UserError(f"no usable text in the input ({counted.n} documents): a vocabulary of only the "
                        f"{len(SPECIAL_TOKENS)} special tokens would be useless; check the files, --text-field "
                        f"and --doc-sep")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(t + "\n" for t in tokens))
    return len(tokens)


class _Counted:
    """Iterates ``texts`` once, counting the non-empty ones."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.n = texts, 0

    def __iter__(self):
        for t in self.texts:
            if t and t.strip():
                self.n += 1
            yield t
