"""Building a student: its shape from a shipped student config, a YAML file or a model directory,
and its first weights from the teacher.

- Layers (DistilBERT): ``init="teacher"`` takes every k-th teacher layer, k = L_teacher/L_student,
  counted so that the student's top layer is the teacher's top layer (12 → 6: layers 2, 4, …, 12;
  12 → 4: 3, 6, 9, 12); a list of 1-based teacher layers picks them explicitly; ``"random"`` keeps
  BERT's random initialisation. Layers are copied only when the student's blocks have the teacher's
  shape (same width, heads, feed-forward width and LayerNorm placement), or, for a narrower
  student, sliced (``narrow="slice"`` or ``"magnitude"``, below). With ``narrow="random"`` an
  explicit list is refused and ``"teacher"`` leaves the layers random with a warning (only the
  embeddings and the MLM head's bias then come from the teacher).
- Narrower blocks (``narrow``): each chosen teacher layer is cut down to the student's shape, the
  same residual dimensions everywhere (the first D_student: those the sliced embeddings keep, so
  the residual stream lines up through embeddings, every block, the final LayerNorm and the MLM
  head), per layer the kept attention heads (the first H_student with ``"slice"``, the H_student
  of largest squared weight norm over Q, K, V and O with ``"magnitude"``, as in head pruning) and
  the first Dh_student dimensions of each kept head, and the kept feed-forward units (the first
  F_student, or those of largest ‖w_in‖·‖w_out‖). Q is scaled by √(Dh_s/Dh_t) so a kept head's
  scores keep the teacher's 1/√Dh_t temperature. Refused in one line where it cannot apply: more
  heads, wider heads, a wider feed-forward or residual than the teacher's, another LayerNorm
  placement, syntax heads, or projected embeddings (a rotated residual stream does not line up
  with LayerNorm's per-dimension weights).
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


NARROW = ("random", "slice", "magnitude")


def _kept(scores: torch.Tensor, k: int, narrow: str) -> torch.Tensor:
    """Indices of the ``k`` units kept, ascending: the first ``k`` (``slice``) or the ``k`` of
    largest score (``magnitude``)."""
    if narrow == "slice":
        return torch.arange(k)
    return scores.topk(k).indices.sort().values


def slice_problem(s: ModelConfig, t: ModelConfig, embeddings: str) -> str | None:
    """Why a narrower student's blocks cannot be cut from the teacher's (None: they can)."""
    dh_s, dh_t = s.hidden_size // s.num_heads, t.hidden_size // t.num_heads
    if s.pre_ln != t.pre_ln:
        return f"the student is {'pre' if s.pre_ln else 'post'}-LN, the teacher {'pre' if t.pre_ln else 'post'}-LN"
    if s.syntax_heads or t.syntax_heads:
        return "syntax heads (their heads are not interchangeable)"
    if s.relative_attention or t.relative_attention:
        return "relative-position biases (one per head: not cut to fewer heads)"
    if s.hidden_size > t.hidden_size:
        return f"the student's hidden size {s.hidden_size} exceeds the teacher's {t.hidden_size}"
    if s.num_heads > t.num_heads or dh_s > dh_t:
        return (f"the student's {s.num_heads} heads of {dh_s} do not fit in the teacher's {t.num_heads} heads of "
                f"{dh_t} (needs no more heads and no wider heads)")
    if s.intermediate_size > t.intermediate_size:
        return f"the student's feed-forward width {s.intermediate_size} exceeds the teacher's {t.intermediate_size}"
    if s.hidden_size != t.hidden_size and embeddings != "slice":
        return f"embeddings={embeddings} rotates the residual stream, which LayerNorm's weights do not follow"
    return None


def _ln(dst: torch.nn.LayerNorm, src: torch.nn.LayerNorm, dims: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[dims])
    dst.bias.copy_(src.bias[dims])


@torch.no_grad()
def slice_block(dst, src, dims: torch.Tensor, narrow: str) -> list[int]:
    """Cut the teacher block ``src`` down to the student block ``dst`` (``bert.Block``s): residual
    dimensions ``dims`` everywhere, the kept heads (each cut to its first Dh_s dimensions, Q scaled
    by √(Dh_s/Dh_t)) and the kept feed-forward units. Returns the kept heads."""
    Ht, Hs = src.attn.n_heads, dst.attn.n_heads
    Dt, Ds = src.attn.out.weight.shape[0], dims.numel()
    dh_t, dh_s = Dt // Ht, Ds // Hs
    w_qkv = src.attn.qkv.weight.view(3, Ht, dh_t, Dt)[:, :, :dh_s][..., dims]  # (3, Ht, dh_s, Ds)
    b_qkv = src.attn.qkv.bias.view(3, Ht, dh_t)[:, :, :dh_s]  # (3, Ht, dh_s)
    w_out = src.attn.out.weight[dims].view(Ds, Ht, dh_t)[:, :, :dh_s]  # (Ds, Ht, dh_s)
    heads = _kept(w_qkv.pow(2).sum((0, 2, 3)) + w_out.pow(2).sum((0, 2)), Hs, narrow)
    scale = torch.tensor([(dh_s / dh_t) ** 0.5, 1.0, 1.0])[:, None, None]  # Q only
    dst.attn.qkv.weight.copy_((w_qkv[:, heads] * scale[..., None]).reshape(3 * Ds, Ds))
    dst.attn.qkv.bias.copy_((b_qkv[:, heads] * scale).reshape(3 * Ds))
    dst.attn.out.weight.copy_(w_out[:, heads].reshape(Ds, Ds))
    dst.attn.out.bias.copy_(src.attn.out.bias[dims])
    w_in, w_o = src.mlp_in.weight[:, dims], src.mlp_out.weight[dims]  # (Ft, Ds), (Ds, Ft)
    units = _kept(w_in.norm(dim=1) * w_o.norm(dim=0), dst.mlp_in.weight.shape[0], narrow)
    dst.mlp_in.weight.copy_(w_in[units])
    dst.mlp_in.bias.copy_(src.mlp_in.bias[units])
    dst.mlp_out.weight.copy_(w_o[:, units])
    dst.mlp_out.bias.copy_(src.mlp_out.bias[dims])
    _ln(dst.ln1, src.ln1, dims)
    _ln(dst.ln2, src.ln2, dims)
    return heads.tolist()


@torch.no_grad()
def init_from_teacher(student: BertForMLM, teacher: BertForMLM, init="teacher",
                      embeddings: str = "slice", lists: bool = True, narrow: str = "random") -> dict:
    """Copy what the shapes allow from ``teacher`` into ``student`` (in place); returns what was
    done: ``teacher_layers`` (None: random layers), ``blocks`` (``copied``, ``slice``,
    ``magnitude`` or ``random``), ``embeddings`` and, for sliced blocks, the kept ``heads`` per
    layer. A layer list, or ``narrow`` slicing, that cannot apply is refused in one line;
    ``init="teacher"`` with ``narrow="random"`` keeps random layers and warns."""
    s, t = student.cfg, teacher.cfg
    if s.vocab_size != t.vocab_size:
        raise UserError(f"student vocabulary {s.vocab_size} ≠ teacher vocabulary {t.vocab_size}")
    if embeddings not in ("slice", "project"):
        raise UserError(f"embeddings {embeddings!r}: expected 'slice' or 'project'")
    if narrow not in NARROW:
        raise UserError(f"narrow_layers {narrow!r}: expected one of {', '.join(NARROW)}")
    layers = teacher_layers(init, t.num_layers, s.num_layers, lists)
    if init == "random":
        return {"teacher_layers": None, "blocks": "random", "embeddings": "random"}
    if s.relative_attention != t.relative_attention:
        raise UserError(f"init={init}: the student's relative_attention ({s.relative_attention}) differs from the "
                        f"teacher's ({t.relative_attention}), so its blocks would not compute the teacher's; give the "
                        f"student model.relative_attention={t.relative_attention}, or use init=random")
    if s.position_init != "normal":
        log.warning("init=teacher: the student's position table comes from the teacher; position_init=%s does "
                    "not apply", s.position_init)
    same_block = (s.hidden_size, s.num_heads, s.intermediate_size, s.pre_ln) == (
        t.hidden_size, t.num_heads, t.intermediate_size, t.pre_ln)
    if not same_block and narrow != "random":
        problem = slice_problem(s, t, embeddings)
        if problem:
            raise UserError(f"narrow_layers={narrow}: cannot cut the teacher's blocks to the student's: {problem}; "
                            f"use narrow_layers=random")
    if not same_block and narrow == "random" and isinstance(init, (list, tuple)):
        raise UserError(f"init {list(init)}: layers can be copied only when the student's blocks have the teacher's "
                        f"shape (student hidden {s.hidden_size}, {s.num_heads} heads, ffn {s.intermediate_size}; "
                        f"teacher {t.hidden_size}, {t.num_heads}, {t.intermediate_size}); use init=random or "
                        f"narrow_layers=slice")
    se, te = student.encoder.embeddings, teacher.encoder.embeddings
    P = min(s.max_position, t.max_position)
    d = s.hidden_size
    dims = torch.arange(d)  # the residual dimensions the student keeps (all of them at equal widths)
    if d == t.hidden_size:
        se.word.weight.copy_(te.word.weight)
        se.position.weight[:P].copy_(te.position.weight[:P])
        se.token_type.weight.copy_(te.token_type.weight[: s.type_vocab_size])
        se.ln.load_state_dict(te.ln.state_dict())
    elif embeddings == "slice":
        if d > t.hidden_size:
            raise UserError(f"embeddings=slice: the student ({d}) is wider than the teacher ({t.hidden_size})")
        se.word.weight.copy_(te.word.weight[:, :d])
        se.position.weight[:P].copy_(te.position.weight[:P, :d])
        se.token_type.weight.copy_(te.token_type.weight[: s.type_vocab_size, :d])
        _ln(se.ln, te.ln, dims)
    else:
        proj = _projection(te.word.weight, s.hidden_size)  # (Dt, Ds)
        se.word.weight.copy_(te.word.weight.float() @ proj)
        se.position.weight[:P].copy_(te.position.weight[:P].float() @ proj)
        se.token_type.weight.copy_(te.token_type.weight[: s.type_vocab_size].float() @ proj)
    student.head.bias.copy_(teacher.head.bias)
    record = {"teacher_layers": layers, "blocks": "copied" if same_block else narrow,
              "embeddings": "copied" if d == t.hidden_size else embeddings}
    if same_block:
        for i, j in enumerate(layers):
            student.encoder.layers[i].load_state_dict(teacher.encoder.layers[j - 1].state_dict())
    elif narrow != "random":
        record["heads"] = [slice_block(student.encoder.layers[i], teacher.encoder.layers[j - 1], dims, narrow)
                           for i, j in enumerate(layers)]
    else:
        record["teacher_layers"] = None
        log.warning("init=teacher: the student's blocks (hidden %d, %d heads, ffn %d) differ from the teacher's "
                    "(hidden %d, %d heads, ffn %d) and narrow_layers=random, so no layer is copied: layers start "
                    "random, embeddings %s (narrow_layers=slice cuts the teacher's blocks down)", s.hidden_size,
                    s.num_heads, s.intermediate_size, t.hidden_size, t.num_heads, t.intermediate_size,
                    "copied" if d == t.hidden_size else embeddings + "d")
    if s.hidden_size == t.hidden_size or narrow != "random":  # the residual stream lines up with the teacher's
        student.head.dense.weight.copy_(teacher.head.dense.weight[dims][:, dims])
        student.head.dense.bias.copy_(teacher.head.dense.bias[dims])
        _ln(student.head.ln, teacher.head.ln, dims)
        if s.pre_ln and t.pre_ln and (same_block or narrow != "random"):
            _ln(student.encoder.final_ln, teacher.encoder.final_ln, dims)
    return record


def build_student(spec: str | Path, teacher: BertForMLM, init="teacher", embeddings: str = "slice",
                  lists: bool = True, narrow: str = "random") -> BertForMLM:
    """A student ``BertForMLM``: ``spec`` is a shipped student name (``configs/students/NAME.yaml``),
    a YAML path (its ``model`` section) or a model directory (whose weights are the start: ``init``
    is then not used). Fresh weights come from the torch RNG, then from the teacher per ``init``
    and ``narrow`` (``init_from_teacher``, whose record is logged)."""
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
    log.info("student %s: initialised %s", path, init_from_teacher(student, teacher, init, embeddings, lists, narrow))
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
