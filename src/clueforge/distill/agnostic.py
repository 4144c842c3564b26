"""Task-agnostic distillation: a student learns from a frozen teacher on the pretraining shards.

One process::

    clueforge distill --teacher runs/mini/final --student pico --data runs/corpus --out runs/pico-kd

Several processes: ``torchrun --nproc_per_node 2 -m clueforge distill ...`` (as ``pretrain``).

It is the pretraining loop (``pretrain.loop.pretrain``) with another model and loss: the data
pipeline (packing, masking, held-out rows, the fixed evaluation protocol), checkpoints, exact
resume, refused/recorded setting changes, metrics and progress are pretraining's. The model the
loop trains is ``DistillModel``: the student (``.mlm``: what is checkpointed, evaluated and
exported to ``OUT/final`` in the HF layout) plus the hidden-state projection (``.aux``: saved in
checkpoints, not exported); the teacher is frozen, in eval mode, and runs once per batch under
``no_grad``. Each loss is weighted in the ``distill`` section and logged on its own
(``mlm_loss``, ``soft_kl``, ``relation_kl``, ``hidden_mse``; ``loss`` is the weighted total).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clueforge.distill import DistillConfig
from clueforge.distill.losses import hidden_mse, minilm_relation_kl, soft_kl
from clueforge.distill.student import build_student, init_from_teacher, resolve_student, student_config
from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.pretrain.config import PretrainConfig, TrainConfig
from clueforge.pretrain.model import PretrainOutput
from clueforge.utils import UserError

log = logging.getLogger("clueforge.distill")


@dataclass
class DistillRunConfig(PretrainConfig):
    """A pretraining config (``model``: the student's shape, ``train``) plus the teacher and the
    ``distill`` section; all of it is compared on resume."""

    teacher: str = ""
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class TeacherOutput:
    """What a student learns from, computed once per batch (detached)."""

    logits: torch.Tensor | None  # (M, V) at the masked positions
    hidden: torch.Tensor | None  # (B, T, Dt) last layer
    qkv: torch.Tensor | None  # (B, T, 3Dt) fused QKV output of the relation layer


def relation_layer(spec: float, num_layers: int) -> int:
    """``relation_layer`` → a 1-based layer: k ≥ 1, -k from the top (-1 = last), or a fraction."""
    x = float(spec)
    layer = round(x * num_layers) if 0 < x < 1 else int(x) if x >= 1 else num_layers + 1 + int(x)
    if not x.is_integer() and not 0 < x < 1 or not 1 <= layer <= num_layers:
        raise UserError(f"distill relation_layer {spec!r}: the teacher has layers 1..{num_layers} (or -1.., or a "
                        f"fraction in (0, 1))")
    return max(1, layer)


def relation_heads(d: DistillConfig, student: ModelConfig, teacher: ModelConfig) -> int:
    heads = d.relation_heads or student.num_heads
    if student.hidden_size % heads or teacher.hidden_size % heads:
        raise UserError(f"distill relation_heads {heads}: must divide the student's width {student.hidden_size} and "
                        f"the teacher's {teacher.hidden_size}")
    return heads


def pair_mask(batch: dict) -> torch.Tensor:
    """(B, T) real tokens, or (B, T, T) allowed pairs when attention stays inside documents."""
    real = batch["attention_mask"].bool()
    if batch.get("doc_ids") is None:
        return real
    d = batch["doc_ids"]
    return (d[:, :, None] == d[:, None, :]) & real[:, None, :] & real[:, :, None]  # (B, T, T)


class QKVTap:
    """A forward hook on a block's fused QKV projection keeping its first output per ``take``."""

    def __init__(self, block: nn.Module, only_training: bool = False):
        self.value = None
        self.only_training = only_training
        self.handle = block.attn.qkv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self.value is None and (module.training or not self.only_training):
            self.value = output

    def take(self) -> torch.Tensor | None:
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def teacher_outputs(teacher: BertForMLM, batch: dict, layer: int, d: DistillConfig) -> TeacherOutput:
    """One teacher forward: what ``d``'s non-zero weights need."""
    tap = QKVTap(teacher.encoder.layers[layer - 1]) if d.relation_weight else None
    try:
        hidden = teacher.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                 batch.get("doc_ids"))  # (B, T, Dt)
    finally:
        if tap is not None:
            tap.remove()
    logits = teacher.head(hidden[batch["labels"] != -100]) if d.soft_weight else None
    return TeacherOutput(logits, hidden if d.hidden_weight else None, tap.take() if tap is not None else None)


def distill_loss(student: BertForMLM, proj: nn.Module | None, batch: dict, teacher: TeacherOutput,
                 d: DistillConfig, heads: int) -> tuple[torch.Tensor, PretrainOutput, dict]:
    """The student's forward and its weighted losses against ``teacher``'s outputs for the same
    batch. Returns ``(loss, output, parts)`` as ``pretrain.model.mlm_objective`` does."""
    tap = QKVTap(student.encoder.layers[-1]) if d.relation_weight else None
    try:
        hidden = student.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                 batch.get("doc_ids"))  # (B, T, Ds)
    finally:
        if tap is not None:
            tap.remove()
    labels = batch["labels"]
    sel = labels != -100  # (B, T)
    targets = labels[sel]  # (M,)
    logits = student.head(hidden[sel])  # (M, V)
    mlm = F.cross_entropy(logits.float(), targets)
    loss = d.mlm_weight * mlm
    parts = {"mlm_loss": mlm.detach()}
    if d.soft_weight:
        kl = soft_kl(logits, teacher.logits, d.temperature)
        loss = loss + d.soft_weight * kl
        parts["soft_kl"] = kl.detach()
    if d.relation_weight:
        rel = minilm_relation_kl(tap.take(), teacher.qkv, heads, pair_mask(batch))
        loss = loss + d.relation_weight * rel
        parts["relation_kl"] = rel.detach()
    if d.hidden_weight:
        mse = hidden_mse(hidden, teacher.hidden, proj, batch["attention_mask"])
        loss = loss + d.hidden_weight * mse
        parts["hidden_mse"] = mse.detach()
    parts["loss"] = loss.detach()
    return loss, PretrainOutput(mlm, logits, targets, hidden), parts


def hidden_projection(d: DistillConfig, student: ModelConfig, teacher: ModelConfig) -> nn.Linear | None:
    """The learned student → teacher width map of the hidden MSE (None: not needed)."""
    if not d.hidden_weight or student.hidden_size == teacher.hidden_size:
        return None
    proj = nn.Linear(student.hidden_size, teacher.hidden_size)
    nn.init.normal_(proj.weight, 0.0, student.initializer_range)
    nn.init.zeros_(proj.bias)
    return proj


class DistillModel(nn.Module):
    """What the pretraining loop trains here: ``mlm`` (the student), ``aux`` (its projection, or
    None) and the frozen teacher (no gradient, always in eval mode)."""

    def __init__(self, student: BertForMLM, teacher: BertForMLM, d: DistillConfig):
        super().__init__()
        self.mlm = student
        proj = hidden_projection(d, student.cfg, teacher.cfg)
        self.aux = nn.ModuleDict({"hidden_proj": proj}) if proj is not None else None
        self.teacher = teacher.requires_grad_(False).eval()
        self.d = d
        self.layer = relation_layer(d.relation_layer, teacher.cfg.num_layers)
        self.heads = relation_heads(d, student.cfg, teacher.cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, input_ids, labels, attention_mask=None, token_type_ids=None, doc_ids=None):
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids, "doc_ids": doc_ids}
        tout = teacher_outputs(self.teacher, batch, self.layer, self.d)
        proj = self.aux["hidden_proj"] if self.aux is not None else None
        return distill_loss(self.mlm, proj, batch, tout, self.d, self.heads)


def distill_objective(model, batch: dict, t, layers=()) -> tuple:
    """``pretrain.model.mlm_objective``'s contract for a ``DistillModel`` (possibly wrapped)."""
    return model(**batch)


def build_distill_model(cfg: DistillRunConfig, teacher: BertForMLM, vocab_size: int) -> tuple[DistillModel, object]:
    """The pretraining loop's model builder for a distillation run (``pretrain(..., build=...)``)."""
    t, d = cfg.train, cfg.distill
    if teacher.cfg.vocab_size != vocab_size:
        raise UserError(f"teacher {cfg.teacher}: vocabulary {teacher.cfg.vocab_size} ≠ the corpus's {vocab_size}")
    torch.manual_seed(t.seed)  # identical student (and projection) on every rank
    if resolve_student(d.student)[1] == "config":  # cfg.model: the YAML's model section + --set model.K=V
        student = BertForMLM(replace(cfg.model, vocab_size=teacher.cfg.vocab_size,
                                     pad_token_id=teacher.cfg.pad_token_id))
        record = init_from_teacher(student, teacher, d.init, d.embeddings, narrow=d.narrow_layers)
    else:
        student = build_student(d.student, teacher, d.init, d.embeddings, narrow=d.narrow_layers)
        record = {"directory": str(d.student)}
    cfg.model = student.cfg
    for who, m in (("student", student.cfg), ("teacher", teacher.cfg)):
        if t.seq_len > m.max_position:
            raise UserError(f"train.seq_len {t.seq_len} exceeds the {who}'s max_position {m.max_position}")
    student.encoder.gradient_checkpointing = t.gradient_checkpointing
    model = DistillModel(student, teacher, d)
    model.student_init = record
    log.info("student initialisation: %s", record)
    log.info("distilling %s (%d layers, hidden %d) into a student of %d layers, hidden %d; relations: teacher layer "
             "%d, %d heads", cfg.teacher, teacher.cfg.num_layers, teacher.cfg.hidden_size, student.cfg.num_layers,
             student.cfg.hidden_size, model.layer, model.heads)
    return model, distill_objective


# ---------------------------------------------------------------------------------------------
# Config and entry point


def load_distill_config(teacher: str | Path, student: str | Path | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> DistillRunConfig:
    """The run's config: the student's YAML (``model`` and ``train``; a model-directory student
    keeps its shape and takes ``TrainConfig``'s defaults), ``--set`` items ``model.K=V``,
    ``train.K=V`` and ``distill.K=V``, and ``--student`` as ``distill.student``."""
    from clueforge.model.hf import read_hf_config
    from clueforge.pretrain.config import build_dataclass, load_config, parse_override

    teacher_cfg = read_hf_config(teacher)[0]
    pre, dist = [], {}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] == "distill":
            if len(keys) != 2:
                raise UserError(f"--set {item!r}: expected distill.KEY=VALUE")
            dist[keys[1]] = value
        else:
            pre.append(item)
    if student is not None:
        dist["student"] = str(student)
    d = build_dataclass(DistillConfig, dist, "distill", section="distill.", overridden=set(dist))
    if d.aux_layer and "aux_layer" in dist:
        raise UserError("distill.aux_layer: the auxiliary layer is an option of online students (train.students of "
                        "`clueforge pretrain`); `clueforge distill` exports the student it trains")
    path, kind = resolve_student(d.student)
    if kind == "config":
        base = load_config(path, pre)
    else:
        if any(item.startswith("model.") for item in pre):
            raise UserError(f"--set model.*: the student {path} is a model directory, its shape is fixed")
        train = {}
        for item in pre:
            keys, value = parse_override(item)
            if len(keys) != 2 or keys[0] != "train":
                raise UserError(f"--set {item!r}: expected train.KEY=VALUE or distill.KEY=VALUE")
            train[keys[1]] = value
        base = PretrainConfig(model=read_hf_config(path)[0],
                              train=build_dataclass(TrainConfig, train, "train", section="train.",
                                                    overridden=set(train)))
    t = base.train
    unsupported = [k for k in ("structure_weights", "knowledge_weights", "self_distill_layers", "init_from", "students")
                   if getattr(t, k, None)] + (["self_distill_instance"] if t.self_distill_instance else []) \
        + (["ar_mlm_groups"] if getattr(t, "ar_mlm_groups", 1) > 1 else [])
    if unsupported:
        raise UserError(f"train.{', train.'.join(unsupported)}: not used by `clueforge distill` (the student learns "
                        f"from the teacher and the MLM loss); remove them")
    model = student_config(path, teacher_cfg) if kind == "model" else base.model
    model = replace(model, vocab_size=teacher_cfg.vocab_size, pad_token_id=teacher_cfg.pad_token_id)
    d.student = str(Path(path).resolve()) if kind == "model" or Path(d.student).is_file() else d.student
    return DistillRunConfig(model=model, train=t, teacher=str(Path(teacher).resolve()), distill=d)


def distill(cfg: DistillRunConfig, data: str | Path, out: str | Path, *, show_progress: bool = True,
            log_progress: bool = False, allow_config_change: bool = False) -> dict:
    """Distil ``cfg.teacher`` into the student on the corpus ``data``; ``out/final`` is the student
    in the HF layout (``clueforge finetune`` takes it). Resumes like ``pretrain``."""
    from clueforge.model.hf import load_hf
    from clueforge.pretrain.loop import pretrain

    teacher = load_hf(cfg.teacher)
    built = {}

    def build(c, vocab_size):
        model, objective = build_distill_model(c, teacher, vocab_size)
        built["student_init"] = model.student_init
        return model, objective

    summary = pretrain(cfg, data, out, show_progress=show_progress, log_progress=log_progress,
                       allow_config_change=allow_config_change, build=build)
    return {**summary, "teacher": cfg.teacher, **built}
