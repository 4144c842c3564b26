"""TinyBERT-style data augmentation for task distillation: copies of the training examples with
some words replaced, labels untouched.

Each example's texts are segmented with POS tags (rjieba). A word made only of CJK characters is
replaced with probability ``rate`` by
- a **single character**: one of the ``top_k`` predictions of a masked language model at that
  position (TinyBERT's BERT-MLM candidates for single-piece words; in Chinese BERT every CJK
  character is one piece), all chosen positions of a copy masked in one forward; without an MLM,
  as a multi-character word;
- a **multi-character word**: a word with the same POS tag and the same number of characters
  drawn from a pool (the training texts, plus ``corpus`` lines when given): TinyBERT takes GloVe
  neighbours, same-POS words are the cheap stand-in.

A replacement always has the length of the word it replaces, so every character offset a label
points to (NER tags, span starts) stays valid. What a label depends on is never replaced: NER
characters tagged other than ``O``, a span answer, KgCLUE's topic entity in the question, CSL's
keywords, CHID's blank (not CJK), and CLUEWSC examples (their spans are marked inside the text)
are not augmented at all. The teacher labels the copies (soft targets), as in TinyBERT.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import torch

from clueforge.text.segment import Segmenter

_CJK = re.compile(r"^[\u4e00-\u9fff]+$")
MAX_CORPUS_LINES = 20_000


def _views(family: str, fmt: str, ex: dict) -> list[tuple[str, str, set[int]]]:
    """``(field, text, protected character positions)`` of the texts of ``ex`` that may change."""
    if family == "classify":
        if fmt == "wsc":
            return []
        out = [] if fmt == "csl" else [("a", ex["a"], set())]  # CSL: the keywords are what is classified
        return out + ([("b", ex["b"], set())] if ex.get("b") else [])
    if family == "kgclue":
        from clueforge.knowledge.sources import entity_name

        q, keep = ex["question"], set()
        name = entity_name(ex["gold"][0]) if ex.get("gold") else ""
        for m in re.finditer(re.escape(name), q) if name else ():
            keep.update(range(m.start(), m.end()))
        return [("question", q, keep)]
    if family == "ner":
        if any(len(c) != 1 for c in ex["chars"]):
            return []
        tags = ex["tags"] or ["O"] * len(ex["chars"])
        return [("chars", "".join(ex["chars"]), {i for i, t in enumerate(tags) if t != "O"})]
    if family == "span":
        keep = set()
        if ex.get("start") is not None:
            keep = set(range(ex["start"], ex["start"] + len(ex["answers"][0])))
        return [("context", ex["context"], keep), ("question", ex["question"], set())]
    if family == "choice":
        if fmt == "c3":
            return [("context", ex["context"], set()), ("question", ex["question"], set())]
        return [("content", ex["content"], set())]
    raise ValueError(f"no augmentation for task family {family!r}")


def _set(ex: dict, field: str, text: str) -> None:
    ex[field] = list(text) if field == "chars" else text


class Augmenter:
    """Makes ``copies`` augmented copies of each example (``augment``); see the module docstring."""

    def __init__(self, family: str, fmt: str, *, rate: float, copies: int, seed: int = 0, mlm=None, tok=None,
                 top_k: int = 15, corpus: str | Path | None = None):
        self.family, self.fmt, self.rate, self.copies, self.top_k = family, fmt, rate, copies, top_k
        self.mlm, self.tok = mlm, tok
        self.rng = random.Random(seed)
        self.seg = Segmenter()
        self.pool: dict[tuple[str, int], list[str]] = {}
        self._seen: set[str] = set()
        self.corpus = corpus

    def _add_to_pool(self, text: str) -> None:
        for word, pos in self.seg.tag(text):
            if _CJK.match(word) and word not in self._seen:
                self._seen.add(word)
                self.pool.setdefault((pos, len(word)), []).append(word)

    def _read_corpus(self) -> None:
        with open(self.corpus, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if n >= MAX_CORPUS_LINES:
                    break
                line = line.strip()
                if line.startswith("{"):
                    line = json.loads(line).get("text", "")
                self._add_to_pool(line)

    def augment(self, examples: list[dict]) -> list[dict]:
        """``copies`` changed copies of every example that has something to change (originals not included)."""
        if not self.copies:
            return []
        views = [_views(self.family, self.fmt, e) for e in examples]
        for vs in views:
            for _, text, _ in vs:
                self._add_to_pool(text)
        if self.corpus:
            self._read_corpus()
        out = []
        for k in range(self.copies):
            for e, vs in zip(examples, views):
                if not vs:
                    continue
                new = copy.deepcopy(e)
                changed = False
                for field, text, keep in vs:
                    t = self.replace(text, keep)
                    changed |= t != text
                    _set(new, field, t)
                if changed:
                    new["augmented"] = k + 1
                    out.append(new)
        return out

    def replace(self, text: str, keep: set[int] = frozenset()) -> str:
        """``text`` with some CJK words outside ``keep`` replaced by words of the same length."""
        chars = list(text)
        masked: list[int] = []
        pos = 0
        for word, tag in self.seg.tag(text):
            start, pos = pos, pos + len(word)
            if not _CJK.match(word) or keep.intersection(range(start, pos)) or self.rng.random() >= self.rate:
                continue
            if len(word) == 1 and self.mlm is not None:
                masked.append(start)
                continue
            choices = [w for w in self.pool.get((tag, len(word)), ()) if w != word]
            if choices:
                chars[start:pos] = self.rng.choice(choices)
        if masked:
            for i, c in self._mlm_predictions("".join(chars), masked).items():
                chars[i] = c
        return "".join(chars)

    @torch.no_grad()
    def _mlm_predictions(self, text: str, positions: list[int]) -> dict[int, str]:
        """A character drawn from the MLM's ``top_k`` CJK predictions at each position (all masked at once)."""
        enc = self.tok.encode(text)
        at = {s: t for t, (s, e) in enumerate(enc.offsets) if e == s + 1 and enc.special_tokens_mask[t] == 0}
        ids = torch.tensor([enc.ids])
        targets = [(p, at[p]) for p in positions if p in at]
        if not targets:
            return {}
        mask_id = self.tok.token_to_id("[MASK]")
        for _, t in targets:
            ids[0, t] = mask_id
        self.mlm.eval()
        logits = self.mlm(ids, torch.ones_like(ids)).logits[0]  # (T, V)
        out = {}
        for p, t in targets:
            cands = []
            for i in logits[t].topk(min(4 * self.top_k, logits.shape[-1])).indices.tolist():
                c = self.tok.id_to_token(i)
                if c and len(c) == 1 and _CJK.match(c) and c != text[p]:
                    cands.append(c)
                if len(cands) == self.top_k:
                    break
            if cands:
                out[p] = self.rng.choice(cands)
        return out
