"""Run a named suite of tasks over several seeds and report mean ± std beside published numbers.

Suites: ``clue1.1``, ``fewclue`` and ``all-local`` (every task with data in ``../shared/data/tasks``:
OCNLI, C3, DRCD, KgCLUE, MSRA-NER and the nine FewCLUE tasks). Tasks whose data is missing are
listed as skipped, never silently dropped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from clueforge.finetune.loop import FinetuneConfig, finetune
from clueforge.tasks.registry import SUITES, get_task
from clueforge.tasks.submit import task_dir
from clueforge.utils import atomic_write

# Published dev numbers (ANCHORS.md): BERT-base-chinese on CLUE 1.1 dev; PET on FewCLUE
# (RoBERTa-wwm-ext, test_public); KgCLUE RoBERTa-wwm-ext 3-layer baseline (online score).
ANCHORS = {
    "afqmc": ("BERT-base", 74.63), "tnews": ("BERT-base", 57.13), "iflytek": ("BERT-base", 61.29),
    "cmnli": ("BERT-base", 80.97), "ocnli": ("BERT-base", 75.22), "cluewsc2020": ("BERT-base", 81.91),
    "csl": ("BERT-base", 81.90), "cmrc2018": ("BERT-base EM", 65.30), "chid": ("BERT-base", 82.01),
    "c3": ("BERT-base", 65.38), "fewclue-eprstmt": ("PET", 86.7), "fewclue-csldcp": ("PET", 51.7),
    "fewclue-tnews": ("PET", 54.5), "fewclue-iflytek": ("PET", 46.0), "fewclue-ocnli": ("PET", 44.0),
    "fewclue-bustm": ("PET", 56.0), "fewclue-csl": ("PET", 59.4), "fewclue-chid": ("PET", 61.2),
    "fewclue-cluewsc": ("PET", 57.5), "kgclue": ("RoBERTa-wwm-ext 3L", 83.9),
}
LOCAL = {  # task → (train file, dev file) overrides for the data in ../shared/data/tasks
    "drcd": ("dev.json", "test.json"),
}
SUITES = {**SUITES, "all-local": ("ocnli", "c3", "drcd", "kgclue", "msra-ner") + SUITES["fewclue"]}


def run_suite(suite: str, model: str | Path, data_root: str | Path, out: str | Path, seeds: int = 3,
              cfg: FinetuneConfig = FinetuneConfig(), show_progress: bool = True) -> dict:
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    out = Path(out)
    rows, skipped = [], []
    for name in SUITES[suite]:
        task = get_task(name)
        folder = task_dir(Path(data_root), task)
        train, dev = LOCAL.get(name, (None, None))
        if folder is None or not (folder / (train or task.files["train"].split(",")[0])).is_file():
            skipped.append({"task": name, "reason": f"no training data under {data_root}"})
            continue
        scores, all_metrics = [], []
        for seed in range(seeds):
            run_cfg = replace(cfg, seed=cfg.seed + seed, train_file=train or cfg.train_file, dev_file=dev or cfg.dev_file)
            run_dir = out / name / f"seed{seed}"
            res = _finished(run_dir, model, run_cfg)  # re-running a suite finishes only what is missing
            if res is None:
                res = finetune(name, folder, model, run_dir, run_cfg, show_progress=show_progress)
            scores.append(res["metric"][task.metric])
            all_metrics.append(res["metric"])
        anchor = ANCHORS.get(name)
        rows.append({"task": name, "metric": task.metric, "mean": statistics.fmean(scores),
                     "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0, "seeds": scores,
                     "anchor": {"model": anchor[0], "value": anchor[1]} if anchor else None,
                     "per_seed_metrics": all_metrics})
    report = {"suite": suite, "model": str(model), "seeds": seeds, "tasks": rows, "skipped": skipped,
              "average": statistics.fmean(r["mean"] for r in rows) if rows else None,
              "config": {k: v for k, v in vars(cfg).items()}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write(out / "report.md", report_markdown(report))
    return report


def _finished(run_dir: Path, model, cfg: FinetuneConfig) -> dict | None:
    """The results of an earlier identical run in ``run_dir``, if it completed."""
    f = run_dir / "results.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    same = res.get("model") == str(model) and all(res["hyperparameters"].get(k) == v for k, v in vars(cfg).items()
                                                   if v is not None and k in res["hyperparameters"])
    return res if same else None


def report_markdown(report: dict) -> str:
    lines = [f"# {report['suite']}: {report['model']}", "",
             f"{report['seeds']} seed(s); mean ± std of each task's dev metric.", "",
             "| task | metric | clueforge | published | |", "|---|---|---|---|---|"]
    for r in report["tasks"]:
        a = r["anchor"]
        lines.append(f"| {r['task']} | {r['metric']} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{a['value'] if a else '—'} | {a['model'] if a else ''} |")
    if report["average"] is not None:
        lines.append(f"| **average** | | {report['average']:.2f} | | |")
    for s in report["skipped"]:
        lines.append(f"\nskipped {s['task']}: {s['reason']}")
    return "\n".join(lines) + "\n"
