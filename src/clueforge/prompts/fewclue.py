"""The FewCLUE protocol: every task trained on each official split ``train_k`` and scored on its
``dev_k`` (k = 0..4), mean ± std over the splits per task and the average, for one method:

    clueforge benchmark fewclue --method finetune|pet|efl|ptuning|zeroshot --model runs/mini/final \\
        --data ../shared/data/tasks --out runs/fewclue-pet [--set epochs=20] [--splits 0,1]
        [--calibration pmi|contextual|batch: zeroshot only]

``finetune``, ``pet``, ``efl`` and ``ptuning`` train with the fine-tuning loop (``--set`` applies); ``zeroshot``
trains nothing and scores each ``dev_k`` (the same five sets, so the methods share one table shape;
``--set max_length`` applies to it too). Tasks without data, and CHID under PET/EFL/P-tuning (no fixed label
set), are listed as skipped with the reason. The report also records the run's conditions (wall and
process CPU seconds, the load average at start and end, torch threads): figures on a shared machine
mean little without them.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from clueforge.finetune.loop import FinetuneConfig, finetune
from clueforge.prompts.zeroshot import load_mlm, zeroshot
from clueforge.tasks.registry import SUITES, get_task
from clueforge.tasks.submit import task_dir
from clueforge.tasks.suite import write_report

METHODS = ("finetune", "pet", "efl", "ptuning", "zeroshot")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_fewclue(method: str, model: str | Path, data_root: str | Path, out: str | Path,
                cfg: FinetuneConfig = FinetuneConfig(), calibration: str = "none", splits=range(5),
                show_progress: bool = False, tasks: list[str] | None = None) -> dict:
    """One method over the FewCLUE tasks (``tasks``: a subset, default all); writes report.json/.md."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    unknown = sorted(set(tasks or ()) - set(SUITES["fewclue"]))
    if unknown:
        raise ValueError(f"--tasks: {unknown[0]!r} is not a FewCLUE task ({', '.join(SUITES['fewclue'])})")
    out = Path(out)
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), _load()
    mlm = load_mlm(model) if method == "zeroshot" else None
    rows, skipped = [], []
    for name in SUITES["fewclue"]:
        if tasks and name not in tasks:
            continue
        task = get_task(name)
        folder = task_dir(Path(data_root), task)
        ks = [k for k in splits if folder is not None and (folder / f"train_{k}.json").is_file()
              and (folder / f"dev_{k}.json").is_file()]
        if not ks:
            skipped.append({"task": name, "reason": f"no train_k/dev_k splits under {data_root}"})
            continue
        if method in ("pet", "efl", "ptuning") and task.family != "classify":
            skipped.append({"task": name, "reason": f"{method.upper()} needs a fixed label set (per-example candidates)"})
            continue
        scores = []
        for k in ks:
            if method == "zeroshot":
                res = zeroshot(name, model, str(folder / f"dev_{k}.json"), None, cfg.template, calibration,
                               cfg.prompts, max_length=cfg.max_length, model=mlm)
            else:
                run_cfg = replace(cfg, method=method, train_file=f"train_{k}.json", dev_file=f"dev_{k}.json")
                res = finetune(name, folder, model, out / name / f"split{k}", run_cfg, show_progress=show_progress)
            scores.append(res["metric"][task.metric])
        rows.append({"task": name, "metric": task.metric, "mean": statistics.fmean(scores),
                     "std": statistics.pstdev(scores), "splits": dict(zip((f"dev_{k}" for k in ks), scores))})
    report = {"suite": "fewclue", "protocol": "train_k → dev_k", "method": method, "model": str(model),
              "calibration": calibration if method == "zeroshot" else None, "splits": list(splits), "tasks_run": tasks or "all",
              "tasks": rows, "skipped": skipped,
              "average": statistics.fmean(r["mean"] for r in rows) if rows else None,
              "config": {k: v for k, v in vars(cfg).items()},
              "run": {"wall_seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - cpu0, 2),
                      "load_average_start": load0, "load_average_end": _load(), "torch_threads": torch.get_num_threads()}}
    write_report(out, report, report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    how = report["method"] + (f" ({report['calibration']} calibration)" if report["calibration"] else "")
    lines = [f"# FewCLUE, {how}: {report['model']}", "",
             "Mean ± std over the official splits (train_k → dev_k).", "",
             "| task | metric | splits | mean ± std |", "|---|---|---|---|"]
    for r in report["tasks"]:
        lines.append(f"| {r['task']} | {r['metric']} | {len(r['splits'])} | {r['mean']:.2f} ± {r['std']:.2f} |")
    if report["average"] is not None:
        lines.append(f"| **average** | | | {report['average']:.2f} |")
    for s in report["skipped"]:
        lines.append(f"\nskipped {s['task']}: {s['reason']}")
    return "\n".join(lines) + "\n"
