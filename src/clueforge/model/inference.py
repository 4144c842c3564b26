"""CPU inference fast paths for a trained model.

- ``fp32``: the model as trained (SDPA attention, fused QKV).
- ``bf16``: weights cast to bfloat16 (matmuls on AVX-512-BF16 / AMX units where the CPU has them;
  LayerNorm and softmax accumulate in fp32 inside the kernels). Logits within ~1e-2 of fp32.
- ``int8``: dynamic int8 quantisation of every ``nn.Linear`` (weights int8 per channel,
  activations quantised on the fly), the usual CPU deployment path. Embeddings stay fp32.

Each mode has an equivalence test against fp32 (``tests/test_inference.py``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

MODES = ("fp32", "bf16", "int8")


def optimize_for_inference(model: nn.Module, mode: str = "fp32") -> nn.Module:
    """A copy of ``model`` in eval mode, converted for ``mode``; the original is untouched."""
    if mode not in MODES:
        raise ValueError(f"inference mode {mode!r}: expected one of {MODES}")
    m = copy.deepcopy(model).eval()
    if mode == "bf16":
        return m.to(torch.bfloat16)
    if mode == "int8":
        return torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    return m
