"""Multiple choice: C3 (reading comprehension) and CHID (idiom cloze) in both formats.

Every (context, choice) pair is one row of a ``(B, K, T)`` batch scored by the ``choice`` head
(``BertForMultipleChoice``); missing choices are padded and masked out of the softmax.

- C3: a JSON array of ``[sentences, [{question, choice, answer[, id]}...], doc_id]``; a row is
  ``[CLS] passage [SEP] question + choice [SEP]`` with the passage truncated first.
- CHID, FewCLUE format: JSON lines ``{id, candidates, content with "#idiom#", answer}``.
- CHID, CLUE format: JSON lines ``{candidates, content: [paragraphs with "#idiom000123#"]}`` plus
  a ``<split>_answer.json`` object ``{"#idiom000123#": index}``; each blank is one example, other
  blanks of the paragraph become [MASK]. A row is the text window around the blank with the
  candidate written in.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clueforge.tasks.io import TaskDataError, encoding_ling, field, read_json, read_jsonl
from clueforge.tasks.metrics import accuracy
from clueforge.tasks.registry import Task
from clueforge.text.normalize import normalize

HEAD = "choice"
LINGUISTIC = True  # ``encode`` adds the ``ling`` channel when ``state["segmenter"]`` is set
_TAG = re.compile(r"#idiom\d+#")


def _load_c3(path: Path, with_labels: bool) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON array of [sentences, questions, id]")
    out = []
    n = 0
    for d, doc in enumerate(data):
        if not (isinstance(doc, list) and len(doc) >= 2 and isinstance(doc[0], list) and isinstance(doc[1], list)):
            raise TaskDataError(f"{path}: record {d}: expected [sentences, questions, id]")
        passage = normalize("".join(doc[0]))
        for q_i, q in enumerate(doc[1]):
            where = f"record {d} question {q_i}"
            choices = q.get("choice")
            if not isinstance(choices, list) or not choices or "question" not in q:
                raise TaskDataError(f"{path}: {where}: missing 'question' or 'choice'")
            label = None
            if with_labels:
                if "answer" not in q:
                    raise TaskDataError(f"{path}: {where}: missing field 'answer'")
                if q["answer"] not in choices:
                    raise TaskDataError(f"{path}: {where}: answer {q['answer']!r} is not one of its choices")
                label = choices.index(q["answer"])
            out.append({"id": q.get("id", n), "context": passage, "question": normalize(q["question"]),
                        "choices": [normalize(c) for c in choices], "label": label})
            n += 1
    return out


def _window(text: str, pos: int, width: int) -> tuple[str, int]:
    """Characters around ``pos`` (at most ``width``): the text and the blank's new position."""
    start = max(0, min(pos - width // 2, len(text) - width))
    return text[start:start + width], pos - start


def _load_chid_few(path: Path, with_labels: bool, task: Task) -> list[dict]:
    out = []
    for lineno, obj in read_jsonl(path):
        content = field(obj, "content", path, lineno)
        cands = field(obj, "candidates", path, lineno, (list,))
        if "#idiom#" not in content:
            raise TaskDataError(f"{path}:{lineno}: content has no #idiom# blank")
        label = None
        if with_labels:
            label = field(obj, task.label_field, path, lineno, (int,))
            if not 0 <= label < len(cands):
                raise TaskDataError(f"{path}:{lineno}: answer {label} out of range for {len(cands)} candidates")
        out.append({"id": field(obj, "id", path, lineno, (int, str)), "content": normalize(content),
                    "choices": cands, "label": label})
    return out


def _load_chid_clue(path: Path, with_labels: bool) -> list[dict]:
    answers = {}
    if with_labels:
        ans_path = path.with_name(path.stem + "_answer.json")
        answers = read_json(ans_path)
    out = []
    for lineno, obj in read_jsonl(path):
        cands = field(obj, "candidates", path, lineno, (list,))
        for para in field(obj, "content", path, lineno, (list,)):
            for m in _TAG.finditer(para):
                tag = m.group()
                label = None
                if with_labels:
                    if tag not in answers:
                        raise TaskDataError(f"{path}:{lineno}: blank {tag} has no answer in {path.stem}_answer.json")
                    label = int(answers[tag])
                text = _TAG.sub(lambda x: "#idiom#" if x.group() == tag else "[MASK]" * 4, para)
                out.append({"id": tag, "content": normalize(text), "choices": cands, "label": label})
    return out


def load(task: Task, path: Path, state: dict, with_labels: bool) -> list[dict]:
    if task.fmt == "c3":
        return _load_c3(path, with_labels)
    if task.fmt == "chid_few":
        return _load_chid_few(path, with_labels, task)
    return _load_chid_clue(path, with_labels)


def encode(task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False) -> list[dict]:
    seg = state.get("segmenter")  # a model with linguistic inputs (``finetune.loop.linguistic_state``)
    feats = []
    if task.fmt == "c3":
        tok.enable_truncation(max_length, strategy="only_first")
        for i, e in enumerate(examples):
            pairs = [(e["context"], e["question"] + c) for c in e["choices"]]
            encs = tok.encode_batch(pairs)
            feats.append({"rows": [(x.ids, x.type_ids) for x in encs], "example": i,
                          "label": e["label"] if e["label"] is not None else -100})
            if seg is not None:
                feats[-1]["ling"] = [encoding_ling(seg, x, p) for x, p in zip(encs, pairs)]
        tok.no_truncation()
        return feats
    width = max_length - 2 - 4  # [CLS] [SEP] and the idiom's 4 characters
    for i, e in enumerate(examples):
        text, pos = _window(e["content"].replace("#idiom#", "\x00"), e["content"].index("#idiom#"), width)
        texts = [text.replace("\x00", c) for c in e["choices"]]
        encs = tok.encode_batch(texts)
        rows = [(_cut(x.ids, max_length), x.type_ids[:max_length]) for x in encs]
        feats.append({"rows": rows, "example": i, "label": e["label"] if e["label"] is not None else -100})
        if seg is not None:
            feats[-1]["ling"] = [_cut(encoding_ling(seg, x, (t,)), max_length) for x, t in zip(encs, texts)]
    return feats


def _cut(row: list, max_length: int) -> list:
    """A row of at most ``max_length`` tokens that keeps its last ([SEP])."""
    return row[:max_length - 1] + row[-1:] if len(row) > max_length else row


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    K = max(len(f["rows"]) for f in features)
    T = max(len(ids) for f in features for ids, _ in f["rows"])
    ids = np.full((len(features), K, T), pad_id, dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    valid = np.zeros((len(features), K), dtype=bool)
    for b, f in enumerate(features):
        for k, (row, tt) in enumerate(f["rows"]):
            ids[b, k, :len(row)], types[b, k, :len(row)], mask[b, k, :len(row)] = row, tt, 1
            valid[b, k] = True
    mask[~valid, 0] = 1  # a padded choice still attends to one token (no empty softmax)
    batch = {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
             "attention_mask": torch.from_numpy(mask), "choice_mask": torch.from_numpy(valid),
             "labels": torch.tensor([f["label"] for f in features])}
    if "ling" in features[0]:  # (B, K, T), 0 on padding and padded choices
        ling = np.zeros_like(ids)
        for b, f in enumerate(features):
            for k, row in enumerate(f["ling"]):
                ling[b, k, :len(row)] = row
        batch["ling"] = torch.from_numpy(ling)
    return batch


def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    logits = logits.float().masked_fill(~batch["choice_mask"], -1e4)
    return F.cross_entropy(logits, batch["labels"], ignore_index=-100)


def decode(task: Task, logits: list[np.ndarray], features: list[dict], examples: list[dict], state: dict):
    rows = [row for block in logits for row in block]  # batches may differ in their number of choices
    return [int(np.argmax(row[: len(e["choices"])])) for row, e in zip(rows, examples)]


def score(task: Task, preds: list, examples: list[dict]) -> dict[str, float]:
    return {"accuracy": 100 * accuracy(preds, [e["label"] for e in examples])}


def submission(task: Task, examples: list[dict], preds: list, state: dict):
    if task.fmt == "chid_clue":
        return {e["id"]: int(p) for e, p in zip(examples, preds)}
    key = task.label_field
    return [{"id": e["id"], key: int(p)} for e, p in zip(examples, preds)]


def check_prediction(task: Task, row, example: dict, state: dict) -> str | None:
    """Why a submission row (CHID's CLUE format: the bare answer) cannot be scored, or ``None``."""
    if task.fmt == "chid_clue":
        value, key = row, "answer"
    elif task.label_field not in row:
        return f"no {task.label_field!r}"
    else:
        value, key = row[task.label_field], task.label_field
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(example["choices"])):
        return f"{key} {value!r} is not a candidate index (0..{len(example['choices']) - 1})"
    return None
