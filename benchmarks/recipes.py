"""Which pretraining components help? The same model, the same number of MLM tokens, then a fixed
quick fine-tuning suite with several seeds.

    python benchmarks/recipes.py --out bench-out/recipes.json                       # CPU budget
    python benchmarks/recipes.py --config mini --steps 20000 --finetune-steps 0 --out bench-out/recipes-gpu.json

Recipes: (a) token masking 15 % (what transformers' run_mlm does), (b) whole-word masking, (c) the
full knowledge recipe of ``configs/knowledge.yaml``, (d) the full recipe minus one component at a
time (curriculum, mixed masking strategies, structure objectives, knowledge objectives,
self-distillation), (e) whole-word masking with one architecture option of issue 14 on (attention
residual, POS embeddings, syntax heads; ``ARCH_RECIPES``, model settings). Every recipe trains for ``--steps`` optimizer steps of the same MLM batch
(same MLM tokens); the auxiliary objectives of (c)/(d) add their own small batches on top, which
the table reports as extra tokens.

Every recipe is pretrained with ``--pretrain-seeds`` seeds and scored on the held-out rows twice:
under one fixed protocol (token masking 15 %, fixed masking seed, the same 640 rows in batches of 32 for every recipe:
``eval_fixed_loss``/``eval_fixed_mlm_acc``, the comparable column, mean ± std over the seeds) and
under the recipe's own final masking (``eval_own_loss``, not comparable across recipes). The first
seed's model is fine-tuned on OCNLI, FewCLUE EPRSTMT/TNEWS/BUSTM and C3 dev with ``--seeds``
fine-tuning seeds; the table gives mean ± std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BERT_VOCAB, CORPUS, SHARED, machine  # noqa: E402

EVAL_PROTOCOL = ("eval_fixed_*: token masking 15 % (80/10/10), masking seed 0, the first 640 held-out rows in "
                 "batches of 32 for every recipe and batch size; eval_own_*: the recipe's final masking")

TASKS = ("ocnli", "fewclue-eprstmt", "fewclue-tnews", "fewclue-bustm", "c3")
FULL_KEYS = ("masking_weights", "curriculum", "structure_weights", "knowledge_weights", "knowledge_triples",
             "self_distill_instance", "self_distill_layers", "self_distill_layer_weight", "structure_batch_size",
             "knowledge_batch_size")
MIXED_MASKING = {"wwm": 0.4, "entity": 0.2, "span": 0.2, "discourse": 0.1, "corrective": 0.1}
"""The fixed strategy mix of "full - curriculum" (the curriculum sets the mix of the full recipe)."""
ABLATIONS = {
    "full - curriculum": ["curriculum"],
    "full - mixed masking": ["masking_weights", "curriculum"],
    "full - structure": ["structure_weights"],
    "full - knowledge": ["knowledge_weights"],
    "full - self-distillation": ["self_distill_instance", "self_distill_layers"],
}

ARCH_RECIPES = {  # wwm 15 % + one ModelConfig option (keys "model.*" are model settings)
    "wwm + attn residual 0.5": {"masking": "wwm", "model.attn_residual_decay": 0.5},
    "wwm + POS embeddings": {"masking": "wwm", "model.pos_embeddings": True},
    "wwm + syntax heads chunk 2/4": {"masking": "wwm", "model.syntax_heads": 2, "model.syntax_constraint": "chunk"},
    "wwm + syntax heads distance 2/4": {"masking": "wwm", "model.syntax_heads": 2,
                                        "model.syntax_constraint": "distance"},
}


def recipes(full_train: dict) -> dict[str, dict]:
    full = {k: full_train[k] for k in FULL_KEYS if k in full_train}
    out = {"token 15%": {"masking": "token"}, "wwm 15%": {"masking": "wwm"}, "full": dict(full)}
    for name, drop in ABLATIONS.items():
        out[name] = {k: v for k, v in full.items() if k not in drop}
    out["full - curriculum"].setdefault("masking_weights", MIXED_MASKING)
    out.update(ARCH_RECIPES)
    out["wwm 15% + AR-MLM k=2"] = {"masking": "wwm", "ar_mlm_groups": 2}  # issue 14 point 4: against "wwm 15%"
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "seeds": values}


def build_knowledge_corpus(out: Path, docs: int) -> Path:
    from clueforge.corpus.build import BuildConfig, build_corpus

    kg = SHARED / "kg"
    src = out / "head.jsonl"
    with open(CORPUS, "rb") as fh, open(src, "wb") as w:
        for _, line in zip(range(docs), fh):
            w.write(line)
    cfg = BuildConfig(vocab=str(BERT_VOCAB), entities=(str(kg / "msra_entities.tsv"), str(kg / "medical_entities")),
                      triples=(str(kg / "kgclue_triples.tsv"),))
    build_corpus([src], out / "corpus", cfg, workers=2)
    return out / "corpus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="model size: a shipped config (tiny, mini, base)")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per recipe")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--docs", type=int, default=30000, help="corpus documents (knowledge corpus built if --data absent)")
    ap.add_argument("--data", default=None, help="a corpus built with knowledge files")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds")
    ap.add_argument("--pretrain-seeds", type=int, default=3, help="pretraining seeds per recipe (held-out loss spread)")
    ap.add_argument("--finetune-steps", type=int, default=30, help="cap per task (0 = the task's full schedule)")
    ap.add_argument("--max-eval", type=int, default=200)
    ap.add_argument("--only", nargs="*", help="run only these recipes")
    ap.add_argument("--work", default=None, help="working directory (pretraining runs resume there)")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), help="fine-tuning tasks (default: all five)")
    ap.add_argument("--out", default="bench-out/recipes.json")
    args = ap.parse_args()
    if not (CORPUS.is_file() and BERT_VOCAB.is_file()):
        sys.exit("needs ../shared/data (corpus, vocab, kg, tasks)")

    import yaml

    from clueforge.finetune.loop import FinetuneConfig, finetune
    from clueforge.pretrain.config import CONFIG_DIR, load_config
    from clueforge.pretrain.loop import pretrain
    from clueforge.tasks.registry import get_task
    from clueforge.tasks.submit import task_dir

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cf-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else build_knowledge_corpus(work, args.docs)
    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    done = {r["recipe"]: r for r in old.get("rows", []) if "eval_fixed_loss" in r
            } if old.get("eval_protocol") == EVAL_PROTOCOL else {}  # rows of an older protocol are re-run
    full_train = yaml.safe_load((CONFIG_DIR / "knowledge.yaml").read_text())["train"]
    full_train["knowledge_triples"] = str(SHARED / "kg" / "kgclue_triples.tsv")
    small = {"structure_batch_size": 4, "knowledge_batch_size": 4}
    rows = []
    todo = recipes(full_train)
    order = [n for n in args.only if n in todo] if args.only else list(todo)  # --only also sets the order
    for name, extra in ((n, todo[n]) for n in order):
        if name in done:  # results are written after every recipe; a re-run finishes the rest
            rows.append(done[name])
            continue
        overrides = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                     f"train.seq_len={args.seq_len}", "train.eval_every=0", "train.log_every=10",
                     f"train.save_every={args.steps}", "train.eval_batches=10", "train.warmup_steps=30"]
        for k, v in extra.items():
            if k in small:
                v = small[k]
            overrides.append(f"{k if k.startswith('model.') else 'train.' + k}={json.dumps(v, ensure_ascii=False)}")
        evals, summary, metrics = [], None, []
        for pseed in range(args.pretrain_seeds):
            cfg = load_config(args.config, overrides + [f"train.seed={pseed}"])
            run = work / name.replace(" ", "_").replace("%", "") / f"seed{pseed}"
            s = pretrain(cfg, data, run, show_progress=False)
            summary = summary or s  # the first seed's model is fine-tuned
            m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            metrics = metrics or m
            evals.append(next(r for r in reversed(m) if "eval_loss" in r))  # also when the run was already done
        run = work / name.replace(" ", "_").replace("%", "") / "seed0"
        mlm_tokens = args.steps * args.batch_size * args.seq_len
        row = {"recipe": name,
               "eval_fixed_loss": spread([e["eval_fixed_loss"] for e in evals]),
               "eval_fixed_mlm_acc": spread([e["eval_fixed_mlm_acc"] for e in evals]),
               "eval_own_loss": spread([e["eval_loss"] for e in evals]),
               "eval_own_mlm_acc": spread([e["eval_mlm_acc"] for e in evals]),
               "tokens_incl_aux": metrics[-1]["tokens"], "mlm_token_budget": mlm_tokens, "tasks": {}}
        for task_name in args.tasks:
            task = get_task(task_name)
            folder = task_dir(SHARED / "tasks", task)
            scores = []
            for seed in range(args.seeds):
                fcfg = FinetuneConfig(seed=seed, max_steps=args.finetune_steps or None, max_eval=args.max_eval,
                                      max_length=128, batch_size=16)
                res = finetune(task_name, folder, summary["final"], run / "ft" / task_name / f"seed{seed}", fcfg,
                               show_progress=False)
                scores.append(res["metric"][task.metric])
            row["tasks"][task_name] = {"mean": statistics.fmean(scores),
                                       "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0, "seeds": scores}
        row["average"] = statistics.fmean(v["mean"] for v in row["tasks"].values())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tasks"}, ensure_ascii=False), flush=True)
        _write(out_path, args, rows)
    _write(out_path, args, rows)
    print(markdown(rows))


def _write(out_path: Path, args, rows: list[dict]) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"benchmark": "recipes", "config": args.config, "steps": args.steps,
                          "batch_size": args.batch_size, "seq_len": args.seq_len, "seeds": args.seeds,
                          "pretrain_seeds": args.pretrain_seeds,
                          "eval_protocol": EVAL_PROTOCOL,
                          "finetune_steps": args.finetune_steps, "rows": rows, "machine": machine()},
                               indent=2, ensure_ascii=False))


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | held-out MLM loss, fixed protocol | own masking | " + " | ".join(TASKS) + " | average |",
             "|---|---:|---:|" + "---:|" * (len(TASKS) + 1)]
    for r in rows:
        cells = [f"{r['tasks'][t]['mean']:.1f} ± {r['tasks'][t]['std']:.1f}" if t in r["tasks"] else "–" for t in TASKS]
        fixed, own = r["eval_fixed_loss"], r["eval_own_loss"]
        lines.append(f"| {r['recipe']} | {fixed['mean']:.3f} ± {fixed['std']:.3f} | {own['mean']:.3f} | "
                     + " | ".join(cells) + f" | {r['average']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
