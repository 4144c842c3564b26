"""Pretraining data: packed rows from corpus shards, a resumable sampler, a masking collator.

- **Rows.** A row is a contiguous token range ``[start, end)`` of one shard, grown greedily from
  consecutive sentences up to ``seq_len`` (a sentence longer than a row is cut). With
  ``pack_docs`` a row may run on into the next document, with a [SEP] at each document start
  (RoBERTa FULL-SENTENCES); without it a row stays inside one document (DOC-SENTENCES). Rows are
  computed once from the flag side channel: no padding waste beyond the last row of a batch.
- **Sampling is a pure function of the step.** Step ``s``, micro-batch ``a``, rank ``r`` read rows
  ``perm_e[j]`` at global row positions ``((s·A + a)·W + r)·B …``; each epoch ``e`` has its own
  seeded permutation. Resuming needs nothing but the step; ranks never read the same row.
- **Masking at collate time** with a generator seeded by ``(seed, step, micro, rank)``, so a
  resumed run masks exactly as an uninterrupted one. Token or whole-word masking, budget exact in
  tokens per row, 80/10/10 replacement.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass

import numpy as np

from clueforge.corpus.build import DOC_START, SENT_START, WORD_START
from clueforge.corpus.shards import Corpus


def pack_rows(flags: np.ndarray, seq_len: int, pack_docs: bool) -> np.ndarray:
    """Greedy packing of one shard's sentences into rows. Returns ``(R, 2)`` int64 [start, end)."""
    n = flags.size
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    budget = seq_len - 2  # [CLS] ... [SEP]
    starts = np.flatnonzero(flags & SENT_START)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], n)
    is_doc = (flags[starts] & DOC_START) != 0
    rows: list[tuple[int, int]] = []
    row_start, row_len = -1, 0
    for s, e, d in zip(starts.tolist(), ends.tolist(), is_doc.tolist()):
        if row_start >= 0 and d and not pack_docs:
            rows.append((row_start, s))
            row_start, row_len = -1, 0
        cost = (e - s) + (1 if (d and row_start >= 0) else 0)
        if row_start >= 0 and row_len + cost <= budget:
            row_len += cost
            continue
        if row_start >= 0:
            rows.append((row_start, s))
        while e - s > budget:  # a sentence longer than a row: cut it
            rows.append((s, s + budget))
            s += budget
        row_start, row_len = s, e - s
    if row_start >= 0:
        rows.append((row_start, n))
    return np.asarray(rows, dtype=np.int64)


@dataclass
class RowIndex:
    shard: np.ndarray  # (R,) int32
    span: np.ndarray  # (R, 2) int64

    def __len__(self) -> int:
        return int(self.shard.size)

    def select(self, idx: np.ndarray) -> "RowIndex":
        return RowIndex(self.shard[idx], self.span[idx])


def build_row_index(corpus: Corpus, seq_len: int, pack_docs: bool) -> RowIndex:
    shards, spans = [], []
    for i, sh in enumerate(corpus.shards):
        rows = pack_rows(np.asarray(sh.flags), seq_len, pack_docs)
        shards.append(np.full(len(rows), i, dtype=np.int32))
        spans.append(rows)
    return RowIndex(np.concatenate(shards) if shards else np.zeros(0, np.int32),
                    np.concatenate(spans) if spans else np.zeros((0, 2), np.int64))


def split_heldout(index: RowIndex, corpus: Corpus, fraction: float = 0.05) -> tuple[RowIndex, RowIndex]:
    """Hold out the last shard when there are several, else the last ``fraction`` of rows."""
    if len(corpus) >= 2:
        last = len(corpus) - 1
        return index.select(np.flatnonzero(index.shard != last)), index.select(np.flatnonzero(index.shard == last))
    n_eval = max(1, int(len(index) * fraction)) if len(index) > 1 else 0
    cut = len(index) - n_eval
    return index.select(np.arange(cut)), index.select(np.arange(cut, len(index)))


class Sampler:
    """Which rows a (step, micro, rank) reads: epoch permutations over a global row cursor."""

    def __init__(self, n_rows: int, batch_size: int, grad_accum: int, world: int, seed: int):
        if n_rows == 0:
            raise ValueError("no training rows: the corpus is empty")
        self.n, self.B, self.A, self.W, self.seed = n_rows, batch_size, grad_accum, world, seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
        return self._perm_cache[epoch]

    def rows(self, step: int, micro: int, rank: int) -> np.ndarray:
        base = ((step * self.A + micro) * self.W + rank) * self.B
        g = np.arange(base, base + self.B, dtype=np.int64)
        out = np.empty(self.B, dtype=np.int64)
        for epoch in np.unique(g // self.n).tolist():
            sel = (g // self.n) == epoch
            out[sel] = self._perm(epoch)[g[sel] % self.n]
        return out

    def epoch_of(self, step: int) -> float:
        return (step * self.A * self.W * self.B) / self.n


@dataclass
class MaskingConfig:
    strategy: str = "wwm"
    ratio: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1


class Collator:
    """Rows → padded numpy batch with MLM inputs and labels."""

    def __init__(self, corpus: Corpus, specials: dict[str, int], vocab_size: int, masking: MaskingConfig,
                 doc_attention: bool = False):
        if masking.strategy not in ("token", "wwm"):
            raise ValueError(f"masking {masking.strategy!r}: expected 'token' or 'wwm'")
        self.shards = corpus.shards
        self.cls, self.sep, self.pad, self.mask = specials["cls"], specials["sep"], specials["pad"], specials["mask"]
        special_set = set(specials.values())
        self.random_pool = np.array([i for i in range(vocab_size) if i not in special_set], dtype=np.int64)
        self.m = masking
        self.doc_attention = doc_attention

    def _row(self, shard: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, word-group ids (-1 = special, never masked) and document ids of one row."""
        sh = self.shards[shard]
        ids = np.asarray(sh.ids[start:end], dtype=np.int64)
        fl = np.asarray(sh.flags[start:end])
        doc_pos = np.flatnonzero(fl & DOC_START)
        doc_pos = doc_pos[doc_pos > 0]
        ids = np.insert(ids, doc_pos, self.sep)
        is_special = np.zeros(ids.size, dtype=bool)
        is_special[doc_pos + np.arange(doc_pos.size)] = True
        word_start = np.insert((fl & WORD_START) != 0, doc_pos, True)
        doc = np.cumsum((fl & DOC_START) != 0)
        doc = np.insert(doc, doc_pos, doc[doc_pos] - 1)  # a [SEP] closes the previous document
        ids = np.concatenate([[self.cls], ids, [self.sep]])
        is_special = np.concatenate([[True], is_special, [True]])
        word_start = np.concatenate([[True], word_start, [True]]) | is_special
        word = np.cumsum(word_start) - 1
        word[is_special] = -1
        doc = np.concatenate([doc[:1], doc, doc[-1:]])
        return ids, word, doc

    def choose(self, word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask of predicted positions: exactly ``round(ratio · real tokens)`` (≥ 1)
        tokens; with ``wwm`` only whole words (a word that would overshoot is skipped)."""
        cand = np.flatnonzero(word >= 0)
        chosen = np.zeros(word.size, dtype=bool)
        if cand.size == 0:
            return chosen
        budget = min(cand.size, max(1, int(round(self.m.ratio * cand.size))))
        if self.m.strategy == "token":
            chosen[rng.choice(cand, budget, replace=False)] = True
            return chosen
        wids, first, lens = np.unique(word[cand], return_index=True, return_counts=True)
        order = rng.permutation(wids.size)
        csum = np.cumsum(lens[order])
        take = int(np.searchsorted(csum, budget, side="right"))
        picked = list(order[:take])
        left = budget - (int(csum[take - 1]) if take else 0)
        for j in order[take:]:  # fill the remainder exactly with words that still fit
            if left == 0:
                break
            if lens[j] <= left:
                picked.append(j)
                left -= int(lens[j])
        for j in picked:
            s = cand[first[j]]
            chosen[s:s + lens[j]] = True
        return chosen

    def __call__(self, rows: list[tuple[int, int, int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        built = [self._row(*r) for r in rows]
        T = max(b[0].size for b in built)
        B = len(built)
        input_ids = np.full((B, T), self.pad, dtype=np.int64)
        labels = np.full((B, T), -100, dtype=np.int64)
        attn = np.zeros((B, T), dtype=np.int64)
        docs = np.full((B, T), -1, dtype=np.int64)
        for i, (ids, word, doc) in enumerate(built):
            n = ids.size
            chosen = self.choose(word, rng)
            pos = np.flatnonzero(chosen)
            labels[i, pos] = ids[pos]
            r = rng.random(pos.size)
            masked = ids.copy()
            masked[pos[r < self.m.mask_prob]] = self.mask
            rnd = pos[(r >= self.m.mask_prob) & (r < self.m.mask_prob + self.m.random_prob)]
            masked[rnd] = self.random_pool[rng.integers(0, self.random_pool.size, rnd.size)]
            input_ids[i, :n] = masked
            attn[i, :n] = 1
            docs[i, :n] = doc
        batch = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
        if self.doc_attention:
            batch["doc_ids"] = docs
        return batch


def batch_digest(shard: np.ndarray, span: np.ndarray) -> str:
    """Short fingerprint of which rows a batch read (for per-rank data logs)."""
    return hashlib.sha1(np.ascontiguousarray(np.column_stack([shard, span])).tobytes()).hexdigest()[:16]


class Prefetcher:
    """Builds batches in a background thread so the model never waits for numpy work.

    ``make(step, micro)`` is called in order for ``step`` from ``start`` on; ``get()`` returns the
    next batch and the seconds the caller waited for it.
    """

    def __init__(self, make, start_step: int, grad_accum: int, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._make = make
        self._thread = threading.Thread(target=self._run, args=(start_step, grad_accum), daemon=True)
        self._thread.start()

    def _run(self, step: int, accum: int) -> None:
        try:
            while not self._stop.is_set():
                for micro in range(accum):
                    item = self._make(step, micro)
                    while not self._stop.is_set():
                        try:
                            self._q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                step += 1
        except BaseException as exc:  # surface errors in the consumer
            self._q.put(exc)

    def get(self):
        import time

        t0 = time.perf_counter()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
