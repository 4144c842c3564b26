"""Structure objectives on [CLS] (ERNIE 3.0, StructBERT), built from the corpus side channels.

- **Sentence reordering.** A passage of consecutive sentences of one document is cut at sentence
  boundaries into k ∈ 1..m segments, shuffled by a permutation π, and the model classifies π
  among all permutations of 1..m segments: ``Σ_{j<k} j! + rank(π)`` (9 classes for m = 3).
  ``label_to_permutation`` inverts it, so the original passage is recoverable from the label.
- **Sentence distance.** ``[CLS] A [SEP] B [SEP]``: B is the next sentence of A (0), another
  sentence of the same document (1), or a sentence of another document (2). All three classes
  take A and B from the interior sentences (neither first nor last) of documents of at least 5
  sentences (at least 3 on a corpus without such), so neither sentence alone tells the class.

Batches are numpy dicts like the MLM batch; the encoder is shared, the heads are small
``nn.Linear`` layers on the pooled [CLS] (``AuxHeads``), saved in training checkpoints but not in
the Hugging Face export.
"""

from __future__ import annotations

import itertools
import logging
from array import array
import math
import sys
import time

import numpy as np
import torch
from torch import nn

from clueforge.corpus.build import DOC_START, ENT_START, SENT_START

OBJECTIVES = ("reorder", "distance")
log = logging.getLogger("clueforge.pretrain")


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
        self.long = np.flatnonzero(self.doc_count >= 5)  # with 3 interior sentences: A, B never first/last

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
        if self.long.size:
            i, j = self._interior_pair(label, rng)
        else:
            i, j = self._any_pair(label, rng)
        half = (self.seq_len - 3) // 2
        a, b = self._tokens(i)[:half], self._tokens(j)[:half]
        ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]])
        types = np.concatenate([np.zeros(a.size + 2, dtype=np.int64), np.ones(b.size + 1, dtype=np.int64)])
        return ids, types, label, (i, j)

    def _interior_pair(self, label: int, rng: np.random.Generator) -> tuple[int, int]:
        """A and B from documents of >= 5 sentences, never a document's first or last sentence, in
        every class: class 0 cannot put B first or A last, and on the real corpus (titles, openers,
        sign-offs) "B opens a document" told the class 0.41 of the time, "A ends one" 0.40, against a
        majority of 0.34."""
        pool = self.long
        d = int(pool[rng.integers(pool.size)])
        lo, n = int(self.doc_first[d]) + 1, int(self.doc_count[d]) - 2  # interior sentences lo .. lo+n-1
        if label == 0:
            i = lo + int(rng.integers(n - 1))
            return i, i + 1
        if label == 1:
            while True:
                i, j = lo + int(rng.integers(n)), lo + int(rng.integers(n))
                if abs(i - j) > 1:
                    return i, j
        e = d
        while e == d and pool.size > 1:
            e = int(pool[rng.integers(pool.size)])
        return lo + int(rng.integers(n)), int(self.doc_first[e]) + 1 + int(rng.integers(self.doc_count[e] - 2))

    def _any_pair(self, label: int, rng: np.random.Generator) -> tuple[int, int]:
        """A corpus without documents of 5 sentences: any sentences of documents of >= 3."""
        # every class draws its documents from the same pool (those with >= 3 sentences): drawing the
        # different-document class from all documents made it "A is a one-sentence review or headline"
        # (74 % of its examples on the real corpus, never in the other classes), a cue read from A alone
        pool = self.multi if self.multi.size else np.arange(self.doc_first.size)
        d = int(pool[rng.integers(pool.size)])
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
            others = pool if pool.size > 1 else np.arange(self.doc_first.size)
            e = d
            while e == d and self.doc_first.size > 1:
                e = int(others[rng.integers(others.size)])
            j = int(self.doc_first[e]) + int(rng.integers(self.doc_count[e]))
        return i, j

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
RELATION_FEW = 1000  # fewer positive relation pairs than this: a warning (memorisation-prone)


class _Progress:
    """Progress of a data-preparation pass: a rich bar on a terminal, a log line every ``every_s``
    seconds otherwise, and one closing line with the count and the time taken."""

    def __init__(self, what: str, total: int, every_s: float = 5.0):
        self.what, self.total, self.done, self.every = what, total, 0, every_s
        self.t0 = time.monotonic()
        self.next = self.t0 + every_s
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(what, total=total)
            self.bar.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif time.monotonic() >= self.next:
            log.info("%s: %s/%s (%.0f s)", self.what, f"{self.done:,}", f"{self.total:,}", time.monotonic() - self.t0)
            self.next += self.every

    def close(self, summary: str = "") -> None:
        if self.bar is not None:
            self.bar.stop()
        log.info("%s: %s done in %.1f s%s", self.what, f"{self.done:,}", time.monotonic() - self.t0, summary)


class SentenceIndex:
    """Sentence boundaries of some shards, found in one pass over each shard's flags; the sentence
    around a position is then a binary search (rescanning a shard's flags per lookup cost ~14 ms,
    ~10 minutes for the relation examples of the real corpus)."""

    def __init__(self, shards, use):
        self.bounds_of: dict[int, np.ndarray] = {}  # shard → sentence starts + [shard size]
        for i in use:
            fl = np.asarray(shards[i].flags)
            st = np.flatnonzero(fl & SENT_START)
            if fl.size and (st.size == 0 or st[0] != 0):
                st = np.concatenate([[0], st])
            self.bounds_of[i] = np.append(st, fl.size).astype(np.int64)

    def sentence(self, shard: int, pos) -> np.ndarray | int:
        """Index of the sentence holding ``pos`` (an int or an array of positions) in its shard."""
        return np.searchsorted(self.bounds_of[shard], pos, side="right") - 1

    def bounds(self, shard: int, pos: int) -> tuple[int, int]:
        b = self.bounds_of[shard]
        k = int(self.sentence(shard, pos))
        return int(b[k]), int(b[k + 1])


class KnowledgeData:
    """Knowledge samples from a corpus built with knowledge files (entity side channel).

    - ``replace`` (Shenzhou): a row of the corpus with a share (``replace_share``) of its dictionary
      mentions swapped for another entity of the same type; per-token labels are 1 exactly on the
      inserted tokens. Types: a typed list's type (PER, drug, …), or for a name known only from the
      KG its relation signature when it has at least two relations (``kg_types``: heads with the
      same relations are one kind; one relation is no type); a name without a type, or alone in
      its type, is never swapped.
    - ``triple_mlm`` (Shenzhou, ERNIE 3.0): ``[CLS] head relation tail [SEP] sentence [SEP]`` for a
      sentence that mentions the triple's head, tokens masked on both sides (at least one in the
      triple), predicted by the MLM head. A share ``triple_text_share`` of the examples take a
      sentence that mentions the head and the tail (where the corpus has any), the others a
      sentence that mentions the head: the real corpus has only ~170 head+tail sentences, too few
      to be the whole of the objective.
    - ``relation`` (distant supervision): the candidates are pairs of KG entities that co-occur in
      a sentence: a mention of a KG head (entity channel) and a KG tail value of at least two
      characters found in the same sentence (any triple's tail). The label is the relation the KG
      gives the pair (1..R), or 0 (no relation) when the KG has none. Input
      ``[CLS] sentence [SEP] head [SEP] tail [SEP]``; both strings are in the sentence in every
      example, so string presence tells nothing. Positives and negatives are drawn ½ each, with
      weights that give both classes the same distribution of head entities and of tail values
      (the negatives pair a positive head with a positive tail value, weights fitted by iterative
      proportional fitting), so neither the head, the tail nor their lengths tell the class; on a
      corpus without such negatives, the negatives are drawn at the tail lengths of the positives.
      Few positives (< ``RELATION_FEW``) are logged as a warning: the objective is then
      memorisation-prone (a model can still learn which sentences are positive).

    Everything is indexed once at construction (seconds on the real corpus, with progress).
    """

    def __init__(self, corpus, tokenizer, specials: dict[str, int], seq_len: int, rows=None,
                 triples: list[tuple[str, str, str]] | None = None, replace_share: float = 0.5,
                 mask_ratio: float = 0.15, shards: list[int] | None = None, triple_text_share: float = 0.5):
        from clueforge.knowledge.sources import KG_TYPE, EntityTable, entity_name, kg_types

        if not all(sh.ent is not None for sh in corpus.shards):
            raise ValueError("knowledge objectives need a corpus built with knowledge files (--entities/--triples)")
        t0 = time.monotonic()
        self.shards, self.tok, self.sp = corpus.shards, tokenizer, specials
        self.seq_len, self.share, self.ratio = seq_len, replace_share, mask_ratio
        self.triple_text_share = triple_text_share
        self.table = EntityTable.read(corpus.path / "entities.tsv")
        triples = list(triples or [])
        derived = kg_types(triples)
        # the type of each entity id (index 0: no entity); "" = unknown (never swapped)
        self.entity_type = [""] + [derived.get(n, "") if k == KG_TYPE else k
                                   for n, k in zip(self.table.names, self.table.types)]
        pools: dict[str, list[int]] = {}
        for idx, kind in enumerate(self.entity_type):
            if kind:
                pools.setdefault(kind, []).append(idx)
        self.by_type = {k: np.asarray(v, dtype=np.int64) for k, v in pools.items() if len(v) >= 2}
        type_code = {k: c for c, k in enumerate(self.by_type)}
        self._ent_code = np.asarray([type_code.get(k, -1) for k in self.entity_type], dtype=np.int64)
        self._ids: dict[int, list[int]] = {}

        use = list(shards if shards is not None else range(len(self.shards)))
        self.index = SentenceIndex(self.shards, use)
        # dictionary mentions: (shard, start, end, entity id), ends where the entity channel changes
        parts = []
        for i in use:
            sh = self.shards[i]
            fl, ent, et = np.asarray(sh.flags), np.asarray(sh.ent), np.asarray(sh.etype)
            if fl.size == 0:
                continue
            first = (fl & ENT_START) != 0
            cut = np.append(np.flatnonzero(first | np.r_[True, (ent[1:] != ent[:-1]) | (et[1:] != et[:-1])]), fl.size)
            s = np.flatnonzero(first & (ent > 0))
            e = cut[np.searchsorted(cut, s, side="right")]
            parts.append(np.stack([np.full(s.size, i), s, e, ent[s].astype(np.int64)], 1))
        self.mentions = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
        if not len(self.mentions):
            raise ValueError(f"{corpus.path}: no dictionary entity mentions to build knowledge samples from")
        self.swappable = self.mentions[self._ent_code[self.mentions[:, 3]] >= 0]  # sorted by (shard, start)
        self._swap_key = (self.swappable[:, 0] << 32) + self.swappable[:, 1]

        self.triples = triples
        self.triples_by_entity: dict[int, list[int]] = {}  # entity id → indices into self.triples
        for k, (h, _, _) in enumerate(triples):
            e = self.table.id(entity_name(h))
            if e:
                self.triples_by_entity.setdefault(e, []).append(k)
        self.relations = sorted({r for _, r, _ in triples})
        is_head = np.zeros(len(self.table.names) + 1, dtype=bool)
        is_head[list(self.triples_by_entity)] = True
        self.triple_mentions = self.mentions[is_head[self.mentions[:, 3]]]
        self._build_relation_pairs()
        log.info("knowledge data: %s mentions (%s swappable, %d types), %s of KG heads, %s relation pairs "
                 "(%s with a KG relation) in %.1f s", f"{len(self.mentions):,}", f"{len(self.swappable):,}",
                 len(self.by_type), f"{len(self.triple_mentions):,}", f"{len(self.pairs):,}",
                 f"{int((self.pairs[:, 6] > 0).sum()):,}", time.monotonic() - t0)
        if len(self.triple_mentions) and not len(self.head_tail):
            log.warning("triple_mlm: no sentence mentions a head and its tail; "
                        "sentences that mention the head are used")

    def _build_relation_pairs(self) -> None:
        """``self.pairs`` (P, 8): shard, sentence start, sentence end, head start, head end, tail value,
        relation id (0: none), head entity id; ``self.tail_values``; ``self.head_tail`` (Q, 4): shard, sentence start,
        sentence end, triple index, for the sentences that mention a triple's head and tail."""
        import ahocorasick_rs

        from clueforge.knowledge.sources import entity_name

        rel_id = {r: i + 1 for i, r in enumerate(self.relations)}
        self.tail_values = sorted({t for _, _, t in self.triples if len(t) >= 2})
        spelled = [" " + " ".join(map(str, self.tok.encode(t, add_special_tokens=False).ids)) + " "
                   for t in self.tail_values]
        keep = [k for k, x in enumerate(spelled) if x.strip()]
        ac = ahocorasick_rs.AhoCorasick([spelled[k] for k in keep], matchkind=ahocorasick_rs.MATCHKIND_STANDARD) \
            if keep else None
        pairs, head_tail = array("q"), array("q")  # flat int64 rows: no Python tuple per pair
        heads = self.triple_mentions
        order = np.lexsort((heads[:, 1], heads[:, 0]))
        heads = heads[order]
        sent = np.empty(len(heads), dtype=np.int64)
        for i in np.unique(heads[:, 0]):
            m = heads[:, 0] == i
            sent[m] = self.index.sentence(int(i), heads[m, 1])
        key = heads[:, 0] * (1 << 32) + sent
        groups = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        bar = _Progress("relation examples (sentences with a KG head)", len(groups))
        for g, lo in enumerate(groups.tolist()):
            hi = int(groups[g + 1]) if g + 1 < len(groups) else len(heads)
            shard = int(heads[lo, 0])
            a, b = (int(x) for x in self.index.bounds_of[shard][sent[lo]:sent[lo] + 2])
            if ac is not None:
                text = " " + " ".join(map(str, np.asarray(self.shards[shard].ids[a:b]).tolist())) + " "
                found = {(keep[k], text.count(" ", 0, s + 1) - 1 + a)
                         for k, s, _ in ac.find_matches_as_indexes(text, overlapping=True)}
            else:
                found = set()
            for _, hs, he, e in heads[lo:hi].tolist():
                known = {self.triples[k][2]: k for k in self.triples_by_entity[e]}
                name = entity_name(self.triples[self.triples_by_entity[e][0]][0])
                seen = set()
                for v, ts in sorted(found):
                    t = self.tail_values[v]
                    te = ts + spelled[v].count(" ") - 1
                    if t == name or t in seen or (ts < he and hs < te):  # the head itself, a repeat, overlap
                        continue
                    seen.add(t)
                    k = known.get(t)
                    pairs.extend((shard, a, b, hs, he, v, rel_id[self.triples[k][1]] if k is not None else 0, e))
                    if k is not None:
                        head_tail.extend((shard, a, b, k))
            bar.advance()
        bar.close()
        self.pairs = np.frombuffer(pairs, dtype=np.int64).reshape(-1, 8)
        self._pos = np.flatnonzero(self.pairs[:, 6] > 0)
        self._neg = np.flatnonzero(self.pairs[:, 6] == 0)
        self.head_tail = np.frombuffer(head_tail, dtype=np.int64).reshape(-1, 4)
        self._tail_ids = [[int(x) for x in sp.split()] for sp in spelled]
        # negatives by tail length (tokens, 8 = 8 or more), drawn at the length of a random positive:
        # KG relations co-occur with long specific tails, no-relation pairs with short common ones,
        # and the length alone told the class (0.71 on the real corpus against a majority of 0.50)
        length = np.minimum([len(self._tail_ids[v]) for v in self.pairs[:, 5]], 8).astype(np.int64) \
            if len(self.pairs) else np.zeros(0, np.int64)
        self._pos_len = length[self._pos]
        self._neg_by_len = {int(n): self._neg[length[self._neg] == n] for n in np.unique(length[self._neg])}
        self._balance_relation_pairs()

    def _balance_relation_pairs(self, rounds: int = 200) -> None:
        """``self._rel_pick``/``self._rel_p``: pairs and sampling weights with the same head-entity and
        tail-value distributions in both classes. On the real corpus (169 positives) the head alone
        told the class 0.98 of the time and the tail alone 0.97 (majority 0.50): heads and tails of
        positives are a few dozen specific strings. Candidates: the positives and the negatives
        that pair a positive head with a positive tail value; iterative proportional fitting then
        scales each class to the geometric mean of the two classes' mass, per head, then per tail."""
        self._rel_pick = self._rel_cdf = None
        pos = self.pairs[:, 6] > 0
        if len(self.pairs) and len(self._pos) < RELATION_FEW:
            log.warning("relation: only %d positive pairs; the objective is memorisation-prone on so few "
                        "(a model can learn which sentences are positive)", len(self._pos))
        if not pos.any() or pos.all():
            return
        head, tail = self.pairs[:, 7], self.pairs[:, 5]
        cand = np.flatnonzero(pos | (np.isin(head, head[pos]) & np.isin(tail, tail[pos])))
        y, w = pos[cand], np.ones(cand.size)
        keys = [np.unique(k[cand], return_inverse=True)[1].reshape(-1) for k in (head, tail)]
        for _ in range(rounds):
            for k in keys:
                wp, wn = np.bincount(k[y], w[y], k.max() + 1), np.bincount(k[~y], w[~y], k.max() + 1)
                m = np.sqrt(wp * wn)
                fp = np.divide(m, wp, out=np.zeros_like(m), where=wp > 0)
                fn = np.divide(m, wn, out=np.zeros_like(m), where=wn > 0)
                w *= np.where(y, fp[k], fn[k])
        keep = w > 1e-9 * w.max() if w.max() > 0 else np.zeros(w.size, bool)
        if (keep & y).any() and (keep & ~y).any():
            self._rel_pick, self._rel_cdf = cand[keep], np.cumsum(w[keep]) / w[keep].sum()
        log.info("relation: %d positive and %d negative pairs matched on head and tail", int((keep & y).sum()),
                 int((keep & ~y).sum()))

    def relation(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """``(input ids, token types, label)``; 0 = no relation."""
        if not len(self.pairs):
            raise ValueError("relation: no sentence mentions a KG head together with a KG tail value")
        if self._rel_pick is not None:  # head- and tail-matched classes
            pick = self._rel_pick[min(int(np.searchsorted(self._rel_cdf, rng.random(), side="right")),
                                      len(self._rel_pick) - 1)]
        elif not len(self._neg) or (len(self._pos) and rng.random() < 0.5):
            pick = self._pos[rng.integers(len(self._pos))]
        else:
            side = self._neg_by_len.get(int(self._pos_len[rng.integers(len(self._pos))]), self._neg) \
                if len(self._pos) else self._neg
            pick = side[rng.integers(len(side))]
        shard, a, b, hs, he, v, label, _ = (int(x) for x in self.pairs[pick])
        ids = np.asarray(self.shards[shard].ids[a:b], dtype=np.int64)
        head = ids[hs - a:he - a].tolist()[:16]
        tail = self._tail_ids[v][:16]
        ts = self._find(ids, self._tail_ids[v], hs - a, he - a)
        room = self.seq_len - 4 - len(head) - len(tail)
        lo, hi = min(hs - a, ts), max(he - a, ts + len(self._tail_ids[v]))
        start = max(0, min(lo, hi - room))  # a window of the sentence that holds both mentions
        sent = ids[start:start + room]
        out = np.asarray([self.sp["cls"], *sent.tolist(), self.sp["sep"], *head, self.sp["sep"], *tail,
                          self.sp["sep"]], dtype=np.int64)
        types = np.concatenate([np.zeros(sent.size + 2, np.int64), np.ones(len(head) + len(tail) + 2, np.int64)])
        return out, types, label

    @staticmethod
    def _find(ids: np.ndarray, pattern: list[int], hs: int, he: int) -> int:
        """First occurrence of ``pattern`` in ``ids`` that does not overlap the head [hs, he)."""
        n = len(pattern)
        for k in np.flatnonzero(ids == pattern[0]).tolist():
            if ids[k:k + n].tolist() == pattern and not (k < he and hs < k + n):
                return k
        return hs

    def relation_pairs(self) -> np.ndarray:
        return self.pairs

    def _name_ids(self, entity: int) -> list[int]:
        if entity not in self._ids:
            self._ids[entity] = self.tok.encode(self.table.names[entity - 1], add_special_tokens=False).ids
        return self._ids[entity]

    def replace(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """``(input ids, labels, original ids, swaps)``: labels 1 on swapped-in tokens, 0 on the
        others, -100 on [CLS]/[SEP]; ``swaps`` lists ``(start, end, new entity)`` in the original ids."""
        pool = self.swappable if len(self.swappable) else self.mentions
        shard, pos = (int(x) for x in pool[rng.integers(len(pool)), :2])
        sh = self.shards[shard]
        a, _ = self.index.bounds(shard, pos)
        b = min(sh.ids.size, a + self.seq_len - 2)
        ids = np.asarray(sh.ids[a:b], dtype=np.int64)
        lo, hi = np.searchsorted(self._swap_key, [(shard << 32) + a, (shard << 32) + b])
        m = self.swappable[lo:hi]
        m = m[m[:, 2] <= b]
        n = max(1, int(round(self.share * len(m)))) if len(m) and self.share > 0 else 0
        chosen = m[np.sort(rng.choice(len(m), n, replace=False))] if n else m[:0]
        out, labels, swaps, k = [], [], [], a
        for _, s, e, ent in chosen.tolist():
            kind = self.by_type[self.entity_type[ent]]
            j = int(rng.integers(len(kind) - 1))
            new = int(kind[j]) if kind[j] != ent else int(kind[-1])  # uniform over the others of the type
            out.extend(ids[k - a:s - a].tolist())
            labels.extend([0] * (s - k))
            name = self._name_ids(new)
            out.extend(name)
            labels.extend([1] * len(name))
            swaps.append((s - a, e - a, new))
            k = e
        out.extend(ids[k - a:].tolist())
        labels.extend([0] * (b - k))
        out, labels = out[: self.seq_len - 2], labels[: self.seq_len - 2]
        return (np.asarray([self.sp["cls"], *out, self.sp["sep"]], dtype=np.int64),
                np.asarray([-100, *labels, -100], dtype=np.int64), ids, swaps)

    def triple_mlm(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masked input ids, token types, MLM labels)``."""
        both = len(self.head_tail) and (not len(self.triple_mentions) or rng.random() < self.triple_text_share)
        if both:  # a sentence that mentions the head and the tail
            shard, a, b, k = (int(x) for x in self.head_tail[rng.integers(len(self.head_tail))])
        elif len(self.triple_mentions):  # a sentence that mentions the head
            shard, pos, _, e = (int(x) for x in self.triple_mentions[rng.integers(len(self.triple_mentions))])
            options = self.triples_by_entity[e]
            k = options[int(rng.integers(len(options)))]
            a, b = self.index.bounds(shard, pos)
        else:
            raise ValueError("triple_mlm: no mention of a triple's head in the corpus (give train.knowledge_triples)")
        h, r, t = self.triples[k]
        triple = self.tok.encode(f"{h} {r} {t}", add_special_tokens=False).ids[: self.seq_len // 2]
        sent = np.asarray(self.shards[shard].ids[a:b], dtype=np.int64)[: self.seq_len - 3 - len(triple)]
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
                ids, lab, _, _ = self.replace(rng)
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
