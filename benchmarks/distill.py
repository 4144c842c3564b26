"""Task distillation: teacher vs distilled student vs the same student without a teacher, and latency.

    nice -n 10 python benchmarks/distill.py --out docs/results/distill_msra_ner.json
    python benchmarks/distill.py --teacher runs/ft/msra-ner --student nano --student-init runs/agnostic-nano/final

With the task-agnostic stage (issue 12: "task-agnostic + task distillation vs the same student
fine-tuned without a teacher")::

    python benchmarks/distill.py --teacher-init runs/teacher/final --corpus runs/corpus \
        --agnostic-steps 300 --agnostic-set distill.narrow_layers=slice --baseline pretrained

1. Teacher: a fine-tuned ``--teacher`` directory, or one fine-tuned here (``--teacher-init``: a
   pretrained directory, else a random encoder of ``--teacher-shape`` LxD) on the task.
2. Task-agnostic stage (``--agnostic-steps N`` > 0): ``clueforge distill`` of the pretrained MLM
   teacher (``--mlm-teacher``, default ``--teacher-init``) into ``--student`` on the shards
   ``--corpus`` for N steps (``--agnostic-set``: ``train.K=V`` / ``distill.K=V`` items); its
   ``final/`` is the student the task stage starts from. Run once, shared by the seeds.
3. For each seed: (a) ``distill_task`` into the student (a shipped student config initialised
   from the teacher, ``--student-init``, or the agnostic stage's student), then (b) plain
   fine-tuning without a teacher, same steps and hyper-parameters, from the start ``--baseline``
   names, recorded in the JSON: ``random`` (the student's shape at BERT's random initialisation,
   nothing from any teacher: the default), ``pretrained`` (the student's shape pretrained alone on
   ``--corpus`` for the agnostic stage's steps and settings: the no-teacher twin of stage 2) or
   ``same-start`` (run a's own starting weights, ``student-init/``: teacher-derived whenever run a
   started from the teacher, e.g. its sliced embeddings). Dev scores mean ± std over seeds.
3. Latency at batch 1, length 128, one thread (median of alternating rounds): teacher and student
   (PyTorch eager fp32, ONNX Runtime int8 of the student through the export path), and for the
   issue's shape target ``nano`` ONNX int8 against ``transformers`` ``mini`` fp32 (random weights:
   latency depends on the shape only).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BERT_VOCAB, SHARED, machine, timed, write_json  # noqa: E402

from clueforge.distill.task import distill_task  # noqa: E402
from clueforge.finetune.loop import FinetuneConfig, checkpoint_dir, finetune, load_finetuned  # noqa: E402
from clueforge.model.bert import BertForMLM, ModelConfig  # noqa: E402
from clueforge.model.hf import save_hf  # noqa: E402
from clueforge.utils import atomic_write  # noqa: E402

DATA_DIRS = {"msra-ner": "msra_ner", "kgclue": "kgclue", "ocnli": "ocnli"}
BASELINES = ("random", "pretrained", "same-start")
ARMS = ("distilled", "no_teacher")
_RANDOM = {"teacher_layers": None, "blocks": "random", "embeddings": "random"}  # init_from_teacher's init=random


def latency(models: dict, seq_len: int, repeats: int) -> dict[str, float]:
    """Median ms at batch 1, ``seq_len`` tokens (no padding), one thread, contenders alternating."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(672, 7992, (1, seq_len), generator=g)  # CJK characters of the Chinese BERT vocab
    ids[0, 0], ids[0, -1] = 101, 102
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    fns = {k: (lambda m=m: m(ids, mask, types)) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            timed(fn, 3)
        for _ in range(3):
            for k, fn in fns.items():
                times[k] += timed(fn, max(1, repeats // 3))
    return {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}


def onnx_int8(model, d: Path):
    from clueforge.deploy.export import write_onnx
    from clueforge.deploy.runtime import OnnxModel

    files, _ = write_onnx(model.eval(), d, int8=True)
    return OnnxModel(d / files["int8"], threads=1)


def shape_rows(seq_len: int, repeats: int) -> dict:
    """``nano`` ONNX int8 vs transformers ``mini`` fp32 (random weights, sequence head, 3 labels)."""
    import transformers

    from clueforge.distill.student import student_config
    from clueforge.model.heads import TaskModel
    from clueforge.pretrain.config import load_config

    mini = load_config("mini").model
    hc = transformers.BertConfig(vocab_size=21128, hidden_size=mini.hidden_size, num_hidden_layers=mini.num_layers,
                                 num_attention_heads=mini.num_heads, intermediate_size=mini.intermediate_size,
                                 max_position_embeddings=mini.max_position, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hc).eval()
    nano = TaskModel(student_config("nano", ModelConfig()), "sequence", 3).eval()
    tmp = Path(tempfile.mkdtemp())
    ms = latency({"transformers_mini_fp32": lambda i, m, t: hf(input_ids=i, attention_mask=m, token_type_ids=t),
                  "nano_fp32": nano, "nano_ort_int8": onnx_int8(nano, tmp / "nano")}, seq_len, repeats)
    ms["nano_int8_speedup_vs_transformers_mini_fp32"] = round(ms["transformers_mini_fp32"] / ms["nano_ort_int8"], 2)
    return ms


def train_teacher(args, task: str, data: Path, work: Path) -> Path:
    if args.teacher:
        return Path(args.teacher)
    init = Path(args.teacher_init) if args.teacher_init else None
    if init is None:
        L, D, H = (int(x) for x in args.teacher_shape.lower().split("x"))
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=21128, hidden_size=D, num_layers=L, num_heads=H,
                          intermediate_size=4 * D, max_position=max(128, args.max_length))
        init = save_hf(BertForMLM(cfg), work / "teacher-init", vocab=BERT_VOCAB)
    cfg = FinetuneConfig(epochs=1, max_steps=args.teacher_steps, max_train=args.teacher_steps * args.batch_size,
                         max_eval=args.max_eval, max_length=args.max_length, lr=args.teacher_lr,
                         batch_size=args.batch_size, warmup_ratio=0.06)
    finetune(task, data, init, work / "teacher", cfg, show_progress=False)
    return work / "teacher"


def mean_std(xs: list[float]) -> dict:
    return {"mean": round(statistics.mean(xs), 2), "std": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0,
            "runs": [round(x, 2) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="msra-ner", choices=sorted(DATA_DIRS))
    ap.add_argument("--data", default=None, help="The task's folder (default: ../shared/data/tasks/...).")
    ap.add_argument("--teacher", default=None, help="A fine-tuned teacher directory (skips training one).")
    ap.add_argument("--teacher-init", default=None, help="A pretrained directory to fine-tune as the teacher.")
    ap.add_argument("--teacher-shape", default="4x256x4",
                    help="LAYERSxHIDDENxHEADS of a random teacher encoder (feed-forward 4 × hidden).")
    ap.add_argument("--teacher-steps", type=int, default=150)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--student", default="pico", help="Student config (mini/micro/nano/pico/YAML) or directory.")
    ap.add_argument("--student-init", default=None, help="A task-agnostically distilled student directory.")
    ap.add_argument("--corpus", default=None, help="Pretraining shards of the task-agnostic stage (and baseline).")
    ap.add_argument("--agnostic-steps", type=int, default=0, help="Task-agnostic distillation steps (0: no stage).")
    ap.add_argument("--agnostic-set", action="append", default=[],
                    help="train.K=V / distill.K=V items of the task-agnostic stage (and of the pretrained baseline).")
    ap.add_argument("--mlm-teacher", default=None, help="The pretrained MLM the agnostic stage distils "
                    "(default: --teacher-init).")
    ap.add_argument("--baseline", choices=BASELINES, default="random",
                    help="What the no-teacher student starts from (see the module docstring).")
    ap.add_argument("--student-steps", type=int, default=100)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-eval", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="distill_set", action="append", default=[],
                    help="Task distillation settings (TaskDistillConfig), e.g. temperature=2.")
    ap.add_argument("--jobs", type=int, default=1, help="Runs (arm × seed) in parallel processes.")
    ap.add_argument("--latency-repeats", type=int, default=30)
    ap.add_argument("--work", default=None, help="Working directory (default: a temporary one).")
    ap.add_argument("--reuse", action="store_true",
                    help="Take a run already finished under --work with the same settings (its arm.json) "
                         "instead of running it again; the JSON marks it reused.")
    ap.add_argument("--out", default="bench-out/distill.json")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    task = args.task
    data = Path(args.data) if args.data else SHARED / "tasks" / DATA_DIRS[task]
    work = Path(args.work or tempfile.mkdtemp(prefix="clueforge-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = train_teacher(args, task, data, work)
    teacher_res = json.loads((checkpoint_dir(teacher).parent / "results.json").read_text())
    metric = teacher_res["main_metric"]
    if teacher_res["hyperparameters"].get("max_eval") != args.max_eval:  # else the scores are on other sentences
        raise SystemExit(f"the teacher was scored on max_eval={teacher_res['hyperparameters'].get('max_eval')} dev "
                         f"examples, the students would be on --max-eval {args.max_eval}: give the same number")
    t_teacher = time.perf_counter() - t0 if not args.teacher else teacher_res["seconds"]
    print(f"teacher {metric} {teacher_res['metric'][metric]:.2f} ({t_teacher:.0f} s)", flush=True)

    student = args.student_init or args.student
    agnostic, alone = None, None
    if args.agnostic_steps:
        student, agnostic = agnostic_stage(args, work)
        print(f"task-agnostic student {student}: held-out loss {agnostic['summary'].get('eval_fixed_loss')}",
              flush=True)
    if args.baseline == "pretrained":
        alone = pretrained_baseline(args, work)
    common = [f"max_steps={args.student_steps}", "epochs=1", f"max_train={args.student_steps * args.batch_size}",
              f"max_eval={args.max_eval}", f"max_length={args.max_length}", f"lr={args.student_lr}",
              f"batch_size={args.batch_size}", "warmup_ratio=0.06"]
    distill_set = ["soft_weight=1", "hard_weight=1", "temperature=2", *args.distill_set]
    t1 = time.perf_counter()
    job = (task, str(teacher), str(student), str(data), str(work), common, distill_set, args.baseline,
           alone["dir"] if alone else None, args.reuse)
    done = run_arms(job, args.seeds, args.jobs, args.baseline == "same-start")
    runs = {arm: [done[arm, seed][0][metric] for seed in args.seeds] for arm in ARMS}
    for seed in args.seeds:
        print(f"seed {seed}: distilled {done['distilled', seed][0][metric]:.2f}, "
              f"no teacher {done['no_teacher', seed][0][metric]:.2f} "
              f"({done['distilled', seed][1] + done['no_teacher', seed][1]:.0f} CPU s)", flush=True)
    t_students = time.perf_counter() - t1

    _, _, _, t_model, _ = load_finetuned(teacher, task)
    _, _, _, s_model, _ = load_finetuned(run_dir(work, "distilled", args.seeds[0], args.baseline), task)
    lat = latency({"teacher_fp32": t_model.eval(), "student_fp32": s_model.eval(),
                   "student_ort_int8": onnx_int8(s_model, work / "student-onnx")}, 128, args.latency_repeats)
    lat["student_fp32_speedup"] = round(lat["teacher_fp32"] / lat["student_fp32"], 2)
    lat["student_int8_speedup"] = round(lat["teacher_fp32"] / lat["student_ort_int8"], 2)
    shapes = shape_rows(128, args.latency_repeats)

    teacher_score = teacher_res["metric"][metric]
    distilled, no_teacher = mean_std(runs["distilled"]), mean_std(runs["no_teacher"])
    paired = mean_std([a - b for a, b in zip(runs["distilled"], runs["no_teacher"])])  # same seed: data order
    out = {
        "benchmark": "task_distillation", "task": task, "metric": metric, "data": str(data),
        "teacher": {"dir": str(teacher), "score": round(teacher_score, 2), "config": t_model.cfg.__dict__,
                    "steps": teacher_res["steps"], "train_examples": teacher_res["train_examples"]},
        "student": {"spec": str(student), "config": s_model.cfg.__dict__,
                    "init": done["distilled", args.seeds[0]][2]["distilled_init"]},
        "agnostic_stage": agnostic,
        "baseline": {"start": args.baseline, "dir_seed0": done["no_teacher", args.seeds[0]][2]["baseline_dir"],
                     "teacher_derived": (args.baseline == "same-start"
                                         and done["distilled", args.seeds[0]][2]["distilled_init"] != _RANDOM),
                     "pretrained_alone": alone},
        "seeds": args.seeds, "settings": {"common": common, "distill": distill_set},
        "reused_runs": [r[2]["dir"] for r in done.values() if r[2].get("reused")],
        "distilled": distilled, "no_teacher": no_teacher,
        "paired_difference": paired,
        "student_share_of_teacher": round(distilled["mean"] / teacher_score, 3) if teacher_score else None,
        "no_teacher_share_of_teacher": round(no_teacher["mean"] / teacher_score, 3) if teacher_score else None,
        "latency_ms_batch1_len128_1thread": lat, "shape_latency_ms": shapes,
        "seconds": {"teacher_wall": round(t_teacher), "students_wall": round(t_students),
                    "students_cpu": {arm: round(sum(done[arm, s][1] for s in args.seeds)) for arm in ARMS},
                    "this_run_wall": round(time.perf_counter() - t0)},
        "machine": machine(),
    }
    write_json(args.out, out)


def run_arms(job: tuple, seeds: list[int], jobs: int, ordered: bool) -> dict:
    """Every (arm, seed) run, in ``jobs`` parallel processes (each single-threaded: the same CPU
    time, less wall time), or in this process one after the other (``jobs`` 1: the distilled run of
    a seed, then its no-teacher run). ``ordered`` (``--baseline same-start``): a no-teacher run
    starts from its distilled run's ``student-init/``, so it waits for it. Returns
    ``{(arm, seed): run_arm's result}``."""
    if jobs <= 1:
        return {(arm, seed): run_arm(job, arm, seed) for seed in seeds for arm in ARMS}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = {pool.submit(run_arm, job, "distilled", seed): ("distilled", seed) for seed in seeds}
        if ordered:
            for f in as_completed(list(futs)):
                f.result()
                seed = futs[f][1]
                futs[pool.submit(run_arm, job, "no_teacher", seed)] = ("no_teacher", seed)
        else:  # queued behind the (longer) distilled runs
            futs.update({pool.submit(run_arm, job, "no_teacher", seed): ("no_teacher", seed) for seed in seeds})
        return {key: f.result() for f, key in futs.items()}


def fingerprint(path: str | Path | None) -> str | None:
    """SHA-256 over a model directory's weights, config and vocabulary (a directory's ``best/`` or
    ``final/`` is what loads; both are hashed when present); None for a config name or nothing.
    ``--reuse`` compares it, so a teacher retrained into the same folder is a different teacher."""
    import hashlib

    if path is None or not Path(path).is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and (f.suffix in (".safetensors", ".onnx") or f.name in ("config.json", "vocab.txt")):
            digest.update(str(f.relative_to(path)).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def run_dir(work: str | Path, arm: str, seed: int, baseline: str) -> Path:
    """Where one run writes: ``distilled/seedS``, ``no_teacher-BASELINE/seedS`` (one folder per
    baseline start, so runs with different baselines can share ``--work`` and its distilled runs)."""
    return Path(work) / (f"{arm}/seed{seed}" if arm == "distilled" else f"{arm}-{baseline}/seed{seed}")


def run_arm(job: tuple, arm: str, seed: int) -> tuple[dict, float, dict]:
    """One seed of one arm: ``distilled`` (``distill_task`` into the student) or ``no_teacher``
    (plain fine-tuning from the ``baseline`` start, same settings). Returns the dev metrics, the
    CPU seconds spent and where it started; also written to the run's ``arm.json``, which
    ``--reuse`` takes instead of running again when its settings are this job's."""
    task, teacher, student, data, work, common, distill_set, baseline, alone, reuse = job
    out = run_dir(work, arm, seed, baseline)
    # every arm starts from something the teacher decides (its vocabulary, its sliced embeddings, or the
    # distilled run's start): the teacher's content, not only its path, is part of each run's settings
    settings = {"task": task, "student": student, "data": data, "common": common, "seed": seed,
                "teacher": teacher, "teacher_content": fingerprint(teacher), "student_content": fingerprint(student),
                **({"distill": distill_set} if arm == "distilled" else
                   {"baseline": baseline, "pretrained_alone": alone, "alone_content": fingerprint(alone),
                    **({"distill": distill_set} if baseline == "same-start" else {})})}
    if reuse and (out / "arm.json").is_file():
        done = json.loads((out / "arm.json").read_text())
        if done["settings"] == settings:
            print(f"{arm} seed {seed}: reusing {out}", flush=True)
            return done["metric"], done["cpu_s"], {**done["info"], "dir": str(out), "reused": True}
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {arm} seed {seed}: %(message)s", force=True)
    torch.set_num_threads(1)
    cpu = time.process_time()
    if arm == "distilled":
        a = distill_task(task, teacher, student, data, out, common + distill_set, seed=seed, show_progress=False)
        metric, info = a["metric"], {"distilled_init": a["distillation"]["student_init"]}
    else:
        start = {"same-start": run_dir(work, "distilled", seed, baseline) / "student-init",
                 "pretrained": alone}.get(baseline)
        if baseline == "random":
            start = random_student(student, teacher, Path(work) / f"baseline-random/seed{seed}", seed)
        metric = finetune(task, data, start, out, _finetune_cfg(common, seed), show_progress=False)["metric"]
        info = {"baseline_dir": str(start)}
    info["dir"] = str(out)
    cpu = time.process_time() - cpu
    atomic_write(out / "arm.json", json.dumps({"settings": settings, "metric": metric, "cpu_s": cpu, "info": info},
                                              indent=2, ensure_ascii=False))
    return metric, cpu, info


def random_student(student: str, teacher: str, out: Path, seed: int) -> Path:
    """The student's shape at BERT's random initialisation (torch seed ``seed``), nothing from a
    teacher, in the HF layout with the teacher's vocabulary."""
    from clueforge.distill.student import resolve_student, student_config
    from clueforge.model.hf import read_hf_config
    from clueforge.text.tokenizer import resolve_vocab

    vocab = resolve_vocab(checkpoint_dir(teacher))
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    path, kind = resolve_student(student)
    cfg = read_hf_config(path)[0] if kind == "model" else student_config(path, ModelConfig(vocab_size=n))
    torch.manual_seed(seed)
    return save_hf(BertForMLM(cfg), out, vocab=vocab)


def agnostic_stage(args, work: Path) -> tuple[Path, dict]:
    """``clueforge distill`` of the pretrained MLM teacher into ``--student`` on ``--corpus``."""
    from clueforge.distill.agnostic import distill, load_distill_config

    mlm = args.mlm_teacher or args.teacher_init
    if not (mlm and args.corpus):
        raise SystemExit("--agnostic-steps needs --corpus and a pretrained MLM teacher "
                         "(--mlm-teacher or --teacher-init)")
    cfg = load_distill_config(mlm, args.student, [f"train.max_steps={args.agnostic_steps}", *args.agnostic_set])
    summary = distill(cfg, args.corpus, work / "agnostic", show_progress=False)
    return work / "agnostic" / "final", {"teacher": str(mlm), "corpus": str(args.corpus),
                                         "steps": args.agnostic_steps, "settings": args.agnostic_set,
                                         "distill": cfg.distill.__dict__, "summary": summary}


def pretrained_baseline(args, work: Path) -> dict:
    """The no-teacher twin of the agnostic stage: the student's shape pretrained alone, same steps
    and ``train.``/``model.`` settings (the ``distill.`` ones do not apply)."""
    from clueforge.distill.student import resolve_student
    from clueforge.pretrain.config import load_config
    from clueforge.pretrain.loop import pretrain

    if not (args.corpus and args.agnostic_steps):
        raise SystemExit("--baseline pretrained needs --corpus and --agnostic-steps (its steps and settings)")
    path, kind = resolve_student(args.student)
    if kind == "model":
        raise SystemExit(f"--baseline pretrained needs a student config (a shape), not the directory {path}")
    items = [f"train.max_steps={args.agnostic_steps}"] + [x for x in args.agnostic_set if not x.startswith("distill.")]
    summary = pretrain(load_config(path, items), args.corpus, work / "alone", show_progress=False)
    return {"dir": str(work / "alone" / "final"), "settings": items, "summary": summary}


def _finetune_cfg(items: list[str], seed: int) -> FinetuneConfig:
    from clueforge.distill.task import split_overrides

    return split_overrides(items, seed)[0]


if __name__ == "__main__":
    main()
