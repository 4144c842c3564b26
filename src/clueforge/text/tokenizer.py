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


class FastChineseEncoder:
    """Batch encoder that gives exactly ``tok.encode_batch`` ids and start offsets, faster.

    Chinese characters and punctuation are always tokens of their own in BERT's scheme
    (``handle_chinese_chars`` puts spaces around CJK ideographs; punctuation splits words), so
    their ids come from a code-point table, vectorised over a whole chunk of documents. Only the
    maximal runs of other characters (Latin words, digits, symbols, spaces) go through the
    tokenizer. The table is not hand-written: a character is in it only if the tokenizer itself
    encodes it as one token, also between letters on both sides (``"a" + c + "a"``).
    """

    _CANDIDATES = [(0x3000, 0x303F), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF),
                   (0x2000, 0x206F), (0x0021, 0x002F), (0x003A, 0x0040), (0x005B, 0x0060), (0x007B, 0x007E),
                   (0x00A1, 0x00BF), (0x2E80, 0x2FDF), (0x20000, 0x2A6DF)]

    def __init__(self, tok: Tokenizer):
        import numpy as np

        self.tok = tok
        cands = [chr(c) for a, b in self._CANDIDATES for c in range(a, b + 1)]
        single = tok.encode_batch(cands, add_special_tokens=False)
        framed = tok.encode_batch([f"a{c}a" for c in cands], add_special_tokens=False)
        a_id = tok.encode("a", add_special_tokens=False).ids
        table = np.full(0x110000, -1, dtype=np.int64)
        for c, s, f in zip(cands, single, framed):
            if len(s.ids) == 1 and s.offsets[0] == (0, 1) and f.ids == a_id + s.ids + a_id:
                table[ord(c)] = s.ids[0]
        self.table = table

    def encode(self, texts: list[str]):
        """``(ids, starts, ntok)``: token ids (N,), their start character offsets relative to the
        concatenation of ``texts`` (N,), and tokens per text."""
        import numpy as np

        from itertools import chain

        doc_len = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        bounds = np.concatenate([[0], np.cumsum(doc_len)])
        joined = "".join(texts)
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        tid = self.table[cps]
        other = tid < 0
        n = cps.size
        # runs of other characters, never crossing a document boundary
        edge = np.zeros(n + 1, dtype=bool)
        edge[bounds[:-1][doc_len > 0]] = True
        prev_other = np.concatenate([[False], other[:-1]])
        run_start = np.flatnonzero(other & (~prev_other | edge[:-1]))
        next_other = np.concatenate([other[1:], [False]])
        run_end = np.flatnonzero(other & (~next_other | edge[1:])) + 1
        pieces = [joined[a:b] for a, b in zip(run_start.tolist(), run_end.tolist())]
        encs = self.tok.encode_batch(pieces, add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        total = int(counts.sum())
        run_ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int64, count=total)
        run_offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), dtype=np.int64,
                               count=2 * total)
        run_pos = run_offs[0::2] + np.repeat(run_start, counts)
        single_pos = np.flatnonzero(~other)
        pos = np.concatenate([single_pos, run_pos])
        ids = np.concatenate([tid[single_pos], run_ids])
        order = np.argsort(pos, kind="stable")
        pos, ids = pos[order], ids[order]
        ntok = np.diff(np.searchsorted(pos, bounds))
        return ids, pos, ntok
