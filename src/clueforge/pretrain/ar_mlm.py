"""Autoregressive MLM (Shenzhou): the masked units of a row are split into k groups in a random
order, and group j is predicted with the ground truth of groups < j revealed.

No public reference implementation is known; this is clueforge's reading of it:

- **Group members are masked units, never single tokens.** A member is a maximal run of
  consecutive predicted positions of a row (``mask_units``). Every unit the masking strategies
  choose (a token, a whole word, an entity mention, a span) is contiguous and predicted whole, so a
  run is one unit or several adjacent ones: a word, mention or span is never split across groups.
  Adjacent units share a group (the collator's batch carries the labels, not the unit numbers).
- **Random order, balanced groups.** Per row, the n members are put in a random order (a
  permutation) and dealt round-robin into the k groups from a random first group: group sizes
  differ by at most one member and each member's group is uniform over 0..k-1
  (``assign_groups``). The draw comes from a generator seeded by the run's seed, step,
  micro-step and rank, like the masking: a resumed run groups exactly as an uninterrupted one.
- **Inputs.** Group j's input is the collator's input with the positions of groups < j set to
  their original tokens; the positions of groups ≥ j keep what the collator drew for them
  ([MASK] / random token / kept, 80/10/10 per unit). Group j's labels are its own positions only,
  so every predicted position is predicted exactly once per step (``expand``).
- **k passes, one forward.** A bidirectional encoder's every hidden state depends on which groups
  are revealed, so an exact k-group step is k passes of the whole row, however they are arranged.
  The k inputs run as one batch of k·B rows (one forward, one graph; measured against a Python
  loop of k forwards and against one row of k·T tokens under a block-diagonal mask in
  ``benchmarks/ar_mlm_cost.py``). A two-stream (XLNet) layout would cost ~(1 + mask ratio)·T
  tokens whatever k, but it is a different model (a query stream without [MASK] inputs, context
  that never sees the revealed tokens) that fine-tuning never runs; it is not what is built here.
- **Loss.** The mean over the non-empty groups of each group's mean cross-entropy
  (``group_losses``). Evaluation is unchanged: the plain MLM pass, every masked position hidden.

``train.ar_mlm_groups = 1`` is ordinary MLM: no groups are drawn, the step is the plain path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

STREAM = 14
"""Key appended to the masking generator's seed for the group draw (an independent stream: the
masking and the objectives' batches are the same whatever ``ar_mlm_groups``)."""


def group_rng(seed: int, step: int, micro: int, rank: int) -> np.random.Generator:
    """The generator of one micro-batch's group draw: the masking's key ``(seed, 1, step, micro,
    rank)`` (``pretrain.loop``) extended by ``STREAM``."""
    return np.random.default_rng([seed, 1, step, micro, rank, STREAM])


def mask_units(labels: np.ndarray) -> np.ndarray:
    """``(B, T)`` member number of each predicted position (1, 2, … per row; 0 = not predicted):
    a member is a maximal run of consecutive predicted positions (``labels != -100``)."""
    pred = labels != -100
    start = pred & ~np.pad(pred, ((0, 0), (1, 0)))[:, :-1]  # (B, T) first position of each run
    return np.where(pred, np.cumsum(start, axis=1), 0)


def assign_groups(units: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, T)`` group (0..k-1) of each predicted position, -1 elsewhere. ``units``: ``(B, T)``
    member numbers 1..n per row (0 = not predicted); all positions of a member get one group."""
    groups = np.full(units.shape, -1, dtype=np.int64)
    for i, row in enumerate(units):
        n = int(row.max())
        if n == 0:
            continue
        of_member = (rng.permutation(n) + rng.integers(k)) % k  # (n,) round-robin from a random group
        groups[i] = np.where(row > 0, of_member[row - 1], -1)
    return groups


def expand(batch: dict[str, torch.Tensor], groups: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The k inputs of one step as one batch of k·B rows, copy j at rows ``j·B … (j+1)·B - 1``:
    ``input_ids`` with the original token (the label) at groups < j, ``labels`` at group j only;
    every other tensor (attention mask, document ids, …) repeated."""
    ids, labels = batch["input_ids"], batch["labels"]  # (B, T)
    j = torch.arange(k, device=groups.device).view(k, 1, 1)
    g = groups.unsqueeze(0)  # (1, B, T)
    revealed = (g >= 0) & (g < j)  # (k, B, T)
    out = {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in batch.items()}
    out["input_ids"] = torch.where(revealed, labels.unsqueeze(0), ids.unsqueeze(0)).flatten(0, 1)  # (k·B, T)
    out["labels"] = torch.where(g == j, labels.unsqueeze(0), -100).flatten(0, 1)  # (k·B, T)
    return out


def group_losses(logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-group loss (k,))``: ``logits``/``targets`` (M, V)/(M,) at the predicted
    positions of the expanded batch, in its row order (group 0's positions first); the loss is the
    mean of the non-empty groups' mean cross-entropies (an empty group's entry is 0)."""
    counts = torch.stack([(groups == j).sum() for j in range(k)])  # (k,)
    of_row = torch.repeat_interleave(torch.arange(k, device=logits.device), counts)  # (M,)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    per_group = torch.zeros(k, device=logits.device).index_add(0, of_row, ce) / counts.clamp(min=1)
    present = counts > 0
    return per_group[present].mean(), per_group
