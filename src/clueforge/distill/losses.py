"""Distillation losses: what a student is pulled toward, each a plain function of tensors.

- ``minilm_relation_kl`` (MiniLMv2): the Q-Q, K-K and V-V self-attention relations of one student
  layer against one teacher layer. Each of Q, K, V is re-split into ``relation_heads`` heads
  whatever the model's own head count, so teacher and student may differ in width and heads: a
  relation is (T × T) per relation head, the same shape on both sides.
- ``hidden_mse`` (TinyBERT): the student's hidden states, through a learned projection when the
  widths differ, against the teacher's.
- ``soft_kl``: KL(teacher ‖ student) of the MLM distributions at temperature T, scaled by T² so
  its gradient does not shrink as T grows (Hinton et al.).

The hard MLM loss is the model's own cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV projection's output (B, T, 3D) → Q, K, V each (B, T, D)."""
    B, T, D3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, D3 // 3).unbind(2)
    return q, k, v


def relation_log_probs(x: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention relation of ``x`` (B, T, D) split into ``heads`` heads: log softmax over
    keys of x·xᵀ/√(D/heads), (B, heads, T, T). ``mask`` (B, T) or (B, T, T), True = may attend."""
    B, T, D = x.shape
    if D % heads:
        raise ValueError(f"relation heads {heads} do not divide width {D}")
    h = x.float().view(B, T, heads, D // heads).transpose(1, 2)  # (B, R, T, Dr)
    scores = h @ h.transpose(-1, -2) / math.sqrt(D // heads)  # (B, R, T, T)
    if mask is not None:
        allowed = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]  # (B, 1, 1|T, T)
        scores = scores.masked_fill(~allowed.bool(), torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, -1)


def minilm_relation_kl(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, relation_heads: int,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over Q-Q, K-K, V-V of the mean KL(teacher relation ‖ student relation) per query row.

    ``student_qkv`` (B, T, 3Ds) and ``teacher_qkv`` (B, T, 3Dt): outputs of the fused QKV
    projections (``layer.attn.qkv``). ``mask`` (B, T) padding (1 = real token) or (B, T, T)
    allowed pairs; rows of padding queries do not count.
    """
    rows = None
    if mask is not None:
        mask = mask.bool()
        rows = mask if mask.dim() == 2 else mask.any(-1)  # (B, T) real query positions
    total = student_qkv.new_zeros((), dtype=torch.float32)
    for s, t in zip(split_qkv(student_qkv), split_qkv(teacher_qkv)):
        ls = relation_log_probs(s, relation_heads, mask)  # (B, R, T, T)
        lt = relation_log_probs(t, relation_heads, mask)
        kl = (lt.exp() * (lt - ls)).sum(-1)  # (B, R, T)
        if rows is not None:
            kl = kl.masked_select(rows[:, None, :].expand_as(kl))
        total = total + kl.mean()
    return total


def hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, proj: nn.Module | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between ``proj(student_h)`` (B, T, Ds → Dt) and ``teacher_h`` (B, T, Dt)
    over the real tokens of ``mask`` (B, T); ``proj`` None when the widths are equal."""
    s = proj(student_h) if proj is not None else student_h
    if s.shape[-1] != teacher_h.shape[-1]:
        raise ValueError(f"student width {s.shape[-1]} ≠ teacher width {teacher_h.shape[-1]}: give a projection")
    err = (s.float() - teacher_h.float()).pow(2).mean(-1)  # (B, T)
    return err[mask.bool()].mean() if mask is not None else err.mean()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², mean over rows (the last dim is the
    distribution); zero when the student's logits equal the teacher's."""
    T = float(temperature)
    ls = F.log_softmax(student_logits.float() / T, -1)
    lt = F.log_softmax(teacher_logits.float() / T, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * T * T
