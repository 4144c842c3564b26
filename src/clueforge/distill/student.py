"""Building a student: its shape from a shipped student config, a YAML file or a model directory,
and its first weights from the teacher.

- Layers (DistilBERT): ``init="teacher"`` takes every k-th teacher layer, k = L_teacher/L_student,
  counted so that the student's top layer is the teacher's top layer (12 → 6: layers 2, 4, …, 12;
  12 → 4: 3, 6, 9, 12); a list of 1-based teacher layers picks them explicitly; ``"random"`` keeps
  BERT's random initialisation. Layers are copied only when the student's blocks have the teacher's
  shape (same width, heads, feed-forward width and LayerNorm placement): otherwise an explicit list
  is refused and ``"teacher"`` leaves the layers random with a warning (only the embeddings and the
  MLM head's bias then come from the teacher).
- Embeddings: copied when the widths are equal; otherwise ``embeddings="slice"`` keeps the first
  D_student dimensions, ``"project"`` maps them through the top D_student principal directions of
  the teacher's word embeddings (the same map for positions and token types).
- The MLM head's vocabulary bias is always the teacher's; its dense/LayerNorm are copied at equal
  widths. The vocabulary is the teacher's.
- Auxiliary layer (ERNIE 3.0 Titan): ``with_aux_layer`` stacks one extra block (a copy of the top
  one) for distillation; ``drop_aux_layer`` removes it before export.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.utils import UserError

log = logging.getLogger("clueforge.distill")

STUDENT_DIR = Path(__file__).resolve().parent.parent / "configs" / "students"


def student_names() -> list[str]:
    return sorted(p.stem for p in STUDENT_DIR.glob("*.yaml"))


def resolve_student(spec: str | Path) -> tuple[Path, str]:
    """``spec`` → ``(path, kind)``: kind ``"model"`` for an HF model directory, ``"config"`` for a
    YAML file (a shipped student name such as ``pico`` or a path)."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"student {spec}: a directory without config.json is not a model directory")
        return p, "model"
    if p.is_file():
        return p, "config"
    shipped = STUDENT_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped, "config"
    raise UserError(f"student {spec!r}: not a model directory, not a YAML file and not a shipped student "
                    f"({', '.join(student_names())})")


def student_config(spec: str | Path, teacher_cfg: ModelConfig) -> ModelConfig:
    """The student's ``ModelConfig`` from a YAML ``model`` section (vocabulary: the teacher's)."""
    from clueforge.pretrain.config import load_config

    path, kind = resolve_student(spec)
    if kind == "model":
        from clueforge.model.hf import read_hf_config

        cfg = read_hf_config(path)[0]
    else:
        cfg = load_config(path).model
    return replace(cfg, vocab_size=teacher_cfg.vocab_size, pad_token_id=teacher_cfg.pad_token_id)


def teacher_layers(init, n_teacher: int, n_student: int, lists: bool = True) -> list[int] | None:
    """The 1-based teacher layer each student layer starts from (None: random). ``lists``: whether
    the caller accepts an explicit list of layers (task distillation does not)."""
    if init == "random":
        return None
    if init == "teacher":
        if n_student > n_teacher:
            raise UserError(f"init=teacher: the student has {n_student} layers, the teacher only {n_teacher}; "
                            + ("give a list of teacher layers or init=random" if lists else "use init=random"))
        return [round((i + 1) * n_teacher / n_student) for i in range(n_student)]
    if isinstance(init, (list, tuple)):
        layers = [int(x) for x in init]
        if len(layers) != n_student or not all(1 <= x <= n_teacher for x in layers):
            raise UserError(f"init {list(init)}: expected {n_student} teacher layers, each in 1..{n_teacher}")
        return layers
    raise UserError(f"init {init!r}: expected 'teacher', 'random'" + (" or a list of teacher layers" if lists else ""))


def _projection(teacher_word: torch.Tensor, width: int) -> torch.Tensor:
    """(Dt, Ds): the top ``width`` principal directions of the teacher's word embeddings."""
    w = teacher_word.float()
    _, _, vh = torch.linalg.svd(w - w.mean(0), full_matrices=False)  # vh (Dt, Dt)
    return vh[:width].T.contiguous()


@torch.no_grad()
def init_from_teacher(student: BertForMLM, teacher: BertForMLM, init="teacher",
                      embeddings: str = "slice", lists: bool = True) -> list[int] | None:
    """Copy what the shapes allow from ``teacher`` into ``student`` (in place); returns the teacher
    layers used (None: random layers). An explicit layer list that cannot be copied (the blocks'
    shapes differ) is refused; ``init="teacher"`` then keeps random layers and warns."""
    s, t = student.cfg, teacher.cfg
    if s.vocab_size != t.vocab_size:
        raise UserError(f"student vocabulary {s.vocab_size} ≠ teacher vocabulary {t.vocab_size}")
    if embeddings not in ("slice", "project"):
        raise UserError(f"embeddings {embeddings!r}: expected 'slice' or 'project'")
    layers = teacher_layers(init, t.num_layers, s.num_layers, lists)
    if init == "random":
        return None
    same_block = (s.hidden_size, s.num_heads, s.intermediate_size, s.pre_ln) == (
        t.hidden_size, t.num_heads, t.intermediate_size, t.pre_ln)
    if not same_block and isinstance(init, (list, tuple)):
        raise UserError(f"init {list(init)}: layers can be copied only when the student's blocks have the teacher's "
                        f"shape (student hidden {s.hidden_size}, {s.num_heads} heads, ffn {s.intermediate_size}; "
                        f"teacher {t.hidden_size}, {t.num_heads}, {t.intermediate_size}); use init=random")
    se, te = student.encoder.embeddings, teacher.encoder.embeddings
    P = min(s.max_position, t.max_position)
    if s.hidden_size == t.hidden_size:
        se.word.weight.copy_(te.word.weight)
        se.position.weight[:P].copy_(te.position.weight[:P])
        se.token_type.weight.copy_(te.token_type.weight[: s.type_vocab_size])
        se.ln.load_state_dict(te.ln.state_dict())
    elif embeddings == "slice":
        d = s.hidden_size
        if d > t.hidden_size:
            raise UserError(f"embeddings=slice: the student ({d}) is wider than the teacher ({t.hidden_size})")
        se.word.weight.copy_(te.word.weight[:, :d])
        se.position.weight[:P].copy_(te.position.weight[:P, :d])
        se.token_type.weight.copy_(te.token_type.weight[: s.type_vocab_size, :d])
        se.ln.weight.copy_(te.ln.weight[:d])
        se.ln.bias.copy_(te.ln.bias[:d])
    else:
        proj = _projection(te.word.weight, s.hidden_size)  # (Dt, Ds)
        se.word.weight.copy_(te.word.weight.float() @ proj)
        se.position.weight[:P].copy_(te.position.weight[:P].float() @ proj)
        se.token_type.weight.copy_(te.token_type.weight[: s.type_vocab_size].float() @ proj)
    student.head.bias.copy_(teacher.head.bias)
    if s.hidden_size == t.hidden_size:
        student.head.dense.load_state_dict(teacher.head.dense.state_dict())
        student.head.ln.load_state_dict(teacher.head.ln.state_dict())
    if same_block:
        for i, j in enumerate(layers):
            student.encoder.layers[i].load_state_dict(teacher.encoder.layers[j - 1].state_dict())
        if s.pre_ln:
            student.encoder.final_ln.load_state_dict(teacher.encoder.final_ln.state_dict())
    else:
        log.warning("init=teacher: the student's blocks (hidden %d, %d heads, ffn %d) differ from the teacher's "
                    "(hidden %d, %d heads, ffn %d), so no layer can be copied: layers start random, embeddings %s", s.hidden_size, s.num_heads, s.intermediate_size,
                    t.hidden_size, t.num_heads, t.intermediate_size,
                    "copied" if s.hidden_size == t.hidden_size else embeddings + "d")
    return layers


def build_student(spec: str | Path, teacher: BertForMLM, init="teacher", embeddings: str = "slice",
                  lists: bool = True) -> BertForMLM:
    """A student ``BertForMLM``: ``spec`` is a shipped student name (``configs/students/NAME.yaml``),
    a YAML path (its ``model`` section) or a model directory (whose weights are the start: ``init``
    is then not used). Fresh weights come from the torch RNG, then from the teacher per ``init``."""
    path, kind = resolve_student(spec)
    if kind == "model":
        from clueforge.model.hf import load_hf

        student = load_hf(path)
        if student.cfg.vocab_size != teacher.cfg.vocab_size:
            raise UserError(f"student {path}: vocabulary {student.cfg.vocab_size} ≠ the teacher's "
                            f"{teacher.cfg.vocab_size}")
        log.info("student %s: starts from its own weights (init is not used)", path)
        return student
    student = BertForMLM(student_config(path, teacher.cfg))
    init_from_teacher(student, teacher, init, embeddings, lists)
    return student


def with_aux_layer(model: BertForMLM) -> BertForMLM:
    """A copy of ``model`` with one more block on top (a copy of its top block)."""
    cfg = replace(model.cfg, num_layers=model.cfg.num_layers + 1)
    out = BertForMLM(cfg)
    out.load_state_dict(model.state_dict(), strict=False)
    out.encoder.layers[-1].load_state_dict(model.encoder.layers[-1].state_dict())
    return out


def drop_aux_layer(model: BertForMLM) -> BertForMLM:
    """``model`` without its top block (the auxiliary layer), sharing nothing with it."""
    cfg = replace(model.cfg, num_layers=model.cfg.num_layers - 1)
    out = BertForMLM(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(f"encoder.layers.{cfg.num_layers}.")}
    out.load_state_dict(copy.deepcopy(sd))
    return out


def describe(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")}
