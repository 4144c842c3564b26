"""Score runs' checkpoints with the fixed held-out MLM protocol, step by step (issue 12's measured
task-agnostic distillation: the same student distilled vs pretrained alone, same schedule).

    python benchmarks/distill_agnostic.py --data CORPUS --out docs/distill-agnostic.json \\
        alone=runs/pico-alone kd=runs/pico-kd teacher=runs/teacher

Each ``NAME=RUN`` is a ``pretrain`` or ``distill`` run directory, whose every
``checkpoints/step-N`` (and ``final``) is scored, or a model directory (one point, ``model``):
token masking 15 %, seed 0, the first 640 held-out rows in batches of 32 (``pretrain.loop``'s
``eval_fixed_*``), so runs with the same schedule compare at the same step. Also the soft KL
(teacher ‖ model) at the masked positions when a ``teacher=`` run is given.

Everything in the JSON is written here: per run its shape, steps, distillation settings and
student initialisation (from the run's ``config.json`` / ``summary.json``) and the run's own
end-of-run ``eval_fixed_loss`` (``run_reported``: the same protocol, a cross-check); runs named
``ARM@SEED`` are also grouped per arm and point (mean, std, n) under ``groups``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def main() -> None:
    from clueforge.corpus.shards import Corpus
    from clueforge.distill.losses import soft_kl
    from clueforge.model.hf import load_hf
    from clueforge.pretrain.data import Collator, build_row_index, split_heldout
    from clueforge.pretrain.loop import FIXED_EVAL_BATCH, FIXED_EVAL_MASKING, FIXED_EVAL_ROWS, FIXED_EVAL_SEED
    from clueforge.text.tokenizer import load_tokenizer, special_ids

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the corpus the runs trained on")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", default="", help="only these checkpoint steps, e.g. 100,200 (default: all)")
    ap.add_argument("--out", required=True)
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    args = ap.parse_args()

    data = Path(args.data)
    corpus, tok = Corpus(data), load_tokenizer(data / "vocab.txt")
    _, eval_rows = split_heldout(build_row_index(corpus, args.seq_len, True), corpus)
    col = Collator(corpus, special_ids(tok), tok.get_vocab_size(), FIXED_EVAL_MASKING, tokenizer=tok)
    n_rows = min(len(eval_rows), FIXED_EVAL_ROWS)
    batches = []
    for b in range(math.ceil(n_rows / FIXED_EVAL_BATCH)):
        rows = eval_rows.select(np.arange(b * FIXED_EVAL_BATCH, min(n_rows, (b + 1) * FIXED_EVAL_BATCH)))
        batch = col(list(zip(rows.shard.tolist(), rows.span[:, 0].tolist(), rows.span[:, 1].tolist())),
                    np.random.default_rng([FIXED_EVAL_SEED, 3, b]), progress=1.0)
        batches.append({k: torch.from_numpy(v) for k, v in batch.items()})

    @torch.no_grad()
    def logits_of(model_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = load_hf(model_dir).eval()
        return [(o.logits, o.labels) for o in (m(**b) for b in batches)]

    runs = dict(r.split("=", 1) for r in args.runs)
    keep = {int(x) for x in args.steps.split(",") if x}

    def _points(run: Path) -> list[Path]:
        if (run / "config.json").is_file() and not (run / "checkpoints").is_dir() and not (run / "final").is_dir():
            return [run]  # a model directory
        ck = sorted((p for p in (run / "checkpoints").glob("step-*") if p.is_dir() and ".tmp" not in p.name
                     and (not keep or int(p.name.split("-")[1]) in keep)), key=lambda p: int(p.name.split("-")[1]))
        return ck + ([run / "final"] if (run / "final").is_dir() else [])

    teacher = {}
    if "teacher" in runs:
        t_dir = Path(runs["teacher"])
        teacher = {"final": logits_of(t_dir / "final" if (t_dir / "final").is_dir() else t_dir)}
    rows = []
    for name, run in runs.items():
        for point in _points(Path(run)):
            out = logits_of(point)
            n = sum(lab.numel() for _, lab in out)
            loss = sum(float(torch.nn.functional.cross_entropy(lg, lab, reduction="sum")) for lg, lab in out) / n
            acc = sum(int((lg.argmax(-1) == lab).sum()) for lg, lab in out) / n
            row = {"run": name, "point": "model" if point == Path(run) else point.name, "eval_fixed_loss": loss,
                   "eval_fixed_mlm_acc": acc}
            if "final" in teacher and name != "teacher":
                row["kl_to_teacher"] = sum(float(soft_kl(lg, t[0])) * lab.numel()
                                           for (lg, lab), t in zip(out, teacher["final"])) / n
            rows.append(row)
            print(json.dumps(row))
            write_json(args.out, {"complete": False, "rows": rows})  # a capped run leaves what it scored
    write_json(args.out, {"complete": True, "machine": machine(), "command": " ".join(sys.argv),
                          "protocol": "eval_fixed (token 15 %, seed 0, 640 held-out rows, batches of 32)",
                          "data": str(data), "runs": {name: describe_run(Path(run)) for name, run in runs.items()},
                          "rows": rows, "groups": groups(rows)})


def describe_run(run: Path) -> dict:
    """What a run was, from its own files: shape, steps, distillation settings, initialisation."""
    out = {"dir": str(run)}
    cfg_file = run / "config.json"
    if (run / "checkpoints").is_dir() or (run / "final").is_dir():
        cfg = json.loads(cfg_file.read_text())["config"] if cfg_file.is_file() else {}
        m = cfg.get("model", {})
        out["model"] = {k: m.get(k) for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "pre_ln")}
        out["max_steps"] = cfg.get("train", {}).get("max_steps")
        out["seed"] = cfg.get("train", {}).get("seed")
        if "distill" in cfg:
            out["teacher"], out["distill"] = cfg.get("teacher"), cfg["distill"]
        if (run / "summary.json").is_file():
            summary = json.loads((run / "summary.json").read_text())
            out["run_reported"] = {k: summary[k] for k in ("steps", "eval_fixed_loss", "eval_fixed_mlm_acc")
                                   if k in summary}
            if "student_init" in summary:
                out["student_init"] = summary["student_init"]
        elif (run / "metrics.jsonl").is_file():  # a run started through the Python API: its last fixed eval
            evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if "eval_fixed_loss" in r]
            if evals:
                out["run_reported"] = {k: evals[-1][k] for k in ("step", "eval_fixed_loss", "eval_fixed_mlm_acc")
                                       if k in evals[-1]}
    elif cfg_file.is_file():
        h = json.loads(cfg_file.read_text())
        out["model"] = {k: h.get(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                              "intermediate_size")}
    return out


def groups(rows: list[dict]) -> dict:
    """Rows of runs named ARM@SEED → per arm and point: mean, std (n - 1) and n of each figure."""
    acc: dict = {}
    for r in rows:
        if "@" in r["run"]:
            acc.setdefault(r["run"].split("@")[0], {}).setdefault(r["point"], []).append(r)
    out = {}
    for arm, points in acc.items():
        out[arm] = {}
        for point, rs in points.items():
            out[arm][point] = {"n": len(rs)}
            for k in ("eval_fixed_loss", "eval_fixed_mlm_acc", "kl_to_teacher"):
                xs = [r[k] for r in rs if k in r]
                if xs:
                    out[arm][point][k] = {"mean": float(np.mean(xs)),
                                          "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}
    return out


if __name__ == "__main__":
    main()
