"""Why zero-shot calibration helps or not on a model: the label-word prior per FewCLUE task.

    python benchmarks/zeroshot_calibration.py --model /work/runs/small-best --out docs/results/fewclue/calibration_prior.json

For each FewCLUE task, all five official dev splits pooled (``dev_0..4``: the sets the protocol
scores), the task's first shipped template, ``--max-length`` as in the protocol command: accuracy
under no calibration, PMI, contextual and batch calibration (``clueforge.prompts.score.calibrate``), with
its binomial standard error; the share of the most-predicted label under each (a model that
answers one label whatever the input has share 1.0); and the model's label-word prior on the
content-free inputs — per input ("N/A", "", "[MASK]") the label distribution's largest share and
its label, and the total-variation distance between the three inputs' distributions (calibration
divides by their mean: when they disagree, the mean is not "the" prior). CHID has per-example
candidates and no label prior: accuracy only.

For the two-label tasks every calibration is a threshold on one number, the margin
s(label 1) − s(label 0) (PMI and contextual subtract a per-label constant from the scores; batch, after
normalising each example, too), so none of them can beat the best accuracy any threshold on the
uncalibrated margin reaches (``margin_best_accuracy``: the threshold chosen on these gold labels, an
in-sample ceiling, not a method). ``margin_auc``, the ROC AUC of the margin for label 1, gives the
signal's direction and strength: 0.5 none, below 0.5 pointing the wrong way. For two-sentence tasks,
``overlap_auc``: the same AUC for the Jaccard overlap of the two texts' character sets, a surface cue
that needs no model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, write_json  # noqa: E402

from clueforge.finetune.loop import prepare_state  # noqa: E402
from clueforge.prompts.score import (CONTENT_FREE, PromptEncoder, calibrate, score_examples, slots_of,  # noqa: E402
                                     softmax, words_of)
from clueforge.prompts.spec import SLOTS, templates_for  # noqa: E402
from clueforge.prompts.zeroshot import load_mlm  # noqa: E402
from clueforge.tasks.registry import SUITES, get_task  # noqa: E402
from clueforge.text.tokenizer import load_tokenizer  # noqa: E402

FEW = SHARED / "tasks" / "fewclue"


def margin_auc(margin: list[float], gold: list[int]) -> float:
    """ROC AUC of ``margin`` for gold label 1 (Mann-Whitney: the share of (1, 0) pairs ranked right, ties ½)."""
    m, g = np.asarray(margin, dtype=float), np.asarray(gold)
    pos, neg = m[g == 1], m[g == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def best_threshold_accuracy(margin: list[float], gold: list[int]) -> float:
    """The highest accuracy of ``margin > t`` → label 1 over every threshold t (both constant answers included)."""
    m, g = np.asarray(margin, dtype=float), np.asarray(gold)
    cuts = np.concatenate([[-np.inf], np.unique(m)])
    return float(max(((m > t).astype(int) == g).mean() for t in cuts))


def task_row(name: str, model, tok, max_length: int) -> dict:
    task = get_task(name)
    fam = importlib.import_module(f"clueforge.tasks.{task.family}")
    folder = FEW / name.removeprefix("fewclue-")
    state = prepare_state(fam, task, folder)
    labels = state.get("labels")
    examples = [e for k in range(5) for e in fam.load(task, folder / f"dev_{k}.json", state, True)]
    t = templates_for(task)[0]
    enc = PromptEncoder(tok, t, max_length)
    slots = [slots_of(task, e) for e in examples]
    words = [words_of(t, e, labels) for e in examples]
    gold = [e["label"] for e in examples]
    with torch.inference_mode():
        none = score_examples(model, enc, slots, words)
        methods = {m: calibrate(model, enc, none, words, list(SLOTS[task.fmt]), m) for m in ("none", "pmi", "contextual", "batch")}
    row = {"task": name, "template": t.name, "examples": len(examples), "labels": len(words[0])}
    for m, scores in methods.items():
        pred = [int(np.argmax(s)) for s in scores]
        right = [p == (g if task.family == "choice" else labels.index(g)) for p, g in zip(pred, gold)]
        acc = float(np.mean(right))
        row[m] = {"accuracy": round(100 * acc, 2), "stderr": round(100 * (acc * (1 - acc) / len(right)) ** 0.5, 2),
                  "top_prediction_share": round(Counter(pred).most_common(1)[0][1] / len(pred), 3)}
    if task.family == "choice":
        return row
    row["gold_majority_share"] = round(Counter(gold).most_common(1)[0][1] / len(gold), 3)
    if len(labels) == 2:
        margin, y = [s[1] - s[0] for s in none], [labels.index(g) for g in gold]
        row["margin_auc"] = round(margin_auc(margin, y), 3)
        row["margin_best_accuracy"] = round(100 * best_threshold_accuracy(margin, y), 2)
        if task.fmt == "pair":
            jac = [len(set(e["a"]) & set(e["b"])) / max(1, len(set(e["a"]) | set(e["b"]))) for e in examples]
            row["overlap_auc"] = round(margin_auc(jac, y), 3)
    vocab = words[0]
    with torch.inference_mode():
        priors = {f: softmax(score_examples(model, enc, [{k: f for k in SLOTS[task.fmt]}], [vocab], keep_masks=True)[0])
                  for f in CONTENT_FREE}
    row["prior"] = {repr(f): {"top_share": round(float(p.max()), 3), "top_label": labels[int(p.argmax())]}
                    for f, p in priors.items()}
    ps = list(priors.values())
    row["prior_tv_distance_max"] = round(max(0.5 * float(np.abs(a - b).sum()) for i, a in enumerate(ps) for b in ps[i + 1:]), 3)
    none_top = Counter(int(np.argmax(s)) for s in none).most_common(1)[0][0]
    row["none_top_label"] = labels[none_top]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default="bench-out/zeroshot_calibration.json")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    model = load_mlm(args.model)
    rows = []
    for name in SUITES["fewclue"]:
        rows.append(task_row(name, model, tok, args.max_length))
        print(rows[-1], file=sys.stderr, flush=True)
    avg = {m: round(float(np.mean([r[m]["accuracy"] for r in rows])), 2) for m in ("none", "pmi", "contextual", "batch")}
    write_json(args.out, {"benchmark": "zeroshot_calibration", "machine": machine(), "model": args.model,
                          "splits": "dev_0..4 pooled", "max_length": args.max_length, "content_free": list(CONTENT_FREE),
                          "average": avg, "tasks": rows})


if __name__ == "__main__":
    main()
