"""WordPiece tokenisation with HF ``tokenizers`` (Rust), id-for-id equal to ``BertTokenizerFast``.

The Chinese BERT recipe: clean text, put spaces around every CJK character, lowercase (which also
strips accents), split on whitespace and punctuation, then greedy longest-match WordPiece with
``##`` continuations. Special tokens are looked up by name, never by a hard-coded id, so a vocab
built by ``clueforge vocab build`` (specials at 0..4) and the 21,128-entry Chinese BERT vocab
(specials at 0, 100..103) both work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def resolve_vocab(path: str | Path) -> Path:
    """``path`` is a vocab.txt or a directory holding one (a HF checkpoint directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no WordPiece vocabulary at {path}")
    return path


def load_tokenizer(vocab: str | Path, *, lowercase: bool = True) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` for a BERT WordPiece vocab.txt (or a directory holding one)."""
    path = resolve_vocab(vocab)
    wp = BertWordPieceTokenizer(
        str(path), lowercase=lowercase, handle_chinese_chars=True, strip_accents=None, clean_text=True
    )
    tok = wp._tokenizer  # the plain Tokenizer: picklable and free of the wrapper's extras
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks special tokens {missing}")
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {name.strip("[]").lower(): tok.token_to_id(name) for name in SPECIAL_TOKENS}


def save_tokenizer_files(vocab: str | Path, out_dir: str | Path, *, lowercase: bool = True, max_length: int = 512) -> None:
    """Write vocab.txt and the tokenizer configs so ``AutoTokenizer.from_pretrained(out_dir)`` works."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = resolve_vocab(vocab)
    if src.resolve() != (out_dir / "vocab.txt").resolve():
        shutil.copyfile(src, out_dir / "vocab.txt")
    cfg = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": max_length,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    specials = {k: v for k, v in cfg.items() if k.endswith("_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
