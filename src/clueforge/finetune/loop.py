"""Fine-tune, evaluate and predict any CLUE-family task: one loop for every task family.

    clueforge finetune ocnli --data ../shared/data/tasks/ocnli --model runs/mini/final --out runs/ft/ocnli
    clueforge predict ocnli --model runs/ft/ocnli --input ../shared/data/tasks/ocnli/test.json --out sub/ocnli_50k_predict.json

The family module of the task (``clueforge.tasks.<family>``) supplies loading, encoding, the head,
the loss, decoding, the metric and the submission rows; this loop owns batching, the optimizer
and schedule, the tricks (``finetune.tricks``), evaluation each epoch, the best checkpoint and
the metrics files (``select``: the best-on-dev epoch in ``best/``, or the last one in ``last/``). ``state`` carries what a family needs beyond its examples (the label list, the
knowledge base of KgCLUE), and is saved with the checkpoint so that ``predict`` needs only it.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from clueforge.finetune.tricks import EMA, FGM, llrd_param_groups
from clueforge.model.losses import symmetric_kl
from clueforge.model.bert import set_dropout
from clueforge.model.hf import load_hf_task, read_hf_config, save_hf
from clueforge.tasks.io import TaskDataError
from clueforge.tasks.registry import Task, get_task, with_overrides
from clueforge.text.tokenizer import load_tokenizer, save_tokenizer_files
from clueforge.utils import UserError, atomic_write

log = logging.getLogger("clueforge.finetune")


@dataclass
class FinetuneConfig:
    epochs: int | None = None
    """Epochs (default: the task's CLUE baseline value)."""
    kb: str | None = None
    """KgCLUE: a ``head<TAB>relation<TAB>tail`` file as the knowledge base (default: the task's answers)."""
    lr: float | None = None
    """Peak learning rate (default: the task's)."""
    batch_size: int | None = None
    """Examples per optimizer step (default: the task's)."""
    max_length: int | None = None
    """Tokens per example, truncated (default: the task's; at most the model's positions)."""
    seed: int = 42
    """Seeds initialisation of the head, data order and dropout."""
    warmup_ratio: float = 0.1
    """Share of the steps spent in linear warm-up, then linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    clip_grad: float = 1.0
    """Max global gradient norm (0 = off)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (tests, quick runs)."""
    max_train: int | None = None
    """Use only N training examples (a fixed random subset)."""
    max_eval: int | None = None
    """Score only N dev examples (a fixed random subset, the same for every seed)."""
    eval_batch_size: int = 64
    """Examples per batch when scoring dev."""
    dropout: float | None = None
    """Dropout of every layer and the attention weights while fine-tuning (default: the checkpoint's
    own, ``hidden_dropout_prob``). A model pretrained with dropout off (the ``small`` recipe, as in
    cramming) carries 0 into fine-tuning unless this turns it back on: 0.1 is BERT's value."""
    pooling: str | None = None
    """What the sentence(-pair) and choice heads read: ``cls`` (BERT's [CLS] pooler) or ``mean`` (the
    mean of the real tokens: much better for a model pretrained without a sentence-level objective,
    like the ``small`` recipe's; docs/benchmarks.md "3d"). Default: the checkpoint's own (``cls``
    for a pretrained model). Saved in the checkpoint; ``mean`` ones are not loadable by transformers'
    BERT heads (they read [CLS]), which refuse them."""
    rdrop: float = 0.0
    """R-Drop weight α (0 = off). Needs dropout: refused on a model whose dropout is 0."""
    fgm: float = 0.0
    """FGM adversarial step ε on word embeddings (0 = off)."""
    ema: float = 0.0
    """EMA decay of the weights used for evaluation and saving (0 = off)."""
    llrd: float = 1.0
    """Layer-wise learning-rate decay γ (1 = off)."""
    train_file: str | None = None
    """Override the task's training file name (inside --data)."""
    dev_file: str | None = None
    """Override the task's dev file name (inside --data)."""
    log_every: int = 20
    """Steps between lines of metrics.jsonl."""
    select: str = "best"
    """Which weights to keep: ``best`` (the best-on-dev epoch, in ``out/best``) or ``last`` (the
    final epoch, in ``out/last``: a protocol without model selection on dev)."""
    method: str = "finetune"
    """``finetune`` (a new task head), ``pet`` (the MLM head through a template; ``clueforge.prompts.pet``),
    ``efl`` (entailment against each label's statement; ``clueforge.prompts.efl``) or ``ptuning``
    (PET with trainable continuous prompt vectors; ``clueforge.prompts.ptuning``)."""
    template: str | None = None
    """PET and `benchmark fewclue --method zeroshot`: the template's name (default: the task's first)."""
    prompts: str | None = None
    """PET and `benchmark fewclue --method zeroshot`: a prompt YAML file instead of the shipped prompts."""
    pet_mlm: float = 0.0
    """PET: weight of the auxiliary masked-LM loss on unlabeled text run through the template (0 = off)."""
    unlabeled_file: str | None = None
    """PET with ``pet_mlm``: the unlabeled text's file(s) inside --data (default: the training file's inputs)."""
    ptuning_tokens: int = 4
    """P-tuning: continuous prompt vectors appended to each prompt row, before its final [SEP] (0 = PET)."""
    ptuning_encoder: str = "lstm"
    """P-tuning: what produces the prompt vectors: ``lstm`` (the paper's BiLSTM + MLP), ``mlp``, or
    ``none`` (the vectors are trained directly)."""
    ptuning_freeze: bool = False
    """P-tuning: train only the prompt encoder; the encoder body and MLM head stay bit-identical
    (default: everything trains, as in P-tuning's few-shot runs). Frozen, ``lr`` is the prompt's rate."""


class StepObjective(Protocol):
    """More to learn than the task's labels (task distillation, ``clueforge.distill.task``): the
    loop asks it once for extra training examples and trainable parameters, then at every step for
    the loss, given the task loss of the step's logits."""

    def train_examples(self, examples: list[dict]) -> list[dict]:
        """Examples to train on beside ``examples`` (the task's training set)."""

    def attach(self, model) -> list[torch.nn.Parameter]:
        """Called once with the model about to be trained; returns parameters to train with it."""

    def loss(self, batch: dict, logits: torch.Tensor, task_loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The step's loss and its logged parts."""


def family(task: Task):
    return importlib.import_module(f"clueforge.tasks.{task.family}")


def prepare_state(fam, task: Task, data: Path, cfg=None) -> dict:
    """What a family needs beyond its examples (labels, a knowledge base); families without such
    state (choice, span) define no ``prepare``."""
    return fam.prepare(task, data, cfg) if hasattr(fam, "prepare") else {}


def with_method(fam, cfg: FinetuneConfig):
    """The family the loop drives for ``cfg.method``: the task's own, or it seen through a prompt."""
    if cfg.method == "finetune":
        return fam
    from clueforge.prompts import method_family

    return method_family(fam, cfg)


def load_model(fam, model_dir: Path, state: dict, tok):
    """The task model: a new head on the encoder, or the family's own (PET keeps the MLM head)."""
    if hasattr(fam, "load_model"):
        return fam.load_model(model_dir, state, tok)
    return load_hf_task(model_dir, fam.HEAD, _num_labels(fam, state))


def _num_labels(fam, state: dict) -> int:
    return {"choice": 1, "span": 2}.get(fam.HEAD, len(state.get("labels") or [])) or 2


def _batches(features: list[dict], size: int, rng: random.Random | None):
    order = list(range(len(features)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        yield [features[j] for j in order[i:i + size]]


def run_model(model, fam, features: list[dict], batch_size: int, pad_id: int, device) -> list[np.ndarray]:
    model.eval()
    out = []
    with torch.inference_mode():
        for batch in _batches(features, batch_size, None):
            b = {k: v.to(device) for k, v in fam.collate(batch, pad_id).items()}
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **_ling(b))
            out.append(logits.float().cpu().numpy())
    return out


def _ling(batch: dict) -> dict:
    """The linguistic channel as a keyword argument, when the family encoded one."""
    return {"ling": batch["ling"]} if "ling" in batch else {}


def linguistic_state(fam, task: Task, state: dict, model_dir: Path) -> None:
    """A model that reads linguistic inputs (``ModelConfig.linguistic_inputs``) gets them from the
    rjieba segmentation the corpus build uses: put a ``Segmenter`` in ``state`` for the family's
    ``encode`` (the classify, NER, choice, span and KgCLUE families set ``LINGUISTIC``); refuse a
    family that does not encode them (the prompt methods, PET / EFL)."""
    model_cfg, _ = read_hf_config(model_dir)
    if not model_cfg.linguistic_inputs:
        return
    if not getattr(fam, "LINGUISTIC", False):
        raise UserError(f"{model_dir} reads linguistic inputs ({', '.join(model_cfg.arch_options)}), which the "
                        f"{task.family} family{' (PET)' if fam is not family(task) else ''} does not encode yet; "
                        f"only plain fine-tuning of the classify, NER, choice, span and KgCLUE families does")
    from clueforge.text.segment import Segmenter

    state["segmenter"] = Segmenter()


def subset(examples: list[dict], n: int | None) -> list[dict]:
    """``n`` examples spread over the whole file (a fixed random choice, the same for every run
    seed, kept in file order): some official files are sorted by label, so a prefix is biased."""
    if not n or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(0).choice(len(examples), n, replace=False))
    return [examples[i] for i in keep]


def _split_path(data: Path, name: str) -> list[Path]:
    return [data / n for n in name.split(",")]


def load_split(task: Task, fam, data: Path, name: str, state: dict, with_labels: bool) -> list[dict]:
    examples = []
    for path in _split_path(data, name):
        examples.extend(fam.load(task, path, state, with_labels))
    return examples


def finetune(task_name: str, data: str | Path, model_dir: str | Path, out: str | Path,
             cfg: FinetuneConfig = FinetuneConfig(), show_progress: bool = True,
             objective: StepObjective | None = None, state: dict | None = None) -> dict:
    """Fine-tune ``model_dir`` on ``task_name``; write ``out/best`` and ``out/results.json``.
    ``objective`` adds examples and loss terms (task distillation); ``state`` replaces the one the
    family prepares from ``data`` (a teacher's label order and knowledge base)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    data, model_dir, out = Path(data), Path(model_dir), Path(out)
    task = with_overrides(get_task(task_name), epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                          max_length=cfg.max_length)
    fam = with_method(family(task), cfg)
    check_settings(cfg, task, model_dir)  # before any data is read
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    state = prepare_state(fam, task, data, cfg) if state is None else state
    linguistic_state(fam, task, state, model_dir)
    train_ex = subset(load_split(task, fam, data, cfg.train_file or task.files["train"], state, True), cfg.max_train)
    if objective is not None:
        train_ex = train_ex + objective.train_examples(train_ex)
    dev_ex = subset(load_split(task, fam, data, cfg.dev_file or task.files["dev"], state, True), cfg.max_eval)
    if not train_ex:
        raise TaskDataError(f"{data}: no training examples for {task.name}")
    tok = load_tokenizer(model_dir)
    pad_id = tok.token_to_id("[PAD]")
    train_f = fam.encode(task, train_ex, tok, task.max_length, state, training=True)
    dev_f = fam.encode(task, dev_ex, tok, task.max_length, state)

    _, raw_cfg = read_hf_config(model_dir)
    if "clueforge_task" in raw_cfg and raw_cfg["clueforge_task"]["task"] != task.name:
        log.info("%s was fine-tuned for %s: its head is replaced", model_dir, raw_cfg["clueforge_task"]["task"])
    model = load_model(fam, model_dir, state, tok).to(device)
    if cfg.dropout is not None:
        log.info("dropout %g while fine-tuning (the checkpoint's: %g)", cfg.dropout, model.cfg.dropout)
        set_dropout(model, cfg.dropout)
    if cfg.pooling is not None:  # check_settings refused it for heads that read every token
        model.pooling = cfg.pooling
    steps_per_epoch = math.ceil(len(train_f) / task.batch_size)
    total = steps_per_epoch * task.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    groups = llrd_param_groups(model, task.lr, cfg.llrd, cfg.weight_decay)
    extra_params = objective.attach(model) if objective is not None else []
    if extra_params:  # e.g. the projections of a hidden-state distillation term
        groups.append({"params": extra_params, "lr": task.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=task.lr, fused=True)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    ema = EMA(model, cfg.ema) if cfg.ema else None
    fgm = FGM(model, cfg.fgm) if cfg.fgm else None

    out.mkdir(parents=True, exist_ok=True)
    metrics_f = (out / "metrics.jsonl").open("w", encoding="utf-8")
    rng = random.Random(cfg.seed)
    best: dict = {"score": -1.0}
    step = 0
    t0 = time.perf_counter()
    next_log = t0 + 30.0

    def forward_loss(b):
        logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **_ling(b))
        loss = fam.loss(logits, b)
        parts = {"task_loss": loss.item()}
        if hasattr(fam, "aux_loss"):  # PET's auxiliary MLM loss on unlabeled rows of the batch
            aux, aux_parts = fam.aux_loss(model, b)
            if aux is not None:
                loss = loss + aux
                parts.update(aux_parts)
        if cfg.rdrop:
            logits2 = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **_ling(b))
            kl = symmetric_kl(logits, logits2, fam.kl_mask(b) if hasattr(fam, "kl_mask") else None)
            loss = 0.5 * (loss + fam.loss(logits2, b)) + cfg.rdrop * kl
            parts["rdrop_kl"] = kl.item()
        if objective is not None:
            loss, more = objective.loss(b, logits, loss)
            parts.update(more)
        return loss, parts

    def evaluate() -> dict:
        ctx = ema.applied() if ema else _nullctx()
        with ctx:
            logits = run_model(model, fam, dev_f, cfg.eval_batch_size, pad_id, device)
        preds = fam.decode(task, logits, dev_f, dev_ex, state)
        return fam.score(task, preds, dev_ex)

    progress = Progress(TextColumn(f"finetune {task.name}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not show_progress)
    with progress:
        bar = progress.add_task("steps", total=total, info="")
        for epoch in range(1, task.epochs + 1):
            model.train()
            for batch in _batches(train_f, task.batch_size, rng):
                b = {k: v.to(device) for k, v in fam.collate(batch, pad_id).items()}
                loss, parts = forward_loss(b)
                loss.backward()
                if fgm and fgm.attack():
                    adv, _ = forward_loss(b)
                    adv.backward()
                    parts["fgm_loss"] = adv.item()
                    fgm.restore()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if ema:
                    ema.update()
                step += 1
                if step % cfg.log_every == 0:
                    metrics_f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss.item(),
                                                "lr": sched.get_last_lr()[0], **parts}) + "\n")
                progress.update(bar, completed=step, info=f"epoch {epoch} loss {loss.item():.3f}")
                if not show_progress and time.perf_counter() >= next_log:  # logs, CI, nohup: a line every 30 s
                    next_log = time.perf_counter() + 30.0
                    log.info("%s step %d/%d epoch %d loss %.3f", task.name, step, total, epoch, loss.item())
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            scores = evaluate()
            metrics_f.write(json.dumps({"step": step, "epoch": epoch, **{f"dev_{k}": v for k, v in scores.items()}}) + "\n")
            metrics_f.flush()
            log.info("%s epoch %d: %s", task.name, epoch, {k: round(v, 2) for k, v in scores.items()})
            last = {"score": scores[task.metric], "epoch": epoch, "metrics": scores}
            if scores[task.metric] > best["score"]:
                best = last
                if cfg.select == "best":
                    with ema.applied() if ema else _nullctx():
                        save_checkpoint(model, out / "best", model_dir, task, state, epoch, fam)
            if cfg.max_steps and step >= cfg.max_steps:
                break
    metrics_f.close()
    if "metrics" not in best:
        raise UserError(f"{task.name}: no epoch produced a dev score (check --set epochs/max_steps)")
    if cfg.select == "last":
        with ema.applied() if ema else _nullctx():
            save_checkpoint(model, out / "last", model_dir, task, state, last["epoch"], fam)
    selected = best if cfg.select == "best" else last
    results = {
        "task": task.name, "metric": selected["metrics"], "main_metric": task.metric, "checkpoint": cfg.select,
        "selected_epoch": selected["epoch"], "best_epoch": best["epoch"],
        "train_examples": len(train_ex), "dev_examples": len(dev_ex), "steps": step,
        "seconds": round(time.perf_counter() - t0, 1), "model": str(model_dir),
        "hyperparameters": {**asdict(cfg), "epochs": task.epochs, "lr": task.lr, "batch_size": task.batch_size,
                            "max_length": task.max_length},
    }
    atomic_write(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    return results


def check_settings(cfg: FinetuneConfig, task: Task, model_dir: Path) -> None:
    """Refuse settings that cannot work with this model before any data is read: every field's
    range (``pretrain.config.validate``), and a ``max_length`` beyond the model's positions."""
    from clueforge.pretrain.config import validate

    validate(cfg, "fine-tuning settings")
    fam = with_method(family(task), cfg)
    if cfg.pooling is not None and (hasattr(fam, "load_model") or fam.HEAD not in ("sequence", "choice")):
        reads = "its MLM head at the [MASK]" if hasattr(fam, "load_model") else "every token"
        raise UserError(f"--set pooling={cfg.pooling}: {task.name} with method={cfg.method} reads {reads} ({fam.HEAD} "
                        f"head); pooling applies to the sentence and choice heads (finetune, efl); leave it out")
    model_cfg, _ = read_hf_config(model_dir)
    if cfg.rdrop and cfg.dropout == 0:
        raise UserError(f"--set rdrop={cfg.rdrop} needs dropout, and --set dropout=0 turns it off")
    if cfg.rdrop and cfg.dropout is None and not (model_cfg.dropout or model_cfg.attention_dropout):
        raise UserError(f"--set rdrop={cfg.rdrop} needs dropout, and {model_dir / 'config.json'} has none "
                        f"(hidden_dropout_prob 0: its pretraining recipe turned dropout off); "
                        f"add --set dropout=0.1 (BERT's value)")
    if task.max_length > model_cfg.max_position:
        source = "--set max_length" if cfg.max_length else f"{task.name}'s default max_length"
        raise UserError(f"{source} {task.max_length} exceeds the model's {model_cfg.max_position} positions "
                        f"(max_position_embeddings in {model_dir / 'config.json'}); "
                        f"use --set max_length={model_cfg.max_position} (or less)")


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def save_checkpoint(model, path: Path, model_dir: Path, task: Task, state: dict, epoch: int | None = None,
                    fam=None) -> None:
    fam = fam or family(task)
    meta = {"task": task.name, "max_length": task.max_length, "epoch": epoch,
            **(fam.state_to_json(state) if hasattr(fam, "state_to_json") else {})}
    extra = {"clueforge_task": meta}
    labels = state.get("labels")
    if labels and getattr(model, "num_labels", None) == len(labels):  # the task's label names, for HF users
        extra["id2label"] = {str(i): str(lab) for i, lab in enumerate(labels)}
        extra["label2id"] = {str(lab): i for i, lab in enumerate(labels)}
    # state files (KgCLUE's kb.tsv) are written inside the temporary directory, before the rename
    save_hf(model, path, vocab=model_dir, extra_config=extra,
            extra_files=(lambda tmp: fam.save_state_files(state, tmp)) if hasattr(fam, "save_state_files") else None)


def checkpoint_dir(model_dir: str | Path) -> Path:
    """A fine-tuned checkpoint, or a ``finetune`` output directory (→ the checkpoint it selected)."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file() or not (model_dir / "results.json").is_file():
        return model_dir
    return model_dir / json.loads((model_dir / "results.json").read_text()).get("checkpoint", "best")


def load_finetuned(model_dir: str | Path, task_name: str):
    """``(task, family, state, model, tokenizer)`` of a fine-tuned checkpoint (or of the one a
    ``finetune`` output directory selected); refuses another task's."""
    model_dir = checkpoint_dir(model_dir)
    _, raw = read_hf_config(model_dir)
    meta = raw.get("clueforge_task")
    if meta is None:
        raise ValueError(f"{model_dir} is not a fine-tuned clueforge checkpoint (no clueforge_task in config.json)")
    if meta["task"] != task_name:
        raise ValueError(f"{model_dir} was fine-tuned for {meta['task']!r}, not {task_name!r}")
    task = with_overrides(get_task(task_name), max_length=meta.get("max_length"))
    fam = family(task)
    state = fam.state_from_json(meta, model_dir) if hasattr(fam, "state_from_json") else {}
    if meta.get("method") in ("pet", "efl", "ptuning"):
        from clueforge.prompts import family_from_meta

        fam, state = family_from_meta(fam, meta, model_dir)
    linguistic_state(fam, task, state, model_dir)
    tok = load_tokenizer(model_dir)
    return task, fam, state, load_model(fam, model_dir, state, tok), tok


def predict(task_name: str, model_dir: str | Path, input_file: str | Path, out_file: str | Path,
            batch_size: int = 64) -> int:
    """Predict an official test file into the task's submission format. Returns the row count."""
    task, fam, state, model, tok = load_finetuned(model_dir, task_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return predict_with(task, fam, state, model.to(device), tok, input_file, out_file, batch_size, device)


def predict_with(task: Task, fam, state: dict, model, tok, input_file: str | Path, out_file: str | Path,
                 batch_size: int = 64, device=torch.device("cpu")) -> int:
    """``predict`` for a loaded model: anything called as ``model(input_ids, attention_mask,
    token_type_ids)`` → logits (a PyTorch ``TaskModel``, ``deploy.runtime.OnnxModel``)."""
    examples = []
    for path in str(input_file).split(","):
        examples.extend(fam.load(task, Path(path), state, False))
    feats = fam.encode(task, examples, tok, task.max_length, state)
    logits = run_model(model, fam, feats, batch_size, tok.token_to_id("[PAD]"), device)
    preds = fam.decode(task, logits, feats, examples, state)
    rows = fam.submission(task, examples, preds, state)
    write_submission(out_file, rows)
    return len(examples)


def write_submission(path: str | Path, rows) -> None:
    """A list is written as JSON lines; a dict (CMRC2018, CHID) as one JSON object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(rows, dict):
        tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


__all__ = ["FinetuneConfig", "finetune", "predict", "load_finetuned", "save_tokenizer_files"]
