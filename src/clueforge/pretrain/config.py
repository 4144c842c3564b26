"""Typed pretraining config: ``model`` (``ModelConfig``) + ``train`` (``TrainConfig``), from YAML.

YAML is read with ``yaml.safe_load``; unknown keys are errors (a typo must not pass silently);
``--set train.lr=3e-4`` overrides any field, its value parsed as YAML.

Paths written in a YAML file (``PATH_FIELDS``) are relative to that file's directory, so a config
works from any working directory; paths given with ``--set`` are relative to the working
directory, as on any command line. Layer taps (``self_distill_layers``) may be written relative to
depth, so one config fits every model shape (``resolve_layers``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from clueforge.model.bert import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    seq_len: int = 128
    """Tokens per packed row, [CLS] and [SEP]s included."""
    batch_size: int = 32
    """Rows per device per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps; the learning-rate schedule spans them."""
    lr: float = 5e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr``."""
    schedule: str = "linear"
    """Decay after warm-up: ``linear``, ``cosine`` or ``constant``."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases, LayerNorm and embeddings' padding)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Max global gradient norm (0 = off)."""
    precision: str = "auto"
    """``auto`` (bf16 where the GPU supports it, else fp32), ``fp32``, ``bf16`` or ``fp16``."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (memory for time)."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    masking: str = "wwm"
    """One strategy for every row: token, wwm, entity, span, discourse or corrective (see
    ``pretrain.masking``); ``masking_weights`` mixes several."""
    masking_weights: dict | None = None
    """Strategy → weight, drawn per row (overrides ``masking``), e.g. ``{wwm: 0.5, entity: 0.3, span: 0.2}``."""
    span_p: float = 0.2
    """Span masking: geometric parameter of the span length in words (mean 1/p)."""
    extra_connectives: list | None = None
    """Discourse masking: connectives added to the built-in list."""
    curriculum: list | None = None
    """OBERT curriculum: stages ``{at: 0..1, ratio, span_p, weights}`` interpolated over training."""
    mask_ratio: float = 0.15
    """Share of real tokens per row that are predicted (exact per row, in tokens)."""
    mask_token_prob: float = 0.8
    """Of the predicted tokens: share replaced by [MASK]..."""
    random_token_prob: float = 0.1
    """...share replaced by a random token; the rest are kept unchanged."""
    pack_docs: bool = True
    """Fill rows with consecutive sentences across documents ([SEP] between documents), as
    RoBERTa's FULL-SENTENCES; ``false`` keeps each row inside one document (DOC-SENTENCES)."""
    doc_attention: bool = False
    """With ``pack_docs``: keep attention inside each document of a row (block-diagonal mask)."""
    self_distill_instance: float = 0.0
    """Shenzhou instance-wise self-distillation weight: the batch runs twice (two dropout masks),
    symmetric KL between the two MLM distributions at masked positions (0 = off)."""
    self_distill_layers: list | None = None
    """Shenzhou layer-wise self-distillation: layers whose MLM predictions are pulled (KL, final
    layer detached as teacher) toward the final layer's. Each entry is a 1-based layer (``3``), a
    negative index counted from the top (``-2``: the layer below the last), or a fraction of the
    depth (``0.5``: the middle layer), resolved against the model actually trained."""
    self_distill_layer_weight: float = 1.0
    """Weight of the layer-wise term."""
    structure_weights: dict | None = None
    """Structure objectives on [CLS] and their loss weights, e.g. ``{reorder: 0.5, distance: 0.5}``
    (ERNIE 3.0 sentence reordering; 3-class sentence distance)."""
    structure_batch_size: int = 8
    """Examples per structure objective per micro-step."""
    reorder_max_segments: int = 3
    """Sentence reordering: at most this many segments (Σ k! classes)."""
    knowledge_weights: dict | None = None
    """Knowledge objectives and their loss weights (dual-path: each gets its own batch through the
    shared encoder), e.g. ``{replace: 0.5, triple_mlm: 0.5}``; needs a corpus built with knowledge files."""
    knowledge_batch_size: int = 8
    """Examples per knowledge objective per micro-step."""
    knowledge_triples: str | None = None
    """KG triple file (``head<TAB>relation<TAB>tail``) for ``triple_mlm``."""
    replace_share: float = 0.5
    """``replace``: share of a row's dictionary mentions swapped for a same-type entity."""
    seed: int = 1234
    """Seeds initialisation, data order, masking and dropout."""
    log_every: int = 10
    """Steps between metrics lines."""
    eval_every: int = 200
    """Steps between held-out evaluations (0 = only at the end)."""
    eval_batches: int = 20
    """Held-out batches per evaluation."""
    save_every: int = 500
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on disk."""
    prefetch: int = 4
    """Batches prepared ahead by a background thread."""
    init_from: str | None = None
    """A local HF BERT directory to continue pretraining from (its vocab must match the corpus)."""
    peak_tflops: float | None = None
    """Device peak for MFU; measured with a large matmul when not given."""


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PATH_FIELDS = ("knowledge_triples", "init_from")
"""``train`` fields holding a file or directory path."""
CURRICULUM_OVERRIDES = {"ratio": "mask_ratio", "span_p": "span_p", "weights": "masking_weights"}
"""Curriculum stage key → the ``train`` setting it replaces when every stage sets it."""


def resolve_layers(spec: list | None, num_layers: int, where: str = "") -> tuple[int, ...]:
    """``self_distill_layers`` entries → 1-based intermediate layers of a ``num_layers`` model.

    ``k ≥ 1`` is layer k; ``-k`` is layer ``num_layers + 1 - k`` (``-1`` would be the last layer,
    which is the teacher); a float in (0, 1) is that fraction of the depth, rounded, at least 1.
    """
    out = []
    for x in spec or ():
        if isinstance(x, float) and 0 < x < 1:
            layer = max(1, round(x * num_layers))
        elif isinstance(x, int) or isinstance(x, float) and x.is_integer():
            layer = int(x) if x > 0 else num_layers + 1 + int(x)
        else:
            raise ValueError(f"train.self_distill_layers entry {x!r}: expected a layer (3), a negative index (-2) "
                             f"or a fraction of the depth (0.5)")
        out.append(layer)
    bad = [x for x, layer in zip(spec or (), out) if not 1 <= layer < num_layers]
    if bad:
        raise ValueError(f"train.self_distill_layers {bad}: intermediate layers are 1..{num_layers - 1} for a "
                         f"{num_layers}-layer model{where}")
    return tuple(out)


def check_curriculum_overrides(train: dict, where: str) -> None:
    """A curriculum whose every stage sets ``ratio``/``span_p``/``weights`` replaces the
    corresponding train setting for the whole run: writing both is refused, never silently ignored."""
    stages = train.get("curriculum") or []
    if not stages or not all(isinstance(st, dict) for st in stages):
        return
    clash = [f"{setting} (every stage sets {key})" for key, setting in CURRICULUM_OVERRIDES.items()
             if setting in train and all(key in st for st in stages)]
    if clash:
        raise ValueError(f"{where}: train.curriculum overrides {', '.join(clash)}: remove them, or leave the key out "
                         f"of a stage to fall back on the setting")


def _resolve_paths(train: dict, base: Path, where: str) -> None:
    """Relative paths written in a config file are relative to its directory ``base``."""
    for k in PATH_FIELDS:
        v = train.get(k)
        if not isinstance(v, str) or Path(v).expanduser().is_absolute():
            continue
        p = (base / v).resolve()
        if not p.exists():
            raise ValueError(f"{where}: train.{k} {v!r} not found: relative paths in a config file resolve against "
                             f"its directory {base} (→ {p}); give an absolute path or one relative to {base}")
        train[k] = str(p)


def build_dataclass(cls, d: dict, where: str):
    """``cls(**d)`` with unknown keys rejected and values coerced to the fields' types."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(v, str(known[k].type), f"{where} {k}")
    return cls(**kwargs)


def _coerce(v, type_name: str, where: str):
    """YAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``): coerce to the field's type."""
    if v is None:
        if "None" in type_name:
            return None
        raise ValueError(f"{where}: null is not allowed")
    try:
        if type_name.startswith("tuple"):
            return tuple(float(x) for x in v)
        if type_name.startswith("float"):
            return float(v)
        if type_name.startswith("int"):
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(v)
        if type_name.startswith("dict") and not isinstance(v, dict) or type_name.startswith("list") and not isinstance(v, list):
            raise ValueError
        if type_name.startswith("bool"):
            if not isinstance(v, bool):
                raise ValueError
            return v
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {v!r} is not a valid {type_name}") from None
    return v


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r}: not a file and not a shipped config ({', '.join(names)})")


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    path = resolve_config_path(name_or_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with 'model' and 'train'")
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; expected 'model' and 'train'")
    raw = {"model": dict(raw.get("model") or {}), "train": dict(raw.get("train") or {})}
    _resolve_paths(raw["train"], path.resolve().parent, str(path))
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 2 or keys[0] not in raw:
            raise ValueError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        raw[keys[0]][keys[1]] = value
    check_curriculum_overrides(raw["train"], str(path))
    return PretrainConfig(
        model=build_dataclass(ModelConfig, raw["model"], f"{path} [model]"),
        train=build_dataclass(TrainConfig, raw["train"], f"{path} [train]"),
    )
