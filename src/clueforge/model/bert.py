"""The clueforge encoder: a BERT-compatible Transformer in one file.

Design choices:
- Post-LN blocks by default (bit-compatible with BERT / RoBERTa-wwm-ext / MacBERT / Mengzi
  checkpoints); ``pre_ln=True`` moves LayerNorm before each sub-layer and adds a final LayerNorm
  (more stable at high learning rates; not loadable by ``transformers``' BERT).
- Learned absolute positions, token types, exact (erf) GELU, as in BERT.
- Fused QKV projection (one matmul) and attention through
  ``torch.nn.functional.scaled_dot_product_attention`` only: flash / memory-efficient kernels on
  GPU, no mask at all when a batch has no padding.
- The MLM head is tied to the word embeddings and, given labels, computes logits only at masked
  positions (about 15% of tokens: the vocabulary projection is the largest matmul of a small model).
- Optional gradient checkpointing per block. No Accelerate or DeepSpeed imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 21128
    """Rows of the word embedding; must cover every token id of the corpus."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_layers: int = 12
    """Transformer blocks."""
    num_heads: int = 12
    """Attention heads; ``hidden_size`` must be divisible by it."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer."""
    max_position: int = 512
    """Learned position embeddings: the longest sequence the model takes."""
    type_vocab_size: int = 2
    """Token-type (segment) embeddings."""
    dropout: float = 0.1
    """Dropout on embeddings and sub-layer outputs."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT uses 1e-12)."""
    pre_ln: bool = False
    """Pre-LayerNorm blocks plus a final LayerNorm instead of BERT's post-LN."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of weights."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row starts at zero."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def num_params(self, with_embeddings: bool = True) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        emb = (self.vocab_size + self.max_position + self.type_vocab_size) * d + 2 * d
        head = d * d + d + 2 * d + self.vocab_size
        return L * block + head + (emb if with_embeddings else 0)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:T]  # (B, T, D)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]
        else:
            x = x + self.token_type(token_type_ids)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.p_drop = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_drop if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_ln = cfg.pre_ln

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), mask))
            return x + self.drop(self.mlp_out(F.gelu(self.mlp_in(self.ln2(x)))))
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        return self.ln2(x + self.drop(self.mlp_out(F.gelu(self.mlp_in(x)))))


def attention_bias(attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA boolean mask (True = attend) from a (B, T) padding mask and/or (B, T) document ids.

    ``None`` when nothing is masked, so SDPA can take its fastest kernel.
    """
    if doc_ids is not None:
        return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_ln else None
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        keep: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``input_ids`` (B, T) → hidden states (B, T, D). ``doc_ids`` (B, T) keeps attention
        inside each packed document (padding gets its own id). With ``keep`` (1-based layer
        numbers) also returns those layers' outputs, normalised as the final output is (pre-LN:
        through ``final_ln``), so a head reads them as it reads the last layer."""
        mask = attention_bias(attention_mask, doc_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        kept = []
        for i, layer in enumerate(self.layers, 1):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
            if i in keep:
                kept.append(x)
        if self.final_ln is not None:  # pre-LN: the residual stream is normalised before any head
            x = self.final_ln(x)
            kept = [self.final_ln(h) for h in kept]
        return (x, kept) if keep else x


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = word_embeddings  # tied
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.dense(h)))  # (..., D)
        return F.linear(h, self.decoder.weight, self.bias)  # (..., V)


def init_weights(model: nn.Module, std: float) -> None:
    """BERT initialisation: normal(0, std) weights, zero biases and padding row, unit LayerNorm."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class MLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (M, V) at masked positions, or (B, T, V) without labels
    labels: torch.Tensor | None  # (M,) the targets matching ``logits`` rows
    hidden: torch.Tensor  # (B, T, D)


class BertForMLM(nn.Module):
    """Encoder + tied MLM head. Pretraining-only parts (auxiliary heads, layer taps, objective
    batches) live in ``pretrain.model.PretrainingModel``, which wraps this one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = MLMHead(cfg, self.encoder.embeddings.word)
        init_weights(self, cfg.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        sparse: bool = True,
    ) -> MLMOutput:
        """With ``labels`` (B, T; -100 = not predicted) returns the MLM loss; ``sparse`` computes
        logits only at labelled positions (the dense path exists for equivalence tests)."""
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, doc_ids)  # (B, T, D)
        if labels is None:
            return MLMOutput(None, self.head(hidden), None, hidden)
        if sparse:
            sel = labels != -100  # (B, T)
            targets = labels[sel]  # (M,)
            logits = self.head(hidden[sel])  # (M, V)
            loss = F.cross_entropy(logits.float(), targets)
            return MLMOutput(loss, logits, targets, hidden)
        logits = self.head(hidden)  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        sel = labels != -100
        return MLMOutput(loss, logits[sel], labels[sel], hidden)


def flops_per_token(cfg: ModelConfig, seq_len: int, mlm_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6·(non-embedding params) + attention (12·L·D·T), with the
    vocabulary projection counted only for the predicted fraction of tokens."""
    d, L = cfg.hidden_size, cfg.num_layers
    dense = 6 * cfg.num_layers * (4 * d * d + 2 * d * cfg.intermediate_size)
    head = 6 * (d * d + mlm_fraction * d * cfg.vocab_size)
    attn = 12 * L * d * seq_len
    return float(dense + head + attn)

