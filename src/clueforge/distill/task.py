"""Task distillation: a fine-tuned teacher teaches a small student one task (TinyBERT's second stage).

    clueforge distill --task msra-ner --teacher runs/ft/msra-ner --student nano \\
        --data ../shared/data/tasks/msra_ner --out runs/distil/msra-ner-nano --set augment_copies=2

The student trains in the ordinary fine-tuning loop (``finetune.loop.finetune``, same batching,
schedule, evaluation, best-on-dev checkpoint) with a ``TeacherObjective`` in place of the plain
task loss, so its output is a normal fine-tuned directory that ``predict``, ``export``, ``serve``
and ``submit`` take unchanged. Per step:

    loss = soft_weight · T² · KL(teacher_T ‖ student_T)      (the family's predictive distributions)
         + hard_weight · task loss                            (the gold labels)
         + hidden_weight · MSE(W·h_student_i, h_teacher_j)    (TinyBERT; W learned when widths differ)
         + attention_weight · MiniLMv2 Q-Q/K-K/V-V relation KL (student's last layer, a teacher layer)

The distributions each family's logits define: a sequence's classes (classification, KgCLUE's
candidate pairs), a question's choices (padding masked out), each real token's tags (NER), and
a window's start and end positions over its real tokens (span extraction). Student layer i of
L_s is matched to teacher layer round(i·L_t/L_s). The teacher runs in eval mode without
gradients on the same batch; its label order and state (KgCLUE's knowledge base) are the
student's. Training data: the task's training set plus, optionally, augmented copies
(``distill.augment``), which the teacher labels.

The student: a directory (a task-agnostically distilled student, or any BERT checkpoint with the
teacher's vocabulary), or a student config (``mini``/``micro``/``nano``/``pico``, a YAML) built by
``distill.student.build_student`` from the teacher (every k-th layer where the block shapes
match; otherwise random layers, with a warning) or at random. Where the
student has the teacher's width, the task head (pooler, classifier) starts as the teacher's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from clueforge.distill.losses import hidden_mse, minilm_relation_kl, soft_kl
from clueforge.finetune.loop import FinetuneConfig, checkpoint_dir, finetune, load_finetuned, save_checkpoint
from clueforge.utils import UserError, atomic_write

log = logging.getLogger("clueforge.distill")


@dataclass
class TaskDistillConfig:
    temperature: float = 1.0
    """Softmax temperature T of both sides' predictions in the soft-target KL (scaled by T²)."""
    soft_weight: float = 1.0
    """Weight of the teacher's soft targets (KL)."""
    hard_weight: float = 0.0
    """Weight of the task loss on the gold labels (0: teacher only, as TinyBERT)."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE between matched layers (0 = off)."""
    attention_weight: float = 0.0
    """Weight of the MiniLMv2 Q-Q/K-K/V-V relation KL on the student's last layer (0 = off)."""
    teacher_layer: int = 0
    """Teacher layer (1-based) whose relations the student's last layer learns (0 = the last)."""
    relation_heads: int = 0
    """Relation heads of the MiniLMv2 term (0 = the student's attention heads); must divide both widths."""
    init: str = "teacher"
    """A student config is initialised from the ``teacher`` (every k-th layer) or ``random``."""
    embeddings: str = "slice"
    """Student narrower than the teacher: its embeddings are the teacher's first dimensions
    (``slice``) or their top principal directions (``project``)."""
    narrow_layers: str = "random"
    """Student narrower than the teacher (width, heads, head width or feed-forward): ``slice`` cuts
    the teacher's layers down to the student's shape, ``magnitude`` keeps the heads and
    feed-forward units of largest weight norm instead of the first ones, ``random`` leaves the
    layers random (``distill.student.init_from_teacher``)."""
    augment_copies: int = 0
    """Augmented copies of each training example (0 = no augmentation)."""
    augment_rate: float = 0.4
    """Probability that a word of an augmented copy is replaced."""
    augment_mlm: str | None = None
    """A masked-LM directory (the teacher's pretrained encoder) proposing single-character replacements."""
    augment_corpus: str | None = None
    """A text or JSON-lines corpus whose words join the same-POS replacement pool."""
    augment_top_k: int = 15
    """MLM candidates a replacement is drawn from."""

    def __post_init__(self) -> None:
        for name in ("temperature",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: must be > 0")
        for name in ("soft_weight", "hard_weight", "hidden_weight", "attention_weight", "teacher_layer",
                     "relation_heads", "augment_copies"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: must be ≥ 0")
        if not 0 <= self.augment_rate <= 1:
            raise ValueError(f"augment_rate={self.augment_rate} is not allowed: must be in [0, 1]")
        if self.augment_top_k < 1:
            raise ValueError(f"augment_top_k={self.augment_top_k} is not allowed: must be ≥ 1")
        if self.init not in ("teacher", "random"):
            raise ValueError(f"init={self.init!r} is not allowed: must be one of teacher, random")
        if self.embeddings not in ("slice", "project"):
            raise ValueError(f"embeddings={self.embeddings!r} is not allowed: must be one of slice, project")
        if self.narrow_layers not in ("random", "slice", "magnitude"):
            raise ValueError(f"narrow_layers={self.narrow_layers!r} is not allowed: must be one of random, slice, "
                             f"magnitude")
        unused = [f"augment_{k}" for k, v, d in (("rate", self.augment_rate, 0.4), ("mlm", self.augment_mlm, None),
                                                 ("corpus", self.augment_corpus, None), ("top_k", self.augment_top_k, 15))
                  if v != d]
        if unused and not self.augment_copies:
            raise ValueError(f"{', '.join(unused)} set but augment_copies=0: no copies are made, so they would be "
                             f"ignored (set augment_copies=N)")
        if self.soft_weight + self.hard_weight + self.hidden_weight + self.attention_weight == 0:
            raise ValueError("every loss weight is 0: nothing to train")


# --- losses --------------------------------------------------------------------------------------

def prediction_rows(head: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The family's predictive distributions as rows of logits (N, C), padding excluded."""
    logits = logits.float()
    if head == "sequence":
        return logits  # (B, C)
    if head == "choice":
        return logits.masked_fill(~batch["choice_mask"], -1e4)  # (B, K)
    mask = batch["attention_mask"].bool()  # (B, T)
    if head == "token":
        return logits[mask]  # (N, C)
    # span: the start and the end distributions over each window's real tokens
    lg = logits.masked_fill(~mask[..., None], -1e4)  # (B, T, 2)
    return torch.cat([lg[..., 0], lg[..., 1]])  # (2B, T)


# --- the objective the fine-tuning loop calls ----------------------------------------------------

class _Taps:
    """Forward hooks keeping each layer's output and the last layer's QKV projection."""

    def __init__(self, model, layers: list[int], qkv_layer: int | None, only_training: bool):
        self.out: dict = {}
        enc_layers = model.encoder.layers
        for i in layers:
            enc_layers[i - 1].register_forward_hook(self._keep(("h", i), only_training))
        if qkv_layer is not None:
            enc_layers[qkv_layer - 1].attn.qkv.register_forward_hook(self._keep("qkv", only_training))

    def _keep(self, key, only_training: bool):
        def hook(module, args, output):
            if module.training or not only_training:
                self.out[key] = output
        return hook


class TeacherObjective:
    """``finetune.loop.StepObjective`` of task distillation (the module docstring's loss)."""

    def __init__(self, teacher: nn.Module, head: str, cfg: TaskDistillConfig, augmenter=None):
        self.teacher, self.head, self.cfg, self.augmenter = teacher.eval(), head, cfg, augmenter
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.t_taps = self.s_taps = None
        self.proj = nn.ModuleList()

    def train_examples(self, examples: list[dict]) -> list[dict]:
        if self.augmenter is None:
            return []
        extra = self.augmenter.augment(examples)
        log.info("augmentation: %d copies of %d training examples", len(extra), len(examples))
        return extra

    def attach(self, model) -> list[nn.Parameter]:
        cfg, tcfg, scfg = self.cfg, self.teacher.cfg, model.cfg
        self.layer_map = {i: round(i * tcfg.num_layers / scfg.num_layers) for i in range(1, scfg.num_layers + 1)}
        t_layer = cfg.teacher_layer or tcfg.num_layers
        if t_layer > tcfg.num_layers:
            raise UserError(f"teacher_layer={t_layer}: the teacher has {tcfg.num_layers} layers")
        self.rel_heads = cfg.relation_heads or scfg.num_heads
        if cfg.attention_weight and (scfg.hidden_size % self.rel_heads or tcfg.hidden_size % self.rel_heads):
            raise UserError(f"relation_heads={self.rel_heads} must divide both hidden sizes "
                            f"(student {scfg.hidden_size}, teacher {tcfg.hidden_size})")
        hidden = list(self.layer_map) if cfg.hidden_weight else []
        qkv = scfg.num_layers if cfg.attention_weight else None
        self.s_taps = _Taps(model, hidden, qkv, only_training=True)
        self.t_taps = _Taps(self.teacher, [self.layer_map[i] for i in hidden], t_layer if qkv else None,
                            only_training=False)
        if cfg.hidden_weight and scfg.hidden_size != tcfg.hidden_size:
            self.proj = nn.ModuleList(nn.Linear(scfg.hidden_size, tcfg.hidden_size) for _ in hidden)
        dev = next(model.parameters()).device
        self.teacher.to(dev)
        self.proj.to(dev)
        return list(self.proj.parameters())

    def loss(self, batch: dict, logits: torch.Tensor, task_loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        with torch.no_grad():
            t_logits = self.teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        parts = {}
        loss = cfg.hard_weight * task_loss
        if cfg.soft_weight:
            kl = soft_kl(prediction_rows(self.head, logits, batch),
                                prediction_rows(self.head, t_logits, batch), cfg.temperature)
            loss = loss + cfg.soft_weight * kl
            parts["soft_kl"] = kl.item()
        mask = batch["attention_mask"]
        if self.head == "choice":
            mask = mask.flatten(0, 1)  # (B·K, T): the encoder saw every choice as a row
        if cfg.hidden_weight:
            mse = sum(hidden_mse(self.s_taps.out[("h", i)], self.t_taps.out[("h", j)],
                                 self.proj[n] if len(self.proj) else None, mask)
                      for n, (i, j) in enumerate(self.layer_map.items())) / len(self.layer_map)
            loss = loss + cfg.hidden_weight * mse
            parts["hidden_mse"] = mse.item()
        if cfg.attention_weight:
            rel = minilm_relation_kl(self.s_taps.out["qkv"], self.t_taps.out["qkv"], self.rel_heads, mask)
            loss = loss + cfg.attention_weight * rel
            parts["relation_kl"] = rel.item()
        self.s_taps.out.clear()
        self.t_taps.out.clear()
        return loss, parts


# --- the command ---------------------------------------------------------------------------------

def split_overrides(items: list[str] | None, seed: int | None = None) -> tuple[FinetuneConfig, TaskDistillConfig]:
    """``--set key=value`` items (YAML values) split between the loop's and distillation's settings."""
    import yaml

    from clueforge.pretrain.config import build_dataclass

    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            overrides[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    if seed is not None:
        if overrides.get("seed", seed) != seed:
            raise UserError(f"--seed {seed} and --set seed={overrides['seed']} disagree; give one of them")
        overrides["seed"] = seed
    mine = {f.name for f in fields(TaskDistillConfig)}
    d = {k: overrides.pop(k) for k in list(overrides) if k in mine}
    dcfg = build_dataclass(TaskDistillConfig, d, "--set", overridden=set(d))
    try:
        cfg = build_dataclass(FinetuneConfig, overrides, "--set", overridden=set(overrides))
    except UserError as exc:
        raise UserError(f"{exc} (task distillation also takes: {', '.join(sorted(mine))})") from None
    if cfg.method != "finetune":
        raise UserError(f"--set method={cfg.method}: task distillation trains a task head (method=finetune)")
    return cfg, dcfg


def _vocab(path: Path) -> list[str]:
    from clueforge.text.tokenizer import resolve_vocab

    return resolve_vocab(path).read_text(encoding="utf-8").splitlines()


def build_task_student(student_spec: str | Path, teacher, teacher_dir: Path, fam, state: dict, init: str,
                       embeddings: str = "slice", narrow: str = "random"):
    """The student ``TaskModel``: from a directory (encoder; head too if it is this task's), or a
    student config built from the teacher's encoder; the teacher's head where widths match.
    Returns ``(student, init, copied heads, record)``: ``record`` is ``init_from_teacher``'s (for a
    directory: ``{"directory": path}``)."""
    from clueforge.finetune.loop import _num_labels
    from clueforge.model.bert import BertForMLM
    from clueforge.model.heads import TaskModel
    from clueforge.model.hf import load_hf_task, read_hf_config, saved_pooling

    from clueforge.distill.student import init_from_teacher, resolve_student, student_config

    n_labels = _num_labels(fam, state)
    spec, kind = resolve_student(student_spec)
    if kind == "model":
        if _vocab(spec) != _vocab(teacher_dir):
            raise UserError(f"the student {spec} and the teacher {teacher_dir} have different vocabularies: "
                            "task distillation feeds both the same token ids")
        student = load_hf_task(spec, fam.HEAD, n_labels)
        if saved_pooling(read_hf_config(spec)[1]) is None:  # a pretrained student: read what the teacher reads
            student.pooling = getattr(teacher, "pooling", "cls")
        init, record = f"directory {spec}", {"directory": str(spec)}
    else:
        mlm = BertForMLM(teacher.cfg)  # the teacher's encoder under an MLM head init_from_teacher expects
        mlm.encoder.load_state_dict(teacher.encoder.state_dict())
        encoder = BertForMLM(student_config(spec, teacher.cfg))
        record = init_from_teacher(encoder, mlm, init, embeddings, lists=False, narrow=narrow)
        student = TaskModel(encoder.cfg, fam.HEAD, n_labels, pooling=getattr(teacher, "pooling", "cls"))
        student.encoder.load_state_dict(encoder.encoder.state_dict())  # reads what the teacher's head reads
    copied = []
    if init == "teacher" and student.cfg.hidden_size == teacher.cfg.hidden_size:
        for name in ("pooler", "classifier"):
            if hasattr(student, name) and getattr(student, name).weight.shape == getattr(teacher, name).weight.shape:
                getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
                copied.append(name)
    return student, init, copied, record


def distill_task(task: str, teacher_dir: str | Path, student_spec: str | Path, data_dir: str | Path,
                 out_dir: str | Path, overrides: list[str] | None = None, *, seed: int | None = None,
                 show_progress: bool = True) -> dict:
    """Distil the fine-tuned ``teacher_dir`` into ``student_spec`` on ``task``; write a fine-tuned
    directory to ``out_dir`` (``best/`` or ``last/``, ``results.json`` with a ``distillation``
    entry, ``metrics.jsonl``, and ``student-init/``, the student before training).
    ``overrides``: ``--set key=value`` items of ``FinetuneConfig`` and ``TaskDistillConfig`` fields.
    Returns ``results.json``'s content."""
    from clueforge.distill.augment import Augmenter
    from clueforge.model.hf import load_hf

    cfg, dcfg = split_overrides(overrides, seed)
    if cfg.rdrop and not dcfg.hard_weight:  # the loop folds R-Drop into the task loss, which hard_weight scales
        raise UserError(f"rdrop={cfg.rdrop} with hard_weight=0 would do nothing: R-Drop is part of the task loss; "
                        f"set hard_weight > 0 or leave rdrop out")
    out_dir, teacher_dir = Path(out_dir), checkpoint_dir(teacher_dir)
    try:
        task_obj, fam, state, teacher, tok = load_finetuned(teacher_dir, task)
    except FileNotFoundError:
        raise UserError(f"--teacher {teacher_dir}: not a fine-tuned checkpoint (no config.json)") from None
    if cfg.max_length is None:  # the length the teacher was trained at
        cfg.max_length = task_obj.max_length
    torch.manual_seed(cfg.seed)
    student, init, copied, record = build_task_student(student_spec, teacher, teacher_dir, fam, state, dcfg.init,
                                                       dcfg.embeddings, dcfg.narrow_layers)
    init_dir = out_dir / "student-init"
    save_checkpoint(student, init_dir, teacher_dir, task_obj, state, fam=fam)
    augmenter = None
    if dcfg.augment_copies:
        mlm = load_hf(dcfg.augment_mlm).eval() if dcfg.augment_mlm else None
        if mlm is not None and mlm.cfg.vocab_size != teacher.cfg.vocab_size:
            raise UserError(f"augment_mlm {dcfg.augment_mlm}: its vocabulary differs from the teacher's")
        augmenter = Augmenter(task_obj.family, task_obj.fmt, rate=dcfg.augment_rate, copies=dcfg.augment_copies,
                              seed=cfg.seed, mlm=mlm, tok=tok, top_k=dcfg.augment_top_k, corpus=dcfg.augment_corpus)
    objective = TeacherObjective(teacher, fam.HEAD, dcfg, augmenter)
    log.info("task distillation of %s: teacher %s (%d layers, %d wide) → student %s (%d layers, %d wide; init %s, "
             "head from the teacher: %s)", task, teacher_dir, teacher.cfg.num_layers, teacher.cfg.hidden_size,
             student_spec, student.cfg.num_layers, student.cfg.hidden_size, init, ", ".join(copied) or "no")
    del student
    res = finetune(task, data_dir, init_dir, out_dir, cfg, show_progress=show_progress, objective=objective,
                   state=state)
    teacher_res = teacher_dir.parent / "results.json"
    res["distillation"] = {
        "teacher": str(teacher_dir), "student": str(student_spec), "init": init, "head_from_teacher": copied,
        "student_init": record,
        "teacher_metric": json.loads(teacher_res.read_text())["metric"] if teacher_res.is_file() else None,
        **asdict(dcfg)}
    atomic_write(out_dir / "results.json", json.dumps(res, indent=2, ensure_ascii=False))
    return res
