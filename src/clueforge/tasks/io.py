"""Reading task files in their official formats, with errors that name file, line and problem."""

from __future__ import annotations

import json
from pathlib import Path


class TaskDataError(ValueError):
    """Bad task input: the message names the file, the line (or record) and the problem."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-empty line. Splits on "\\n" only (FewCLUE IFLYTEK
    has U+2028 inside strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise TaskDataError(f"{path}:{lineno}: expected a JSON object")
            out.append((lineno, obj))
    return out


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def field(obj: dict, name: str, path, lineno, types=(str,)):
    if name not in obj:
        raise TaskDataError(f"{path}:{lineno}: missing field {name!r}")
    v = obj[name]
    if types and not isinstance(v, types):
        raise TaskDataError(f"{path}:{lineno}: field {name!r} has type {type(v).__name__}, expected {types[0].__name__}")
    return v


def pad_features(features: list[dict], pad_id: int, keys=("input_ids", "token_type_ids")):
    """``(input_ids, token_type_ids, attention_mask)`` as (B, T) int64 tensors, right-padded."""
    import numpy as np
    import torch

    T = max(len(f["input_ids"]) for f in features)
    ids = np.full((len(features), T), pad_id, dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, f in enumerate(features):
        n = len(f[keys[0]])
        ids[i, :n], mask[i, :n] = f[keys[0]], 1
        if keys[1] in f:
            types[i, :n] = f[keys[1]]
    return torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask)


def text_ling(seg, text: str, tok_char) -> "np.ndarray":
    """The packed linguistic channel (``model.bert.pack_ling``) of the tokens of ``text`` that start
    at characters ``tok_char`` (ascending; a truncated prefix is fine): the word / sentence starts
    and POS ids ``text.features.token_features`` finds, as the corpus build does. (N,) int64."""
    import numpy as np

    from clueforge.model.bert import pack_ling
    from clueforge.text.features import token_features

    ws, ss, pos = token_features(seg, text, np.asarray(tok_char, dtype=np.int64))
    return pack_ling(pos.astype(np.int64), ws.astype(np.int64), ss.astype(np.int64), 1)


def encoding_ling(seg, enc, texts: tuple[str, ...]) -> list[int]:
    """The packed linguistic channel (``model.bert.pack_ling``) of one ``tokenizers`` encoding of
    ``texts`` (one text, or a pair): each sequence's tokens get the word / sentence starts and POS
    ids that ``text.features.token_features`` finds in its text, as the corpus build does;
    [CLS] / [SEP] / padding get 0. ``seg``: a ``text.segment.Segmenter``."""
    import numpy as np

    seq = np.asarray([-1 if s is None else s for s in enc.sequence_ids], dtype=np.int64)
    starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
    out = np.zeros(seq.size, dtype=np.int64)
    for s, text in enumerate(texts):
        idx = np.flatnonzero(seq == s)
        if idx.size:
            out[idx] = text_ling(seg, text, starts[idx])
    return out.tolist()


def pad_ling(features: list[dict]):
    """``ling`` of every feature as a (B, T) int64 tensor, right-padded with 0."""
    import numpy as np
    import torch

    T = max(len(f["input_ids"]) for f in features)
    out = np.zeros((len(features), T), dtype=np.int64)
    for i, f in enumerate(features):
        out[i, :len(f["ling"])] = f["ling"]
    return torch.from_numpy(out)
