"""Zero-shot throughput over full FewCLUE test files: the fp32 path against the CPU fast paths.

    python benchmarks/zeroshot.py --out bench-out/zeroshot.json
    python benchmarks/zeroshot.py --model runs/mini/final --tasks eprstmt,tnews --paths fp32,int8
    python benchmarks/zeroshot.py --tasks chid,csldcp,iflytek,csl --limit 500 --paths bf16-full,bf16

For each task's whole ``test.json`` (no labels: throughput only; ``--limit N``: its first N
examples), ``clueforge.prompts.zeroshot`` with the task's first template and PMI calibration, once
per path, all in one process on the same weights (random-init ``configs/mini.yaml`` unless
``--model``), the paths alternated ``--rounds`` times (the best round is kept: the machine is
shared). A path is a precision (``fp32``; ``bf16`` and ``int8``: ``clueforge.model.inference``)
with the encoder's last layer only at the [MASK] rows (``at_masks``, the default), or
``<precision>-full``: the whole last layer, the path before that change. The first path is the
baseline of the ratios. Every path batches rows by length (sorted, padded per batch), runs the MLM
head only at [MASK]s, one row per example and word length, the calibration terms once per
template, under ``torch.inference_mode``. Reported per task and path: examples/s of the scoring (model and data
loaded beforehand), seconds, CPU seconds of the process and examples per CPU-second (with
``--threads 1`` the examples/s one idle core gives, whatever else the machine runs), and for the fast paths the share of
predictions equal to the baseline's (random weights make near-ties common, so agreement is a lower
bound of what a trained model shows) and ``speedup`` = its examples/s / the baseline's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BERT_VOCAB, SHARED, machine, write_json  # noqa: E402

from clueforge.model.bert import BertForMLM  # noqa: E402
from clueforge.model.hf import save_hf  # noqa: E402
from clueforge.pretrain.config import load_config  # noqa: E402
from clueforge.finetune.loop import prepare_state  # noqa: E402
from clueforge.prompts.score import PromptEncoder, example_rows, slots_of, words_of  # noqa: E402
from clueforge.prompts.spec import templates_for  # noqa: E402
from clueforge.prompts.zeroshot import load_examples, load_mlm, zeroshot  # noqa: E402
from clueforge.tasks.registry import get_task  # noqa: E402
from clueforge.text.tokenizer import load_tokenizer  # noqa: E402

FEW = SHARED / "tasks" / "fewclue"
SHORT = "eprstmt,tnews,bustm,ocnli,cluewsc"  # inputs of ≤ 64 tokens on average
ALL = SHORT + ",chid,csldcp,iflytek,csl"


def random_mini(tmp: Path) -> Path:
    torch.manual_seed(0)
    model = BertForMLM(load_config("configs/mini.yaml").model)
    return save_hf(model, tmp / "mini", vocab=BERT_VOCAB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an MLM directory (default: random-init mini)")
    ap.add_argument("--tasks", default=SHORT, help=f"FewCLUE task names, or 'all' ({ALL})")
    ap.add_argument("--paths", default="fp32-full,fp32,bf16-full,bf16", help="precision[-full], the first is the baseline")
    ap.add_argument("--precisions", help="the earlier runs' option: these precisions on the whole-last-layer path")
    ap.add_argument("--limit", type=int, default=None, help="the first N examples of each file (default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="the paths alternated this many times; the best kept")
    ap.add_argument("--calibration", default="pmi")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench-out/zeroshot.json")
    args = ap.parse_args()
    if not BERT_VOCAB.is_file():
        sys.exit(f"needs {BERT_VOCAB} and the FewCLUE test files under {FEW}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="clueforge-zs-"))
    model_dir = Path(args.model) if args.model else random_mini(tmp)
    mlm = load_mlm(model_dir)
    paths = [f"{p}-full" for p in args.precisions.split(",")] if args.precisions else args.paths.split(",")
    base = paths[0]
    results = []
    for name in (ALL if args.tasks == "all" else args.tasks).split(","):
        test = FEW / name / "test.json"
        if not test.is_file():
            print(f"skip {name}: no {test}", file=sys.stderr)
            continue
        if args.limit:  # the file's first N examples, beside the task's other files (labels_all.txt)
            (tmp / name).mkdir()
            for f in test.parent.iterdir():
                if f.is_file() and f.name != "test.json":
                    (tmp / name / f.name).write_bytes(f.read_bytes())
            lines = test.read_text(encoding="utf-8").splitlines(keepends=True)
            test = tmp / name / "test.json"
            test.write_text("".join(lines[:args.limit]), encoding="utf-8")
        row = {"task": f"fewclue-{name}", **work(name, test, mlm.cfg, model_dir), "paths": {}}
        preds = {}
        for _ in range(args.rounds):
            for p in paths:
                entry, preds[p] = run_path(name, model_dir, test, tmp / f"{name}-{p}.json", p, mlm, args)
                entry["full_forward_gflop_per_cpu_s"] = round(row["gflop_full_forward"] / max(entry["cpu_seconds"], 1e-9), 1)
                best = row["paths"].get(p)
                if best is None or entry["examples_per_cpu_s"] > best["examples_per_cpu_s"]:
                    row["paths"][p] = entry
                print(name, p, entry, file=sys.stderr, flush=True)
        for p in paths[1:]:
            entry, ref = row["paths"][p], row["paths"][base]
            entry["speedup"] = round(entry["examples_per_s"] / ref["examples_per_s"], 2)
            entry["cpu_speedup"] = round(entry["examples_per_cpu_s"] / ref["examples_per_cpu_s"], 2)
            entry["agreement_with_" + base] = round(sum(a == b for a, b in zip(preds[p], preds[base])) / len(preds[p]), 4)
        results.append(row)
    write_json(args.out, {"benchmark": "zeroshot", "machine": machine(), "load_average": os.getloadavg(),
                          "model": str(args.model or "random-init mini"), "calibration": args.calibration,
                          "batch_size": args.batch_size, "paths": paths, "limit": args.limit, "rounds": args.rounds,
                          "results": results})


def work(name: str, test: Path, cfg, model_dir: Path) -> dict:
    """The rows the first template makes of ``test`` (PMI's one row aside), their real tokens, and
    the FLOPs of the plain forward over them: 2·L·12·D² per token (QKV, output, MLP) + 4·L·D·T² per
    row (attention) + 2·(D² + D·V) per [MASK] (the head)."""
    task = get_task(f"fewclue-{name}")
    fam = importlib.import_module(f"clueforge.tasks.{task.family}")
    state = prepare_state(fam, task, test.parent)
    examples, _ = load_examples(task, fam, [test], state)
    t = templates_for(task)[0]
    enc = PromptEncoder(load_tokenizer(model_dir), t, min(task.max_length, cfg.max_position))
    words = [words_of(t, e, state.get("labels")) for e in examples]
    rows, queries, _ = example_rows(enc, [slots_of(task, e) for e in examples], words)
    lens = np.array([len(r[0]) for r in rows], dtype=np.float64)
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    masks = sum(q.shape[1] for q in queries)
    flops = 2 * L * 12 * D * D * lens.sum() + 4 * L * D * (lens ** 2).sum() + 2 * (D * D + D * V) * masks
    return {"rows": len(rows), "tokens": int(lens.sum()), "mean_row_tokens": round(float(lens.mean()), 1),
            "gflop_full_forward": round(float(flops) / 1e9, 1)}


def run_path(name: str, model_dir: Path, test: Path, out: Path, path: str, mlm, args) -> tuple[dict, list]:
    """One timed zero-shot pass of ``test`` on ``path``: its figures and its predictions."""
    precision, _, full = path.partition("-")
    t0, c0 = time.perf_counter(), time.process_time()
    res = zeroshot(f"fewclue-{name}", model_dir, str(test), out, calibration=args.calibration,
                   batch_size=args.batch_size, model=mlm, precision=precision, at_masks=full != "full")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()  # JSON lines (one row per example), or one object (CHID)
    preds = lines if len(lines) > 1 else list(json.loads(text).values())
    return {"examples": res["examples"], "examples_per_s": res["examples_per_s"], "seconds": res["seconds"],
            "wall_seconds_with_writing": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "examples_per_cpu_s": round(res["examples"] / max(cpu, 1e-9), 1)}, preds


if __name__ == "__main__":
    main()
