"""Task heads on the shared encoder, in the Hugging Face ``BertFor*`` layouts so fine-tuned
checkpoints load in ``transformers`` too.

=========  ==========================================  ====================================
head       computes                                    HF class / weight names
=========  ==========================================  ====================================
sequence   [CLS] → pooler(tanh) → dropout → C logits    BertForSequenceClassification
choice     each (context, choice) row → 1 score         BertForMultipleChoice
token      every token → C logits                       BertForTokenClassification
span       every token → start/end logits               BertForQuestionAnswering
=========  ==========================================  ====================================
"""

from __future__ import annotations

import torch
from torch import nn

from clueforge.model.bert import Encoder, ModelConfig, init_options, init_positions, init_weights

HEADS = ("sequence", "choice", "token", "span")


POOLINGS = ("cls", "mean")
"""What the sentence and choice heads read: [CLS] (BERT's pooler, the default) or the mean of the
real tokens (better for a model pretrained without a sentence-level objective, like ``small``)."""


class TaskModel(nn.Module):
    """Encoder + one task head. ``forward`` returns logits:
    sequence (B, C); choice (B, K) from inputs (B, K, T); token (B, T, C); span (B, T, 2)."""

    def __init__(self, cfg: ModelConfig, head: str, num_labels: int, pooling: str = "cls"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r}: expected one of {HEADS}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
        self.cfg, self.head, self.num_labels, self.pooling = cfg, head, num_labels, pooling
        self.encoder = Encoder(cfg)
        d = cfg.hidden_size
        self.drop = nn.Dropout(cfg.dropout)
        if head in ("sequence", "choice"):
            self.pooler = nn.Linear(d, d)
        out = {"sequence": num_labels, "choice": 1, "token": num_labels, "span": 2}[head]
        self.classifier = nn.Linear(d, out)
        init_weights(self, cfg.initializer_range)
        init_positions(self, cfg)
        init_options(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, ling: torch.Tensor | None = None) -> torch.Tensor:
        """``ling``: the packed linguistic channel, for a model with ``cfg.linguistic_inputs``."""
        shape = input_ids.shape
        if self.head == "choice":  # (B, K, T) → (B·K, T)
            flat = lambda x: None if x is None else x.reshape(-1, shape[-1])  # noqa: E731
            input_ids, attention_mask, token_type_ids, ling = (flat(input_ids), flat(attention_mask),
                                                               flat(token_type_ids), flat(ling))
        h = self.encoder(input_ids, attention_mask, token_type_ids, ling=ling)  # (B, T, D)
        if self.head in ("sequence", "choice"):
            pooled = self.pool(h, attention_mask)  # (B, D)
            logits = self.classifier(self.drop(pooled))  # (B, C) or (B·K, 1)
            return logits.view(shape[0], shape[1]) if self.head == "choice" else logits
        return self.classifier(self.drop(h))  # (B, T, C) or (B, T, 2)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) → (B, D) through the pooler: the [CLS] state (BERT), or with ``pooling="mean"``
        the mean over the real tokens (padding excluded)."""
        if self.pooling == "cls":
            return torch.tanh(self.pooler(h[:, 0]))
        if attention_mask is None:
            return torch.tanh(self.pooler(h.mean(1)))
        m = attention_mask[..., None].to(h.dtype)  # (B, T, 1)
        return torch.tanh(self.pooler((h * m).sum(1) / m.sum(1).clamp(min=1)))


class SequenceClassifier(TaskModel):
    """``TaskModel`` with the sequence head; ``forward`` also takes labels: ``(loss, logits)``."""

    def __init__(self, cfg: ModelConfig, num_labels: int, pooling: str = "cls"):
        super().__init__(cfg, "sequence", num_labels, pooling)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, ling=None):  # type: ignore[override]
        logits = super().forward(input_ids, attention_mask, token_type_ids, ling)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return loss, logits
