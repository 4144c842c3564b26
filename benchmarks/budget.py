"""The best model from a small CPU budget (issue 11): the search behind ``configs/small.yaml``, and
clueforge's small recipe against transformers' ``run_mlm`` recipe at the same CPU time.

    python benchmarks/budget.py search --minutes 3 --jobs 2 --data runs/corpus-real \\
        --work runs/budget-search --out docs/results/budget_search.json default dropout0 lr2e-3
    python benchmarks/budget.py compare --minutes 20 --jobs 3 --data runs/corpus-real \\
        --work runs/budget --out docs/results/budget.json

Compute is measured as process CPU time (``time.process_time``: every thread of the training
process) of the training steps — start-up and held-out evaluation excluded — and wall time is
recorded beside it: the machine is shared, and CPU time is what a run costs whoever else runs.
Every run uses one torch thread (``--threads``), so two runs share the 2-core machine.

Every model is scored under clueforge's fixed protocol (``pretrain.loop.FIXED_EVAL_*``: token
masking 15 % with 80/10/10, masking seed 0, the first 640 held-out rows of 128 tokens in batches
of 32), in fp32, by ``fixed_heldout`` — whatever the sequence length, precision or masking the run
trained with, and for the transformers models too (they load through the HF key map).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, machine  # noqa: E402

# clueforge's default recipe (configs/tiny|mini's training settings) at the shape (2 layers,
# hidden 128, batch 32 × 128): the search's starting point. Every variant lists all its settings.
DEFAULT = {
    "model.hidden_size": 128, "model.num_layers": 2, "model.num_heads": 2, "model.intermediate_size": 512,
    "model.max_position": 128, "model.dropout": 0.1, "model.attention_dropout": 0.1, "model.pre_ln": False,
    "train.seq_len": 128, "train.batch_size": 32, "train.lr": 5e-4, "train.warmup_steps": 100,
    "train.schedule": "linear", "train.min_lr_ratio": 0.0, "train.masking": "wwm", "train.mask_ratio": 0.15,
    "train.precision": "bf16", "model.relative_attention": 0, "model.position_init": "normal",
}


def _v(base: dict, **changes) -> dict:
    return {**base, **{k.replace("__", "."): v for k, v in changes.items()}}


VARIANTS: dict[str, dict] = {"default": DEFAULT, "default-fp32": _v(DEFAULT, train__precision="fp32")}
VARIANTS["dropout0"] = _v(DEFAULT, model__dropout=0.0, model__attention_dropout=0.0)
for _lr in ("1e-3", "2e-3", "4e-3"):
    VARIANTS[f"dropout0-lr{_lr}"] = _v(VARIANTS["dropout0"], train__lr=float(_lr))
for _lr in ("1e-3", "2e-3"):  # the greedy search's next steps, from each of the two best learning rates
    _b = VARIANTS[f"dropout0-lr{_lr}"]
    VARIANTS[f"lr{_lr}-token"] = _v(_b, train__masking="token")
    VARIANTS[f"lr{_lr}-token-mask0.3"] = _v(_b, train__masking="token", train__mask_ratio=0.3)
    VARIANTS[f"lr{_lr}-token-mask0.4"] = _v(_b, train__masking="token", train__mask_ratio=0.4)
    VARIANTS[f"lr{_lr}-wwm-mask0.3"] = _v(_b, train__mask_ratio=0.3)
    VARIANTS[f"lr{_lr}-preln"] = _v(_b, model__pre_ln=True)
    VARIANTS[f"lr{_lr}-preln-x2lr"] = _v(_b, model__pre_ln=True, train__lr=2 * float(_lr))
    VARIANTS[f"lr{_lr}-batch64"] = _v(_b, train__batch_size=64)
    VARIANTS[f"lr{_lr}-batch16"] = _v(_b, train__batch_size=16)
    VARIANTS[f"lr{_lr}-warmup30"] = _v(_b, train__warmup_steps=30)
    VARIANTS[f"lr{_lr}-h256"] = _v(_b, model__hidden_size=256, model__num_heads=4, model__intermediate_size=1024)
    VARIANTS[f"lr{_lr}-4layers"] = _v(_b, model__num_layers=4)


# transformers' run_mlm recipe: BertForMaskedLM from a config (dropout 0.1), its collator
# (DataCollatorForLanguageModeling, mlm_probability 0.15, 80/10/10), the Trainer's defaults (AdamW
# β 0.9/0.999, ε 1e-8, weight decay 0, linear decay from the peak with no warm-up, fp32 on a CPU,
# no clipping beyond max_grad_norm 1.0), on the same packed 128-token rows of the same corpus.
HF_RECIPES = {
    "transformers run_mlm (lr 5e-5)": {"lr": 5e-5, "bf16": False},
    "transformers run_mlm, tuned (lr 1e-3, --bf16)": {"lr": 1e-3, "bf16": True},
}
HF_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}


def hf_train(out: Path, data: Path, minutes: float, lr: float, bf16: bool, seed: int, points: int) -> None:
    """One run of the run_mlm recipe for ``minutes`` CPU-minutes (a calibration on a throw-away copy
    fixes the step count, so the linear schedule ends at the budget), saving the model at
    ``points`` evenly spaced steps with the CPU time spent so far (``CpuClock``, as clueforge's)."""
    import copy
    import shutil

    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling
    from transformers import get_linear_schedule_with_warmup

    from clueforge.corpus.shards import Corpus
    from clueforge.pretrain.data import Collator, build_row_index, split_heldout
    from clueforge.pretrain.loop import FIXED_EVAL_MASKING, CpuClock, budget_steps
    from clueforge.text.tokenizer import load_tokenizer, special_ids
    from clueforge.utils import atomic_write

    torch.manual_seed(seed)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "vocab.txt", tok_dir / "vocab.txt")  # transformers 5.x: load from a directory
    hf_tok = BertTokenizerFast.from_pretrained(tok_dir)
    corpus = Corpus(data)
    tok = load_tokenizer(data / "vocab.txt")
    rows_col = Collator(corpus, special_ids(tok), tok.get_vocab_size(), FIXED_EVAL_MASKING, tokenizer=tok)
    train_rows, _ = split_heldout(build_row_index(corpus, 128, True), corpus)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
    order = np.random.default_rng(seed).permutation(len(train_rows))
    model = BertForMaskedLM(BertConfig(vocab_size=hf_tok.vocab_size, **HF_SHAPE)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def batch(step: int) -> dict:
        idx = order[(step * 32 + np.arange(32)) % len(order)]
        feats = [{"input_ids": rows_col._row(int(train_rows.shard[i]), *map(int, train_rows.span[i]))[0].ids.tolist()}
                 for i in idx]
        return collator(feats)

    def step_on(m, o, b) -> float:
        with ctx():
            loss = m(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        o.step()
        o.zero_grad(set_to_none=True)
        return float(loss)

    # calibration (as ``pretrain.loop.calibrate_steps``): 2 warm-up + 5 timed steps on copies
    m2 = copy.deepcopy(model)
    o2 = torch.optim.AdamW(m2.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rng = torch.get_rng_state()
    for i in range(7):
        if i == 2:
            c0 = time.process_time()
        step_on(m2, o2, batch(i))
    cpu_per_step = (time.process_time() - c0) / 5
    torch.set_rng_state(rng)
    del m2, o2
    steps = budget_steps(minutes, cpu_per_step)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    marks = sorted({max(1, round(steps * (k + 1) / points)) for k in range(points)})
    clock, log = CpuClock(), []
    for step in range(steps):
        loss = step_on(model, opt, batch(step))
        sched.step()
        if step + 1 in marks:
            clock.pause()
            cpu, wall = clock.read()
            d = out / "final" if step + 1 == steps else out / "checkpoints" / f"step-{step + 1:06d}"
            model.save_pretrained(d)
            shutil.copyfile(data / "vocab.txt", d / "vocab.txt")
            log.append({"step": step + 1, "cpu_min": cpu / 60, "wall_min": wall / 60, "loss": loss, "dir": str(d)})
            clock.resume()
    atomic_write(out / "summary.json", json.dumps({"steps": steps, "tokens": steps * 32 * 128, "lr": lr, "bf16": bf16,
                                                  "cpu_s_per_step": cpu_per_step, "points": log}, indent=2))

# The cramming-style combination, then each of its choices undone one at a time (an ablation: a
# choice is kept only if undoing it raises the held-out loss at equal CPU time).
COMBO = _v(DEFAULT, model__dropout=0.0, model__attention_dropout=0.0, model__pre_ln=True, train__lr=2e-3,
           train__warmup_steps=30, train__masking="token", train__mask_ratio=0.3, train__batch_size=16)
VARIANTS["combo"] = COMBO
VARIANTS["combo-batch32"] = _v(COMBO, train__batch_size=32)
VARIANTS["combo-batch8"] = _v(COMBO, train__batch_size=8)
VARIANTS["combo-postln"] = _v(COMBO, model__pre_ln=False)
VARIANTS["combo-mask0.15"] = _v(COMBO, train__mask_ratio=0.15)
VARIANTS["combo-mask0.4"] = _v(COMBO, train__mask_ratio=0.4)
VARIANTS["combo-wwm"] = _v(COMBO, train__masking="wwm")
VARIANTS["combo-lr1e-3"] = _v(COMBO, train__lr=1e-3)
VARIANTS["combo-lr4e-3"] = _v(COMBO, train__lr=4e-3)
VARIANTS["combo-dropout0.1"] = _v(COMBO, model__dropout=0.1, model__attention_dropout=0.1)
VARIANTS["combo-fp32"] = _v(COMBO, train__precision="fp32")
VARIANTS["combo-seq64"] = _v(COMBO, train__seq_len=64, train__batch_size=32)  # same tokens per step
VARIANTS["combo-h256"] = _v(COMBO, model__hidden_size=256, model__num_heads=4, model__intermediate_size=1024)
VARIANTS["combo-4layers"] = _v(COMBO, model__num_layers=4)
VARIANTS["combo-warmup100"] = _v(COMBO, train__warmup_steps=100)
COMBO8 = _v(COMBO, train__batch_size=8)  # the batch-8 branch (batch 16 → 8 lowered the loss again)
for _name, _ch in {"lr1e-3": {"train__lr": 1e-3}, "lr4e-3": {"train__lr": 4e-3}, "mask0.4": {"train__mask_ratio": 0.4},
                   "mask0.15": {"train__mask_ratio": 0.15}, "fp32": {"train__precision": "fp32"},
                   "wwm": {"train__masking": "wwm"}, "postln": {"model__pre_ln": False},
                   "h256": {"model__hidden_size": 256, "model__num_heads": 4, "model__intermediate_size": 1024},
                   "4layers": {"model__num_layers": 4}, "batch4": {"train__batch_size": 4}}.items():
    VARIANTS[f"combo8-{_name}"] = _v(COMBO8, **_ch)
# short sequences first (``train.short_seq_len``) on top of configs/small.yaml as it was before
# session 6 (no relative positions: "small"); "-seed1" repeats a variant with another seed (data
# order, masking, initialisation). Every variant below starts from that recipe, so it reruns as it ran.
SMALL: dict = {"model.relative_attention": 0, "model.position_init": "normal"}
for _name, _ch in {"small": {}, "small-short64-f0.3": {"train__short_seq_len": 64, "train__short_seq_fraction": 0.3},
                   "small-short64-f0.5": {"train__short_seq_len": 64, "train__short_seq_fraction": 0.5},
                   "small-short64-f0.5-b8": {"train__short_seq_len": 64, "train__short_seq_fraction": 0.5,
                                             "train__short_batch_size": 8}}.items():
    VARIANTS[_name] = _v(SMALL, **_ch)
    VARIANTS[f"{_name}-seed1"] = _v(SMALL, **_ch, train__seed=1)
# session 6, on the same base: sinusoidal initial position embeddings (``model.position_init``), short
# rows first, batch 4, LR 4e-3, and relative positions (``small-rel8``: configs/small.yaml since then)
_SHORT32 = {"train__short_seq_len": 32, "train__short_seq_fraction": 0.25}  # 32 × 32 rows for a quarter
_SINPOS = {"model__position_init": "sinusoidal"}
SESSION6 = {"small": {}, "small-sinpos": _SINPOS, "small-short32-f0.25": _SHORT32,
            "small-sinpos-short32-f0.25": {**_SINPOS, **_SHORT32}, "small-sinpos-batch4": {**_SINPOS, "train__batch_size": 4},
            "small-sinpos-lr4e-3": {**_SINPOS, "train__lr": 4e-3}, "small-rel8": {"model__relative_attention": 8}}
for _name, _ch in SESSION6.items():
    VARIANTS[_name] = _v(SMALL, **_ch)
    VARIANTS[f"{_name}-seed1"] = _v(VARIANTS[_name], train__seed=1)
    VARIANTS[f"{_name}-seed2"] = _v(VARIANTS[_name], train__seed=2)
VARIANTS["small-rel8-seed3"] = _v(VARIANTS["small-rel8"], train__seed=3)  # session 8: a fourth pretraining seed


def fixed_heldout(model_dir: str | Path, data: str | Path, seq_len: int = 128) -> dict:
    """The fixed protocol (``eval_fixed_*`` of the training loop) on a saved model, in fp32 on the
    CPU: the same rows, masking and batches for every model, whatever it trained with."""
    import torch

    from clueforge.corpus.shards import Corpus
    from clueforge.model.hf import load_hf
    from clueforge.pretrain.data import Collator, build_row_index, split_heldout
    from clueforge.pretrain.loop import (FIXED_EVAL_BATCH, FIXED_EVAL_MASKING, FIXED_EVAL_ROWS, FIXED_EVAL_SEED,
                                         evaluate_mlm)
    from clueforge.text.tokenizer import load_tokenizer, special_ids

    corpus = Corpus(data)
    tok = load_tokenizer(Path(data) / "vocab.txt")
    _, eval_rows = split_heldout(build_row_index(corpus, seq_len, True), corpus)
    col = Collator(corpus, special_ids(tok), tok.get_vocab_size(), FIXED_EVAL_MASKING, tokenizer=tok)
    model = load_hf(model_dir)
    one = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), autocast=nullcontext,
                          reduce=lambda x, op: x)  # the evaluator's view of a one-process CPU Accelerator
    res = evaluate_mlm(model, {"fixed": (col, [FIXED_EVAL_SEED, 3], FIXED_EVAL_ROWS, FIXED_EVAL_BATCH)},
                       eval_rows, SimpleNamespace(batch_size=FIXED_EVAL_BATCH, eval_batches=1), one)
    return {"loss": res["fixed_loss"], "acc": res["fixed_mlm_acc"]}


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src"),
            "TOKENIZERS_PARALLELISM": "false"}


AUTOGROUP_NICE: int | None = None
"""Where set (``--autogroup-nice``): the scheduler niceness of each training child's own session.
With Linux autogroups every session shares the CPU equally whatever its processes' nice values,
so each child runs in a new session (``start_new_session``), and this sets that session's share."""


def _run_child(cmd: list[str], env: dict, log) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if AUTOGROUP_NICE is not None:
        try:
            Path(f"/proc/{proc.pid}/autogroup").write_text(str(AUTOGROUP_NICE))
        except OSError:
            pass
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def pretrain_run(name: str, settings: dict, minutes: float, data: Path, work: Path, threads: int,
                 extra: tuple[str, ...] = (), nice: int = 10) -> dict:
    """One clueforge pretraining run of ``minutes`` CPU-minutes in a child process (its own
    Accelerate state and thread count); resumes (exactly) when ``work/name`` holds checkpoints."""
    out = work / name
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "clueforge", "pretrain", "--config", "small", "--data", str(data),
           "--out", str(out), "--no-progress"]
    sets = {**settings, "train.max_minutes": minutes, "train.threads": threads, **dict(x.split("=", 1) for x in extra)}
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    if not (out / "summary.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "a") as log:
            _run_child(cmd, _env(threads), log)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"name": name, "settings": sets, "final": str(out / "final"), "steps": summary["steps"],
            "tokens": summary["tokens"], "cpu_min": metrics[-1]["cpu_min"], "wall_min": metrics[-1]["wall_min"],
            "budget": json.loads((out / "budget.json").read_text()) if (out / "budget.json").is_file() else None,
            "curve": [{"step": r["step"], "cpu_min": r["cpu_min"], "tokens": r["tokens"],
                       "eval_fixed_loss": r["eval_fixed_loss"]} for r in metrics if "eval_fixed_loss" in r]}


def _merge(path: Path, key: str, rows: list[dict], meta: dict) -> dict:
    from clueforge.utils import atomic_write

    old = json.loads(path.read_text()) if path.is_file() else {}
    by_name = {r["name"]: r for r in old.get(key, [])}
    by_name.update({r["name"]: r for r in rows})
    doc = {**old, **meta, key: list(by_name.values()), "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False))
    return doc


def search(args) -> None:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    data, work = Path(args.data), Path(args.work)

    def one(name: str) -> dict:
        t0 = time.time()
        row = pretrain_run(name, VARIANTS[name], args.minutes, data, work, args.threads, nice=args.nice)
        row["fixed"] = fixed_heldout(row["final"], data)
        print(f"{name}: fixed-protocol loss {row['fixed']['loss']:.4f} acc {row['fixed']['acc']:.4f} "
              f"({row['steps']} steps, {row['cpu_min']:.2f} CPU-min, {row['wall_min']:.2f} wall-min, "
              f"{time.time() - t0:.0f}s)", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, args.variants))
    _merge(Path(args.out), "variants", rows, {"benchmark": "budget-search", "minutes": args.minutes,
                                               "threads": args.threads, "default": DEFAULT})


# Fine-tuning, identical for every pretrained model: lr 3e-4 (a small model from scratch; the
# tasks' BERT-base defaults of 2-3e-5 barely move it), batch 32, 128 tokens, the last epoch kept
# (no model selection on dev); OCNLI on 9,000 training pairs (all of ../shared/data's; the full
# OCNLI's 50k would take 5x the CPU) for 3 epochs, every dev set capped at 1,000 examples (the caps
# are the same for every model). Until session 7 OCNLI took 3,000 pairs for 2 epochs (188 steps),
# which left every 20-minute model at chance (33-38): a protocol that could not tell models apart.
# Since session 7 every model also fine-tunes with the same head and dropout: mean pooling (the
# [CLS] state of a model pretrained without a sentence-level objective is a poor summary: EPRSTMT
# 60 → 78 for ours) and dropout 0 (what the small recipe's models carry; transformers' models'
# own 0.1 scored lower on OCNLI and EPRSTMT, and so did 0.1 on ours).
FT_COMMON = {"lr": 3e-4, "batch_size": 32, "max_length": 128, "max_eval": 1000, "select": "last",
             "pooling": "mean", "dropout": 0.0}
FT_TASKS = {
    "ocnli": {"epochs": 3, "max_train": 9000},
    "fewclue-eprstmt": {"epochs": 10},
    "fewclue-tnews": {"epochs": 3},
    "fewclue-bustm": {"epochs": 10},
    "fewclue-csldcp": {"epochs": 3},
}
CHANCE = {"ocnli": 33.3, "fewclue-eprstmt": 50.0, "fewclue-tnews": 100 / 15, "fewclue-bustm": 50.0,
          "fewclue-csldcp": 100 / 67}


def _changed_settings(res_file: Path, settings: dict, model: str) -> list[str]:
    """``key: recorded → wanted`` for each fine-tuning setting (``settings`` over the defaults, the
    seed aside) and the model that a finished run's ``results.json`` records otherwise, so an earlier
    run with an extra ``--ft-set`` is not taken for a plain one; [] when there is no such file or
    nothing differs."""
    from dataclasses import asdict

    from clueforge.finetune.loop import FinetuneConfig

    if not res_file.is_file():
        return []
    res = json.loads(res_file.read_text())
    hp = res.get("hyperparameters", {})
    wanted = {k: v for k, v in {**asdict(FinetuneConfig()), **settings}.items() if k != "seed"}

    def norm(x):  # --set spellings (YAML) against recorded JSON values
        if isinstance(x, str) and x.lower() in ("null", "none", "~"):
            return None
        if isinstance(x, str) and x.lower() in ("true", "false"):
            return x.lower() == "true"
        return x

    def same(a, b) -> bool:
        a, b = norm(a), norm(b)
        if a == b or str(a) == str(b):
            return True
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False

    out = [f"{k}: {hp.get(k)} → {v}" for k, v in wanted.items() if not same(hp.get(k), v)]
    if "model" in res and Path(res["model"]).resolve() != Path(model).resolve():
        out.append(f"model: {res['model']} → {model}")
    return out


def finetune_one(model: str, task: str, seed: int, out: Path, overrides: dict | None = None) -> float:
    from clueforge.tasks.registry import get_task
    from clueforge.tasks.submit import task_dir

    t = get_task(task)
    res_file = out / "results.json"
    settings = {**FT_COMMON, **FT_TASKS[task], **(overrides or {})}
    stale = _changed_settings(res_file, settings, model)
    if stale:  # a finished run with other settings (e.g. an earlier protocol in the same --work): run again
        print(f"{out}: earlier run with other settings ({', '.join(stale)}): fine-tuning again", flush=True)
    if stale or not res_file.is_file():
        cmd = [sys.executable, "-m", "clueforge", "finetune", task, "--data", str(task_dir(SHARED / "tasks", t)),
               "--model", model, "--out", str(out), "--seed", str(seed), "--no-progress"]
        for k, v in settings.items():
            cmd += ["--set", f"{k}={v}"]
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"log-{out.name}.txt", "a") as log:
            _run_child(cmd, _env(1), log)
    return json.loads(res_file.read_text())["metric"][t.metric]


def compare(args) -> None:
    import statistics

    data, work = Path(args.data), Path(args.work)
    minutes = args.minutes

    def train(name: str) -> dict:
        run = work / _slug(name)
        if name == "clueforge small":
            seed = {} if args.pretrain_seed is None else {"train.seed": args.pretrain_seed}
            row = pretrain_run("clueforge-small", seed, minutes, data, work, args.threads, nice=args.nice,
                               extra=(f"train.save_every={args.save_every}", "train.keep_checkpoints=100",
                                      f"train.eval_every={args.save_every}", *args.recipe_set))
            metrics = {r["step"]: r for r in map(json.loads, (work / "clueforge-small" / "metrics.jsonl").open())}
            points = [{"step": st, "cpu_min": metrics[st]["cpu_min"], "wall_min": metrics[st]["wall_min"], "dir": str(d)}
                      for st, d in ((int(d.name.split("-")[-1]), d) for d in sorted((run.parent / "clueforge-small" /
                                                                                     "checkpoints").glob("step-*")))
                      if st in metrics and st != row["steps"]]
            points.sort(key=lambda p: p["step"])
            points.append({"step": row["steps"], "cpu_min": row["cpu_min"], "wall_min": row["wall_min"],
                           "dir": row["final"]})
            info = {"settings": row["settings"], "steps": row["steps"], "budget": row["budget"]}
        else:
            if not (run / "summary.json").is_file():
                spec = HF_RECIPES[name]
                cmd = ["nice", "-n", str(args.nice), sys.executable, __file__, "hf-train", "--out", str(run), "--data",
                       str(data), "--minutes", str(minutes), "--lr", str(spec["lr"]), "--points", str(args.points)]
                cmd += [] if args.pretrain_seed is None else ["--seed", str(args.pretrain_seed)]
                cmd += ["--bf16"] if spec["bf16"] else []
                run.mkdir(parents=True, exist_ok=True)
                with open(run / "log.txt", "a") as log:
                    _run_child(cmd, _env(args.threads), log)
            summ = json.loads((run / "summary.json").read_text())
            points, info = summ["points"], {k: summ[k] for k in ("steps", "lr", "bf16", "cpu_s_per_step")}
        for pt in points:  # scored once: the score is kept beside the weights
            cache = Path(pt["dir"]) / "fixed_heldout.json"
            if not cache.is_file():
                cache.write_text(json.dumps(fixed_heldout(pt["dir"], data)))
            pt.update(json.loads(cache.read_text()))
        final = points[-1]
        print(f"{name}: fixed-protocol loss {final['loss']:.4f} acc {final['acc']:.4f} at {final['cpu_min']:.2f} "
              f"CPU-min ({final['wall_min']:.1f} wall-min)", flush=True)
        return {"name": name, "curve": points, "final": final["dir"], "loss": final["loss"], "acc": final["acc"],
                "cpu_min": final["cpu_min"], "wall_min": final["wall_min"], **info}

    names = [n for n in ("clueforge small", *HF_RECIPES) if not args.only or n in args.only]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(train, names))
    meta = {"benchmark": "budget", "minutes": minutes, "threads": args.threads, "seeds": args.seeds,
            "pretrain_seed": args.pretrain_seed,
            "finetune": {"common": FT_COMMON, "tasks": FT_TASKS}, "unit": "CPU-minutes of training (process CPU "
            "time, all threads; evaluation excluded)", "eval_protocol": "fixed: token masking 15 % (80/10/10), "
            "masking seed 0, first 640 held-out rows of 128 tokens, batches of 32, fp32"}
    _merge(Path(args.out), "recipes", rows, meta)
    for f in args.tasks_from or ():  # scores of `finetune` runs (e.g. of a checkpoint at equal CPU time)
        doc = json.loads(Path(f).read_text())  # a `finetune` file, or an earlier `compare --seeds N` file
        done = {r["name"]: r for r in doc.get("finetuned", [])}
        done.update({r["name"]: {**r, "model": r["final"]} for r in doc.get("recipes", []) if "tasks" in r})
        for r in rows:
            if r["name"] in done:
                r["tasks"], r["finetuned_model"] = done[r["name"]]["tasks"], done[r["name"]]["model"]
    _merge(Path(args.out), "recipes", rows, meta)
    if args.seeds:
        jobs = [(r, task, seed) for r in rows for task in FT_TASKS for seed in range(args.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:
            scores = list(pool.map(lambda j: finetune_one(j[0]["final"], j[1], j[2],
                                                          work / "ft" / _slug(j[0]["name"]) / j[1] / f"seed{j[2]}"),
                                   jobs))
        for r in rows:
            r["tasks"] = {}
            for task in FT_TASKS:
                vals = [sc for (rr, t, _), sc in zip(jobs, scores) if rr is r and t == task]
                r["tasks"][task] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "seeds": vals}
        _merge(Path(args.out), "recipes", rows, meta)
    print(markdown(rows))


def finetune_cmd(args) -> None:
    """Fine-tune one model directory (e.g. a checkpoint at a given CPU time) on every task × seed;
    ``compare --tasks-from`` attaches the scores to the recipe ``--name``."""
    import shutil
    import statistics

    model = Path(args.model)
    if not (model / "vocab.txt").is_file():  # a training checkpoint: weights + config, no tokenizer files
        ready = Path(args.work) / "models" / _slug(args.name)
        if not ready.is_dir():
            tmp = ready.with_name(ready.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("optimizer*", "rng-*", "trainer_state.json"))
            shutil.copyfile(Path(args.data) / "vocab.txt", tmp / "vocab.txt")
            tmp.rename(ready)
        model = ready
    over = dict(x.split("=", 1) for x in args.ft_set)
    chosen = [t for t in FT_TASKS if not args.tasks or t in args.tasks]
    jobs = [(task, seed) for task in chosen for seed in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        scores = list(pool.map(lambda j: finetune_one(str(model), j[0], j[1], Path(args.work) / "ft" / _slug(args.name)
                                                      / j[0] / f"seed{j[1]}", over), jobs))
    tasks = {}
    for task in chosen:
        vals = [sc for (t, _), sc in zip(jobs, scores) if t == task]
        tasks[task] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "seeds": vals}
    _merge(Path(args.out), "finetuned", [{"name": args.name, "model": str(Path(args.model)), "tasks": tasks}],
           {"finetune": {"common": {**FT_COMMON, **over}, "tasks": {t: FT_TASKS[t] for t in chosen},
                         "effective": {t: {**FT_COMMON, **FT_TASKS[t], **over} for t in chosen}}})  # --ft-set wins
    print(json.dumps(tasks))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:48]


def markdown(rows: list[dict]) -> str:
    tasks = [t for t in FT_TASKS if all(t in r.get("tasks", {}) for r in rows)]
    out = ["| recipe | steps | CPU-min | wall-min | held-out loss (fixed) | acc % | "
           + " | ".join(tasks) + " |", "|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in rows:
        cells = [f"{r['tasks'][t]['mean']:.1f} ± {r['tasks'][t]['std']:.1f}" for t in tasks]
        out.append(f"| {r['name']} | {r['steps']} | {r['cpu_min']:.2f} | {r['wall_min']:.1f} | {r['loss']:.3f} | "
                   f"{100 * r['acc']:.1f} | " + " | ".join(cells) + " |")
    out += ["", "| recipe | " + " | ".join(["CPU-min → loss"] * 1) + " |", "|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | " + ", ".join(f"{p['cpu_min']:.1f} → {p['loss']:.3f}" for p in r["curve"]) + " |")
    return "\n".join(out)


def search_markdown(doc: dict) -> str:
    """The search's table: each variant's settings that differ from ``DEFAULT``, its compute and
    its fixed-protocol held-out loss, in the order run."""
    out = ["| variant | settings changed from the default recipe | steps | CPU-min | wall-min | held-out loss (fixed) | acc % |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["variants"]:
        diff = {k: v for k, v in r["settings"].items() if k in DEFAULT and DEFAULT[k] != v}
        desc = ", ".join(f"{k.split('.')[1]}={v}" for k, v in diff.items()) or "—"
        out.append(f"| {r['name']} | {desc} | {r['steps']} | {r['cpu_min']:.2f} | {r['wall_min']:.1f} | "
                   f"{r['fixed']['loss']:.3f} | {100 * r['fixed']['acc']:.1f} |")
    return "\n".join(out)


def report(args) -> None:
    rows, meta = [], {}
    for f in args.inputs:
        doc = json.loads(Path(f).read_text())
        meta = {k: v for k, v in doc.items() if k != "variants"}
        rows += doc.get("variants", [])
    doc = _merge(Path(args.out), "variants", rows, meta)
    print(search_markdown(doc))


def _task_scores(spec: str) -> dict:
    """``FILE[#ROW]``: the tasks of one row of a ``finetune`` JSON (``finetuned``) or a ``compare`` JSON
    (``recipes``); ``ROW`` names it (default: the file's only row)."""
    path, _, name = spec.partition("#")
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"{path}: cannot read a finetune/compare JSON file ({exc})")
    rows = [r for r in doc.get("finetuned", []) + doc.get("recipes", []) if r.get("tasks") and (not name or r["name"] == name)]
    if len(rows) != 1:
        sys.exit(f"{spec}: {len(rows)} rows with scores{' named ' + repr(name) if name else ''}; name one with FILE#ROW")
    return rows[0]["tasks"]


def pool(args) -> None:
    """Each recipe over its pretraining seeds: a seed's score on a task is the mean of its fine-tuning
    seeds; the recipe's is the mean ± std of those over pretraining seeds (the spread a user meets)."""
    import statistics

    recipes: dict[str, list[dict]] = {}
    for recipe, seed, *files in (s if len(s) >= 3 else sys.exit(f"--seed {' '.join(s)}: expected RECIPE SEED "
                                                                 f"FILE[#ROW] [FILE[#ROW] ...]") for s in args.seed):
        tasks = {}
        for f in files:
            for t, v in _task_scores(f).items():
                if t in tasks:
                    print(f"{recipe} seed {seed}: {t} from {f} replaces the earlier file's", flush=True)
                tasks[t] = v
        recipes.setdefault(recipe, []).append({"pretrain_seed": seed, "files": files,
                                               "tasks": {t: v["mean"] for t, v in tasks.items()}})
    names = [t for t in FT_TASKS if all(t in s["tasks"] for r in recipes.values() for s in r)]
    partial = sorted({t for r in recipes.values() for s in r for t in s["tasks"]} - set(names))
    if partial:
        print(f"left out, not scored for every pretraining seed: {', '.join(partial)}", flush=True)
    if not names:
        sys.exit("no task is scored for every pretraining seed given")
    rows = []
    for recipe, seeds in recipes.items():
        row = {"name": recipe, "seeds": seeds, "tasks": {}}
        for t in names:
            vals = [s["tasks"][t] for s in seeds]
            row["tasks"][t] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                               "per_pretrain_seed": vals}
        rows.append(row)
    _merge(Path(args.out), "pooled", rows, {"pool_unit": "per task: mean ± sample std over pretraining seeds of "
                                            "each seed's mean over its fine-tuning seeds", "chance": CHANCE})
    out = ["| recipe (pretraining seeds) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in rows:
        out.append(f"| {r['name']} ({', '.join(str(s['pretrain_seed']) for s in r['seeds'])}) | " + " | ".join(
            f"{r['tasks'][t]['mean']:.1f} ± {r['tasks'][t]['std']:.1f}" for t in names) + " |")
    print("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="short runs of recipe variants, scored under the fixed protocol")
    s.add_argument("variants", nargs="+")
    c = sub.add_parser("compare", help="clueforge small vs transformers run_mlm at the same CPU time, then fine-tuning")
    c.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (0: pretraining and held-out loss only)")
    c.add_argument("--points", type=int, default=5, help="curve points (transformers runs)")
    c.add_argument("--recipe-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings on top of configs/small.yaml for the clueforge run (e.g. model.relative_attention=0: "
                        "the recipe of sections 3 and 3b, before session 6)")
    c.add_argument("--pretrain-seed", type=int, default=None, help="seed of every pretraining run (train.seed / the "
                   "transformers run's torch and data-order seed; default: theirs, 1234 / 0); one --work per seed")
    c.add_argument("--only", nargs="*", help="train (and fine-tune) only these recipes")
    c.add_argument("--tasks-from", nargs="*", help="`finetune` JSON files whose scores to attach by recipe name")
    f = sub.add_parser("finetune", help="fine-tune one model directory on the suite (3 seeds)")
    f.add_argument("--model", required=True)
    f.add_argument("--name", required=True, help="the recipe name the scores belong to")
    f.add_argument("--seeds", type=int, default=3)
    f.add_argument("--jobs", type=int, default=3)
    f.add_argument("--data", default=str(ROOT.parent.parent / "runs" / "corpus-real"))
    f.add_argument("--work", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--tasks", nargs="*", choices=list(FT_TASKS), help="only these tasks (default: all)")
    f.add_argument("--ft-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="fine-tuning settings replacing FT_COMMON's (the same for every model you compare)")
    f.add_argument("--autogroup-nice", type=int, default=None, help="niceness of each fine-tuning session")
    c.add_argument("--save-every", type=int, default=250, help="clueforge curve points every N steps")
    q = sub.add_parser("pool", help="recipes over their pretraining seeds, from finetune/compare JSON files")
    q.add_argument("--seed", nargs="+", action="append", required=True, metavar="ARG",
                   help="RECIPE SEED FILE[#ROW] [FILE[#ROW] ...]: one pretraining seed's scores (later files add tasks)")
    q.add_argument("--out", required=True)
    r = sub.add_parser("report", help="merge search JSON files and print the search table")
    r.add_argument("inputs", nargs="+")
    r.add_argument("--out", required=True)
    h = sub.add_parser("hf-train", help="(internal) one run of the run_mlm recipe")
    h.add_argument("--out", required=True)
    h.add_argument("--data", required=True)
    h.add_argument("--minutes", type=float, required=True)
    h.add_argument("--lr", type=float, required=True)
    h.add_argument("--bf16", action="store_true")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--points", type=int, default=5)
    for p in (s, c):
        p.add_argument("--minutes", type=float, default=3.0, help="CPU-minutes per run")
        p.add_argument("--jobs", type=int, default=2, help="runs at a time")
        p.add_argument("--threads", type=int, default=1, help="torch threads per run")
        p.add_argument("--nice", type=int, default=10, help="niceness of the training processes")
        p.add_argument("--autogroup-nice", type=int, default=None, help="niceness of each training session")
        p.add_argument("--data", default=str(ROOT.parent.parent / "runs" / "corpus-real"))
        p.add_argument("--work", required=True)
        p.add_argument("--out", required=True)
    args = ap.parse_args()
    global AUTOGROUP_NICE
    AUTOGROUP_NICE = getattr(args, "autogroup_nice", None)
    if args.cmd == "hf-train":
        hf_train(Path(args.out), Path(args.data), args.minutes, args.lr, args.bf16, args.seed, args.points)
        return
    {"search": search, "compare": compare, "report": report, "finetune": finetune_cmd, "pool": pool}[args.cmd](args)


if __name__ == "__main__":
    main()
