"""Single-sentence and sentence-pair classification; CSL (keywords, abstract); CLUEWSC coreference.

CLUEWSC is classified with its two spans marked in the text, as the CLUE baseline does: the
candidate antecedent wrapped in ``_…_`` and the pronoun in ``[…]``, inserted at the given
character indices (checked against the given span texts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clueforge.tasks.io import TaskDataError, encoding_ling, field, pad_features, pad_ling, read_jsonl
from clueforge.tasks.metrics import accuracy
from clueforge.tasks.registry import Task, resolve_file
from clueforge.text.normalize import normalize

HEAD = "sequence"
LINGUISTIC = True  # ``encode`` adds the ``ling`` channel when ``state["segmenter"]`` is set


def _label(obj: dict, task: Task, path, lineno, labels: list[str] | None, required: bool):
    if task.label_field not in obj:
        if required:
            raise TaskDataError(f"{path}:{lineno}: missing field {task.label_field!r}")
        return None
    value = str(obj[task.label_field])
    if labels is not None and value not in labels and value != "-":
        raise TaskDataError(f"{path}:{lineno}: unknown label {value!r} (labels: {', '.join(labels[:20])}"
                            f"{'…' if len(labels) > 20 else ''})")
    return value


def mark_wsc(text: str, t: dict, path, lineno) -> str:
    spans = []
    for k, (left, right) in (("1", ("_", "_")), ("2", ("[", "]"))):
        start, span = t.get(f"span{k}_index"), t.get(f"span{k}_text")
        if not isinstance(start, int) or not isinstance(span, str):
            raise TaskDataError(f"{path}:{lineno}: target lacks span{k}_index/span{k}_text")
        if text[start:start + len(span)] != span:
            raise TaskDataError(f"{path}:{lineno}: span{k}_text {span!r} is not at index {start} of the text")
        spans.append((start, start + len(span), left, right))
    out = text
    for start, end, left, right in sorted(spans, reverse=True):
        out = out[:start] + left + out[start:end] + right + out[end:]
    return out


def prepare(task: Task, data_dir: Path, cfg=None) -> dict:
    """The label list (fixed, ``labels_all.txt``, or train ∪ dev) and label descriptions."""
    state = {"labels": label_set(task, data_dir), "descs": {}}
    desc = task.extra.get("desc_field")
    train = resolve_file(task, data_dir / task.files["train"])
    if desc and train.is_file():
        for _, o in read_jsonl(train):
            if desc in o and task.label_field in o:
                state["descs"][str(o[task.label_field])] = o[desc]
    return state


def state_to_json(state: dict) -> dict:
    return {"labels": state["labels"], "descs": state["descs"]}


def state_from_json(meta: dict, model_dir: Path) -> dict:
    return {"labels": meta["labels"], "descs": meta.get("descs", {})}


def load(task: Task, path: Path, state: dict, with_labels: bool) -> list[dict]:
    labels = state["labels"]
    examples = []
    path = resolve_file(task, path)
    for lineno, obj in read_jsonl(path):
        ex_id = obj.get(task.id_field, obj.get("id", obj.get("idx")))
        if ex_id is None:  # CLUE train/dev files of some tasks carry no ids; test files must
            if not with_labels:
                raise TaskDataError(f"{path}:{lineno}: missing field {task.id_field!r}")
            ex_id = lineno - 1
        spans = None
        if task.fmt == "wsc":
            target = field(obj, "target", path, lineno, (dict,))
            text = mark_wsc(field(obj, "text", path, lineno), target, path, lineno)
            a, b = text, None
            spans = (obj["text"], target["span1_text"], target["span2_text"])  # for prompts (clueforge.prompts)
        elif task.fmt == "csl":
            kw = field(obj, "keyword", path, lineno, (list,))
            a, b = "；".join(map(str, kw)), field(obj, "abst", path, lineno)
        elif task.fmt == "pair":
            a, b = field(obj, task.text_fields[0], path, lineno), field(obj, task.text_fields[1], path, lineno)
        else:
            a, b = field(obj, task.text_fields[0], path, lineno), None
        label = _label(obj, task, path, lineno, labels, with_labels)
        if with_labels and label == "-":  # OCNLI pairs without annotator majority
            continue
        ex = {"id": ex_id, "a": normalize(a), "b": normalize(b) if b is not None else None, "label": label,
              "line": lineno}
        if spans is not None:
            ex["text"], ex["span1"], ex["span2"] = (normalize(x) for x in spans)
        desc = task.extra.get("desc_field")
        if desc and desc in obj:
            ex["desc"] = obj[desc]
        examples.append(ex)
    return examples


def label_set(task: Task, data_dir: Path) -> list[str]:
    if task.labels is not None:
        return list(task.labels)
    listed = data_dir / "labels_all.txt"
    if listed.is_file():
        return [x.strip() for x in listed.read_text(encoding="utf-8").splitlines() if x.strip()]
    seen = set()
    for split in ("train", "dev"):
        f = resolve_file(task, data_dir / task.files[split])
        if f.is_file():
            seen.update(str(o[task.label_field]) for _, o in read_jsonl(f) if task.label_field in o)
    return sorted(seen)


def encode(task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False) -> list[dict]:
    tok.enable_truncation(max_length, strategy="longest_first")
    index = {lab: i for i, lab in enumerate(state["labels"])}
    out = []
    encs = tok.encode_batch([(e["a"], e["b"]) if e["b"] is not None else e["a"] for e in examples])
    seg = state.get("segmenter")  # a model with linguistic inputs (``finetune.loop.linguistic_state``)
    for i, (e, enc) in enumerate(zip(examples, encs)):
        out.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "example": i,
                    "label": index[e["label"]] if e.get("label") not in (None, "-") else -100})
        if seg is not None:
            out[-1]["ling"] = encoding_ling(seg, enc, (e["a"],) if e["b"] is None else (e["a"], e["b"]))
    tok.no_truncation()
    return out


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, types, mask = pad_features(features, pad_id)
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
             "labels": torch.tensor([f["label"] for f in features])}
    if "ling" in features[0]:
        batch["ling"] = pad_ling(features)
    return batch


def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return F.cross_entropy(logits.float(), batch["labels"], ignore_index=-100)


def decode(task: Task, logits: list[np.ndarray], features: list[dict], examples: list[dict], state: dict):
    pred = np.concatenate(logits).argmax(-1)
    return [state["labels"][int(p)] for p in pred]


def score(task: Task, preds: list, examples: list[dict]) -> dict[str, float]:
    return {"accuracy": 100 * accuracy(preds, [e["label"] for e in examples])}


def submission(task: Task, examples: list[dict], preds: list, state: dict) -> list[dict]:
    descs = state.get("descs") or {}
    rows = []
    for e, p in zip(examples, preds):
        row = {"id": e["id"], task.label_field: p}
        if p in descs:
            row[task.extra["desc_field"]] = descs[p]
        rows.append(row)
    return rows


def check_prediction(task: Task, row: dict, example: dict, state: dict) -> str | None:
    """Why a submission row cannot be scored, or ``None``."""
    if task.label_field not in row:
        return f"no {task.label_field!r}"
    labels = state.get("labels")
    if labels is not None and str(row[task.label_field]) not in labels:
        return f"label {row[task.label_field]!r} is not in the label set"
    return None
