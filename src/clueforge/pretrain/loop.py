"""The pretraining loop: one explicit loop, Accelerate for devices and processes.

One process (CPU or one GPU)::

    clueforge pretrain --config mini --data runs/corpus --out runs/mini

Several processes (DDP; on CPU with gloo)::

    torchrun --nproc_per_node 2 -m clueforge pretrain --config mini --data runs/corpus --out runs/mini
    accelerate launch --multi_gpu --num_processes 8 -m clueforge pretrain --config base --data runs/corpus --out runs/base

Running the same command on an ``--out`` that holds checkpoints resumes from the newest valid one,
exactly: data order and masking are functions of the step, and RNG/optimizer/scheduler state is
restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from clueforge.corpus.shards import Corpus
from clueforge.model.bert import BertForMLM, ModelConfig, flops_per_token
from clueforge.pretrain import ar_mlm
from clueforge.pretrain import checkpoint as ckpt
from clueforge.pretrain.config import PretrainConfig, TrainConfig, resolve_layers
from clueforge.pretrain.data import Collator, Prefetcher, Sampler, batch_digest, build_row_index, split_heldout
from clueforge.pretrain.data import Phase, SeqSchedule, outside
from clueforge.pretrain.masking import DEFAULT_CONNECTIVES, Curriculum, MaskingConfig
from clueforge.pretrain.model import PretrainingModel, mlm_objective
from clueforge.utils import UserError, atomic_write

log = logging.getLogger("clueforge.pretrain")


def lr_lambda(cfg, step: int) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / max(1, t.warmup_steps)
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.schedule == "linear":
        decay = 1.0 - progress
    elif t.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule {t.schedule!r}: expected linear, cosine or constant")
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay


# One yardstick for every run and recipe: token masking 15 % (80/10/10) with a fixed seed on the
# same held-out rows, whatever the run's own masking, curriculum or seed (``eval_fixed_*``).
# The rows and batches are fixed too: the first ``FIXED_EVAL_ROWS`` held-out rows in batches of
# ``FIXED_EVAL_BATCH``, whatever the run's ``batch_size`` and ``eval_batches`` (which size only the
# run's own-masking ``eval_*``).
FIXED_EVAL_MASKING = MaskingConfig(ratio=0.15, weights={"token": 1.0}, mask_prob=0.8, random_prob=0.1)
FIXED_EVAL_SEED = 0
FIXED_EVAL_ROWS = 640
FIXED_EVAL_BATCH = 32


def masking_config(t) -> MaskingConfig:
    """The masking settings of a ``TrainConfig`` (a curriculum then moves ratio/span_p/weights)."""
    return MaskingConfig(ratio=t.mask_ratio, weights=dict(t.masking_weights or {t.masking: 1.0}),
                         mask_prob=t.mask_token_prob, random_prob=t.random_token_prob, span_p=t.span_p,
                         connectives=DEFAULT_CONNECTIVES + tuple(t.extra_connectives or ()))


def effective_mask_ratio(t, progress: float | None = None) -> float:
    """The masking ratio in force: ``mask_ratio``, or the curriculum's at ``progress`` (its final
    ratio when ``progress`` is None — the budget ``triple_mlm`` masks with)."""
    if not t.curriculum:
        return t.mask_ratio
    cur = Curriculum([dict(s) for s in t.curriculum])
    return cur.at(1.0 if progress is None else progress, masking_config(t))["ratio"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or ".ln" in name or "embeddings.ln" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 5) -> float:
    """Best achieved FLOP/s of a large square matmul (best of 3 timings): the ceiling MFU is
    measured against."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * iters / best


def resolve_precision(precision: str) -> str:
    """Accelerate's ``mixed_precision`` for our config value."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(mixed_precision: str):
    """The run's ``Accelerator``. Accelerate keeps one process-wide state whose precision cannot
    change; a later run in the same single process (a benchmark, the quickstart, a test) with
    another precision starts that state afresh. Launched processes (DDP/FSDP/DeepSpeed) keep it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, GradientState

    st = AcceleratorState._shared_state
    if st.get("_mixed_precision") not in (None, mixed_precision) and st.get("distributed_type") == DistributedType.NO:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX-512 BF16 or AMX; oneDNN uses them under
    autocast). Without them bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN
        return False


class CpuClock:
    """Compute spent training: process CPU seconds (``time.process_time``: every thread of this
    process, the data-preparing thread included) and wall seconds, with evaluation and
    checkpointing excluded (``paused``). Carried across resumes in the checkpoint, so ``cpu_min``
    in the metrics is the run's total whatever the interruptions."""

    def __init__(self, cpu_s: float = 0.0, wall_s: float = 0.0):
        self.cpu_s, self.wall_s = cpu_s, wall_s
        self._c0, self._w0 = time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        if self._c0 is None:  # paused
            return self.cpu_s, self.wall_s
        return self.cpu_s + time.process_time() - self._c0, self.wall_s + time.perf_counter() - self._w0

    def pause(self) -> None:
        self.cpu_s, self.wall_s = self.read()
        self._c0 = self._w0 = None

    def resume(self) -> None:
        self._c0, self._w0 = time.process_time(), time.perf_counter()


BUDGET_UNIT = ("process CPU time (time.process_time: all threads of the process) of the training steps; "
               "held-out evaluation, checkpointing and start-up excluded")


def calibrate_steps(model: PretrainingModel, make_batch, accelerator, t, sd_layers, warmup: int = 3,
                    measure: int = 8, objective=None) -> dict:
    """CPU and wall seconds per optimizer step (every micro-step, its batch preparation, backward,
    clipping and the AdamW update), timed on a throw-away copy of the model and optimizer with the
    run's first batches: the median of ``measure`` steps after ``warmup`` (first-use kernel set-up
    and a busy neighbour's spikes stay out). The global RNG is restored: the run is unchanged."""
    import copy

    rng = torch.get_rng_state()
    m = copy.deepcopy(model)
    m.train()
    opt = torch.optim.AdamW(param_groups(m, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps, fused=True)
    fwd = torch.compile(m) if t.compile else m
    cpu, wall = [], []
    for i in range(warmup + measure):
        c0, w0 = time.process_time(), time.perf_counter()
        for micro in range(t.grad_accum):
            batch = to_device(make_batch(i, micro)[0], accelerator.device)
            with accelerator.autocast():
                loss = (objective or mlm_objective)(fwd, batch, t, sd_layers)[0]
            (loss / t.grad_accum).backward()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), t.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    torch.set_rng_state(rng)
    return {"warmup_steps": warmup, "steps": measure, "cpu_s_per_step": float(np.median(cpu)),
            "wall_s_per_step": float(np.median(wall)), "cpu_s_steps": cpu, "threads": torch.get_num_threads()}


def budget_steps(max_minutes: float, cpu_s_per_step: float) -> int:
    """Optimizer steps that fit ``max_minutes`` CPU-minutes at the calibrated cost."""
    return max(1, int(max_minutes * 60.0 / cpu_s_per_step))


def rebudget_steps(step: int, cpu_s: float, budget_s: float, ref_step: int, ref_cpu_s: float) -> int | None:
    """The step count that ends a budgeted run at ``budget_s`` CPU seconds: ``step`` plus the steps
    the CPU time left buys at the cost of the steps since ``(ref_step, ref_cpu_s)``; ``None`` when
    no cost was measured (no step, or no CPU time, since the reference)."""
    if step <= ref_step or cpu_s <= ref_cpu_s:
        return None
    cost = (cpu_s - ref_cpu_s) / (step - ref_step)
    return step + max(0, int((budget_s - cpu_s) / cost + 1e-9))  # 1e-9: 0.06 · 60 is 3.5999…


def short_phase(t, corpus: Corpus, eval_rows, world: int) -> Phase | None:
    """The short-rows phase of ``train.short_seq_len`` (None when off): the corpus packed at that
    length, less every row that shares a token with the held-out rows, ``short_batch_size`` rows
    per micro-step (0: the long phase's tokens per step). Its steps are set by ``seq_schedule``."""
    if not t.short_seq_len:
        return None
    rows = outside(build_row_index(corpus, t.short_seq_len, t.pack_docs), eval_rows)
    batch = t.short_batch_size or max(1, round(t.batch_size * t.seq_len / t.short_seq_len))
    return Phase(0, 0, t.short_seq_len, batch, rows, Sampler(len(rows), batch, t.grad_accum, world, t.seed))


def seq_schedule(t, short: Phase | None, long: Phase, switch: int | None = None) -> SeqSchedule:
    """Short rows for the first ``round(short_seq_fraction · max_steps)`` steps, then ``seq_len``
    rows to the end; without a short phase, ``long`` for every step (the plain path). ``switch``:
    the step recorded when the run started (a resume keeps it: extending ``max_steps`` must not
    send a run back to short rows)."""
    if short is None:
        return SeqSchedule([dataclasses.replace(long, start=0, end=t.max_steps)])
    switch = min(t.max_steps, round(t.short_seq_fraction * t.max_steps) if switch is None else switch)
    return SeqSchedule([dataclasses.replace(short, start=0, end=switch),
                        dataclasses.replace(long, start=switch, end=max(switch, t.max_steps))])


def phase_budget(long_cal: dict, short_cal: dict, t, short: Phase) -> dict:
    """One calibration for a run with short rows first: each phase timed on its own batches, the
    cost of a step their mean weighted by the share of steps each phase gets."""
    f = t.short_seq_fraction
    return {"cpu_s_per_step": f * short_cal["cpu_s_per_step"] + (1 - f) * long_cal["cpu_s_per_step"],
            "wall_s_per_step": f * short_cal["wall_s_per_step"] + (1 - f) * long_cal["wall_s_per_step"],
            "threads": long_cal["threads"], "cost": f"{f:g} × short + {1 - f:g} × long (per-step CPU s)",
            "phases": {"short": {**short_cal, "seq_len": short.seq_len, "batch_size": short.batch_size},
                       "long": {**long_cal, "seq_len": t.seq_len, "batch_size": t.batch_size}}}


def resumed_budget_steps(saved_train: dict, max_minutes: float) -> int | None:
    """A resumed budgeted run's step count: the recorded one (the same budget), scaled by the
    ratio of budgets (a budget changed with ``--allow-config-change``), or ``None`` when the
    checkpoint's run had no budget (then it is calibrated)."""
    old = saved_train.get("max_minutes")
    if not old:
        return None
    if old == max_minutes:
        return int(saved_train["max_steps"])
    return max(1, round(saved_train["max_steps"] * max_minutes / old))


class MetricsWriter:
    """JSONL + TensorBoard on the main process; on resume, lines past the resumed step are dropped."""

    def __init__(self, out: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write(self.path, "".join(k + "\n" for k in keep))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # pragma: no cover
            log.warning("tensorboardX missing: no TensorBoard events")

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(enabled: bool, total: int, start: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    p = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                 disable=not enabled)
    task = p.add_task("steps", total=total, completed=start, rate="", info="")
    return p, task


def state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def build_model(cfg: PretrainConfig, vocab_size: int) -> tuple[BertForMLM, tuple[int, ...]]:
    """The encoder + MLM head to train (fresh, or ``train.init_from``'s, whose shape then replaces
    ``cfg.model``) and the resolved layer taps. Settings that depend on the model's shape are
    checked against the model actually trained."""
    from clueforge.model.hf import load_hf

    t = cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    if t.init_from:
        default = ModelConfig()
        drawn = {f: getattr(cfg.model, f) for f in INIT_ONLY if getattr(cfg.model, f) != getattr(default, f)}
        if drawn:  # they shape fresh weights; train.init_from loads trained ones
            raise UserError(f"{', '.join(f'model.{f}={v!r}' for f, v in drawn.items())} acts only on fresh weights, "
                            f"and train.init_from {t.init_from} loads trained ones: leave it out")
        model = load_hf(t.init_from)
        if model.cfg.vocab_size != vocab_size:
            raise UserError(f"{t.init_from}: vocab size {model.cfg.vocab_size} ≠ corpus vocab {vocab_size}")
        if model.cfg.num_layers != cfg.model.num_layers or model.cfg.hidden_size != cfg.model.hidden_size:
            log.info("train.init_from %s: the model shape comes from the checkpoint (%d layers, hidden %d), not the "
                     "config's model section", t.init_from, model.cfg.num_layers, model.cfg.hidden_size)
        model = _with_requested_options(model, cfg.model, t.init_from)
        cfg.model = model.cfg
    else:
        model = BertForMLM(cfg.model)
    where = f" (the model of train.init_from {t.init_from})" if t.init_from else ""
    sd_layers = resolve_layers(t.self_distill_layers, cfg.model.num_layers, where)
    if t.seq_len > cfg.model.max_position:
        raise UserError(f"train.seq_len {t.seq_len} exceeds model.max_position {cfg.model.max_position}{where}")
    if t.self_distill_instance and not (cfg.model.dropout or cfg.model.attention_dropout):
        raise UserError(f"train.self_distill_instance={t.self_distill_instance:g} compares two dropout samples of each "
                        f"batch, and model.dropout and model.attention_dropout are 0{where}: the two would be equal "
                        f"and the term 0; set model.dropout=0.1 or leave self_distill_instance out")
    model.encoder.gradient_checkpointing = t.gradient_checkpointing
    return model, sd_layers


ARCH_OPTIONS = ("attn_residual_decay", "pos_embeddings", "syntax_heads", "syntax_constraint", "relative_attention")
"""``ModelConfig`` fields of issue 14: a config may add them to a ``train.init_from`` model."""
INIT_ONLY = ("position_init", "initializer_range")
"""``ModelConfig`` fields that act only on the initial weights: refused on resume (even with
--allow-config-change) and with ``train.init_from``."""
WEIGHT_SHAPE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position",
                "type_vocab_size", "pre_ln", "pos_embeddings", "syntax_heads", "syntax_constraint", "relative_attention")
"""``ModelConfig`` fields that decide which weights exist: a resume cannot change them."""


def _with_requested_options(model: BertForMLM, requested, init_from) -> BertForMLM:
    """``init_from``'s model with the architecture options the config sets (to a non-default value)
    applied: their new parameters start at zero (the model computes what it did, bar the
    attention residual, which has none); an option the checkpoint has is kept unless the config
    sets it. A change the checkpoint's weights cannot take is refused, never dropped."""
    from clueforge.model.bert import ModelConfig

    default = ModelConfig()
    changes = {f: getattr(requested, f) for f in ARCH_OPTIONS
               if getattr(requested, f) != getattr(default, f) and getattr(requested, f) != getattr(model.cfg, f)}
    if not changes:
        return model
    new = BertForMLM(dataclasses.replace(model.cfg, **changes))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(new.state_dict()[k].abs().sum() != 0 for k in missing):
        raise UserError(f"train.init_from {init_from}: cannot apply model settings {changes} to its weights "
                        f"(unused: {sorted(unexpected)[:3]}); leave them out to keep the checkpoint's")
    log.warning("train.init_from %s: model options %s added (their new weights start at zero)", init_from, changes)
    return new


def build_objectives(cfg: PretrainConfig, corpus: Corpus, tok, specials: dict) -> tuple:
    """``(structure, knowledge, aux)``: the data of the structure and knowledge objectives the
    config turns on (``None`` when off) and the pretraining-only heads they need (or ``None``)."""
    t = cfg.train
    train_shards = [i for i in range(len(corpus)) if len(corpus) < 2 or i != len(corpus) - 1]  # not the held-out one
    structure = None
    if t.structure_weights:
        from clueforge.pretrain.objectives import OBJECTIVES, StructureData

        unknown = sorted(set(t.structure_weights) - set(OBJECTIVES))
        if unknown:
            raise UserError(f"train.structure_weights: unknown objectives {unknown}; known: {OBJECTIVES}")
        structure = StructureData(corpus, specials, t.seq_len, t.reorder_max_segments, shards=train_shards)
    knowledge = None
    if t.knowledge_weights:
        from clueforge.knowledge.sources import load_triples
        from clueforge.pretrain.objectives import KNOWLEDGE_OBJECTIVES, KnowledgeData

        unknown = sorted(set(t.knowledge_weights) - set(KNOWLEDGE_OBJECTIVES))
        if unknown:
            raise UserError(f"train.knowledge_weights: unknown objectives {unknown}; known: {KNOWLEDGE_OBJECTIVES}")
        if "triple_mlm" in t.knowledge_weights and not t.knowledge_triples:
            raise UserError("train.knowledge_weights.triple_mlm needs train.knowledge_triples (a triple file)")
        knowledge = KnowledgeData(corpus, tok, specials, t.seq_len,
                                  triples=load_triples(t.knowledge_triples) if t.knowledge_triples else None,
                                  replace_share=t.replace_share, mask_ratio=effective_mask_ratio(t),
                                  shards=train_shards, triple_text_share=t.triple_text_share)
    aux = None
    if structure is not None or knowledge is not None:
        from clueforge.pretrain.objectives import AuxHeads, n_reorder_classes

        classes = {"reorder": n_reorder_classes(t.reorder_max_segments), "distance": 3, "replace": 2,
                   "relation": 1 + len(knowledge.relations) if knowledge is not None else 1}
        names = [k for k in (*(t.structure_weights or {}), *(t.knowledge_weights or {})) if k in classes]
        if names:  # triple_mlm alone needs no head of its own: it predicts through the MLM head
            aux = AuxHeads(cfg.model.hidden_size, {k: classes[k] for k in names}, cfg.model.initializer_range,
                           token=("replace",))
    return structure, knowledge, aux


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated numpy batch (nested for the objectives' own batches) as tensors on ``device``."""
    return {k: to_device(v, device) if isinstance(v, dict) else torch.from_numpy(v).to(device, non_blocking=True)
            for k, v in batch.items()}


def evaluate_mlm(model: BertForMLM, protocols: dict, eval_rows, t, accelerator) -> dict:
    """Held-out MLM loss and accuracy per protocol ``prefix → (collator, seed, rows, batch)``: the
    run's own final masking (``eval_*``, comparable over time within a run: ``eval_batches``
    batches of ``batch_size``) and the fixed protocol (``eval_fixed_*``, comparable across runs and
    recipes: ``FIXED_EVAL_ROWS`` rows in batches of ``FIXED_EVAL_BATCH``). ``rows``/``batch`` None
    means the run's own. Each rank scores its share of batches."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    model.eval()
    res = {}
    for prefix, (col, seed, n_rows, bs) in protocols.items():
        bs = bs or t.batch_size
        n_rows = min(len(eval_rows), n_rows or t.eval_batches * t.batch_size)
        n_batches = max(1, math.ceil(n_rows / bs))
        loss_sum = torch.zeros(3, device=device)  # loss·count, correct, count
        with torch.no_grad():
            for b in range(rank, n_batches, world):
                sel = np.arange(b * bs, min(n_rows, (b + 1) * bs))
                if sel.size == 0:
                    continue
                rows = eval_rows.select(sel)
                batch = col(list(zip(rows.shard.tolist(), rows.span[:, 0].tolist(), rows.span[:, 1].tolist())),
                            np.random.default_rng([*seed, b]), progress=1.0)  # fixed: comparable over time
                with accelerator.autocast():
                    o = model(**to_device(batch, device))
                n = o.labels.numel()
                loss_sum += torch.stack([o.loss.float() * n, (o.logits.argmax(-1) == o.labels).sum().float(),
                                         torch.tensor(float(n), device=device)])
        loss_sum = accelerator.reduce(loss_sum, "sum")
        c = max(1.0, loss_sum[2].item())
        res.update({f"{prefix}_loss": loss_sum[0].item() / c, f"{prefix}_mlm_acc": loss_sum[1].item() / c})
    model.train()
    return res


def pretrain(cfg: PretrainConfig, data: str | Path, out: str | Path, *, show_progress: bool = True,
             log_progress: bool = False, allow_config_change: bool = False, build=None) -> dict:
    """Pretrain (or resume) and write ``out/final`` in the HF layout. Returns a summary.

    ``log_progress``: a progress log line every 30 s (for logs, CI, nohup: no bar there).
    ``allow_config_change``: on resume, apply (and record) settings that differ from the run's;
    without it only ``runs.PRETRAIN_MUTABLE`` settings may change.
    ``build``: ``(cfg, vocab_size) → (model, objective)`` replacing the MLM model and its loss
    (task-agnostic distillation, ``distill.agnostic``: a model with ``.mlm`` and ``.aux`` as
    ``PretrainingModel`` has, an objective with ``mlm_objective``'s contract)."""
    from accelerate import Accelerator

    from clueforge.pretrain.config import validate_pretrain

    validate_pretrain(cfg)
    from clueforge.model.hf import save_hf
    from clueforge.text.tokenizer import load_tokenizer, special_ids

    t = cfg.train
    data, out = Path(data), Path(out)
    threads_before = torch.get_num_threads()
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.precision == "bf16" and not torch.cuda.is_available() and not cpu_bf16_supported():
        log.warning("train.precision=bf16 on a CPU without native bf16 (AVX-512 BF16/AMX): emulated, slower than fp32")
    accelerator = make_accelerator(resolve_precision(t.precision))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device

    corpus = Corpus(data)
    vocab = data / "vocab.txt"
    tok = load_tokenizer(vocab)
    specials = special_ids(tok)
    vocab_size = tok.get_vocab_size()
    if cfg.model.vocab_size != vocab_size:
        log.info("model.vocab_size set to the corpus vocabulary size %d", vocab_size)
        cfg.model.vocab_size = vocab_size
    if cfg.model.pad_token_id >= vocab_size:
        from clueforge.utils import UserError

        raise UserError(f"model.pad_token_id={cfg.model.pad_token_id} is not allowed: must be < the corpus "
                        f"vocabulary size ({vocab_size}, {vocab})")
    index = build_row_index(corpus, t.seq_len, t.pack_docs)
    train_rows, eval_rows = split_heldout(index, corpus)
    sampler = Sampler(len(train_rows), t.batch_size, t.grad_accum, world, t.seed)
    long = Phase(0, t.max_steps, t.seq_len, t.batch_size, train_rows, sampler)
    short = short_phase(t, corpus, eval_rows, world)  # issue 11: short rows first (None: off)
    schedule = seq_schedule(t, None, long)  # the calibration times long rows; the run's schedule follows max_steps
    masking = masking_config(t)
    curriculum = Curriculum([dict(s) for s in t.curriculum]) if t.curriculum else None
    collate = Collator(corpus, specials, vocab_size, masking, doc_attention=t.doc_attention and t.pack_docs,
                       tokenizer=tok, curriculum=curriculum, linguistic=cfg.model.linguistic_inputs)
    fixed_collate = Collator(corpus, specials, vocab_size, FIXED_EVAL_MASKING,
                             doc_attention=t.doc_attention and t.pack_docs, tokenizer=tok,
                             linguistic=cfg.model.linguistic_inputs)

    if build is None:
        mlm, sd_layers = build_model(cfg, vocab_size)
        structure, knowledge, aux = build_objectives(cfg, corpus, tok, specials)
        model = PretrainingModel(mlm, aux)  # what the optimizer and data parallelism see
        objective = mlm_objective
    else:  # issue 12: a student and its frozen teacher (clueforge.distill.agnostic)
        model, objective = build(cfg, vocab_size)
        sd_layers, structure, knowledge = (), None, None
    collate.linguistic = fixed_collate.linguistic = cfg.model.linguistic_inputs  # init_from's model decides
    # fused AdamW: one kernel for all parameters, ~7x faster than the foreach path on a CPU here
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(cfg, s))

    ck_root = out / "checkpoints"
    start_step, tokens_seen = 0, 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(ck_root)
    accelerator.wait_for_everyone()
    found = ckpt.latest_valid(ck_root)
    if found is not None:
        path, state = found
        if state["world_size"] != world:
            log.warning("resuming a %d-process run with %d processes: data order changes", state["world_size"], world)
        if t.max_minutes:  # the budget's step count was fixed when the run started: exact resume
            t.max_steps = resumed_budget_steps(state.get("config", {}).get("train", {}), t.max_minutes) or t.max_steps
        _check_resume(state, cfg, data, allow_config_change)  # before loading: another model shape cannot load
        ckpt.load_checkpoint(path, state, model, optimizer, rank)
        scheduler.load_state_dict(state["scheduler"])
        _apply_optimizer_settings(optimizer, scheduler, t)  # a change allowed on resume takes effect
        start_step, tokens_seen = state["step"], state["tokens"]
        log.info("resumed from %s (step %d)", path, start_step)
    else:
        torch.manual_seed(t.seed + 1 + rank)  # dropout differs per rank
    _write_run_config(out, cfg, data, found, start_step, allow_config_change, write=main)  # every rank checks

    model, optimizer = accelerator.prepare(model, optimizer)
    if found is not None and accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    raw_model: PretrainingModel = accelerator.unwrap_model(model)
    step_model = torch.compile(model) if t.compile else model
    students = None  # issue 12: online distillation (clueforge.distill.online), students follow the teacher
    if t.students:
        from clueforge.distill.online import OnlineStudents

        students = OnlineStudents(cfg, raw_model.mlm, device, world, resume=found[0] if found is not None else None)

    def make_batch(step: int, micro: int, phase: Phase | None = None):
        rows = schedule.rows(step, micro, rank, phase)
        rng = np.random.default_rng([t.seed, 1, step, micro, rank])
        batch = collate(list(zip(rows.shard.tolist(), rows.span[:, 0].tolist(), rows.span[:, 1].tolist())), rng,
                        progress=step / max(1, t.max_steps))
        if t.ar_mlm_groups > 1:  # autoregressive MLM: each predicted unit's group, from its own seeded stream
            batch["ar_groups"] = ar_mlm.assign_groups(ar_mlm.mask_units(batch["labels"]), t.ar_mlm_groups,
                                                      ar_mlm.group_rng(t.seed, step, micro, rank))
        if structure is not None or knowledge is not None:
            batch["aux"] = {k: structure.batch(k, t.structure_batch_size, rng) for k in t.structure_weights or {}}
            batch["aux"].update({k: knowledge.batch(k, t.knowledge_batch_size, rng) for k in t.knowledge_weights or {}})
        return batch, batch_digest(rows.shard, rows.span)

    saved_train = found[1].get("config", {}).get("train", {}) if found is not None else {}
    if t.max_minutes and (found is None or not saved_train.get("max_minutes")):  # calibrate the budget
        cal = calibrate_steps(raw_model, make_batch, accelerator, t, sd_layers, objective=objective)
        if short is not None:  # short rows first: both phases timed, the steps from their weighted cost
            cal = phase_budget(cal, calibrate_steps(raw_model, lambda i, m: make_batch(i, m, short), accelerator,
                                                    t, sd_layers, objective=objective), t, short)
        if world > 1:  # every process must run the same number of steps: the slowest one's cost decides
            cost = accelerator.gather(torch.tensor([cal["cpu_s_per_step"]], device=device))
            cal["cpu_s_per_step_per_process"] = [float(x) for x in cost.cpu()]
            cal["cpu_s_per_step"] = float(cost.max())
        if t.max_steps != TrainConfig.max_steps:
            log.warning("train.max_minutes=%g sets the number of steps: train.max_steps=%d is replaced (set "
                        "train.max_minutes=null to train a step count)", t.max_minutes, t.max_steps)
        t.max_steps = budget_steps(t.max_minutes, cal["cpu_s_per_step"])
        if main:
            atomic_write(out / "budget.json", json.dumps({"max_minutes": t.max_minutes, "unit": BUDGET_UNIT,
                                                         "max_steps": t.max_steps, "calibration": cal}, indent=2))
        log.info("budget %.3g CPU-minutes: %.3f CPU s/step measured → max_steps %d", t.max_minutes,
                 cal["cpu_s_per_step"], t.max_steps)
        _write_run_config(out, cfg, data, found, start_step, allow_config_change, write=main)
    # a resume keeps the switch step its run started with, unless the short-rows settings changed
    # (allowed with --allow-config-change: then it is computed afresh and the change is recorded)
    same_short = all(saved_train.get(k, getattr(TrainConfig, k)) == getattr(t, k)
                     for k in ("short_seq_len", "short_seq_fraction"))
    kept_switch = found[1].get("short_switch") if found is not None and same_short else None
    schedule = seq_schedule(t, short, long, kept_switch)
    if short is not None and main:
        log.info("short rows first: steps 0-%d on %d rows of %d tokens per micro-step (%d training rows), then "
                 "%d rows of %d", schedule.phases[0].end, short.batch_size, short.seq_len, len(short.rows),
                 t.batch_size, t.seq_len)

    def evaluate(mlm=None) -> dict:
        return evaluate_mlm(raw_model.mlm if mlm is None else mlm, {"eval": (collate, [t.seed, 2], None, None),
                                            "eval_fixed": (fixed_collate, [FIXED_EVAL_SEED, 3], FIXED_EVAL_ROWS,
                                                           FIXED_EVAL_BATCH)},
                            eval_rows, t, accelerator)

    next_log = [time.perf_counter() + 30.0]
    def flops_tok(at_step: int) -> float:  # useful work: the head runs on the masked tokens only (curriculum: at this step)
        return flops_per_token(cfg.model, schedule.at(max(0, at_step - 1)).seq_len, mlm_fraction=effective_mask_ratio(t, at_step / max(1, t.max_steps)))
    peak = (t.peak_tflops * 1e12) if t.peak_tflops else measure_peak_flops(
        device, torch.bfloat16 if accelerator.mixed_precision == "bf16" and device.type == "cuda" else torch.float32)

    metrics = MetricsWriter(out, start_step, main)
    rank_log = None
    if world > 1:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        rank_log = (out / "logs" / f"rank{rank}.jsonl").open("a" if start_step else "w", encoding="utf-8")
    if main:
        log.info("model %.1fM params, %d train rows, %d held-out rows, %d processes, precision %s, device %s",
                 sum(p.numel() for p in raw_model.parameters()) / 1e6, len(train_rows), len(eval_rows), world,
                 accelerator.mixed_precision, device)

    prefetch = Prefetcher(make_batch, start_step, t.grad_accum, t.prefetch)
    progress, task = _progress(show_progress and main, t.max_steps, start_step)
    model.train()
    def new_window() -> dict:
        return {"sums": torch.zeros(3, device=device, dtype=torch.float64), "tokens": 0, "slots": 0, "wait": 0.0,
                "encoder_tokens": 0, "parts": {}, "steps": 0, "t0": time.perf_counter()}

    window = new_window()
    clock = CpuClock(state.get("cpu_s", 0.0), state.get("wall_s", 0.0)) if found is not None else CpuClock()
    unlogged_tokens = 0  # this rank's tokens not yet added to ``tokens_seen``
    last_eval: dict = {}
    step = start_step
    recheck = t.budget_recheck if t.max_minutes else 0
    budget_ref = (start_step, clock.read()[0])  # the steps the next re-estimate's cost is measured on
    try:
        with progress:
            while step < t.max_steps:
                for micro in range(t.grad_accum):
                    (batch, digest), waited = prefetch.get()
                    window["wait"] += waited
                    if rank_log is not None:
                        rank_log.write(json.dumps({"step": step, "micro": micro, "rows": digest}) + "\n")
                    tb = to_device(batch, device)
                    sync = micro == t.grad_accum - 1
                    with accelerator.no_sync(model) if not sync else nullcontext():
                        with accelerator.autocast():
                            loss, o, parts = objective(step_model, tb, t, sd_layers)
                        accelerator.backward(loss / t.grad_accum)
                    if students is not None:  # issue 12: the same batch, the teacher's outputs
                        students.follow(tb, o, t.grad_accum, accelerator.autocast)
                    for k, v in parts.items():
                        window["parts"][k] = window["parts"].get(k, 0.0) + v.float() / t.grad_accum
                    n = o.labels.numel()
                    window["sums"] += torch.stack([o.loss.detach().double() * n,
                                                   (o.logits.detach().argmax(-1) == o.labels).sum().double(),
                                                   torch.tensor(float(n), device=device, dtype=torch.float64)])
                    main_real = int(batch["attention_mask"].sum())
                    real = main_real + sum(int(b["attention_mask"].sum()) for b in batch.get("aux", {}).values())
                    window["tokens"] += real
                    # the work done: instance self-distillation runs the main batch through the encoder twice
                    window["encoder_tokens"] += real + (main_real if t.self_distill_instance else 0)
                    window["encoder_tokens"] += (t.ar_mlm_groups - 1) * main_real  # AR-MLM: k passes of the main batch
                    window["slots"] += batch["attention_mask"].size + sum(
                        b["attention_mask"].size for b in batch.get("aux", {}).values())
                    unlogged_tokens += real
                grad_norm = None
                if t.clip_grad > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if students is not None:  # issue 12
                    students.step()
                step += 1
                window["steps"] += 1
                if recheck and short is not None and step == schedule.phases[0].end:
                    budget_ref = (step, clock.read()[0])  # the long steps' cost is measured on long steps only
                if recheck and step % recheck == 0 and step < t.max_steps and (short is None or step > schedule.phases[0].end):
                    cpu_now = clock.read()[0]
                    new_max = rebudget_steps(step, cpu_now, t.max_minutes * 60.0, *budget_ref)
                    budget_ref = (step, cpu_now)
                    if world > 1:  # every process must stop at the same step: the slowest one's estimate decides
                        new_max = int(accelerator.gather(torch.tensor([new_max or t.max_steps], device=device)).min())
                    if new_max is not None and new_max != t.max_steps:
                        if main and abs(new_max - t.max_steps) > 0.01 * t.max_steps:
                            log.info("budget: %.2f of %g CPU-minutes used at step %d → max_steps %d (was %d)",
                                     cpu_now / 60.0, t.max_minutes, step, new_max, t.max_steps)
                        t.max_steps = max(step, new_max)
                        progress.update(task, total=t.max_steps)
                        if curriculum is not None:  # batches built ahead read the old end (the curriculum's progress)
                            prefetch.close()
                            prefetch = Prefetcher(make_batch, step, t.grad_accum, t.prefetch)

                eval_due = bool(t.eval_every) and step % t.eval_every == 0
                if step % t.log_every == 0 or step == t.max_steps or eval_due:  # an evaluation gets its own line
                    extra = torch.tensor([window["tokens"], unlogged_tokens, window["encoder_tokens"]], device=device,
                                         dtype=torch.float64)
                    stats = accelerator.reduce(torch.cat([window["sums"], extra]), "sum")
                    elapsed = time.perf_counter() - window["t0"]
                    tokens_seen += int(stats[4].item())
                    unlogged_tokens = 0
                    tps = stats[5].item() / elapsed  # tokens through the encoder (all ranks), per second
                    rec = {
                        "step": step,
                        "mlm_acc": stats[1].item() / max(1.0, stats[2].item()),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": tokens_seen,  # data tokens read (a doubled batch counts once)
                        "step_tokens": stats[5].item() / window["steps"],  # encoder tokens per optimizer step
                        "tokens_per_s": tps,
                        "mfu": tps * flops_tok(step) / (peak * world),
                        "data_wait_share": window["wait"] / elapsed,
                        "padding_share": 1.0 - window["tokens"] / max(1, window["slots"]),  # this rank's batches
                        "epoch": schedule.epoch_of(step),
                        # this process's compute so far (evaluation, checkpoints excluded): ``CpuClock``
                        "cpu_min": clock.read()[0] / 60.0, "wall_min": clock.read()[1] / 60.0,
                    }
                    if recheck:  # the budget's current step count (re-estimated every ``budget_recheck`` steps)
                        rec["max_steps"] = t.max_steps
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    for k, v in sorted(window["parts"].items()):  # the total ``loss`` and each term's own loss
                        rec[k] = accelerator.reduce(v.detach(), "mean").item() / window["steps"]
                    if curriculum is not None or len(masking.weights) > 1:
                        st = collate.settings(step / max(1, t.max_steps))
                        rec["mask_ratio"] = st["ratio"]
                        rec.update({f"mask_w_{k}": v for k, v in st["weights"].items()})
                    if short is not None:  # issue 11: the row length of the logged step
                        rec["seq_len"] = schedule.at(step - 1).seq_len
                    if eval_due or step == t.max_steps:
                        clock.pause()
                        last_eval = evaluate()
                        clock.resume()
                        rec.update(last_eval)
                    if students is not None:  # issue 12: each student's losses (held-out scores with the teacher's)
                        rec.update(students.log(evaluate if "eval_fixed_loss" in rec else None))
                    metrics.write(rec)
                    progress.update(task, completed=step, rate=f"{tps:,.0f} tok/s",
                                    info=f"loss {rec['loss']:.3f} acc {rec['mlm_acc']:.3f}")
                    if log_progress and main and (time.perf_counter() >= next_log[0] or step == t.max_steps):
                        next_log[0] = time.perf_counter() + 30.0
                        log.info("step %d/%d loss %.3f acc %.3f %s tok/s", step, t.max_steps, rec["loss"],
                                 rec["mlm_acc"], f"{tps:,.0f}")
                    window = new_window()
                else:
                    progress.update(task, completed=step)

                if step % t.save_every == 0 or step == t.max_steps:
                    tokens_seen += int(accelerator.reduce(
                        torch.tensor([unlogged_tokens], device=device, dtype=torch.float64), "sum").item())
                    unlogged_tokens = 0
                    state = {"tokens": tokens_seen, "scheduler": scheduler.state_dict(),
                             "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                             "config": cfg.to_dict(), "data": data_identity(data)}
                    state["cpu_s"], state["wall_s"] = clock.read()
                    if short is not None:  # the switch step, kept on resume (seq_schedule)
                        state["short_switch"] = schedule.phases[0].end
                    clock.pause()
                    ckpt.write_rank_rng(ckpt.tmp_dir(ck_root, step), rank)
                    if students is not None:  # issue 12: step-N/students/NAME/
                        students.save(ckpt.tmp_dir(ck_root, step))
                    accelerator.wait_for_everyone()
                    if main:
                        ckpt.save_checkpoint(ck_root, step, raw_model, optimizer, state, world, t.keep_checkpoints)
                    accelerator.wait_for_everyone()
                    clock.resume()
    finally:
        prefetch.close()
        metrics.close()
        torch.set_num_threads(threads_before)
    clock.pause()

    digest = state_digest(raw_model.mlm)
    if rank_log is not None:
        rank_log.write(json.dumps({"final_state_sha": digest}) + "\n")
        rank_log.close()
    if main:
        save_hf(raw_model.mlm, out / "final", vocab=vocab)
        if recheck and (out / "budget.json").is_file():  # what the re-estimates made of the calibration's count
            budget = json.loads((out / "budget.json").read_text())
            budget.update({"steps_run": step, "cpu_min_run": clock.read()[0] / 60.0, "recheck_every": recheck,
                           "max_minutes_run": t.max_minutes})  # a resume may have changed the budget
            atomic_write(out / "budget.json", json.dumps(budget, indent=2))
    accelerator.wait_for_everyone()
    summary = {"steps": step, "tokens": tokens_seen, "final": str(out / "final"), "state_sha": digest, **last_eval}
    if students is not None:  # issue 12: OUT/students/NAME/final, without the auxiliary layer
        summary["students"] = students.export(out / "students", vocab)
    summary.update({"cpu_min": clock.read()[0] / 60.0, "wall_min": clock.read()[1] / 60.0, "threads": t.threads or threads_before,
                    "precision": accelerator.mixed_precision})
    accelerator.end_training()
    return summary


def _apply_optimizer_settings(optimizer, scheduler, t) -> None:
    """A checkpoint's optimizer/scheduler state carries its lr, betas, eps and weight decay: put
    the config's back (a no-op when they are unchanged; refused changes never get here)."""
    scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    for i, g in enumerate(optimizer.param_groups):
        g["initial_lr"] = t.lr
        g["betas"], g["eps"] = tuple(t.betas), t.eps
        if i == 0:  # the decayed group (see ``param_groups``)
            g["weight_decay"] = t.weight_decay


def data_identity(data: Path) -> dict:
    """The corpus a run trains on: its path and ``manifest_sha256``, a sha256 over what its
    ``manifest.json`` records of the content (each shard's files' sha256 and the vocabulary's), so
    that a moved copy, or a rerun of ``corpus build`` that repairs a shard, is the same corpus."""
    import hashlib

    m = Path(data) / "manifest.json"
    try:
        man = json.loads(m.read_text(encoding="utf-8"))
        content = {"vocab": man.get("vocab_sha256"),
                   "shards": [[s["name"], {k: f["sha256"] for k, f in sorted(s["files"].items())}]
                              for s in man["shards"]]}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        digest = None
    return {"path": str(data), "manifest_sha256": digest}


def _check_resume(state: dict, cfg: PretrainConfig, data: Path, allow: bool) -> None:
    """Refuse (``UserError`` listing the differences) a resume whose settings or corpus differ from
    the checkpoint's, before the checkpoint is loaded; ``--allow-config-change`` lets them through."""
    from clueforge.runs import check_resume_config, config_changes
    from clueforge.utils import UserError

    if "config" in state:
        changes = config_changes(state["config"], cfg.to_dict(), PretrainConfig().to_dict())
        model = {k.removeprefix("model."): v for k, v in changes.items() if k.startswith("model.")}
        init_only = {f: v for f, v in model.items() if f in INIT_ONLY}
        if init_only:  # the weights were drawn when the run started: applying it now would mean restarting
            listed = "; ".join(f"model.{f}: {old!r} → {new!r}" for f, (old, new) in init_only.items())
            raise UserError(f"this run was started with other initialisation settings ({listed}); they act only when "
                            f"a run starts, so a resume cannot apply them (not even with --allow-config-change). "
                            f"Rerun with the run's settings, or start a new run in another --out")
        shape = {f: v for f, v in model.items() if f in WEIGHT_SHAPE}
        if shape:  # the checkpoint's weights cannot be loaded into another architecture
            listed = "; ".join(f"model.{f}: {old!r} → {new!r}" for f, (old, new) in shape.items())
            sets = " ".join(f"--set model.{f}={json.dumps(old)}" for f, (old, _) in shape.items())
            raise UserError(f"this run's checkpoint has another architecture ({listed}); its weights cannot be "
                            f"resumed into this one (not even with --allow-config-change). Resume with {sets}, or "
                            f"start a new run in another --out (train.init_from adds options to trained weights)")
        check_resume_config(state["config"], cfg.to_dict(), allow=allow, defaults=PretrainConfig().to_dict())
    saved = (state.get("data") or {}).get("manifest_sha256")
    now = data_identity(data)["manifest_sha256"]
    if saved and now and saved != now and not allow:
        raise UserError(f"this run was trained on another corpus ({state['data']['path']}, manifest sha256 "
                        f"{saved[:12]}…) than --data {data} ({now[:12]}…); resuming would mix them. Use the run's "
                        f"corpus, another --out, or pass --allow-config-change to apply and record the change")


def _write_run_config(out: Path, cfg: PretrainConfig, data: Path, found, start_step: int, allow: bool,
                      write: bool = True) -> None:
    """``out/config.json``: the config that trains from now on, plus the history of changes made on
    resume. A resume whose settings differ from the checkpoint's is refused unless the change is
    allowed (``runs.check_resume_config``); the file is written atomically."""
    from clueforge.runs import check_resume_config
    from clueforge.utils import atomic_write

    path = out / "config.json"
    history = []
    if path.is_file():
        try:
            history = json.loads(path.read_text()).get("history", [])
        except (json.JSONDecodeError, AttributeError):
            history = []
    if found is not None and "config" in found[1]:
        record = check_resume_config(found[1]["config"], cfg.to_dict(), allow=allow, at_step=start_step,
                                     defaults=PretrainConfig().to_dict())
        if record is not None:
            for k, v in record["changes"].items() if write else ():
                log.warning("resume at step %d: %s changed %r → %r", start_step, k, v["from"], v["to"])
            history.append(record)
        saved = (found[1].get("data") or {}).get("manifest_sha256")
        ident = data_identity(data)
        if saved and ident["manifest_sha256"] and saved != ident["manifest_sha256"]:  # allowed: _check_resume
            history.append({"step": start_step, "changes": {"data": {"from": found[1]["data"], "to": ident}},
                            "allowed_by": "--allow-config-change"})
    if write:
        atomic_write(path, json.dumps({"config": cfg.to_dict(), "data": data_identity(data), "history": history},
                                      indent=2))


def summary_line(summary: dict) -> str:
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()})


