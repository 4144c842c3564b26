"""Masking strategies for MLM, mixed by weight per row, with an exact token budget and a curriculum.

Strategies choose *units* of consecutive tokens that are masked whole:

============  ==================================================================================
token         single tokens (BERT)
wwm           whole words from the segmentation side channel
entity        whole entity mentions (corpus built with knowledge files); filled up with words
span          runs of whole words with geometric length (p = ``span_p``, at most ``span_max`` words);
              a span may run over a sentence end (SpanBERT) but never over a document end
discourse     connectives (因为/所以/但是/然而/因此/如果… user-extensible) and sentence-initial words
              first; filled up with words
corrective    MacBERT: units chosen as ``wwm``, but a unit whose fate is "mask" is replaced by
              another real word of the same POS and token length ([MASK] when there is none)
============  ==================================================================================

The budget is ``round(ratio · real tokens)`` (at least 1) and is kept exactly: units are taken in
the strategy's priority order, then at random, whenever they still fit; a remainder is filled with
single tokens outside the strategy's protected units (so an entity mention, a span, a word is
never split when the budget allows it). No unit ever contains a special token ([CLS], the [SEP]
between two packed documents, [PAD]); units of several words (``span``, ``entity``) stay
inside one document. ``Masker.choose_units`` numbers the units, so that the 80/10/10 fate
([MASK] / random / kept) is drawn once per unit: a word, mention or span is never half masked.

``Curriculum`` (OBERT): stages ``{at: progress, ratio, span_p, weights}`` interpolated linearly
over training progress (0 → 1), from easy (single tokens, low ratio) to hard. The settings in
force for a batch are values passed down (``ratio``, ``span_p`` arguments): nothing writes them
back into a shared config, so a prefetch thread and evaluation never see each other's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("token", "wwm", "entity", "span", "discourse", "corrective")
DEFAULT_CONNECTIVES = (
    "因为", "所以", "但是", "然而", "因此", "如果", "虽然", "而且", "并且", "不过", "可是", "于是", "否则", "即使",
    "只要", "只有", "除非", "既然", "尽管", "因而", "从而", "此外", "另外", "总之", "首先", "其次", "最后", "例如",
    "比如", "同时", "甚至", "况且", "何况", "反而", "那么", "接着", "然后", "由于", "以便", "以免",
)


@dataclass
class MaskingConfig:
    ratio: float = 0.15
    """Share of real tokens per row that are predicted (exact, in tokens)."""
    weights: dict[str, float] = field(default_factory=lambda: {"wwm": 1.0})
    """Strategy → weight; each row draws one strategy with these probabilities."""
    mask_prob: float = 0.8
    random_prob: float = 0.1
    span_p: float = 0.2
    """Geometric parameter of span length in words (mean 1/p)."""
    span_max: int = 10
    connectives: tuple[str, ...] = DEFAULT_CONNECTIVES

    def __post_init__(self) -> None:
        bad = sorted(set(self.weights) - set(STRATEGIES))
        if bad:
            raise ValueError(f"unknown masking strategies {bad}; known: {', '.join(STRATEGIES)}")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError("masking weights must have a positive entry")

    @property
    def strategy(self) -> str:  # the single strategy, for configs that use one
        return max(self.weights, key=self.weights.get)


@dataclass
class Row:
    """Per-position views of one row (specials included, ``word == -1`` on them)."""

    ids: np.ndarray  # (T,) token ids
    word: np.ndarray  # (T,) word number, -1 on specials
    sent_start: np.ndarray  # (T,) bool
    mention: np.ndarray  # (T,) mention number (1-based), 0 outside mentions
    pos: np.ndarray  # (T,) POS id


def _groups(labels: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of runs of equal positive labels."""
    if labels.size == 0:
        return []
    change = np.flatnonzero(np.diff(labels) != 0) + 1
    starts = np.concatenate([[0], change])
    ends = np.append(change, labels.size)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends) if labels[s] > 0]


def _take(units: list[tuple[int, int]], budget: int, chosen: np.ndarray) -> int:
    """Greedily add units that fit and do not overlap, numbering them in ``chosen`` (0 = free)
    from ``chosen.max() + 1``; returns the budget left."""
    k = int(chosen.max()) if chosen.size else 0
    for s, n in units:
        if budget == 0:
            break
        if n <= budget and not chosen[s:s + n].any():
            k += 1
            chosen[s:s + n] = k
            budget -= n
    return budget


class Masker:
    def __init__(self, cfg: MaskingConfig, connective_ids: list[tuple[int, ...]] | None = None):
        self.cfg = cfg
        self.connectives = set(connective_ids or [])

    def units(self, strategy: str, row: Row, rng: np.random.Generator, span_p: float | None = None
              ) -> tuple[list, list, np.ndarray]:
        """``(priority units, other units, protected positions)`` for a strategy; units are
        ``(start, length)`` runs of real tokens (never a special token, never two documents)."""
        words = _groups(row.word + 1)
        rng.shuffle(words)
        real = row.word >= 0
        if strategy == "token":
            toks = [(int(i), 1) for i in rng.permutation(np.flatnonzero(real))]
            return [], toks, np.zeros_like(real)
        if strategy in ("wwm", "corrective"):
            return [], words, real
        if strategy == "entity":
            mentions = _groups(row.mention * real)
            rng.shuffle(mentions)
            return mentions, words, row.mention > 0
        if strategy == "discourse":
            first = [(s, n) for s, n in words if row.sent_start[s]]  # a row may start mid-sentence
            conn = [(s, n) for s, n in words if tuple(row.ids[s:s + n].tolist()) in self.connectives]
            seen = set(conn)
            return conn + [u for u in first if u not in seen], words, real
        if strategy == "span":
            p = self.cfg.span_p if span_p is None else span_p
            order = sorted(_groups(row.word + 1))
            # the words of one run of real tokens (between two specials): one document
            segment = np.cumsum(~real)[[s for s, _ in order]] if order else np.zeros(0, np.int64)
            seg_end = np.searchsorted(segment, segment, side="right")  # first word of the next segment
            spans = []
            for k in rng.permutation(len(order)):
                length = min(int(rng.geometric(p)), self.cfg.span_max, int(seg_end[k]) - k)
                s = order[k][0]
                e = order[k + length - 1][0] + order[k + length - 1][1]
                spans.append((s, e - s))
            return spans, words, real
        raise ValueError(f"unknown masking strategy {strategy!r}")

    def choose_units(self, strategy: str, row: Row, rng: np.random.Generator, ratio: float | None = None,
                     span_p: float | None = None) -> np.ndarray:
        """``(T,)`` unit number of each position to predict (1, 2, …; 0 = not predicted).

        ``ratio`` and ``span_p`` are this batch's values (curriculum); ``None`` takes the config's.
        """
        real = row.word >= 0
        chosen = np.zeros(row.word.size, dtype=np.int64)
        n_real = int(real.sum())
        if n_real == 0:
            return chosen
        ratio = self.cfg.ratio if ratio is None else ratio
        budget = min(n_real, max(1, int(round(ratio * n_real))))
        first, rest, protected = self.units(strategy, row, rng, span_p)
        left = _take(first, budget, chosen)
        left = _take(rest, left, chosen)
        if left:  # exact budget: single tokens, outside protected units first
            free = np.flatnonzero(real & (chosen == 0))
            order = np.concatenate([rng.permutation(free[~protected[free]]), rng.permutation(free[protected[free]])])
            k = int(chosen.max())
            chosen[order[:left]] = np.arange(k + 1, k + 1 + left)
        return chosen

    def choose(self, strategy: str, row: Row, rng: np.random.Generator, ratio: float | None = None,
               span_p: float | None = None) -> np.ndarray:
        """``(T,)`` bool: the positions to predict."""
        return self.choose_units(strategy, row, rng, ratio, span_p) > 0


def pick_strategy(weights: dict[str, float], rng: np.random.Generator) -> str:
    names = [k for k, w in weights.items() if w > 0]
    p = np.array([weights[k] for k in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


@dataclass
class Curriculum:
    """Piecewise-linear schedule of masking settings over training progress (0 → 1)."""

    stages: list[dict]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("curriculum needs at least one stage")
        self.stages = sorted(self.stages, key=lambda s: s.get("at", 0.0))
        for s in self.stages:
            unknown = set(s) - {"at", "ratio", "span_p", "weights"}
            if unknown:
                raise ValueError(f"curriculum stage keys {sorted(unknown)} unknown (at, ratio, span_p, weights)")
            bad = set(s.get("weights", {})) - set(STRATEGIES)
            if bad:
                raise ValueError(f"curriculum stage: unknown strategies {sorted(bad)}")

    def at(self, progress: float, base: MaskingConfig) -> dict:
        """``{ratio, span_p, weights}`` at ``progress``."""
        def value(stage, key):
            return stage.get(key, {"ratio": base.ratio, "span_p": base.span_p, "weights": base.weights}[key])

        st = self.stages
        if progress <= st[0].get("at", 0.0):
            lo = hi = st[0]
            t = 0.0
        elif progress >= st[-1].get("at", 0.0):
            lo = hi = st[-1]
            t = 0.0
        else:
            k = next(i for i in range(1, len(st)) if progress <= st[i]["at"])
            lo, hi = st[k - 1], st[k]
            t = (progress - lo["at"]) / max(1e-12, hi["at"] - lo["at"])
        wl, wh = value(lo, "weights"), value(hi, "weights")
        weights = {k: (1 - t) * wl.get(k, 0.0) + t * wh.get(k, 0.0) for k in sorted(set(wl) | set(wh))}
        return {"ratio": (1 - t) * value(lo, "ratio") + t * value(hi, "ratio"),
                "span_p": (1 - t) * value(lo, "span_p") + t * value(hi, "span_p"), "weights": weights}
