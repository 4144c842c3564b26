"""Fine-tuning tricks shared by every task, each off by default.

- **R-Drop** (``rdrop`` = α): the batch goes through the model twice (two dropout masks); the loss
  adds α · symmetric KL between the two predictive distributions.
- **FGM** (``fgm`` = ε): after the backward pass, word embeddings move by ε·g/‖g‖ along their
  gradient, a second forward/backward adds the adversarial loss's gradient, the embeddings return.
- **EMA** (``ema`` = decay): an exponential moving average of the weights, used for evaluation and
  for the saved checkpoint. Frozen parameters (``requires_grad=False``, P-tuning's frozen body) are
  not averaged: they stay bit-identical.
- **LLRD** (``llrd`` = γ < 1): layer-wise learning-rate decay; layer i of L gets lr·γ^(L−i), the
  embeddings lr·γ^(L+1), the task head lr.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from clueforge.model.losses import symmetric_kl  # noqa: F401  (R-Drop's loss; shared with pretraining)


def llrd_param_groups(model: nn.Module, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups with layer-wise decayed learning rates (decay=1: one rate for all)."""
    n_layers = len(model.encoder.layers)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.embeddings."):
            depth = n_layers + 1
        elif name.startswith("encoder.layers."):
            depth = n_layers - int(name.split(".")[2])
        else:
            depth = 0
        wd = 0.0 if p.ndim < 2 or ".ln" in name else weight_decay
        groups.setdefault((lr * decay**depth, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # tied: all names
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point and k not in frozen}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in self.model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    @contextmanager
    def applied(self):
        """Temporarily load the averaged weights (for evaluation and saving)."""
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.shadow}
        self.model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(backup, strict=False)


class FGM:
    def __init__(self, model: nn.Module, epsilon: float):
        self.param = model.encoder.embeddings.word.weight
        self.epsilon = epsilon
        self.backup: torch.Tensor | None = None

    def attack(self) -> bool:
        g = self.param.grad
        if g is None:
            return False
        norm = torch.linalg.vector_norm(g)
        if not torch.isfinite(norm) or norm == 0:
            return False
        self.backup = self.param.data.clone()
        self.param.data.add_(self.epsilon * g / norm)
        return True

    def restore(self) -> None:
        if self.backup is not None:
            self.param.data.copy_(self.backup)
            self.backup = None
