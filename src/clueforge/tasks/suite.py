"""Run a named suite of tasks over several seeds and report mean ± std beside published numbers.

Suites: ``clue1.1``, ``fewclue`` and ``all-local`` (every task with data in ``../shared/data/tasks``:
OCNLI, C3, DRCD, KgCLUE, MSRA-NER and the nine FewCLUE tasks). Tasks whose data is missing are
listed as skipped, never silently dropped.

Every published figure beside a clueforge figure carries its model, method and split
(``Published``), and the report names the method clueforge's own figures come from (plain
fine-tuning, plus any trick switched on): FewCLUE rows show the published plain fine-tuning
baseline first and PET second, never PET alone beside a fine-tuned number.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from clueforge.finetune.loop import FinetuneConfig, finetune
from clueforge.tasks.registry import SUITES, get_task, resolve_file
from clueforge.tasks.submit import task_dir
from clueforge.utils import atomic_write


@dataclass(frozen=True)
class Published:
    """A published figure and what produced it: never shown without its model, method and split."""
    value: float
    metric: str
    model: str
    method: str
    split: str

    def label(self) -> str:
        return f"{self.metric} {self.value:g} ({self.model} · {self.method} · {self.split})"


def _clue(value: float, metric: str = "accuracy") -> tuple[Published, ...]:
    # PaddleNLP's grid-searched CLUE 1.1 dev table, reproduced in CLUE's baselines README.
    return (Published(value, metric, "BERT-base-chinese", "fine-tuning", "CLUE 1.1 dev"),)


def _few(finetuned: float, pet: float) -> tuple[Published, ...]:
    # FewCLUE README/paper, RoBERTa-wwm-ext on test_public: plain fine-tuning (the method clueforge
    # runs) first, then PET (cloze prompts), a different method.
    return (Published(finetuned, "accuracy", "RoBERTa-wwm-ext", "fine-tuning", "FewCLUE test_public"),
            Published(pet, "accuracy", "RoBERTa-wwm-ext", "PET", "FewCLUE test_public"))


ANCHORS: dict[str, tuple[Published, ...]] = {  # sources: ../shared/docs/ANCHORS.md
    "afqmc": _clue(74.63), "tnews": _clue(57.13), "iflytek": _clue(61.29), "cmnli": _clue(80.97),
    "ocnli": _clue(75.22), "cluewsc2020": _clue(81.91), "csl": _clue(81.90), "chid": _clue(82.01), "c3": _clue(65.38),
    "cmrc2018": _clue(65.30, "em") + _clue(86.53, "f1"),
    "fewclue-eprstmt": _few(61.9, 86.7), "fewclue-csldcp": _few(25.6, 51.7), "fewclue-tnews": _few(40.5, 54.5),
    "fewclue-iflytek": _few(22.6, 46.0), "fewclue-ocnli": _few(33.6, 44.0), "fewclue-bustm": _few(54.1, 56.0),
    "fewclue-csl": _few(50.5, 59.4), "fewclue-chid": _few(15.0, 61.2), "fewclue-cluewsc": _few(50.3, 57.5),
    "kgclue": tuple(Published(v, m, "RoBERTa-wwm-ext 3L", "KgCLUE baseline (NER + relation matching)",
                              "KgCLUE online test") for m, v in (("score", 83.9), ("em", 83.0), ("f1", 84.9))),
}


def method_of(cfg: FinetuneConfig) -> str:
    """What produced clueforge's figures: plain fine-tuning plus the tricks switched on."""
    tricks = [name for name, on in (("R-Drop", cfg.rdrop > 0), ("FGM", cfg.fgm > 0), ("EMA", cfg.ema > 0),
                                    ("LLRD", cfg.llrd != 1.0)) if on]
    return "fine-tuning" + "".join(f" + {t}" for t in tricks)


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
        if folder is None or not resolve_file(task, folder / (train or task.files["train"].split(",")[0])).is_file():
            skipped.append({"task": name, "reason": f"no training data under {data_root}"})
            continue
        all_metrics = []
        for seed in range(seeds):
            run_cfg = replace(cfg, seed=cfg.seed + seed, train_file=train or cfg.train_file, dev_file=dev or cfg.dev_file)
            run_dir = out / name / f"seed{seed}"
            res = _finished(run_dir, model, run_cfg, task.metric)  # re-running finishes only what is missing
            if res is None:
                res = finetune(name, folder, model, run_dir, run_cfg, show_progress=show_progress)
            all_metrics.append(res["metric"])
        rows.append(task_row(name, all_metrics, method_of(cfg)))
    report = {"suite": suite, "model": str(model), "seeds": seeds, "method": method_of(cfg), "tasks": rows,
              "skipped": skipped,
              "average": statistics.fmean(r["mean"] for r in rows) if rows else None,
              "config": {k: v for k, v in vars(cfg).items()}}
    write_report(out, report, report_markdown(report))
    return report


def write_report(out: Path, report: dict, markdown: str) -> None:
    """``out/report.json`` and ``out/report.md``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write(out / "report.md", markdown)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def task_row(name: str, per_seed_metrics: list[dict], method: str) -> dict:
    """One task's report row: the headline metric over seeds, the other metrics beside it, and the
    published figures, each labelled with its model, method and split."""
    task = get_task(name)
    scores = [m[task.metric] for m in per_seed_metrics]
    mean, std = _mean_std(scores)
    also = {k: dict(zip(("mean", "std"), _mean_std([m[k] for m in per_seed_metrics])))
            for k in task.also if all(k in m for m in per_seed_metrics)}
    return {"task": name, "metric": task.metric, "method": method, "mean": mean, "std": std, "seeds": scores,
            "also": also, "published": [vars(p) for p in ANCHORS.get(name, ())],
            "per_seed_metrics": per_seed_metrics}


def _finished(run_dir: Path, model, cfg: FinetuneConfig, metric: str) -> dict | None:
    """The results of an earlier identical run in ``run_dir``, if it completed and has ``metric``
    (a run scored before a metric changed is run again)."""
    f = run_dir / "results.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    if metric not in res.get("metric", {}):
        return None
    same = res.get("model") == str(model) and all(res["hyperparameters"].get(k) == v for k, v in vars(cfg).items()
                                                   if v is not None and k in res["hyperparameters"])
    return res if same else None


def report_markdown(report: dict) -> str:
    method = report.get("method", "fine-tuning")
    lines = [f"# {report['suite']}: {report['model']}", "",
             f"{report['seeds']} seed(s); mean ± std of each task's dev metric (the leaderboard's headline "
             f"metric, others beside it). clueforge's figures come from **{method}**; each published figure "
             "names its model, method and split: one from another method or split is not a like-for-like "
             "comparison.", "",
             "| task | metric | clueforge | method | also | published (model · method · split) |",
             "|---|---|---|---|---|---|"]
    for r in report["tasks"]:
        also = ", ".join(f"{k} {v['mean']:.2f} ± {v['std']:.2f}" for k, v in r.get("also", {}).items())
        published = "; ".join(Published(**p).label() for p in r.get("published", [])) or "—"
        lines.append(f"| {r['task']} | {r['metric']} | {r['mean']:.2f} ± {r['std']:.2f} | {r.get('method', method)} | "
                     f"{also} | {published} |")
    if report["average"] is not None:
        lines.append(f"| **average** | | {report['average']:.2f} | | | |")
    for s in report["skipped"]:
        lines.append(f"\nskipped {s['task']}: {s['reason']}")
    return "\n".join(lines) + "\n"
