"""Scoring label words through the MLM head: encoding prompts, one batched forward, calibration.

An example becomes one row per label-word length ``n`` present in its verbalizer (usually one):
``[CLS] pattern-with-slots-filled [SEP]`` with the template's ``[MASK]`` written as ``n`` [MASK]
tokens. The encoder runs once per row (rows sorted by length, padded per batch); its last layer
(``Encoder.forward_at``) and the MLM head run only at the [MASK] positions; a word's score is the
mean (or sum) of its tokens' log-probabilities at those positions.

Calibration (zero-shot):
- ``pmi``: subtract the word's score given the template with every slot empty, i.e. rank by
  log P(y|x) − log P(y|∅) (ERNIE 3.0 Titan's PMI scoring);
- ``contextual``: Zhao et al. 2021: p(y|x) normalised over the labels, divided by the mean of the
  same distribution on the paper's three content-free inputs "N/A", "" and "[MASK]" (every slot
  filled with it; "[MASK]" is the real mask token here, the MLM's own "no content") — the diagonal
  correction W = diag(p_cf)⁻¹, applied as log p − log p_cf (renormalised by the caller: argmax unchanged);
- ``batch``: batch calibration (Zhou et al. 2024, "Batch Calibration"): the prior is estimated from the
  inputs being scored themselves, p̂(y) = mean over the examples of p(y|x) normalised over the labels,
  and each example ranks by log p(y|x) − log p̂(y). No extra forward and no content-free guess: the
  bias removed is the one the model actually shows on this input set (unlabelled; the gold labels are
  never read). For per-example candidates (CHID) the classes are the candidate positions. It needs the
  whole set: the answers depend on which inputs are scored together.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from clueforge.prompts.spec import Template
from clueforge.tasks.registry import Task

log = logging.getLogger("clueforge.prompts")
CALIBRATIONS = ("none", "pmi", "contextual", "batch")
CONTENT_FREE = ("N/A", "", "[MASK]")


def slots_of(task: Task, ex: dict) -> dict[str, str]:
    """A loaded example (``clueforge.tasks`` family format) as the values of its pattern slots."""
    if task.family == "choice":
        before, _, after = ex["content"].partition("#idiom#")
        return {"before": before, "after": after}
    if task.fmt == "pair":
        return {"sentence1": ex["a"], "sentence2": ex["b"]}
    if task.fmt == "csl":
        return {"keywords": ex["a"], "abstract": ex["b"]}
    if task.fmt == "wsc":
        return {"text": ex["text"], "span1": ex["span1"], "span2": ex["span2"]}
    return {"sentence": ex["a"]}


def words_of(t: Template, ex: dict, labels: list[str] | None) -> list[str]:
    """The words to score for ``ex``, in label order (or candidate order)."""
    if t.verbalizer is None:
        return [str(c) for c in ex["choices"]]
    return [t.verbalizer[lab] for lab in labels]


def _fit(lengths: list[int], budget: int) -> list[int]:
    """Tokens kept per slot: the longest slot is cut first until the total fits ``budget``."""
    keep = list(lengths)
    while sum(keep) > max(0, budget):
        excess = sum(keep) - max(0, budget)
        i = max(range(len(keep)), key=keep.__getitem__)
        second = max((k for j, k in enumerate(keep) if j != i), default=0)
        keep[i] -= min(excess, max(1, keep[i] - second))
    return keep


class PromptEncoder:
    """Token ids of a template's rows, with the position of the first [MASK] of each row."""

    def __init__(self, tok, template: Template, max_length: int):
        self.tok, self.t, self.max_length = tok, template, max_length
        self.mask_id, self.unk_id = tok.token_to_id("[MASK]"), tok.token_to_id("[UNK]")
        self.cls_id, self.sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        self.pieces = template.pieces()
        self.literal = {v: tok.encode(v, add_special_tokens=False).ids for k, v in self.pieces if k == "text"}
        self._words: dict[str, list[int]] = {}

    def word_ids(self, word: str) -> list[int]:
        if word not in self._words:
            self._words[word] = self.tok.encode(word, add_special_tokens=False).ids
        return self._words[word]

    def rows(self, slot_values: list[dict[str, str]], n_masks: list[int],
             keep_masks: bool = False) -> list[tuple[list[int], int]]:
        """``(ids, first mask position)`` for each (slots, mask count) pair. A "[MASK]" in a slot's
        text becomes [UNK] unless ``keep_masks`` (the content-free input "[MASK]" of calibration)."""
        names = [v for k, v in self.pieces if k == "slot"]
        flat = [s[name] for s in slot_values for name in names]
        encs = self.tok.encode_batch(flat, add_special_tokens=False) if flat else []
        fixed = 2 + sum(len(self.literal[v]) for k, v in self.pieces if k == "text")
        out = []
        for i, n in enumerate(n_masks):
            slot_ids = [[self.unk_id if x == self.mask_id and not keep_masks else x for x in e.ids]
                        for e in encs[i * len(names):(i + 1) * len(names)]]
            keep = _fit([len(s) for s in slot_ids], self.max_length - fixed - n)
            ids, start, j = [self.cls_id], -1, 0
            for kind, value in self.pieces:
                if kind == "text":
                    ids += self.literal[value]
                elif kind == "mask":
                    start = len(ids)
                    ids += [self.mask_id] * n
                else:  # a slot: the text before the blank keeps its end, every other its start
                    s, k = slot_ids[j], keep[j]
                    ids += s[len(s) - k:] if value == "before" else s[:k]
                    j += 1
            out.append((ids + [self.sep_id], start))
        return out


def word_logprobs(model, rows: list[tuple[list[int], int]], queries: list[np.ndarray], batch_size: int = 64,
                  device=None, at_masks: bool = True) -> list[np.ndarray]:
    """For each row and its (W, n) query of word token ids: the (W, n) log-probabilities of those
    tokens at the row's n [MASK] positions. Rows are batched by length; the MLM head runs only at
    [MASK] positions and, with ``at_masks`` (the default, for plain encoders), so does the last
    layer (``Encoder.forward_at``); off, the whole (B, T, D) output is computed and read there."""
    device = device or next(model.parameters()).device
    fast = at_masks and not model.cfg.arch_options
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[np.ndarray | None] = [None] * len(rows)
    model.eval()
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            idx = order[b0:b0 + batch_size]
            T = max(len(rows[i][0]) for i in idx)
            ids = np.zeros((len(idx), T), dtype=np.int64)
            att = np.zeros((len(idx), T), dtype=np.int64)
            for r, i in enumerate(idx):
                ids[r, :len(rows[i][0])], att[r, :len(rows[i][0])] = rows[i][0], 1
            ids_t, att_t = torch.from_numpy(ids).to(device), torch.from_numpy(att).to(device)
            n = [queries[i].shape[1] for i in idx]
            b_idx = np.repeat(np.arange(len(idx)), n)
            if fast:  # the last layer only at each row's max(n) positions from its first [MASK]
                at = np.minimum(np.array([rows[i][1] for i in idx])[:, None] + np.arange(max(n)), T - 1)  # (B, Q)
                h = model.encoder.forward_at(ids_t, att_t, torch.from_numpy(at).to(device))  # (B, Q, D)
                p_idx = np.concatenate([np.arange(k) for k in n])
            else:
                h = model.encoder(ids_t, att_t)  # (B, T, D)
                p_idx = np.concatenate([rows[i][1] + np.arange(k) for i, k in zip(idx, n)])
            logp = F.log_softmax(model.head(h[torch.from_numpy(b_idx), torch.from_numpy(p_idx)]).float(), -1)  # (M, V)
            offsets = np.concatenate([[0], np.cumsum(n)])
            qi = np.concatenate([(offsets[r] + np.arange(n[r]))[None, :].repeat(len(queries[i]), 0).ravel()
                                 for r, i in enumerate(idx)])
            qt = np.concatenate([queries[i].ravel() for i in idx])
            vals = logp[torch.from_numpy(qi).to(device), torch.from_numpy(qt).to(device)].cpu().numpy()
            pos = 0
            for r, i in enumerate(idx):
                size = queries[i].size
                out[i] = vals[pos:pos + size].reshape(queries[i].shape)
                pos += size
    return out  # type: ignore[return-value]


def example_rows(enc: PromptEncoder, slot_values: list[dict[str, str]], words: list[list[str]], keep_masks: bool = False):
    """``(rows, queries, where)``: one row per (example, word length) with that many [MASK]s; the
    (W, n) token ids of its words; ``(example index, word indices)`` it scores."""
    rows_in, n_masks, queries, where = [], [], [], []
    for e, (slots, ws) in enumerate(zip(slot_values, words)):
        by_len: dict[int, list[int]] = {}
        for w_i, w in enumerate(ws):
            by_len.setdefault(len(enc.word_ids(w)), []).append(w_i)
        for n, members in sorted(by_len.items()):
            if n == 0:
                raise ValueError(f"{enc.t.source}: a label word tokenises to nothing")
            rows_in.append(slots)
            n_masks.append(n)
            queries.append(np.array([enc.word_ids(ws[m]) for m in members], dtype=np.int64))
            where.append((e, members))
    return enc.rows(rows_in, n_masks, keep_masks), queries, where


def score_examples(model, enc: PromptEncoder, slot_values: list[dict[str, str]], words: list[list[str]],
                   batch_size: int = 64, keep_masks: bool = False, at_masks: bool = True) -> list[np.ndarray]:
    """Per example, the score (mean or sum of token log-probs) of each of its words."""
    rows, queries, where = example_rows(enc, slot_values, words, keep_masks)
    lps = word_logprobs(model, rows, queries, batch_size, at_masks=at_masks)
    out = [np.zeros(len(ws)) for ws in words]
    agg = np.mean if enc.t.score == "mean" else np.sum
    for (e, members), lp in zip(where, lps):
        out[e][members] = agg(lp, axis=1)
    return out


def calibrate(model, enc: PromptEncoder, scores: list[np.ndarray], words: list[list[str]], slot_names: list[str],
              method: str, batch_size: int = 64, at_masks: bool = True) -> list[np.ndarray]:
    """``scores`` corrected by ``method`` (see the module docstring); argmax of the result predicts."""
    if method == "none":
        return scores
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration {method!r}: expected one of {', '.join(CALIBRATIONS)}")
    if method == "batch":
        return batch_calibrate(scores)
    vocab = sorted({w for ws in words for w in ws})
    fills = ("",) if method == "pmi" else CONTENT_FREE
    prior = {}
    for fill in fills:  # one pseudo-example per content-free input, scoring every word used
        s = score_examples(model, enc, [{k: fill for k in slot_names}], [vocab], batch_size, True, at_masks)[0]
        prior[fill] = dict(zip(vocab, s))
    out = []
    for s, ws in zip(scores, words):
        if method == "pmi":
            out.append(s - np.array([prior[""][w] for w in ws]))
            continue
        p_cf = np.mean([softmax(np.array([prior[f][w] for w in ws])) for f in fills], axis=0)
        out.append(log_softmax(s) - np.log(p_cf))
    return out


def batch_calibrate(scores: list[np.ndarray]) -> list[np.ndarray]:
    """Batch calibration: log p(y|x) − log mean_x' p(y|x'), p normalised over each example's classes."""
    if not scores:
        return scores
    if len({len(s) for s in scores}) != 1:
        raise ValueError("batch calibration needs the same number of classes in every example")
    if len(scores) < 2 * len(scores[0]):  # one example: every calibrated score is 0, the first class wins
        log.warning("batch calibration on %d examples for %d classes: the prior is estimated from the inputs "
                    "scored together, too few here to mean much; use pmi or contextual, or score the whole file at once",
                    len(scores), len(scores[0]))
    logp = [log_softmax(s) for s in scores]
    prior = np.mean([np.exp(lp) for lp in logp], axis=0)
    return [lp - np.log(prior) for lp in logp]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log of the distribution over one example's classes that the scores ``x`` define."""
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))
