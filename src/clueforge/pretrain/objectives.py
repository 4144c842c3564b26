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

from clueforge.corpus.build import DOC_START, ENT_START, SENT_START

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


def pad_rows(rows: list[np.ndarray], types: list[np.ndarray], pad: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``, ``token_type_ids`` and ``attention_mask`` (n, T)."""
    n, T = len(rows), max(r.size for r in rows)
    out = {"input_ids": np.full((n, T), pad, dtype=np.int64), "token_type_ids": np.zeros((n, T), np.int64),
           "attention_mask": np.zeros((n, T), np.int64)}
    for k, (r, tt) in enumerate(zip(rows, types)):
        out["input_ids"][k, :r.size], out["token_type_ids"][k, :r.size], out["attention_mask"][k, :r.size] = r, tt, 1
    return out


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
        return {**pad_rows(rows, types, self.pad), "labels": np.asarray(labels, dtype=np.int64)}


class AuxHeads(nn.Module):
    """Small pretraining-only heads: sequence heads on a shared pooler ([CLS] → dense → tanh) and
    per-token heads (``token``: names classified at every position)."""

    def __init__(self, hidden: int, classes: dict[str, int], std: float = 0.02, token: tuple[str, ...] = ()):
        super().__init__()
        self.token = set(token) & set(classes)
        # only parameters that some objective uses (data parallelism rejects unused ones)
        self.pooler = nn.Linear(hidden, hidden) if set(classes) - self.token else None
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in classes.items()})
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)

    def forward(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        if name in self.token:
            return self.heads[name](hidden)  # (B, T, C)
        return self.heads[name](torch.tanh(self.pooler(hidden[:, 0])))  # (B, C)


KNOWLEDGE_OBJECTIVES = ("replace", "triple_mlm", "relation")


class KnowledgeData:
    """Knowledge samples from a corpus built with knowledge files (entity side channel).

    - ``replace`` (Shenzhou): a row of the corpus with a share of its mentions swapped for another
      entity of the same type; per-token labels are 1 exactly on the inserted tokens.
    - ``triple_mlm`` (Shenzhou, ERNIE 3.0): ``[CLS] head relation tail [SEP] sentence [SEP]`` for a
      sentence that mentions the head of a KG triple, with tokens masked on both sides (at least
      one in the triple) and predicted by the MLM head.
    - ``relation`` (Shenzhou, distant supervision): ``[CLS] sentence [SEP] head [SEP] tail [SEP]``
      for a sentence that mentions both the head and the tail of a triple, labelled with the
      triple's relation (1..R); with probability ½ the tail is swapped for another dictionary
      entity that has no triple with that head, labelled 0 (no relation).
    """

    def __init__(self, corpus, tokenizer, specials: dict[str, int], seq_len: int, rows=None,
                 triples: list[tuple[str, str, str]] | None = None, replace_share: float = 0.5,
                 mask_ratio: float = 0.15, shards: list[int] | None = None):
        from clueforge.knowledge.sources import EntityTable, entity_name

        if not all(sh.ent is not None for sh in corpus.shards):
            raise ValueError("knowledge objectives need a corpus built with knowledge files (--entities/--triples)")
        self.shards, self.tok, self.sp = corpus.shards, tokenizer, specials
        self.seq_len, self.share, self.ratio = seq_len, replace_share, mask_ratio
        self.table = EntityTable.read(corpus.path / "entities.tsv")
        self.type_names = corpus.manifest["entity_types"]
        self.by_type: dict[int, list[int]] = {}
        for idx, kind in enumerate(self.table.types, 1):
            self.by_type.setdefault(self.type_names.index(kind) if kind in self.type_names else 0, []).append(idx)
        self._ids: dict[int, list[int]] = {}
        use = shards if shards is not None else range(len(self.shards))
        # mention starts with a dictionary entity: (shard, position)
        found = [(i, p) for i in use for p in np.flatnonzero(((np.asarray(self.shards[i].flags) & ENT_START) != 0)
                                                             & (np.asarray(self.shards[i].ent) > 0)).tolist()]
        if not found:
            raise ValueError(f"{corpus.path}: no dictionary entity mentions to build knowledge samples from")
        self.mentions = np.asarray(found, dtype=np.int64)
        self.triples_by_entity: dict[int, list[tuple[str, str, str]]] = {}
        for h, r, t in triples or []:
            e = self.table.id(entity_name(h))
            if e:
                self.triples_by_entity.setdefault(e, []).append((h, r, t))
        ents = np.array([self.shards[i].ent[p] for i, p in found])
        self.triple_mentions = self.mentions[np.isin(ents, list(self.triples_by_entity))] if self.triples_by_entity \
            else np.zeros((0, 2), dtype=np.int64)
        self.relations = sorted({r for ts in self.triples_by_entity.values() for _, r, _ in ts})
        self._pairs: list[tuple[int, int, str, str, int]] | None = None  # (shard, pos, head, tail, relation id)

    def relation_pairs(self, limit: int = 200_000) -> list[tuple[int, int, str, str, int]]:
        """Sentences mentioning a triple's head whose tokens also contain its tail (distant supervision)."""
        if self._pairs is None:
            rel_id = {r: i + 1 for i, r in enumerate(self.relations)}
            pairs = []
            spelled: dict[str, str] = {}
            for shard, pos in self.triple_mentions[:limit].tolist():
                a, b = self._sentence(shard, pos)
                sent = np.asarray(self.shards[shard].ids[a:b]).tolist()
                text = " " + " ".join(map(str, sent)) + " "
                for h, r, t in self.triples_by_entity[int(self.shards[shard].ent[pos])]:
                    if t not in spelled:
                        ids = self.tok.encode(t, add_special_tokens=False).ids
                        spelled[t] = " " + " ".join(map(str, ids)) + " " if ids else ""
                    if spelled[t] and spelled[t] in text:
                        pairs.append((shard, pos, h, t, rel_id[r]))
            self._pairs = pairs
        return self._pairs

    def relation(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """``(input ids, token types, label)``; 0 = no relation."""
        from clueforge.knowledge.sources import entity_name

        pairs = self.relation_pairs()
        if not pairs:
            raise ValueError("relation: no sentence mentions both the head and the tail of a triple")
        shard, pos, h, t, label = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:  # a negative: the same sentence and head, an unrelated entity
            related = {x for _, _, x in self.triples_by_entity[int(self.shards[shard].ent[pos])]}
            for _ in range(8):
                cand = self.table.names[int(rng.integers(len(self.table.names)))]
                if cand not in related and cand != entity_name(h):
                    t, label = cand, 0
                    break
        a, b = self._sentence(shard, pos)
        head = self.tok.encode(entity_name(h), add_special_tokens=False).ids[:16]
        tail = self.tok.encode(t, add_special_tokens=False).ids[:16]
        sent = np.asarray(self.shards[shard].ids[a:b], dtype=np.int64)[: self.seq_len - 4 - len(head) - len(tail)]
        ids = np.asarray([self.sp["cls"], *sent.tolist(), self.sp["sep"], *head, self.sp["sep"], *tail, self.sp["sep"]],
                         dtype=np.int64)
        types = np.concatenate([np.zeros(sent.size + 2, np.int64), np.ones(len(head) + len(tail) + 2, np.int64)])
        return ids, types, label

    def _name_ids(self, entity: int) -> list[int]:
        if entity not in self._ids:
            self._ids[entity] = self.tok.encode(self.table.names[entity - 1], add_special_tokens=False).ids
        return self._ids[entity]

    def _sentence(self, shard: int, pos: int) -> tuple[int, int]:
        fl = np.asarray(self.shards[shard].flags)
        starts = np.flatnonzero(fl & SENT_START)
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        a = int(starts[k]) if k >= 0 else 0
        b = int(starts[k + 1]) if k + 1 < starts.size else fl.size
        return a, b

    def replace(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input ids, labels, original ids)``: labels 1 on swapped-in tokens, 0 on the others,
        -100 on [CLS]/[SEP]."""
        shard, pos = (int(x) for x in self.mentions[rng.integers(len(self.mentions))])
        sh = self.shards[shard]
        a, _ = self._sentence(shard, pos)
        b = min(sh.ids.size, a + self.seq_len - 2)
        ids = np.asarray(sh.ids[a:b], dtype=np.int64)
        ent, et, fl = np.asarray(sh.ent[a:b]), np.asarray(sh.etype[a:b]), np.asarray(sh.flags[a:b])
        starts = np.flatnonzero(((fl & ENT_START) != 0) & (ent > 0))
        out, labels, k = [], [], 0
        chosen = set(rng.choice(starts, max(1, int(round(self.share * starts.size))), replace=False).tolist()) \
            if starts.size else set()
        while k < ids.size:
            if k in chosen:
                e = k + 1
                while e < ids.size and ent[e] == ent[k] and et[e] == et[k] and not fl[e] & ENT_START:
                    e += 1
                pool = self.by_type.get(int(et[k]), [])
                others = [x for x in (pool[int(j)] for j in rng.integers(0, len(pool), 4)) if x != ent[k]] if pool else []
                if others:
                    new = self._name_ids(others[0])
                    out.extend(new)
                    labels.extend([1] * len(new))
                    k = e
                    continue
            out.append(int(ids[k]))
            labels.append(0)
            k += 1
        out, labels = out[: self.seq_len - 2], labels[: self.seq_len - 2]
        return (np.asarray([self.sp["cls"], *out, self.sp["sep"]], dtype=np.int64),
                np.asarray([-100, *labels, -100], dtype=np.int64), ids)

    def triple_mlm(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masked input ids, token types, MLM labels)``."""
        if not len(self.triple_mentions):
            raise ValueError("triple_mlm: no mention of a triple's head in the corpus (give train.knowledge_triples)")
        shard, pos = (int(x) for x in self.triple_mentions[rng.integers(len(self.triple_mentions))])
        sh = self.shards[shard]
        options = self.triples_by_entity[int(sh.ent[pos])]
        h, r, t = options[int(rng.integers(len(options)))]
        triple = self.tok.encode(f"{h} {r} {t}", add_special_tokens=False).ids[: self.seq_len // 2]
        a, b = self._sentence(shard, pos)
        sent = np.asarray(sh.ids[a:b], dtype=np.int64)[: self.seq_len - 3 - len(triple)]
        ids = np.asarray([self.sp["cls"], *triple, self.sp["sep"], *sent.tolist(), self.sp["sep"]], dtype=np.int64)
        types = np.concatenate([np.zeros(len(triple) + 2, np.int64), np.ones(sent.size + 1, np.int64)])
        real = np.ones(ids.size, dtype=bool)
        real[[0, len(triple) + 1, ids.size - 1]] = False
        cand = np.flatnonzero(real)
        budget = max(2, int(round(self.ratio * cand.size)))
        pick = set(rng.choice(cand, min(budget, cand.size), replace=False).tolist())
        pick.add(int(1 + rng.integers(len(triple))))  # at least one token of the triple
        pick = np.asarray(sorted(pick))
        labels = np.full(ids.size, -100, dtype=np.int64)
        labels[pick] = ids[pick]
        masked = ids.copy()
        masked[pick] = self.sp["mask"]
        return masked, types, labels

    def batch(self, name: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows, types, labels = [], [], []
        for _ in range(n):
            if name == "replace":
                ids, lab, _ = self.replace(rng)
                tt = np.zeros_like(ids)
            elif name == "triple_mlm":
                ids, tt, lab = self.triple_mlm(rng)
            elif name == "relation":
                ids, tt, lab = self.relation(rng)
            else:
                raise ValueError(f"unknown knowledge objective {name!r}; known: {KNOWLEDGE_OBJECTIVES}")
            rows.append(ids)
            types.append(tt)
            labels.append(lab)
        out = pad_rows(rows, types, self.sp["pad"])
        if name == "relation":  # one label per example
            out["labels"] = np.asarray(labels, dtype=np.int64)
        else:  # one label per token
            out["labels"] = np.full(out["input_ids"].shape, -100, dtype=np.int64)
            for k, lab in enumerate(labels):
                out["labels"][k, :lab.size] = lab
        return out
