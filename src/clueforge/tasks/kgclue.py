"""KgCLUE: answer a question with a triple of a knowledge base.

The default knowledge base is built from the **training** answers only (``head ||| relation |||
tail``; the training file in use, ``--set train_file=…`` included), so dev scores never contain
the dev answers; dev recall is then bounded by how many dev facts the training answers hold, and
is reported as ``recall`` (the share of questions whose gold ``(head, relation)`` is among the
candidates). The full KgCLUE knowledge base is a user triple file (``--set kb=FILE``,
``head<TAB>relation<TAB>tail``). The knowledge base is saved with the fine-tuned checkpoint as
``kb.tsv`` (atomically). A head's parenthesised disambiguation (``守望星光（韩玉玲、刘东考演唱歌曲）``)
is stripped for matching.

1. **Topic entity recall.** Every head name that occurs in the question (Aho-Corasick over all
   names, ``ahocorasick-rs``), longest first. A question with no name in it falls back to the
   names sharing the most character bigrams (then characters) with it.
2. **Entity + relation ranking.** Each candidate ``(head, relation)`` of those entities becomes a
   sentence pair ``question [SEP] head：relation`` scored by the sequence head (2 classes); the
   gold pair is the positive, other candidates of the question the negatives.
3. **Answer.** The best candidate's triple, always a well-formed ``head ||| relation ||| tail``
   (the official scorer splits every answer on ``" ||| "`` into three parts; one malformed answer
   fails the whole file). A question that shares no character with the knowledge base is answered
   ``question ||| 未知 ||| 未知``. Scored by the official metric on the tail (``metrics.kgclue_scores``).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np

from clueforge.knowledge.sources import entity_name, load_triples
from clueforge.tasks import classify
from clueforge.tasks.io import TaskDataError, encoding_ling, field, read_jsonl
from clueforge.tasks.metrics import kgclue_scores
from clueforge.tasks.registry import Task
from clueforge.utils import atomic_write

log = logging.getLogger("clueforge.tasks")
HEAD = "sequence"
LINGUISTIC = True  # ``encode`` adds the ``ling`` channel when ``state["segmenter"]`` is set
collate, loss = classify.collate, classify.loss
MAX_CANDIDATES, TRAIN_NEGATIVES = 48, 7
SEP = " ||| "
"""The official separator: ``evaluate_f1_em.py`` does ``answer.split(' ||| ')`` into three parts."""
UNKNOWN = "未知"


def answer_problem(answer) -> str | None:
    """Why ``answer`` would break or fool the official scorer, or ``None`` when it is well-formed."""
    if not isinstance(answer, str):
        return f"answer {answer!r} is not a string"
    parts = answer.split(SEP)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        return f"answer {answer!r} is not 'head ||| relation ||| tail' (three non-empty parts joined by ' ||| ')"
    return None


def parse_answer(answer: str, where: str) -> tuple[str, str, str]:
    problem = answer_problem(answer)
    if problem:
        raise TaskDataError(f"{where}: {problem}")
    h, r, t = (p.strip() for p in answer.split(SEP))
    return h, r, t


def format_answer(triple: tuple[str, str, str], question: str) -> str:
    """The triple as ``head ||| relation ||| tail``, well-formed whatever the triple holds."""
    parts = [" ".join(str(p).replace("|||", " ").split()) for p in triple]
    if not parts[0]:
        parts[0] = " ".join(question.replace("|||", " ").split()) or UNKNOWN
    parts = [p or UNKNOWN for p in parts]
    return SEP.join(parts)


class KnowledgeBase:
    def __init__(self, triples: list[tuple[str, str, str]]):
        import ahocorasick_rs

        self.triples = sorted(set(triples))
        self.by_name: dict[str, list[tuple[str, str, str]]] = {}
        for t in self.triples:
            self.by_name.setdefault(entity_name(t[0]), []).append(t)
        self.names = sorted(self.by_name)
        self._ac = ahocorasick_rs.AhoCorasick(self.names, matchkind=ahocorasick_rs.MATCHKIND_STANDARD) \
            if self.names else None
        self._grams: dict[int, dict[str, list[int]]] | None = None

    def candidates(self, question: str) -> list[tuple[str, str, str]]:
        """Triples of the names in ``question`` (longest first), else of the most similar names."""
        found = set()
        if self._ac is not None:
            found = {self.names[i] for i, _, _ in self._ac.find_matches_as_indexes(question, overlapping=True)}
        ranked = sorted(found, key=lambda n: (-len(n), n)) or self._similar(question)
        out: list[tuple[str, str, str]] = []
        for name in ranked:
            out.extend(self.by_name[name])
            if len(out) >= MAX_CANDIDATES:
                break
        return out[:MAX_CANDIDATES]

    def _similar(self, question: str) -> list[str]:
        """Names sharing the most character bigrams with ``question`` (characters if none does)."""
        if self._grams is None:  # n → n-gram → ids of the names holding it
            self._grams = {n: {} for n in (1, 2)}
            for i, name in enumerate(self.names):
                for n, index in self._grams.items():
                    for g in {name[k:k + n] for k in range(len(name) - n + 1)}:
                        index.setdefault(g, []).append(i)
        for n in (2, 1):
            hits: Counter = Counter()
            for g in {question[k:k + n] for k in range(len(question) - n + 1)}:
                hits.update(self._grams[n].get(g, ()))
            if hits:
                best = sorted(hits, key=lambda i: (-hits[i] / (len(self.names[i]) ** 0.5), self.names[i]))
                return [self.names[i] for i in best[:8]]
        return []

    def save(self, path: Path) -> None:
        atomic_write(path, "".join("\t".join(t) + "\n" for t in self.triples).encode("utf-8"))

    @classmethod
    def read(cls, path: Path) -> "KnowledgeBase":
        try:
            return cls(load_triples(path))
        except ValueError as exc:
            raise TaskDataError(str(exc)) from None


def prepare(task: Task, data_dir: Path, cfg=None) -> dict:
    """The knowledge base: ``cfg.kb`` when given, else the training file's answers (never dev's)."""
    kb_file = getattr(cfg, "kb", None)
    if kb_file:
        return {"kb": KnowledgeBase.read(Path(kb_file))}
    path = Path(data_dir) / (getattr(cfg, "train_file", None) or task.files["train"])
    triples = []
    if path.is_file():
        for lineno, obj in read_jsonl(path):
            if task.label_field in obj:
                triples.append(parse_answer(obj[task.label_field], f"{path}:{lineno}"))
    if not triples:
        raise TaskDataError(f"{path}: no answers to build a knowledge base from (give a triple file: --set kb=FILE)")
    log.info("KgCLUE knowledge base: %d triples from %s (train only: dev recall is bounded by it; "
             "--set kb=FILE for the full knowledge base)", len(set(triples)), path)
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
    seg = state.get("segmenter")  # a model with linguistic inputs (``finetune.loop.linguistic_state``)
    feats = []
    for i, e in enumerate(examples):
        cands = kb.candidates(e["question"])
        if training:  # the gold pair (recalled or not) and a few recalled negatives
            negatives = [c for c in cands if c[:2] != e["gold"][:2]]
            cands = [e["gold"]] + rng.sample(negatives, min(TRAIN_NEGATIVES, len(negatives)))
        e["candidates"] = cands
        pairs = [(e["question"], f"{entity_name(h)}：{r}") for h, r, _ in cands]
        encs = tok.encode_batch(pairs)
        for c, enc, pair in zip(cands, encs, pairs):
            label = -100 if e["gold"] is None else int(c[:2] == e["gold"][:2])
            feats.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "example": i, "label": label})
            if seg is not None:
                feats[-1]["ling"] = encoding_ling(seg, enc, pair)
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
        out.append(e["candidates"][k] if k >= 0 else (e["question"], UNKNOWN, UNKNOWN))
    return out


def score(task: Task, preds: list, examples: list[dict]) -> dict[str, float]:
    """The official Score/EM/F1 on the tail, and ``recall``: the share of questions whose gold
    ``(head, relation)`` was among the ranked candidates (what the knowledge base allows)."""
    recalled = sum(any(c[:2] == e["gold"][:2] for c in e.get("candidates", ())) for e in examples)
    return {**kgclue_scores([p[2] for p in preds], [e["gold"][2] for e in examples]),
            "recall": 100 * recalled / max(1, len(examples))}


def submission(task: Task, examples: list[dict], preds: list, state: dict) -> list[dict]:
    return [{"id": e["id"], "answer": format_answer(p, e["question"])} for e, p in zip(examples, preds)]


def check_prediction(task: Task, row: dict, example: dict, state: dict) -> str | None:
    if "answer" not in row:
        return "no 'answer'"
    return answer_problem(row["answer"])
