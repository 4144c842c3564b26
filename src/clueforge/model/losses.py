"""Losses shared by pretraining and fine-tuning (neutral ground: neither loop imports the other)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over predictions of ½(KL(p‖q) + KL(q‖p)) along the last dimension."""
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    kl = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))
    if mask is not None:
        kl = kl[mask]
    return kl.mean()
