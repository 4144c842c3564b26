"""Structure objectives on [CLS] (ERNIE 3.0, StructBERT), built from the corpus side channels.

- **Sentence reordering.** A passage of consecutive sentences of one document is cut at sentence
  boundaries into k ∈ 1..m segments, shuffled by a permutation π, and the model classifies π
  among all permutations of 1..m segments: ``Σ_{j<k} j! + rank(π)`` (9 classes for m = 3).
  ``label_to_permutation`` inverts it, so the original passage is recoverable from the label.
- **Sentence distance.** ``[CLS] A [SEP] B [SEP]``: B is the next sentence of A (0), another
  sentence of the same document (1), or a sentence of another document (2).

Batches are numpy dicts like the MLM batch; the encoder is shared, the heads are small
``nn.Linear`` layers on the pooled [CLS] (``AuxHeads``), saved in training checkpoints but not in
the Hugging Face export.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from clueforge.corpus.build import DOC_START, SENT_START

OBJECTIVES = ("reorder", "distance")


def n_reorder_classes(m: int) -> int:
    return sum(math.factorial(k) for k in range(1, m + 1))


def permutation_label(perm: tuple[int, ...]) -> int:
    k = len(perm)
    offset = sum(math.factorial(j) for j in range(1, k))
    return offset + list(itertools.permutations(range(k))).index(tuple(perm))


def label_to_permutation(label: int) -> tuple[int, ...]:
    k = 1
    while label >= math.factorial(k):
        label -= math.factorial(k)
        k += 1
    return list(itertools.permutations(range(k)))[label]


class StructureData:
    """Samples reordering and distance examples from the sentences of a corpus's documents."""

    def __init__(self, corpus, specials: dict[str, int], seq_len: int, max_segments: int = 3,
                 shards: list[int] | None = None):
        self.shards = corpus.shards
        self.cls, self.sep, self.pad = specials["cls"], specials["sep"], specials["pad"]
        self.seq_len, self.m = seq_len, max_segments
        sent_shard, sent_start, sent_end, sent_doc = [], [], [], []
        doc = 0
        for i in (shards if shards is not None else range(len(self.shards))):
            fl = np.asarray(self.shards[i].flags)
            if fl.size == 0:
                continue
            starts = np.flatnonzero(fl & SENT_START)
            if starts.size == 0 or starts[0] != 0:
                starts = np.concatenate([[0], starts])
            ends = np.append(starts[1:], fl.size)
            docs = doc + np.cumsum((fl[starts] & DOC_START) != 0) - 1
            doc = int(docs[-1]) + 1
            sent_shard.append(np.full(starts.size, i))
            sent_start.append(starts)
            sent_end.append(ends)
            sent_doc.append(docs)
        self.s_shard = np.concatenate(sent_shard)
        self.s_start, self.s_end = np.concatenate(sent_start), np.concatenate(sent_end)
        self.s_doc = np.concatenate(sent_doc)
        self.doc_first = np.searchsorted(self.s_doc, np.arange(doc))
        self.doc_count = np.diff(np.append(self.doc_first, self.s_doc.size))
        self.multi = np.flatnonzero(self.doc_count >= 3)  # documents usable for distance classes 0/1

    def _tokens(self, s: int) -> np.ndarray:
        return np.asarray(self.shards[self.s_shard[s]].ids[self.s_start[s]:self.s_end[s]], dtype=np.int64)

    def reorder(self, rng: np.random.Generator) -> tuple[np.ndarray, int, list[np.ndarray]]:
        """``(input ids, label, original segments)``."""
        d = int(rng.integers(self.doc_first.size))
        first, count = int(self.doc_first[d]), int(self.doc_count[d])
        s = first + int(rng.integers(count))
        budget = self.seq_len - 2
        sents = []
        while s < first + count and sum(map(len, sents)) + (self.s_end[s] - self.s_start[s]) <= budget:
            sents.append(self._tokens(s))
            s += 1
        if not sents:  # a sentence longer than the row: its head alone
            sents = [self._tokens(s)[:budget]]
        k = int(rng.integers(1, min(self.m, len(sents)) + 1))
        cuts = sorted(rng.choice(np.arange(1, len(sents)), k - 1, replace=False).tolist()) if k > 1 else []
        bounds = [0] + cuts + [len(sents)]
        segments = [np.concatenate(sents[a:b]) for a, b in zip(bounds, bounds[1:])]
        perm = tuple(int(x) for x in rng.permutation(k))
        ids = np.concatenate([[self.cls], *[segments[p] for p in perm], [self.sep]])
        return ids, permutation_label(perm), segments

    def distance(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, tuple[int, int]]:
        """``(input ids, token types, label, (sentence A, sentence B))``."""
        label = int(rng.integers(3)) if self.multi.size else 2
        d = int(self.multi[rng.integers(self.multi.size)]) if label < 2 else int(rng.integers(self.doc_first.size))
        first, count = int(self.doc_first[d]), int(self.doc_count[d])
        if label == 0:
            i = first + int(rng.integers(count - 1))
            j = i + 1
        elif label == 1:
            i = first + int(rng.integers(count))
            far = [x for x in range(first, first + count) if abs(x - i) > 1]
            if not far:  # the middle of a 3-sentence document: use its first sentence instead
                i, far = first, list(range(first + 2, first + count))
            j = far[int(rng.integers(len(far)))]
        else:
            i = first + int(rng.integers(count))
            j = int(rng.integers(self.s_doc.size))
            while self.s_doc[j] == d and self.doc_first.size > 1:
                j = int(rng.integers(self.s_doc.size))
        half = (self.seq_len - 3) // 2
        a, b = self._tokens(i)[:half], self._tokens(j)[:half]
        ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]])
        types = np.concatenate([np.zeros(a.size + 2, dtype=np.int64), np.ones(b.size + 1, dtype=np.int64)])
        return ids, types, label, (i, j)

    def batch(self, name: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows, types, labels = [], [], []
        for _ in range(n):
            if name == "reorder":
                ids, label, _ = self.reorder(rng)
                tt = np.zeros_like(ids)
            elif name == "distance":
                ids, tt, label, _ = self.distance(rng)
            else:
                raise ValueError(f"unknown structure objective {name!r}; known: {OBJECTIVES}")
            rows.append(ids)
            types.append(tt)
            labels.append(label)
        T = max(r.size for r in rows)
        out = {"input_ids": np.full((n, T), self.pad, dtype=np.int64), "token_type_ids": np.zeros((n, T), np.int64),
               "attention_mask": np.zeros((n, T), np.int64), "labels": np.asarray(labels, dtype=np.int64)}
        for k, (r, tt) in enumerate(zip(rows, types)):
            out["input_ids"][k, :r.size], out["token_type_ids"][k, :r.size], out["attention_mask"][k, :r.size] = r, tt, 1
        return out


class AuxHeads(nn.Module):
    """A pooler ([CLS] → dense → tanh) shared by small classification heads, one per objective."""

    def __init__(self, hidden: int, classes: dict[str, int], std: float = 0.02):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in classes.items()})
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)

    def forward(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads[name](torch.tanh(self.pooler(hidden[:, 0])))  # (B, C)
