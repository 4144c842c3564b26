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
