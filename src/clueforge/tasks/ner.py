"""Token classification (NER): MSRA (``char<TAB>tag`` lines, blank line between sentences) and
CLUENER (JSON lines ``{text, label: {type: {entity: [[start, end], ...]}}}``), BIO tags.

Characters are fed to the tokenizer as pre-split words, so every character keeps its own label;
the first sub-token of a character carries it (a character without tokens, e.g. a space, is
predicted ``O``). MSRA is scored by entity-level micro precision, recall and F1 over spans.
CLUENER is scored the official way (``score.py``): per type, F1 over the entity strings of each
line, macro-averaged over the 10 types (``macro_f1``, the headline); the span-level micro F1
(``span_f1``) is reported beside it. Both take the gold from the label dicts as given (nested or
overlapping gold entities included), not from the BIO tags built for training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clueforge.tasks.io import TaskDataError, field, pad_features, pad_ling, read_jsonl, text_ling
from clueforge.tasks.metrics import CLUENER_TYPES, bio_spans, cluener_scores, entity_prf, span_prf
from clueforge.tasks.registry import Task

HEAD = "token"
LINGUISTIC = True  # ``encode`` adds the ``ling`` channel when ``state["segmenter"]`` is set


def prepare(task: Task, data_dir: Path, cfg=None) -> dict:
    return {"labels": list(task.labels)}


def state_to_json(state: dict) -> dict:
    return {"labels": state["labels"]}


def state_from_json(meta: dict, model_dir: Path) -> dict:
    return {"labels": meta["labels"]}


def _load_bio(path: Path, labels: set[str], with_labels: bool) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    out, chars, tags, start = [], [], [], 1
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(list(fh) + ["\n"], 1):
            line = line.rstrip("\n")
            if not line.strip():
                if chars:
                    out.append({"id": len(out), "chars": chars, "tags": tags if with_labels else None, "line": start})
                chars, tags = [], []
                continue
            if not chars:
                start = lineno
            parts = line.split("\t") if "\t" in line else line.split(" ")
            if with_labels:
                if len(parts) != 2:
                    raise TaskDataError(f"{path}:{lineno}: expected 'char<TAB>tag', got {line!r}")
                if parts[1] not in labels:
                    raise TaskDataError(f"{path}:{lineno}: unknown label {parts[1]!r}")
                tags.append(parts[1])
            chars.append(parts[0] or " ")
    return out


def _load_cluener(path: Path, labels: set[str], with_labels: bool) -> list[dict]:
    out = []
    for lineno, obj in read_jsonl(path):
        text = field(obj, "text", path, lineno)
        tags = gold = None
        if with_labels:
            tags = ["O"] * len(text)
            gold = field(obj, "label", path, lineno, (dict,))
            for kind, ents in field(obj, "label", path, lineno, (dict,)).items():
                if f"B-{kind}" not in labels:
                    raise TaskDataError(f"{path}:{lineno}: unknown entity type {kind!r}")
                for name, spans in ents.items():
                    for s, e in spans:
                        if text[s:e + 1] != name:
                            raise TaskDataError(f"{path}:{lineno}: entity {name!r} is not at [{s}, {e}]")
                        tags[s] = f"B-{kind}"
                        for k in range(s + 1, e + 1):
                            tags[k] = f"I-{kind}"
        out.append({"id": obj.get("id", len(out)), "chars": list(text), "tags": tags, "gold": gold, "line": lineno})
    return out


def load(task: Task, path: Path, state: dict, with_labels: bool) -> list[dict]:
    labels = set(state["labels"])
    return _load_bio(path, labels, with_labels) if task.fmt == "bio" else _load_cluener(path, labels, with_labels)


def encode(task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False) -> list[dict]:
    index = {t: i for i, t in enumerate(state["labels"])}
    tok.enable_truncation(max_length)
    encs = tok.encode_batch([e["chars"] for e in examples], is_pretokenized=True)
    tok.no_truncation()
    seg = state.get("segmenter")  # a model with linguistic inputs (``finetune.loop.linguistic_state``)
    feats = []
    for i, (e, enc) in enumerate(zip(examples, encs)):
        char_tok = [-1] * len(e["chars"])
        labels = [-100] * len(enc.ids)
        for t, w in enumerate(enc.word_ids):
            if w is not None and char_tok[w] < 0:
                char_tok[w] = t
                if e["tags"] is not None:
                    labels[t] = index[e["tags"][w]]
        feats.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "labels": labels,
                      "char_tok": char_tok, "example": i})
        if seg is not None:
            feats[-1]["ling"] = _ling(seg, e["chars"], enc)
    return feats


def _ling(seg, chars: list[str], enc) -> list[int]:
    """The ``ling`` channel of a pre-split encoding: the characters joined are the text, and a
    token starts at its character's position plus its offset inside the character."""
    first = np.cumsum([0] + [len(c) for c in chars])  # where each pre-split character starts in the text
    idx = [t for t, w in enumerate(enc.word_ids) if w is not None]
    out = np.zeros(len(enc.ids), dtype=np.int64)
    if idx:
        starts = [int(first[enc.word_ids[t]]) + enc.offsets[t][0] for t in idx]
        out[idx] = text_ling(seg, "".join(chars), starts)
    return out.tolist()


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, types, mask = pad_features(features, pad_id)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
    if "ling" in features[0]:
        batch["ling"] = pad_ling(features)
    return batch


def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def kl_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


def decode(task: Task, logits: list[np.ndarray], features: list[dict], examples: list[dict], state: dict):
    rows = [row for block in logits for row in block]
    preds = []
    for row, f in zip(rows, features):
        best = row.argmax(-1)
        preds.append([state["labels"][int(best[t])] if t >= 0 else "O" for t in f["char_tok"]])
    return preds


def score(task: Task, preds: list, examples: list[dict]) -> dict[str, float]:
    if task.fmt != "cluener":
        return entity_prf(preds, [e["tags"] for e in examples])
    pred_dicts = [label_dict(e["chars"], tags) for e, tags in zip(examples, preds)]
    gold_spans = [{(k, s, end) for k, ents in e["gold"].items() for spans in ents.values() for s, end in spans}
                  for e in examples]
    span = span_prf([bio_spans(p) for p in preds], gold_spans)
    return {**cluener_scores(pred_dicts, [e["gold"] for e in examples], CLUENER_TYPES),
            "span_f1": span["f1"], "span_precision": span["precision"], "span_recall": span["recall"]}


def label_dict(chars: list[str], tags: list[str]) -> dict[str, dict[str, list]]:
    """CLUENER's ``{type: {entity: [[start, end], ...]}}`` of a BIO tag sequence."""
    label: dict[str, dict[str, list]] = {}
    for kind, s, end in sorted(bio_spans(tags), key=lambda x: x[1]):
        label.setdefault(kind, {}).setdefault("".join(chars[s:end + 1]), []).append([s, end])
    return label


def submission(task: Task, examples: list[dict], preds: list, state: dict) -> list[dict]:
    return [{"id": e["id"], "label": label_dict(e["chars"], tags)} for e, tags in zip(examples, preds)]


def check_prediction(task: Task, row: dict, example: dict, state: dict) -> str | None:
    if "label" not in row:
        return "no 'label'"
    if not isinstance(row["label"], dict) or not all(isinstance(v, dict) for v in row["label"].values()):
        return "label must be {type: {entity: [[start, end]]}}"
    return None
