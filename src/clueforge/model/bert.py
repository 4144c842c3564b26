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
- Architecture options of the Shenzhou / Mengzi seed systems (issue 14), all off by default, and
  off they leave the forward above untouched (the same SDPA call, bit for bit):
  ``attn_residual_decay`` (layer l's pre-softmax scores + decay × layer l-1's: explicit scores),
  ``pos_embeddings`` (POS-tag and word-boundary embeddings added to the input embeddings) and
  ``syntax_heads`` (the last heads of each layer attend only inside a word / POS-delimited chunk /
  sentence, or with a learned bias by relative word distance: an SDPA mask or additive bias).
  Linguistic inputs arrive as one packed (B, T) ``ling`` channel (``pack_ling``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clueforge.text.segment import POS_TAGS

# The ``ling`` input channel, one int per token: bits 0-7 the POS id of the token's word
# (``text.segment.POS_TAGS``), then flags. 0 = a special token or padding (no linguistic input).
LING_POS_MASK = 0xFF
LING_WORD_START = 1 << 8  # first token of an rjieba word
LING_SENT_START = 1 << 9  # first token of a sentence
LING_TEXT = 1 << 10  # a token of segmented text (not [CLS]/[SEP]/[PAD])
POS_TAG_ROWS = 64  # rows of the POS embedding: room for appended tags (``POS_TAGS`` is append-only)
SYNTAX_CONSTRAINTS = ("word", "chunk", "sentence", "distance")
POSITION_INITS = ("normal", "sinusoidal")
SYNTAX_DISTANCE_BUCKETS = 16  # relative word distance 0..14, then "15 or more"
# POS tags that delimit a phrase chunk (they form chunks of their own): punctuation / non-words,
# conjunctions, prepositions, particles, modal particles, interjections.
CHUNK_DELIMITERS = ("x", "c", "p", "u", "ud", "ug", "uj", "ul", "uv", "uz", "y", "e")


def pack_ling(pos, word_start, sent_start, text):
    """One ``ling`` value per token from POS ids and boolean flags (numpy arrays or tensors)."""
    return (pos * text + LING_WORD_START * (word_start * text) + LING_SENT_START * (sent_start * text)
            + LING_TEXT * text)


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
    position_init: str = "normal"
    """How the learned position embeddings start: ``normal`` (BERT: normal(0, initializer_range))
    or ``sinusoidal`` (Vaswani et al.'s sin/cos table scaled to the same RMS, so that position i's
    embedding is a fixed rotation of position j's: "attend to the token k before" is one linear map
    from the start; still learned, and the saved model is a plain BERT)."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row starts at zero."""
    attn_residual_decay: float = 0.0
    """Cross-layer attention residual (Shenzhou): layer l's pre-softmax scores are its own plus
    this factor × layer l-1's (residual included); 0 = off (the SDPA fast path), 1 = RealFormer.
    Scores are then computed explicitly: see the throughput benchmark for the cost."""
    pos_embeddings: bool = False
    """Add a POS-tag embedding and a word-boundary (word start / inside) embedding to each text
    token's input embedding (Mengzi); tags come from the shard side channels in pretraining and
    from the same rjieba segmentation at fine-tuning and prediction. Both tables start at zero."""
    syntax_heads: int = 0
    """Heads per layer (the last ones) that attend under ``syntax_constraint``; 0 = off."""
    syntax_constraint: str = "word"
    """What a syntax head may see: ``word`` (tokens of the same rjieba word), ``chunk`` (the same
    POS-delimited phrase chunk), ``sentence`` (the same sentence) or ``distance`` (everything,
    with a learned bias per head by relative word distance, 0..15+)."""
    relative_attention: int = 0
    """Relative positions (Shaw et al. 2018; T5's learned bias, unbucketed): every head of every
    layer adds a learned bias by the key's token offset from the query, −K..K (farther offsets
    share the ±K bias), to its attention scores; this value is K, 0 = off. Starts at zero (the
    model computes what it did without it); the absolute position embeddings stay."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.relative_attention < 0:
            raise ValueError(f"relative_attention {self.relative_attention} must be ≥ 0")
        if not 0 <= self.syntax_heads <= self.num_heads:
            raise ValueError(f"syntax_heads {self.syntax_heads} must be in [0, num_heads={self.num_heads}]")
        if self.syntax_constraint not in SYNTAX_CONSTRAINTS:
            raise ValueError(f"syntax_constraint {self.syntax_constraint!r}: expected one of {SYNTAX_CONSTRAINTS}")
        if self.position_init not in POSITION_INITS:
            raise ValueError(f"position_init {self.position_init!r}: expected one of {POSITION_INITS}")

    @property
    def arch_options(self) -> dict:
        """The issue-14 options that are on (empty: a plain BERT)."""
        out = {}
        if self.attn_residual_decay:
            out["attn_residual_decay"] = self.attn_residual_decay
        if self.pos_embeddings:
            out["pos_embeddings"] = True
        if self.syntax_heads:
            out["syntax_heads"] = self.syntax_heads
            out["syntax_constraint"] = self.syntax_constraint
        if self.relative_attention:
            out["relative_attention"] = self.relative_attention
        return out

    @property
    def linguistic_inputs(self) -> bool:
        """Whether the model reads the ``ling`` channel (POS / word / sentence structure)."""
        return bool(self.pos_embeddings or self.syntax_heads)

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
        emb += (POS_TAG_ROWS + 3) * d if self.pos_embeddings else 0
        if self.syntax_heads and self.syntax_constraint == "distance":
            block += self.syntax_heads * SYNTAX_DISTANCE_BUCKETS
        block += self.num_heads * (2 * self.relative_attention + 1) if self.relative_attention else 0
        return L * block + head + (emb if with_embeddings else 0)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.pos_embeddings:  # row 0 (untagged / special) stays zero: no input where nothing is known
            self.pos_tag = nn.Embedding(POS_TAG_ROWS, cfg.hidden_size, padding_idx=0)
            self.boundary = nn.Embedding(3, cfg.hidden_size, padding_idx=0)  # 1 word start, 2 inside a word

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                ling: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:T]  # (B, T, D)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]
        else:
            x = x + self.token_type(token_type_ids)
        if ling is not None and hasattr(self, "pos_tag"):
            text = (ling & LING_TEXT) != 0  # (B, T)
            start = (ling & LING_WORD_START) != 0
            x = x + self.pos_tag(ling & LING_POS_MASK) + self.boundary(text * (2 - start.long()))  # (B, T, D)
        return self.drop(self.ln(x))


@dataclass
class Structure:
    """What the syntax heads of every layer share in one forward (built once by the encoder)."""

    mask: torch.Tensor | None  # (B, H, T, T) bool, True = attend: padding/document mask, syntax heads constrained
    distance: torch.Tensor | None  # (B, T, T) long: relative word distance bucket (``distance`` constraint)
    offset: torch.Tensor | None = None  # (T, T) long: key offset from the query + K, clipped to 0..2K (relative_attention)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.p_drop = cfg.attention_dropout
        self.decay = cfg.attn_residual_decay
        self.n_syntax = cfg.syntax_heads
        if cfg.syntax_heads and cfg.syntax_constraint == "distance":
            self.distance_bias = nn.Parameter(torch.zeros(cfg.syntax_heads, SYNTAX_DISTANCE_BUCKETS))
        if cfg.relative_attention:
            self.relative_bias = nn.Parameter(torch.zeros(cfg.num_heads, 2 * cfg.relative_attention + 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_drop if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    def forward_at(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """``forward``'s output at ``positions`` (B, Q) only: keys and values from every token, the
        queries and the output projection only there. Returns (B, Q, D)."""
        B, T, D = x.shape
        Q, Dh = positions.shape[1], D // self.n_heads
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, Dh).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, Dh)
        q = q.gather(2, positions[:, None, :, None].expand(B, self.n_heads, Q, Dh))  # (B, H, Q, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, Dh)
        return self.out(y.transpose(1, 2).reshape(B, Q, D))  # (B, Q, D)

    def _bias(self, mask: torch.Tensor | None, st: Structure | None, dtype) -> torch.Tensor | None:
        """The additive (B, H, T, T) score bias: -inf where a head may not look, plus the learned
        distance bias of the syntax heads and the relative-position bias; ``None`` when nothing is
        masked or biased."""
        m = st.mask if st is not None and st.mask is not None else mask
        if m is None or m.dtype != torch.bool:  # no mask, or already additive (the export graph's)
            bias = None if m is None else m.to(dtype)
        else:
            bias = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
        if st is not None and st.distance is not None:
            d = self.distance_bias.to(dtype)[:, st.distance].transpose(0, 1)  # (B, Hs, T, T)
            B, _, T, _ = d.shape
            d = torch.cat([d.new_zeros(B, self.n_heads - self.n_syntax, T, T), d], 1)  # (B, H, T, T)
            bias = d if bias is None else bias + d
        if st is not None and st.offset is not None:
            r = self.relative_bias.to(dtype)[:, st.offset][None]  # (1, H, T, T)
            bias = r if bias is None else bias + r
        return bias

    def forward_options(self, x: torch.Tensor, mask: torch.Tensor | None, st: Structure | None,
                        prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention with the architecture options: syntax masks/biases through SDPA, or, with the
        residual, explicit scores ``S_l = QKᵀ/√d + decay · S_{l-1}`` (before any mask or bias).
        Returns the output and ``S_l`` (``None`` without the residual)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, Dh)
        bias = self._bias(mask, st, q.dtype)
        p = self.p_drop if self.training else 0.0
        if not self.decay:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, Dh)
            return self.out(y.transpose(1, 2).reshape(B, T, D)), None
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, T)
        if prev is not None:
            scores = scores + self.decay * prev
        att = scores if bias is None else scores + bias
        att = F.dropout(torch.softmax(att.float(), -1).to(q.dtype), p)  # (B, H, T, T)
        y = att @ v  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, D)), scores


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

    def forward_at(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """``forward``'s output at ``positions`` (B, Q) only (attention over every token, the MLP
        and residuals only there): (B, Q, D)."""
        at = positions[:, :, None].expand(-1, -1, x.shape[-1])  # (B, Q, D)
        if self.pre_ln:
            xq = x.gather(1, at) + self.drop(self.attn.forward_at(self.ln1(x), mask, positions))
            return xq + self.drop(self.mlp_out(F.gelu(self.mlp_in(self.ln2(xq)))))
        xq = self.ln1(x.gather(1, at) + self.drop(self.attn.forward_at(x, mask, positions)))
        return self.ln2(xq + self.drop(self.mlp_out(F.gelu(self.mlp_in(xq)))))

    def forward_options(self, x: torch.Tensor, mask: torch.Tensor | None, st: Structure | None,
                        prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` through ``SelfAttention.forward_options``; also returns this layer's scores."""
        if self.pre_ln:
            a, scores = self.attn.forward_options(self.ln1(x), mask, st, prev)
            x = x + self.drop(a)
            return x + self.drop(self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))), scores
        a, scores = self.attn.forward_options(x, mask, st, prev)
        x = self.ln1(x + self.drop(a))
        return self.ln2(x + self.drop(self.mlp_out(F.gelu(self.mlp_in(x))))), scores


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of ``model`` (embeddings, blocks, attention weights, task heads) to ``p``, and
    its config says so (a saved checkpoint records what it was trained with). Fine-tuning uses it
    for a model pretrained without dropout (the ``small`` recipe, as cramming)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, SelfAttention):
            m.p_drop = p
        if isinstance(getattr(m, "cfg", None), ModelConfig):
            m.cfg.dropout = m.cfg.attention_dropout = p


def attention_bias(attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA boolean mask (True = attend) from a (B, T) padding mask and/or (B, T) document ids.

    ``None`` when nothing is masked, so SDPA can take its fastest kernel.
    """
    if doc_ids is not None:
        return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)


def syntax_units(ling: torch.Tensor, constraint: str) -> torch.Tensor:
    """(B, T) unit ids: tokens that share an id form one word / chunk / sentence. A special token
    or padding is a unit of its own, and a unit never runs across one."""
    text = (ling & LING_TEXT) != 0  # (B, T)
    special = ~text
    after_special = torch.cat([torch.ones_like(special[:, :1]), special[:, :-1]], 1)
    word = (ling & LING_WORD_START) != 0
    sent = (ling & LING_SENT_START) != 0
    if constraint == "sentence":
        start = sent
    elif constraint == "chunk":
        delim_ids = torch.tensor([POS_TAGS.index(t) for t in CHUNK_DELIMITERS], device=ling.device)
        delim = torch.isin(ling & LING_POS_MASK, delim_ids) & text  # (B, T)
        prev_delim = torch.cat([torch.zeros_like(delim[:, :1]), delim[:, :-1]], 1)
        start = word & (delim | prev_delim | sent)
    else:  # word, distance
        start = word
    return torch.cumsum(start | special | after_special, 1)  # (B, T)


def ancestors_mask(parent: torch.Tensor) -> torch.Tensor:
    """SG-Net's dependency constraint from a parse side channel: (B, T) head index per token (-1:
    root or no parse) → (B, T, T) True where token j is token i itself or one of its ancestors.
    Not wired to a config value (no parser ships offline); a ``parse`` constraint would build its
    ``Structure.mask`` from this, as ``Encoder.structure`` does for the others."""
    B, T = parent.shape
    hop = torch.zeros(B, T, T + 1, dtype=torch.bool, device=parent.device)
    hop.scatter_(2, torch.where(parent < 0, T, parent)[..., None], True)  # i → its head (T: none)
    reach = (torch.eye(T, dtype=torch.bool, device=parent.device) | hop[..., :T]).float()  # (B, T, T)
    for _ in range(max(1, T.bit_length())):  # pointer doubling: paths of length up to 2^k
        reach = ((reach + reach @ reach) > 0).float()
    return reach.bool()


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_ln else None
        self.gradient_checkpointing = False

    def structure(self, mask: torch.Tensor | None, ling: torch.Tensor | None, T: int,
                  device: torch.device | None = None) -> Structure | None:
        """What every layer's attention shares: the syntax heads' mask and distance buckets, the
        relative-position offsets (``None`` with neither option)."""
        cfg = self.cfg
        offset = None
        if cfg.relative_attention:
            K, at = cfg.relative_attention, torch.arange(T, device=device)
            offset = (at[None, :] - at[:, None]).clamp(-K, K) + K  # (T, T): key j seen from query i
        if not cfg.syntax_heads:
            return None if offset is None else Structure(None, None, offset)
        st = self._syntax_structure(mask, ling, T)
        return dataclasses.replace(st, offset=offset)

    def _syntax_structure(self, mask: torch.Tensor | None, ling: torch.Tensor | None, T: int) -> Structure:
        cfg = self.cfg
        if ling is None:
            raise ValueError(f"syntax_heads={cfg.syntax_heads} needs the linguistic input channel (ling)")
        B = ling.shape[0]
        units = syntax_units(ling, cfg.syntax_constraint)  # (B, T)
        base = torch.ones(B, 1, T, T, dtype=torch.bool, device=ling.device) if mask is None else mask.expand(B, 1, T, T)
        if cfg.syntax_constraint == "distance":
            dist = (units[:, :, None] - units[:, None, :]).abs().clamp(max=SYNTAX_DISTANCE_BUCKETS - 1)  # (B, T, T)
            return Structure(None if mask is None else base, dist)
        allowed = base & (units[:, None, :, None] == units[:, None, None, :])  # (B, 1, T, T)
        allowed = allowed | (base & ~allowed.any(-1, keepdim=True))  # a row left empty (padding) sees what it may
        H, Hs = cfg.num_heads, cfg.syntax_heads
        return Structure(torch.cat([base.expand(B, H - Hs, T, T), allowed.expand(B, Hs, T, T)], 1), None)

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor | None, ling: torch.Tensor | None = None,
                   keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks over embeddings ``x`` (B, T, D); returns the last output and those of ``keep``.
        With no architecture option on, each block is the plain SDPA forward."""
        kept = []
        options = self.cfg.attn_residual_decay or self.cfg.syntax_heads or self.cfg.relative_attention
        st = self.structure(mask, ling, x.shape[1], x.device) if options else None
        prev = None  # the previous layer's attention scores (residual)
        for i, layer in enumerate(self.layers, 1):
            if not options:
                x = checkpoint(layer, x, mask, use_reentrant=False) if self.gradient_checkpointing and self.training \
                    else layer(x, mask)
            elif self.gradient_checkpointing and self.training:
                x, prev = checkpoint(layer.forward_options, x, mask, st, prev, use_reentrant=False)
            else:
                x, prev = layer.forward_options(x, mask, st, prev)
            if i in keep:
                kept.append(x)
        return x, kept

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        keep: tuple[int, ...] = (),
        ling: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``input_ids`` (B, T) → hidden states (B, T, D). ``doc_ids`` (B, T) keeps attention
        inside each packed document (padding gets its own id). With ``keep`` (1-based layer
        numbers) also returns those layers' outputs, normalised as the final output is (pre-LN:
        through ``final_ln``), so a head reads them as it reads the last layer. ``ling`` (B, T):
        the packed linguistic channel (``pack_ling``) a model with ``linguistic_inputs`` reads."""
        if ling is None and self.cfg.pos_embeddings:
            raise ValueError("pos_embeddings=True needs the linguistic input channel (ling)")
        mask = attention_bias(attention_mask, doc_ids)
        x = self.embeddings(input_ids, token_type_ids, ling)  # (B, T, D)
        x, kept = self.run_layers(x, mask, ling, keep)
        if self.final_ln is not None:  # pre-LN: the residual stream is normalised before any head
            x = self.final_ln(x)
            kept = [self.final_ln(h) for h in kept]
        return (x, kept) if keep else x

    def forward_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   positions: torch.Tensor) -> torch.Tensor:
        """``forward(input_ids, attention_mask)`` read only at ``positions`` (B, Q): (B, Q, D). The last
        layer runs its queries, residual and MLP only there (a head that reads a few positions — the
        [MASK]s of a prompt — needs nothing else: about 1/L of the encoder's work less). Plain blocks
        only: a model with an architecture option refuses it."""
        if self.cfg.arch_options:
            raise ValueError(f"forward_at: plain blocks only, not {', '.join(self.cfg.arch_options)}")
        mask = attention_bias(attention_mask, None)
        x = self.embeddings(input_ids, None)  # (B, T, D)
        for layer in self.layers[:-1]:
            x = layer(x, mask)
        x = self.layers[-1].forward_at(x, mask, positions)  # (B, Q, D)
        return x if self.final_ln is None else self.final_ln(x)


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


def sinusoidal_table(n: int, d: int, rms: float) -> torch.Tensor:
    """(n, d): row p holds sin(p·ω_k) in column 2k and cos(p·ω_k) in 2k+1, ω_k = 10000^(-2k/d)
    (Vaswani et al. 2017), scaled so that the table's root-mean-square value is ``rms``."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (ceil(d/2),)
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * omega)
    table[:, 1::2] = torch.cos(pos * omega[: d // 2])
    return (table * (rms / table.pow(2).mean().sqrt())).float()


def init_positions(model: nn.Module, cfg: "ModelConfig") -> None:
    """``cfg.position_init``: ``sinusoidal`` overwrites every position table of ``model`` (normal
    init leaves it as ``init_weights`` drew it)."""
    if cfg.position_init != "sinusoidal":
        return
    for m in model.modules():
        if isinstance(m, Embeddings):
            with torch.no_grad():
                m.position.weight.copy_(sinusoidal_table(*m.position.weight.shape, cfg.initializer_range))


def init_options(model: nn.Module) -> None:
    """The architecture options start as no-ops: zero POS / boundary embeddings and distance bias."""
    for name, p in model.named_parameters():
        if name.endswith(("embeddings.pos_tag.weight", "embeddings.boundary.weight", "attn.distance_bias",
                          "attn.relative_bias")):
            nn.init.zeros_(p)


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
        init_positions(self, cfg)
        init_options(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        sparse: bool = True,
        ling: torch.Tensor | None = None,
    ) -> MLMOutput:
        """With ``labels`` (B, T; -100 = not predicted) returns the MLM loss; ``sparse`` computes
        logits only at labelled positions (the dense path exists for equivalence tests)."""
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, doc_ids, ling=ling)  # (B, T, D)
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

