"""Text normalisation and sentence splitting for Chinese corpora.

- Full-width ASCII (U+FF01..U+FF5E: letters, digits, symbols) becomes half-width and the
  ideographic space a space, except the full-width marks that are standard Chinese punctuation
  (！（），：；？), which are kept like 。、《》“”: CLUE task texts use them, and the BERT vocabulary
  has them.
- Control and format characters are dropped (tab and newline become spaces first: the newline
  only matters to sentence splitting, which runs before they are turned into spaces).
- Runs of whitespace collapse to one space; the text is stripped.
- Optional traditional → simplified conversion with OpenCC (extra ``clueforge[opencc]``).
"""

from __future__ import annotations

import re
from functools import lru_cache

_CHINESE_PUNCT = "！（），：；？"
_FULL_TO_HALF = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F) if chr(cp) not in _CHINESE_PUNCT}
_FULL_TO_HALF[0x3000] = 0x20
# Drop C0/C1 controls (except whitespace, handled below), zero-width and bidi marks, BOM.
_DROP = "".join(
    chr(c) for c in list(range(0x00, 0x09)) + [0x0B, 0x0C] + list(range(0x0E, 0x20)) + list(range(0x7F, 0xA0))
) + "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\ufeff\ufffd"
_TRANSLATE = {**_FULL_TO_HALF, **{ord(c): None for c in _DROP}}
_SPACES = re.compile(r"[\s\u2028\u2029\u00a0]+")


@lru_cache(maxsize=1)
def _t2s():
    try:
        import opencc
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise RuntimeError("traditional→simplified needs OpenCC: pip install 'clueforge[opencc]'") from exc
    return opencc.OpenCC("t2s")


def normalize(text: str, *, t2s: bool = False, keep_newlines: bool = False) -> str:
    """Return ``text`` normalised; with ``keep_newlines`` line breaks survive (one per run)."""
    text = text.translate(_TRANSLATE)
    if t2s:
        text = _t2s().convert(text)
    if keep_newlines:
        lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        return "\n".join(line for line in lines if line)
    return _SPACES.sub(" ", text).strip()


# A sentence ends after 。！？；…, or after !?; or a '.' followed by space/end (not '3.14'),
# including any closing quotes/brackets that follow; a newline always ends a sentence.
_SENT_END = re.compile(r"(?:[。！？；…]+|[!?;]+|\.(?=\s|$))[”’」』）)\]\"']*\s*|\n+")


def sentence_starts(text: str) -> list[int]:
    """Character offsets where sentences begin (always 0 first for non-empty text)."""
    starts = [0] if text else []
    n = len(text)
    for m in _SENT_END.finditer(text):
        if m.end() < n:
            starts.append(m.end())
    return starts


def split_sentences(text: str) -> list[str]:
    """Split normalised text into sentences (stripped; empty pieces dropped)."""
    bounds = sentence_starts(text) + [len(text)]
    pieces = (text[a:b].strip() for a, b in zip(bounds, bounds[1:]))
    return [p for p in pieces if p]


_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def is_probably_binary(text: str, threshold: float = 0.1) -> bool:
    """True when a decoded line looks like binary data: a NUL, or over ``threshold`` of the first
    4 KiB being control characters, surrogates or non-characters."""
    if "\x00" in text:
        return True
    sample = text[:4096]
    return bool(sample) and len(_BINARY.findall(sample)) / len(sample) > threshold
