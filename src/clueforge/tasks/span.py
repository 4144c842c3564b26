"""Span extraction (CMRC2018, DRCD): SQuAD-format files, sliding windows, n-best decoding.

Each (question, context) is cut into windows of ``max_length`` tokens overlapping by ``stride``
(``doc_stride`` 128); a window that does not contain the answer is labelled at [CLS]. Decoding
takes the ``n_best`` start and end positions of every window, keeps spans inside the context with
``end ≥ start`` and at most ``max_answer_tokens``, and answers the best-scoring span's original
characters. Scored by the official CMRC2018 EM/F1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clueforge.tasks.io import TaskDataError, pad_features, pad_ling, read_json, text_ling
from clueforge.tasks.metrics import cmrc_scores
from clueforge.tasks.registry import Task

log = logging.getLogger("clueforge.tasks")
HEAD = "span"
LINGUISTIC = True  # ``encode`` adds the ``ling`` channel when ``state["segmenter"]`` is set
STRIDE, N_BEST, MAX_ANSWER_TOKENS = 128, 20, 64


def load(task: Task, path: Path, state: dict, with_labels: bool) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(f"{path}: expected SQuAD format {{'data': [...]}}")
    out = []
    fixed = missing = 0
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            ctx = para.get("context")
            if not isinstance(ctx, str):
                raise TaskDataError(f"{path}: data[{a}].paragraphs[{p}]: missing 'context'")
            for q_i, qa in enumerate(para.get("qas", [])):
                where = f"data[{a}].paragraphs[{p}].qas[{q_i}]"
                if "id" not in qa or "question" not in qa:
                    raise TaskDataError(f"{path}: {where}: missing 'id' or 'question'")
                answers = qa.get("answers") or []
                start = None
                if with_labels:
                    if not answers or not isinstance(answers[0].get("text"), str):
                        raise TaskDataError(f"{path}: {where} ({qa['id']}): no answers")
                    text, given = answers[0]["text"], answers[0].get("answer_start")
                    start = _locate(ctx, text, given if isinstance(given, int) else 0)
                    if start is None:
                        missing += 1
                    elif start != given:
                        fixed += 1
                out.append({"id": qa["id"], "context": ctx, "question": qa["question"],
                            "answers": [x["text"] for x in answers], "start": start})
    if fixed or missing:
        log.warning("%s: %d answer_start values realigned to the answer text, %d answers not found in their "
                    "context (not trained on, still scored)", path, fixed, missing)
    return out


def _locate(ctx: str, text: str, given: int) -> int | None:
    """``given`` if the answer is there, else the occurrence of ``text`` nearest to it."""
    if text and ctx[given:given + len(text)] == text:
        return given
    hits, k = [], ctx.find(text) if text else -1
    while k >= 0:
        hits.append(k)
        k = ctx.find(text, k + 1)
    return min(hits, key=lambda h: abs(h - given)) if hits else None


def encode(task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False) -> list[dict]:
    tok.enable_truncation(max_length, stride=min(STRIDE, max_length // 4), strategy="only_second")
    seg = state.get("segmenter")  # a model with linguistic inputs (``finetune.loop.linguistic_state``)
    feats = []
    for i, e in enumerate(examples):
        enc = tok.encode(e["question"], e["context"])
        windows = [enc] + list(enc.overflowing)
        lings = _window_ling(seg, e, windows) if seg is not None else None
        for k, w in enumerate(windows):
            seq = w.sequence_ids
            ctx_tok = [t for t, s in enumerate(seq) if s == 1]
            start = end = 0
            if e["start"] is not None:  # a window without the answer points at [CLS]
                a0, a1 = e["start"], e["start"] + len(e["answers"][0])
                inside = [t for t in ctx_tok if w.offsets[t][0] < a1 and w.offsets[t][1] > a0]
                if inside and w.offsets[ctx_tok[0]][0] <= a0 and w.offsets[ctx_tok[-1]][1] >= a1:
                    start, end = inside[0], inside[-1]
            feats.append({"input_ids": w.ids, "token_type_ids": w.type_ids, "example": i,
                          "offsets": [w.offsets[t] if seq[t] == 1 else None for t in range(len(w.ids))],
                          "start": start if e["start"] is not None else -100,
                          "end": end if e["start"] is not None else -100})
            if lings is not None:
                feats[-1]["ling"] = lings[k]
    # training never sees examples whose answer is not in the context (their labels are -100)
    tok.no_truncation()
    return feats


def _window_ling(seg, e: dict, windows: list) -> list[list[int]]:
    """The ``ling`` channel of every window of one example. The question (never truncated) is one
    text; the context's features are those of the whole context (a window starting mid-context is
    a slice of them, as a pretraining sequence is a slice of its document's shard channels)."""
    q = {off[0] for w in windows for off, s in zip(w.offsets, w.sequence_ids) if s == 0}
    c = {off[0] for w in windows for off, s in zip(w.offsets, w.sequence_ids) if s == 1}
    q_start, c_start = sorted(q), sorted(c)
    q_ling = dict(zip(q_start, text_ling(seg, e["question"], q_start).tolist())) if q_start else {}
    c_ling = dict(zip(c_start, text_ling(seg, e["context"], c_start).tolist())) if c_start else {}
    return [[0 if s is None else (q_ling if s == 0 else c_ling)[off[0]] for off, s in zip(w.offsets, w.sequence_ids)]
            for w in windows]


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, types, mask = pad_features(features, pad_id)
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
             "start": torch.tensor([f["start"] for f in features]), "end": torch.tensor([f["end"] for f in features])}
    if "ling" in features[0]:
        batch["ling"] = pad_ling(features)
    return batch


def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    mask = batch["attention_mask"].bool()
    lg = logits.float().masked_fill(~mask[..., None], -1e4)
    return 0.5 * (F.cross_entropy(lg[..., 0], batch["start"], ignore_index=-100)
                  + F.cross_entropy(lg[..., 1], batch["end"], ignore_index=-100))


def kl_mask(batch: dict) -> None:
    return None


def decode(task: Task, logits: list[np.ndarray], features: list[dict], examples: list[dict], state: dict):
    best: dict[int, tuple[float, str]] = {}
    rows = [row for block in logits for row in block]
    for row, f in zip(rows, features):
        offs = f["offsets"]
        n = len(offs)
        s_log, e_log = row[:n, 0], row[:n, 1]
        starts = np.argsort(-s_log)[:N_BEST]
        ends = np.argsort(-e_log)[:N_BEST]
        ctx = examples[f["example"]]["context"]
        for s in starts:
            if offs[s] is None:
                continue
            for e in ends:
                if offs[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                    continue
                sc = float(s_log[s] + e_log[e])
                if sc > best.get(f["example"], (-np.inf, ""))[0]:
                    best[f["example"]] = (sc, ctx[offs[s][0]:offs[e][1]])
    return [best.get(i, (0.0, ""))[1] for i in range(len(examples))]


def score(task: Task, preds: list, examples: list[dict]) -> dict[str, float]:
    return cmrc_scores(preds, [e["answers"] for e in examples])


def submission(task: Task, examples: list[dict], preds: list, state: dict) -> dict:
    return {e["id"]: p for e, p in zip(examples, preds)}


def check_prediction(task: Task, value, example: dict, state: dict) -> str | None:
    return None if isinstance(value, str) else f"answer {value!r} is not a string"
