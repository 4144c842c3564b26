"""KgCLUE: answer a question with a triple of a knowledge base.

The knowledge base is built from the task's training answers (``head ||| relation ||| tail``),
or read from a user triple file (``--set kb=FILE``, ``head<TAB>relation<TAB>tail``), and saved
with the fine-tuned checkpoint as ``kb.tsv``. A head's parenthesised disambiguation
(``守望星光（韩玉玲、刘东考演唱歌曲）``) is stripped for matching.

1. **Topic entity recall.** Every head name that occurs in the question (Aho-Corasick over all
   names, ``ahocorasick-rs``), longest first.
2. **Entity + relation ranking.** Each candidate ``(head, relation)`` of those entities becomes a
   sentence pair ``question [SEP] head：relation`` scored by the sequence head (2 classes); the
   gold pair is the positive, other candidates of the question the negatives.
3. **Answer.** The best candidate's triple; scored by EM and character F1 on the answer (tail).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from clueforge.knowledge.sources import entity_name, load_triples
from clueforge.tasks import classify
from clueforge.tasks.io import TaskDataError, field, read_jsonl
from clueforge.tasks.metrics import kgclue_scores
from clueforge.tasks.registry import Task

HEAD = "sequence"
collate, loss = classify.collate, classify.loss
MAX_CANDIDATES, TRAIN_NEGATIVES = 48, 7


def parse_answer(answer: str, where: str) -> tuple[str, str, str]:
    parts = [p.strip() for p in answer.split("|||")]
    if len(parts) != 3 or not all(parts):
        raise TaskDataError(f"{where}: answer {answer!r} is not 'head ||| relation ||| tail'")
    return parts[0], parts[1], parts[2]


class KnowledgeBase:
    def __init__(self, triples: list[tuple[str, str, str]]):
        import ahocorasick_rs

        self.triples = sorted(set(triples))
        self.by_name: dict[str, list[tuple[str, str, str]]] = {}
        for t in self.triples:
            self.by_name.setdefault(entity_name(t[0]), []).append(t)
        self.names = sorted(self.by_name)
        self._ac = ahocorasick_rs.AhoCorasick(self.names, matchkind=ahocorasick_rs.MATCHKIND_STANDARD)

    def candidates(self, question: str) -> list[tuple[str, str, str]]:
        found = {self.names[i] for i, _, _ in self._ac.find_matches_as_indexes(question, overlapping=True)}
        out: list[tuple[str, str, str]] = []
        for name in sorted(found, key=lambda n: (-len(n), n)):
            out.extend(self.by_name[name])
        return out[:MAX_CANDIDATES]

    def save(self, path: Path) -> None:
        path.write_text("".join("\t".join(t) + "\n" for t in self.triples), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "KnowledgeBase":
        try:
            return cls(load_triples(path))
        except ValueError as exc:
            raise TaskDataError(str(exc)) from None


def prepare(task: Task, data_dir: Path, cfg=None) -> dict:
    kb_file = getattr(cfg, "kb", None)
    if kb_file:
        return {"kb": KnowledgeBase.read(Path(kb_file))}
    triples = []
    for split in ("train", "dev"):
        path = data_dir / task.files[split]
        if path.is_file():
            for lineno, obj in read_jsonl(path):
                if task.label_field in obj:
                    triples.append(parse_answer(obj[task.label_field], f"{path}:{lineno}"))
    if not triples:
        raise TaskDataError(f"{data_dir}: no answers to build a knowledge base from (give a triple file)")
    return {"kb": KnowledgeBase(triples)}


def state_to_json(state: dict) -> dict:
    return {"kb_file": "kb.tsv", "kb_triples": len(state["kb"].triples)}


def save_state_files(state: dict, path: Path) -> None:
    state["kb"].save(path / "kb.tsv")


def state_from_json(meta: dict, model_dir: Path) -> dict:
    return {"kb": KnowledgeBase.read(Path(model_dir) / meta["kb_file"])}


def load(task: Task, path: Path, state: dict, with_labels: bool) -> list[dict]:
    out = []
    for lineno, obj in read_jsonl(path):
        gold = parse_answer(obj[task.label_field], f"{path}:{lineno}") if with_labels and task.label_field in obj else None
        if with_labels and gold is None:
            raise TaskDataError(f"{path}:{lineno}: missing field {task.label_field!r}")
        out.append({"id": field(obj, "id", path, lineno, (int, str)), "question": field(obj, "question", path, lineno),
                    "gold": gold, "line": lineno})
    return out


def encode(task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False) -> list[dict]:
    kb: KnowledgeBase = state["kb"]
    rng = random.Random(0)
    tok.enable_truncation(max_length, strategy="longest_first")
    feats = []
    for i, e in enumerate(examples):
        cands = kb.candidates(e["question"])
        if training:  # the gold pair (recalled or not) and a few recalled negatives
            negatives = [c for c in cands if c[:2] != e["gold"][:2]]
            cands = [e["gold"]] + rng.sample(negatives, min(TRAIN_NEGATIVES, len(negatives)))
        e["candidates"] = cands
        encs = tok.encode_batch([(e["question"], f"{entity_name(h)}：{r}") for h, r, _ in cands])
        for c, enc in zip(cands, encs):
            label = -100 if e["gold"] is None else int(c[:2] == e["gold"][:2])
            feats.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "example": i, "label": label})
    tok.no_truncation()
    return feats


def decode(task: Task, logits: list[np.ndarray], features: list[dict], examples: list[dict], state: dict):
    rows = [row for block in logits for row in block]
    best: dict[int, tuple[float, int]] = {}
    seen: dict[int, int] = {}
    for row, f in zip(rows, features):
        k = seen.get(f["example"], 0)
        seen[f["example"]] = k + 1
        margin = float(row[1] - row[0])
        if margin > best.get(f["example"], (-np.inf, -1))[0]:
            best[f["example"]] = (margin, k)
    out = []
    for i, e in enumerate(examples):
        k = best.get(i, (0.0, -1))[1]
        out.append(e["candidates"][k] if k >= 0 else ("", "", ""))
    return out


def score(task: Task, preds: list, examples: list[dict]) -> dict[str, float]:
    return kgclue_scores([p[2] for p in preds], [e["gold"][2] for e in examples])


def submission(task: Task, examples: list[dict], preds: list, state: dict) -> list[dict]:
    return [{"id": e["id"], "answer": " ||| ".join(p) if p[0] else ""} for e, p in zip(examples, preds)]
