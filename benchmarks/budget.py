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
    "train.precision": "bf16",
}


def _v(base: dict, **changes) -> dict:
    return {**base, **{k.replace("__", "."): v for k, v in changes.items()}}


VARIANTS: dict[str, dict] = {"default": DEFAULT, "default-fp32": _v(DEFAULT, train__precision="fp32")}
VARIANTS["dropout0"] = _v(DEFAULT, model__dropout=0.0, model__attention_dropout=0.0)
for _lr in ("1e-3", "2e-3", "4e-3"):
    VARIANTS[f"dropout0-lr{_lr}"] = _v(VARIANTS["dropout0"], train__lr=float(_lr))


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
            subprocess.run(cmd, env=_env(threads), stdout=log, stderr=subprocess.STDOUT, check=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="short runs of recipe variants, scored under the fixed protocol")
    s.add_argument("variants", nargs="+")
    for p in (s,):
        p.add_argument("--minutes", type=float, default=3.0, help="CPU-minutes per run")
        p.add_argument("--jobs", type=int, default=2, help="runs at a time")
        p.add_argument("--threads", type=int, default=1, help="torch threads per run")
        p.add_argument("--nice", type=int, default=10, help="niceness of the training processes")
        p.add_argument("--data", default=str(ROOT.parent.parent / "runs" / "corpus-real"))
        p.add_argument("--work", required=True)
        p.add_argument("--out", required=True)
    args = ap.parse_args()
    {"search": search}[args.cmd](args)


if __name__ == "__main__":
    main()
