"""Pretraining data: packed rows from corpus shards, a resumable sampler, a masking collator.

- **Rows.** A row is a contiguous token range ``[start, end)`` of one shard. With ``pack_docs``
  the shard is a token stream cut into full rows (RoBERTa FULL-SENTENCES: a row runs on into the
  next document, with a [SEP] at each document start; the sentence at a row's end is split, at a
  word start where one is near), so padding is only the last row of each shard; without it a row
  is whole sentences of one document (DOC-SENTENCES). Rows are computed once from the flag side
  channel; side channels are read by position, so they stay aligned however a row is cut.
- **Sampling is a pure function of the step.** Step ``s``, micro-batch ``a``, rank ``r`` read rows
  ``perm_e[j]`` at global row positions ``((s·A + a)·W + r)·B …``; each epoch ``e`` has its own
  seeded permutation. Resuming needs nothing but the step; ranks never read the same row.
- **Masking at collate time** with a generator seeded by ``(seed, step, micro, rank)``, so a
  resumed run masks exactly as an uninterrupted one. The strategies of ``masking``, budget
  exact in tokens per row, 80/10/10 replacement decided per masked unit.
- **Linguistic channel** (``linguistic=True``, for a model with ``ModelConfig.linguistic_inputs``):
  the shard's POS ids and word / sentence starts packed per token (``model.bert.pack_ling``) as
  ``ling`` (B, T); [CLS], [SEP] and padding carry 0. A masked token keeps its word's tag.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass

import numpy as np

from clueforge.corpus.build import DOC_START, ENT_START, SENT_START, WORD_START
from clueforge.corpus.shards import Corpus
from clueforge.model.bert import pack_ling
from clueforge.pretrain.masking import Curriculum, Masker, MaskingConfig, Row, _groups, pick_strategy


def pack_rows(flags: np.ndarray, seq_len: int, pack_docs: bool, etype: np.ndarray | None = None,
              slack: int | None = None) -> np.ndarray:
    """Packing of one shard's tokens into rows. Returns ``(R, 2)`` int64 [start, end).

    With ``pack_docs`` the shard is one token stream: each row takes as many tokens as fit
    (``seq_len`` minus [CLS], the final [SEP] and one [SEP] per document starting inside it), so
    only a shard's last row is short. The cut falls on the last word start (outside an entity
    mention when ``etype`` is given) among the final ``slack`` tokens that fit (default
    ``(seq_len - 2) // 16``), else exactly where the row is full; the sentence there is split, its rest opens the next row (whose first token
    then carries no sentence-start flag: masking and objectives see it as mid-sentence).
    Without ``pack_docs`` rows are whole sentences inside one document (a sentence longer than a
    row is cut).
    """
    n = flags.size
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    budget = seq_len - 2  # [CLS] ... [SEP]
    slack = budget // 16 if slack is None else slack
    if pack_docs:
        # g[p]: tokens of a row from 0 through p, [SEP]s before the documents starting inside
        # included (minus a constant); a row [s, e) costs g[e-1] - g[s] + 1
        doc = np.cumsum((flags & DOC_START) != 0)
        g = np.arange(n, dtype=np.int64) + doc
        cut_ok = (flags & WORD_START) != 0
        if etype is not None:
            cut_ok &= ~((np.asarray(etype) > 0) & ((flags & ENT_START) == 0))  # not inside a mention
        rows = []
        s = 0
        while s < n:
            e = int(np.searchsorted(g, g[s] + budget - 1, side="right"))
            if e < n and not cut_ok[e]:
                ok = np.flatnonzero(cut_ok[max(s + 1, e - slack + 1):e])
                if ok.size:
                    e = max(s + 1, e - slack + 1) + int(ok[-1])
            rows.append((s, e))
            s = e
        return np.asarray(rows, dtype=np.int64)
    starts = np.flatnonzero(flags & SENT_START)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], n)
    is_doc = (flags[starts] & DOC_START) != 0
    rows: list[tuple[int, int]] = []
    row_start, row_len = -1, 0
    for s, e, d in zip(starts.tolist(), ends.tolist(), is_doc.tolist()):
        if row_start >= 0 and d:
            rows.append((row_start, s))
            row_start, row_len = -1, 0
        cost = e - s
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
        rows = pack_rows(np.asarray(sh.flags), seq_len, pack_docs, None if sh.etype is None else np.asarray(sh.etype))
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


def outside(index: RowIndex, heldout: RowIndex) -> RowIndex:
    """The rows of ``index`` (another packing of the same corpus, e.g. at another ``seq_len``) that
    share no token with the ``heldout`` rows: those of the shards the held-out rows do not touch,
    and in a shard they do touch, the rows that end before its first held-out token
    (``split_heldout`` holds out a whole last shard or the last rows of the only one)."""
    first = {}
    for sh, start in zip(heldout.shard.tolist(), heldout.span[:, 0].tolist()):
        first[sh] = min(start, first.get(sh, start))
    limit = np.array([first.get(i, np.iinfo(np.int64).max) for i in range(int(index.shard.max(initial=-1)) + 1)],
                     dtype=np.int64)
    keep = index.span[:, 1] <= limit[index.shard] if len(index) else np.zeros(0, dtype=bool)
    return index.select(np.flatnonzero(keep))


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
class Phase:
    """Steps ``[start, end)`` of a run read rows of ``seq_len`` tokens, ``batch_size`` per micro-step."""
    start: int
    end: int
    seq_len: int
    batch_size: int
    rows: RowIndex
    sampler: Sampler


class SeqSchedule:
    """Which rows a step reads when the sequence length changes during the run (``train.short_seq_len``:
    short rows first). Each phase has its own packing and sampler, and reads its rows from the
    start of its own order (step ``s`` of a phase starting at ``p`` is its sampler's step ``s - p``),
    so the rows of a step are still a pure function of the step: exact resume on either side of
    the switch. One phase from step 0 is the plain path (``Sampler.rows(step, …)``)."""

    def __init__(self, phases: list[Phase]):
        if not phases or phases[0].start != 0 or any(a.end != b.start for a, b in zip(phases, phases[1:])):
            raise ValueError("phases must start at step 0 and follow each other")
        self.phases = phases

    def at(self, step: int) -> Phase:
        for p in self.phases:
            if step < p.end:
                return p
        return self.phases[-1]

    def rows(self, step: int, micro: int, rank: int, phase: Phase | None = None) -> RowIndex:
        """The rows of ``(step, micro, rank)``; ``phase`` forces one (the budget's calibration times each)."""
        p = phase or self.at(step)
        return p.rows.select(p.sampler.rows(step - p.start, micro, rank))

    def epoch_of(self, steps_done: int) -> float:
        """Epochs read after ``steps_done`` steps by the phase of the last of them, counted from
        that phase's start."""
        p = self.at(max(0, steps_done - 1))
        return p.sampler.epoch_of(steps_done - p.start)


class Collator:
    """Rows → padded numpy batch with MLM inputs and labels (``masking.Masker`` chooses what)."""

    def __init__(self, corpus: Corpus, specials: dict[str, int], vocab_size: int, masking: MaskingConfig,
                 doc_attention: bool = False, tokenizer=None, curriculum: Curriculum | None = None,
                 linguistic: bool = False):
        self.shards = corpus.shards
        self.cls, self.sep, self.pad, self.mask = specials["cls"], specials["sep"], specials["pad"], specials["mask"]
        special_set = set(specials.values())
        self.random_pool = np.array([i for i in range(vocab_size) if i not in special_set], dtype=np.int64)
        self.m = masking
        self.curriculum = curriculum
        strategies = set(masking.weights) | {k for st in (curriculum.stages if curriculum else []) for k in st.get("weights", {})}
        if "entity" in strategies and not all(sh.ent is not None for sh in self.shards):
            raise ValueError("entity masking needs a corpus built with knowledge files (--entities/--triples)")
        connective_ids = []
        if "discourse" in strategies:
            if tokenizer is None:
                raise ValueError("discourse masking needs the tokenizer to spell the connectives")
            connective_ids = [tuple(tokenizer.encode(c, add_special_tokens=False).ids) for c in masking.connectives]
        self.masker = Masker(masking, connective_ids)
        self.inventory = build_word_inventory(self.shards) if "corrective" in strategies else None
        self.doc_attention = doc_attention
        self.linguistic = linguistic

    def _row(self, shard: int, start: int, end: int) -> tuple[Row, np.ndarray]:
        """One row's per-position views (specials get word -1) and its document ids."""
        sh = self.shards[shard]
        ids = np.asarray(sh.ids[start:end], dtype=np.int64)
        fl = np.asarray(sh.flags[start:end])
        pos = np.asarray(sh.pos[start:end])
        doc_pos = np.flatnonzero(fl & DOC_START)
        doc_pos = doc_pos[doc_pos > 0]
        ids = np.insert(ids, doc_pos, self.sep)
        is_special = np.zeros(ids.size, dtype=bool)
        is_special[doc_pos + np.arange(doc_pos.size)] = True
        word_start = np.insert((fl & WORD_START) != 0, doc_pos, True)
        sent_start = np.insert((fl & SENT_START) != 0, doc_pos, False)
        doc = np.cumsum((fl & DOC_START) != 0)
        doc = np.insert(doc, doc_pos, doc[doc_pos] - 1)  # a [SEP] closes the previous document
        if sh.ent is not None:
            etype = np.asarray(sh.etype[start:end])
            m_start = (fl & ENT_START) != 0
            mention = np.where(etype > 0, np.cumsum(m_start), 0)
            mention = np.insert(mention, doc_pos, 0)
        else:
            mention = np.zeros(ids.size, dtype=np.int64)
        pos = np.insert(pos, doc_pos, 0)

        def wrap(a, v):
            return np.concatenate([[v], a, [v]])

        ids, is_special = wrap(ids, self.cls), wrap(is_special, True)
        ids[-1] = self.sep
        word = np.cumsum(wrap(word_start, True) | is_special) - 1
        word[is_special] = -1
        row = Row(ids=ids, word=word, sent_start=wrap(sent_start, False), mention=wrap(mention, 0), pos=wrap(pos, 0))
        return row, np.concatenate([doc[:1], doc, doc[-1:]])

    def choose(self, word: np.ndarray, rng: np.random.Generator, strategy: str = "wwm") -> np.ndarray:
        """Positions to predict for a row given only its word ids (token / wwm)."""
        z = np.zeros(word.size, dtype=np.int64)
        row = Row(ids=z, word=word, sent_start=z.astype(bool), mention=z, pos=z)
        return self.masker.choose(strategy, row, rng)

    def settings(self, progress: float) -> dict:
        """Ratio, span parameter and strategy weights in force at ``progress`` (curriculum)."""
        if self.curriculum is None:
            return {"ratio": self.m.ratio, "span_p": self.m.span_p, "weights": dict(self.m.weights)}
        return self.curriculum.at(progress, self.m)

    def __call__(self, rows: list[tuple[int, int, int]], rng: np.random.Generator, progress: float = 0.0
                 ) -> dict[str, np.ndarray]:
        """Mask ``rows`` with the settings in force at ``progress``; reads but never writes shared
        state (the prefetch thread and evaluation call it concurrently)."""
        built = [self._row(*r) for r in rows]
        T = max(b[0].ids.size for b in built)
        B = len(built)
        input_ids = np.full((B, T), self.pad, dtype=np.int64)
        labels = np.full((B, T), -100, dtype=np.int64)
        attn = np.zeros((B, T), dtype=np.int64)
        docs = np.full((B, T), -1, dtype=np.int64)
        ling = np.zeros((B, T), dtype=np.int64)
        st = self.settings(progress)  # a fresh value for this batch
        for i, (row, doc) in enumerate(built):
            n = row.ids.size
            strategy = pick_strategy(st["weights"], rng)
            units = self.masker.choose_units(strategy, row, rng, st["ratio"], st["span_p"])
            input_ids[i, :n] = self.apply(row, units, strategy, rng)
            pos = np.flatnonzero(units)
            labels[i, pos] = row.ids[pos]
            attn[i, :n] = 1
            docs[i, :n] = doc
            if self.linguistic:
                ling[i, :n] = row_ling(row)
        batch = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
        if self.doc_attention:
            batch["doc_ids"] = docs
        if self.linguistic:
            batch["ling"] = ling
        return batch

    def apply(self, row: Row, units: np.ndarray, strategy: str, rng: np.random.Generator) -> np.ndarray:
        """The model's input for one row: each unit's fate ([MASK] with ``mask_prob``, random
        tokens with ``random_prob``, else kept) is drawn once for the whole unit; with
        ``corrective`` a "mask" unit gets a same-POS, same-length real word instead."""
        masked = row.ids.copy()
        n_units = int(units.max()) if units.size else 0
        if n_units == 0:
            return masked
        fate = rng.random(n_units)
        pos = np.flatnonzero(units)
        f = fate[units[pos] - 1]
        to_mask = pos[f < self.m.mask_prob]
        rnd = pos[(f >= self.m.mask_prob) & (f < self.m.mask_prob + self.m.random_prob)]
        if strategy == "corrective":
            to_mask = self._correct(masked, row, units, fate < self.m.mask_prob, rng)
        masked[to_mask] = self.mask
        masked[rnd] = self.random_pool[rng.integers(0, self.random_pool.size, rnd.size)]
        return masked

    def _correct(self, masked: np.ndarray, row: Row, units: np.ndarray, is_mask: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """MacBERT: write a same-POS, same-length real word over each unit whose fate is "mask";
        positions of units with no such word fall back to [MASK] (returned)."""
        fallback = []
        for s, n in _groups(units):
            if not is_mask[units[s] - 1]:
                continue
            options = self.inventory.get((int(row.pos[s]), n)) if self.inventory else None
            if options is None or len(options) < 2:
                fallback.extend(range(s, s + n))
                continue
            for _ in range(3):  # a word other than the original
                cand = options[int(rng.integers(len(options)))]
                if not np.array_equal(cand, row.ids[s:s + n]):
                    masked[s:s + n] = cand
                    break
            else:
                fallback.extend(range(s, s + n))
        return np.asarray(fallback, dtype=np.int64)


def row_ling(row: Row) -> np.ndarray:
    """The packed linguistic channel of one row (specials: word -1 → 0)."""
    text = row.word >= 0
    word_start = text & (row.word != np.concatenate([[-1], row.word[:-1]]))
    return pack_ling(row.pos.astype(np.int64), word_start.astype(np.int64), row.sent_start.astype(np.int64),
                     text.astype(np.int64))


def build_word_inventory(shards, max_words: int = 400_000, per_key: int = 4000) -> dict[tuple[int, int], np.ndarray]:
    """``(POS id, token length) → (K, length) token ids`` of real words seen in the first shards."""
    buckets: dict[tuple[int, int], set] = {}
    seen = 0
    for sh in shards:
        starts = np.flatnonzero(np.asarray(sh.flags) & WORD_START)
        ends = np.append(starts[1:], sh.ids.size)
        ids = np.asarray(sh.ids)
        for s, e in zip(starts.tolist(), ends.tolist()):
            n = e - s
            if 1 <= n <= 6:
                b = buckets.setdefault((int(sh.pos[s]), n), set())
                if len(b) < per_key:
                    b.add(tuple(ids[s:e].tolist()))
            seen += 1
            if seen >= max_words:
                break
        if seen >= max_words:
            break
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in buckets.items()}


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
