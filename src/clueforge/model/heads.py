"""Task heads on the shared encoder (the HF ``BertFor*`` layouts, so checkpoints interoperate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clueforge.model.bert import Encoder, ModelConfig


class SequenceClassifier(nn.Module):
    """[CLS] → pooler (dense + tanh) → dropout → linear: ``BertForSequenceClassification``."""

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.cfg = cfg
        self.num_labels = num_labels
        self.encoder = Encoder(cfg)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        for m in (self.pooler, self.classifier):
            nn.init.normal_(m.weight, 0.0, cfg.initializer_range)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(loss or None, logits (B, num_labels))``."""
        h = self.encoder(input_ids, attention_mask, token_type_ids)  # (B, T, D)
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, D)
        logits = self.classifier(self.drop(pooled))  # (B, C)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return loss, logits
