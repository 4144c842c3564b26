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
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from clueforge.model.bert import POSITION_INITS, SYNTAX_CONSTRAINTS, ModelConfig
from clueforge.model.heads import POOLINGS
from clueforge.utils import Rule, UserError

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
    ar_mlm_groups: int = 1
    """Shenzhou autoregressive MLM: a row's masked units are split into this many groups in a random
    order and group j is predicted with the original tokens of groups < j revealed (k passes of the
    batch per step, see ``pretrain.ar_mlm``); 1 = ordinary MLM."""
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
    triple_text_share: float = 0.5
    """``triple_mlm``: share of examples whose sentence mentions the triple's head and tail (the
    others: a sentence that mentions the head)."""
    seed: int = 1234
    """Seeds initialisation, data order, masking and dropout."""
    log_every: int = 10
    """Steps between metrics lines."""
    eval_every: int = 200
    """Steps between held-out evaluations (0 = only at the end); an evaluation step also writes a
    metrics line when it is not a ``log_every`` step."""
    eval_batches: int = 20
    """Held-out batches (of ``batch_size``) per evaluation under the run's own masking (``eval_*``);
    the fixed protocol (``eval_fixed_*``) always scores the same rows in the same batches."""
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
    students: dict | None = None
    """Online distillation (ERNIE 3.0 Titan): student name → its settings (``distill.DistillConfig``
    fields: ``student`` shape, ``init``, loss weights, ``temperature``, ``aux_layer``), e.g.
    ``{pico: {student: pico}}``. After each teacher step each student takes a step on the same
    batch from the teacher's outputs; saved as ``OUT/students/NAME/final`` (see ``distill.online``)."""
    threads: int = 0
    """Intra-op CPU threads (``torch.set_num_threads``); 0 keeps torch's default (one per core).
    The number in force is recorded in the summary and ``budget.json``."""
    max_minutes: float | None = None
    """Compute budget in CPU-minutes (process CPU time of the training steps, all threads; held-out
    evaluation and checkpointing excluded). A fresh run converts it to ``max_steps`` by timing a few
    throw-away steps (``pretrain.loop.calibrate_steps``) and records both in ``out/budget.json`` and
    ``config.json``; a resume keeps the recorded step count, so it stays exact. The count is then
    re-estimated as the run goes (``budget_recheck``), so the run ends at its budget when the cost
    of a step differs from the calibration's (a neighbour's load starting or ending)."""
    budget_recheck: int = 500
    """With ``max_minutes``: every this many optimizer steps, the steps left are re-estimated from
    the CPU time the last ones took (each process's; the slowest decides) and ``max_steps`` is
    set so the run ends at the budget — the linear/cosine schedule follows the new end. Not done
    on short rows (``short_seq_len``: their steps cost less than the long ones still to come; the
    switch step stays where the calibration put it, so their share of the steps run can differ
    from ``short_seq_fraction``).
    Recorded in the checkpoint, so a resume carries on from the last estimate; 0 keeps the
    calibration's count to the end."""
    short_seq_len: int = 0
    """Short sequences first (cramming): the first ``short_seq_fraction`` of the steps train on
    packed rows of this many tokens (4 ≤ it < ``seq_len``), the rest on ``seq_len`` rows; 0 = off.
    Held-out evaluation always scores ``seq_len`` rows (the fixed protocol is unchanged), and the
    structure/knowledge objectives keep their own ``seq_len`` examples in both phases."""
    short_seq_fraction: float = 0.0
    """Share of the optimizer steps (of ``max_steps``, budget included) on short rows, in (0, 1)
    with ``short_seq_len``; the switch is step ``round(short_seq_fraction · max_steps)``."""
    short_batch_size: int = 0
    """Rows per micro-step in the short phase; 0 keeps the tokens per step of the long phase
    (``batch_size · seq_len / short_seq_len``, rounded). With ``max_minutes`` both phases are
    timed and the step count follows from their mean cost (``out/budget.json``)."""


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PATH_FIELDS = ("knowledge_triples", "init_from")
"""``train`` fields holding a file or directory path."""
CURRICULUM_OVERRIDES = {"ratio": ("mask_ratio",), "span_p": ("span_p",), "weights": ("masking_weights", "masking")}
"""Curriculum stage key → the ``train`` settings it replaces when every stage sets it."""


def resolve_layers(spec: list | None, num_layers: int, where: str = "") -> tuple[int, ...]:
    """``self_distill_layers`` entries → 1-based intermediate layers of a ``num_layers`` model.

    ``k ≥ 1`` is layer k; ``-k`` is layer ``num_layers + 1 - k`` (``-1`` would be the last layer,
    which is the teacher); a float in (0, 1) is that fraction of the depth, rounded, at least 1.
    A 1-layer model has no intermediate layer: the taps are dropped with a warning (the layer-wise
    term is skipped), so a config written for deeper models still runs.
    """
    out = []
    for x in spec or ():
        if isinstance(x, float) and 0 < x < 1:
            layer = max(1, round(x * num_layers))
        elif isinstance(x, int) or isinstance(x, float) and x.is_integer():
            layer = int(x) if x > 0 else num_layers + 1 + int(x)
        else:
            raise UserError(f"train.self_distill_layers entry {x!r}: expected a layer (3), a negative index (-2) "
                             f"or a fraction of the depth (0.5)")
        out.append(layer)
    if out and num_layers == 1:
        import logging

        logging.getLogger("clueforge.pretrain").warning(
            "train.self_distill_layers %s: a 1-layer model%s has no intermediate layer; layer-wise "
            "self-distillation is skipped", list(spec), where)
        return ()
    bad = [x for x, layer in zip(spec or (), out) if not 1 <= layer < num_layers]
    if bad:
        raise UserError(f"train.self_distill_layers {bad}: intermediate layers are 1..{num_layers - 1} for a "
                         f"{num_layers}-layer model{where}")
    return tuple(out)


def check_curriculum_overrides(train: dict, where: str) -> None:
    """A curriculum whose every stage sets ``ratio``/``span_p``/``weights`` replaces the
    corresponding train setting for the whole run: writing both is refused, never silently ignored."""
    stages = train.get("curriculum") or []
    if not stages or not all(isinstance(st, dict) for st in stages):
        return
    clash = [f"{setting} (every stage sets {key})" for key, settings in CURRICULUM_OVERRIDES.items()
             for setting in settings if setting in train and all(key in st for st in stages)]
    if clash:
        raise UserError(f"{where}: train.curriculum overrides {', '.join(clash)}: remove them, or leave the key out "
                         f"of a stage to fall back on the setting")


def _resolve_paths(train: dict, base: Path, where: str, skip=frozenset()) -> None:
    """Relative paths written in a config file are relative to its directory ``base`` (keys in
    ``skip`` came from ``--set`` and are left as given)."""
    for k in PATH_FIELDS:
        if k in skip:
            continue
        v = train.get(k)
        if not isinstance(v, str) or Path(v).expanduser().is_absolute():
            continue
        p = (base / v).resolve()
        if not p.exists():
            raise UserError(f"{where}: train.{k} {v!r} not found: relative paths in a config file resolve against "
                             f"its directory {base} (→ {p}); give an absolute path or one relative to {base}")
        train[k] = str(p)


def build_dataclass(cls, d: dict, where: str, *, section: str = "", overridden: frozenset | set = frozenset()):
    """``cls(**d)`` with unknown keys rejected, values coerced to the fields' types and every field
    validated (``validate``). A bad value from ``--set`` (a key in ``overridden``) is blamed on it."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(v, str(known[k].type), f"--set {section}{k}" if k in overridden else f"{where} {k}")
    rules = VALIDATION.get(cls.__name__, {})
    bad = {k: v for k, v in kwargs.items() if v is not None and k in rules and not rules[k].ok(v)}
    if bad:  # before construction: a __post_init__ check would blame the file for a --set value
        _raise_problems([(k, v, rules[k].describe()) for k, v in bad.items()], where, section, overridden)
    try:
        obj = cls(**kwargs)
    except ValueError as exc:  # a dataclass's own __post_init__ check
        raise UserError(f"{where}: {exc}") from None
    validate(obj, where, section=section, overridden=overridden)
    return obj


def _coerce(v, type_name: str, where: str):
    """YAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``): coerce to the field's type."""
    if v is None:
        if "None" in type_name:
            return None
        raise UserError(f"{where}: null is not allowed")
    try:
        if isinstance(v, bool) and not type_name.startswith("bool"):  # YAML true/false is not a number
            raise ValueError
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
        raise UserError(f"{where}: {v!r} is not a valid {type_name}") from None
    return v


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config {name_or_path!r}: not a file and not a shipped config ({', '.join(names)})")


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"--set {item!r}: the value is not valid YAML") from None


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    path = resolve_config_path(name_or_path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with 'model' and 'train'")
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise UserError(f"{path}: unknown sections {unknown}; expected 'model' and 'train'")
    for sec in ("model", "train"):
        if raw.get(sec) is not None and not isinstance(raw[sec], dict):
            raise UserError(f"{path}: section {sec!r} must be a mapping of settings, not {raw[sec]!r}")
    raw = {"model": dict(raw.get("model") or {}), "train": dict(raw.get("train") or {})}
    overridden: dict[str, set] = {"model": set(), "train": set()}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 2 or keys[0] not in raw:
            raise UserError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        _check_override_key(item, keys[0], keys[1])
        raw[keys[0]][keys[1]] = value
        overridden[keys[0]].add(keys[1])
    # paths written in the file are relative to it; a --set path stays relative to the working directory
    _resolve_paths(raw["train"], path.resolve().parent, str(path), skip=overridden["train"])
    check_curriculum_overrides(raw["train"], str(path))
    return PretrainConfig(
        model=build_dataclass(ModelConfig, raw["model"], f"{path} [model]", section="model.",
                              overridden=overridden["model"]),
        train=build_dataclass(TrainConfig, raw["train"], f"{path} [train]", section="train.",
                              overridden=overridden["train"]),
    )


# ---------------------------------------------------------------------------------------------
# Validation: one table per config class (field → rule), checked whenever a config is built, so a
# setting that would make training a no-op or nonsense is refused at load time with the field,
# the value and the allowed range. ``FinetuneConfig`` is listed by name (it lives in finetune/).


def _ge(x):
    return Rule(lo=x)


_POS = Rule(lo=0, lo_open=True)  # > 0
_NONNEG = _ge(0)
_PROB = Rule(0, 1)  # [0, 1]
_PROB_HALF_OPEN = Rule(0, 1, hi_open=True)  # [0, 1)

VALIDATION: dict[str, dict[str, Rule]] = {
    "ModelConfig": {
        "vocab_size": _ge(1), "hidden_size": _ge(1), "num_layers": _ge(1), "num_heads": _ge(1),
        "intermediate_size": _ge(1), "max_position": _ge(2), "type_vocab_size": _ge(1),
        "dropout": _PROB_HALF_OPEN, "attention_dropout": _PROB_HALF_OPEN, "layer_norm_eps": _POS,
        "initializer_range": _POS, "pad_token_id": _NONNEG,
    },
    "TrainConfig": {
        "seq_len": _ge(4), "batch_size": _ge(1), "grad_accum": _ge(1), "max_steps": _ge(1), "lr": _POS,
        "min_lr_ratio": _PROB, "warmup_steps": _NONNEG, "schedule": Rule(choices=("linear", "cosine", "constant")),
        "weight_decay": _NONNEG, "eps": _POS, "clip_grad": _NONNEG,
        "precision": Rule(choices=("auto", "fp32", "bf16", "fp16")),
        "masking": Rule(choices=("token", "wwm", "entity", "span", "discourse", "corrective")),
        "span_p": Rule(0, 1, lo_open=True), "mask_ratio": Rule(0, 1, lo_open=True, hi_open=True),
        "mask_token_prob": _PROB, "random_token_prob": _PROB, "self_distill_instance": _NONNEG,
        "self_distill_layer_weight": _NONNEG, "structure_batch_size": _ge(1), "reorder_max_segments": _ge(2),
        "knowledge_batch_size": _ge(1), "replace_share": _PROB, "triple_text_share": _PROB,
        "log_every": _ge(1), "eval_every": _NONNEG,
        "eval_batches": _ge(1), "save_every": _ge(1), "keep_checkpoints": _NONNEG, "prefetch": _ge(1),
        "peak_tflops": _POS, "seed": _NONNEG,
    },
    "DistillConfig": {
        "embeddings": Rule(choices=("slice", "project")), "relation_weight": _NONNEG, "relation_heads": _NONNEG,
        "hidden_weight": _NONNEG, "soft_weight": _NONNEG, "temperature": _POS, "mlm_weight": _NONNEG,
    },
    "FinetuneConfig": {
        "epochs": _ge(1), "lr": _POS, "batch_size": _ge(1), "max_length": _ge(8), "warmup_ratio": _PROB_HALF_OPEN,
        "weight_decay": _NONNEG, "clip_grad": _NONNEG, "max_steps": _ge(1), "max_train": _ge(1),
        "max_eval": _ge(1), "eval_batch_size": _ge(1), "rdrop": _NONNEG, "fgm": _NONNEG, "ema": _PROB_HALF_OPEN,
        "llrd": Rule(0, 1, lo_open=True), "log_every": _ge(1), "select": Rule(choices=("best", "last")),
        "method": Rule(choices=("finetune", "pet", "efl")), "seed": _NONNEG,
        "pet_mlm": _NONNEG, "dropout": _PROB_HALF_OPEN, "pooling": Rule(choices=POOLINGS),
    },
}

# architecture options (issue 14; ``ModelConfig.__post_init__`` also bounds syntax_heads by num_heads)
VALIDATION["ModelConfig"].update({"attn_residual_decay": _PROB, "syntax_heads": _NONNEG,
                                  "syntax_constraint": Rule(choices=SYNTAX_CONSTRAINTS),
                                  "position_init": Rule(choices=POSITION_INITS),
                                  "relative_attention": _NONNEG})


VALIDATION["TrainConfig"].update({"threads": _NONNEG, "max_minutes": _POS, "budget_recheck": _NONNEG})  # issue 11: threads, CPU-time budget
VALIDATION["TrainConfig"].update({"short_seq_len": _NONNEG, "short_batch_size": _NONNEG,  # issue 11: short first
                                  "short_seq_fraction": Rule(0, 1, hi_open=True)})


def _seq_schedule_checks(obj) -> list[tuple[str, object, str]]:
    """``short_seq_*`` (issue 11): a short phase needs a length below ``seq_len`` and a share of the
    steps in (0, 1); its settings without it are refused, never ignored."""
    if type(obj).__name__ != "TrainConfig" or not all(isinstance(getattr(obj, k), (int, float)) for k in
                                                      ("short_seq_len", "short_seq_fraction", "short_batch_size")):
        return []
    out = []
    if obj.short_seq_len:
        if not 4 <= obj.short_seq_len < obj.seq_len:
            out.append(("short_seq_len", obj.short_seq_len, f"0 (off) or in [4, seq_len = {obj.seq_len})"))
        if not 0 < obj.short_seq_fraction < 1:
            out.append(("short_seq_fraction", obj.short_seq_fraction, "in (0, 1) with short_seq_len"))
    else:
        for key in ("short_seq_fraction", "short_batch_size"):
            if getattr(obj, key):
                out.append((key, getattr(obj, key), "0 unless short_seq_len > 0"))
    return out

def _budget_checks(obj) -> list[tuple[str, object, str]]:
    """``budget_recheck`` re-estimates a CPU-minute budget: another value without one is refused."""
    if type(obj).__name__ != "TrainConfig" or obj.max_minutes or obj.budget_recheck == TrainConfig.budget_recheck:
        return []
    return [("budget_recheck", obj.budget_recheck,
             f"left at {TrainConfig.budget_recheck} unless train.max_minutes is set (it re-checks a CPU-minute budget)")]


# P-tuning (issue 13, ``prompts.ptuning``): a method of its own and its three settings
VALIDATION["FinetuneConfig"].update({"method": Rule(choices=("finetune", "pet", "efl", "ptuning")),
                                     "ptuning_tokens": _NONNEG,
                                     "ptuning_encoder": Rule(choices=("lstm", "mlp", "none"))})
VALIDATION["DistillConfig"]["narrow_layers"] = Rule(choices=("random", "slice", "magnitude"))  # issue 12: sliced blocks


def _cross_checks(obj) -> list[tuple[str, object, str]]:
    """Rules that involve several fields or the items of a collection."""
    out = []
    name = type(obj).__name__
    if name == "ModelConfig" and isinstance(obj.pad_token_id, int) and obj.pad_token_id >= obj.vocab_size:
        out.append(("pad_token_id", obj.pad_token_id, f"< vocab_size ({obj.vocab_size})"))
    if name == "FinetuneConfig" and obj.method != "pet":  # PET-only settings are refused, not ignored
        for key in ("pet_mlm", "unlabeled_file"):
            if getattr(obj, key):
                out.append((key, getattr(obj, key), "unset unless method=pet"))
    if name == "FinetuneConfig" and obj.unlabeled_file and not obj.pet_mlm:
        out.append(("unlabeled_file", obj.unlabeled_file, "unset unless pet_mlm > 0 (it feeds the auxiliary MLM loss)"))
    if name == "FinetuneConfig" and obj.method != "ptuning":  # P-tuning-only settings: the default, or refused
        for f in fields(obj):
            if f.name.startswith("ptuning_") and getattr(obj, f.name) != f.default:
                out.append((f.name, getattr(obj, f.name), f"{json.dumps(f.default)} (the default) unless method=ptuning"))
    if name == "FinetuneConfig" and obj.method == "ptuning":
        if obj.ptuning_freeze and obj.ptuning_tokens == 0:
            out.append(("ptuning_freeze", obj.ptuning_freeze, "false with ptuning_tokens=0 (nothing would train)"))
        if obj.template == "all":
            out.append(("template", obj.template, "one template's name with method=ptuning (it learns one prompt)"))
        if obj.ptuning_freeze and obj.fgm:  # FGM perturbs the word embeddings, which a frozen body never updates
            out.append(("fgm", obj.fgm, "0 with ptuning_freeze=true (the frozen word embeddings get no adversarial step)"))
        if obj.ptuning_freeze and obj.llrd != 1.0:  # only the prompt encoder trains: no layers to decay over
            out.append(("llrd", obj.llrd, "1.0 with ptuning_freeze=true (only the prompt encoder trains)"))
    if name == "TrainConfig" and obj.curriculum is not None:
        keys = {"at", *CURRICULUM_OVERRIDES}
        if not isinstance(obj.curriculum, list) or not all(isinstance(st, dict) and set(st) <= keys
                                                           for st in obj.curriculum):
            out.append(("curriculum", obj.curriculum, "a list of stages, each a mapping with keys among "
                        + ", ".join(sorted(keys))))
    if name == "TrainConfig":
        if obj.mask_token_prob + obj.random_token_prob > 1:
            out.append(("random_token_prob", obj.random_token_prob,
                        f"≤ 1 - mask_token_prob ({1 - obj.mask_token_prob:g}): the two are shares of the predicted tokens"))
        if len(obj.betas) != 2 or not all(_PROB_HALF_OPEN.ok(b) for b in obj.betas):
            out.append(("betas", list(obj.betas), "two numbers in [0, 1)"))
        for key in ("masking_weights", "structure_weights", "knowledge_weights"):
            w = getattr(obj, key)
            if w is not None and (not w or not all(_NONNEG.ok(v) for v in w.values()) or sum(w.values()) <= 0):
                out.append((key, w, "a mapping of names to weights ≥ 0, not all 0"))
        if obj.masking_weights:
            bad = sorted(set(obj.masking_weights) - set(VALIDATION["TrainConfig"]["masking"].choices))
            if bad:
                out.append(("masking_weights", obj.masking_weights,
                            "keys among " + ", ".join(VALIDATION["TrainConfig"]["masking"].choices)))
    if name == "TrainConfig" and (isinstance(obj.ar_mlm_groups, bool) or not isinstance(obj.ar_mlm_groups, int)
                                  or obj.ar_mlm_groups < 1):
        out.append(("ar_mlm_groups", obj.ar_mlm_groups, "an integer ≥ 1 (1 = ordinary MLM)"))
    elif name == "TrainConfig" and obj.ar_mlm_groups > 1 and obj.self_distill_instance:
        out.append(("self_distill_instance", obj.self_distill_instance,
                    "0 with ar_mlm_groups > 1 (both multiply the batch; not supported together)"))
    return out


def _distill_checks(obj) -> list[tuple[str, object, str]]:
    """``DistillConfig`` (one student) and ``TrainConfig.students`` (issue 12)."""
    out = []
    if type(obj).__name__ == "DistillConfig":
        init = obj.init
        if not (init in ("teacher", "random") or isinstance(init, list) and init
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in init)):
            out.append(("init", init, "teacher, random or a list of 1-based teacher layers"))
        if not (obj.relation_weight or obj.hidden_weight or obj.soft_weight or obj.mlm_weight):
            out.append(("mlm_weight", obj.mlm_weight, "> 0 when every other weight is 0 (nothing would be learnt)"))
        if not isinstance(obj.student, str) or not obj.student:
            out.append(("student", obj.student, "a student name, YAML file or model directory"))
        x = obj.relation_layer
        if not (0 < x < 1 or float(x).is_integer() and x != 0):
            out.append(("relation_layer", x, "a layer (8), -k from the top (-1) or a fraction in (0, 1)"))
    if type(obj).__name__ == "TrainConfig" and obj.students is not None:
        from clueforge.distill import DistillConfig

        if not isinstance(obj.students, dict) or not obj.students:
            out.append(("students", obj.students, "a mapping of student names to their settings"))
            return out
        known = {f.name for f in fields(DistillConfig)}
        for name, spec in obj.students.items():
            if not isinstance(spec, dict) or set(spec) - known or not str(name).isidentifier():
                out.append(("students", {name: spec}, f"NAME (letters, digits, _) → a mapping with keys among "
                            f"{', '.join(sorted(known))}"))
                continue
            try:
                build_dataclass(DistillConfig, dict(spec), f"train.students.{name}")
            except UserError as exc:
                out.append(("students", {name: spec}, f"valid student settings ({exc})"))
        if obj.self_distill_instance:
            out.append(("self_distill_instance", obj.self_distill_instance, "0 with train.students (the doubled "
                        "batch is not what the students see)"))
        if isinstance(obj.ar_mlm_groups, int) and obj.ar_mlm_groups > 1:
            out.append(("ar_mlm_groups", obj.ar_mlm_groups, "1 with train.students (the teacher sees the k-fold "
                        "AR-MLM batch, the students the plain one)"))
    return out


def check(obj) -> list[tuple[str, object, str]]:
    """``(field, value, allowed)`` for every field of ``obj`` that breaks its rule."""
    rules = VALIDATION.get(type(obj).__name__, {})
    bad = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        rule = rules.get(f.name)
        if rule is not None and not rule.ok(v):
            bad.append((f.name, v, rule.describe()))
        elif rule is None and str(f.type).startswith("str") and not isinstance(v, str):
            bad.append((f.name, v, "a string"))
    return bad + _cross_checks(obj) + _distill_checks(obj) + _seq_schedule_checks(obj) + _budget_checks(obj)


def validate(obj, where: str = "", *, section: str = "", overridden=frozenset()) -> None:
    """Raise ``UserError`` naming every field of ``obj`` outside its allowed range or choices."""
    _raise_problems(check(obj), where, section, overridden)


def _raise_problems(found: list[tuple[str, object, str]], where: str, section: str, overridden) -> None:
    """``UserError`` listing ``(field, value, allowed)`` problems (none: return), each blamed on
    ``--set`` when it came from there, else on ``where``."""
    problems = []
    for key, value, allowed in found:
        source = "--set " if key in overridden else (f"{where}: " if where else "")
        problems.append(f"{source}{section}{key}={json.dumps(value, ensure_ascii=False, default=str)} "
                        f"is not allowed: must be {allowed}")
    if problems:
        raise UserError("; ".join(problems))


def validate_pretrain(cfg: PretrainConfig) -> None:
    """Both sections of a pretraining config (for configs built in code, not by ``load_config``)."""
    validate(cfg.model, section="model.")
    validate(cfg.train, section="train.")


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{where}: not valid YAML ({problem})") from None


def _check_override_key(item: str, section: str, key: str) -> None:
    import difflib

    known = [f.name for f in fields(ModelConfig if section == "model" else TrainConfig)]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(section + '.' + c for c in close)}?" if close else ""
        raise UserError(f"--set {item!r}: {section} has no setting {key!r}{hint} "
                        f"(`clueforge config show` lists them all)")


def field_docs(cls) -> dict[str, str]:
    """Field name → its docstring (the string literal under it in the class body), in order."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = " ".join(nxt.value.value.split())
            out[node.target.id] = doc
    return out
