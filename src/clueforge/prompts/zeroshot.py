"""Zero-shot prediction with a template and verbalizer, no training.

    clueforge zeroshot fewclue-eprstmt --model runs/mini/final \\
        --input ../shared/data/tasks/fewclue/eprstmt/test.json --out sub/eprstmt_predict.json \\
        [--template satisfied] [--calibration none|pmi|contextual|batch] [--prompts my_prompts.yaml]

Works on any clueforge or local Hugging Face BERT masked-LM directory. Writes the task's official
submission rows (the task family's own writer, so ``clueforge submit`` accepts the file) and, when
the input is labelled, scores it with the task's metric.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from clueforge.model.bert import BertForMLM
from clueforge.model.hf import from_hf_state_dict, read_hf_config, read_hf_weights
from clueforge.model.inference import optimize_for_inference
from clueforge.prompts.score import PromptEncoder, calibrate, score_examples, slots_of, words_of
from clueforge.prompts.spec import SLOTS, check_for_task, pick, templates_for
from clueforge.tasks.io import TaskDataError
from clueforge.tasks.registry import get_task
from clueforge.text.tokenizer import load_tokenizer
from clueforge.utils import UserError

log = logging.getLogger("clueforge.zeroshot")


def load_mlm(model_dir: str | Path) -> BertForMLM:
    """A ``BertForMLM`` whose MLM head comes from the checkpoint (refuses one without it)."""
    cfg, _ = read_hf_config(model_dir)
    model = BertForMLM(cfg)
    absent = from_hf_state_dict(model, read_hf_weights(Path(model_dir)))
    if absent:
        raise ValueError(f"{model_dir}: no masked-LM head (lacks {', '.join(absent)}): prompting needs one")
    return model.eval()


def check_vocab(enc: PromptEncoder, words: list[str]) -> None:
    unk = enc.unk_id
    bad = [w for w in words if unk in enc.word_ids(w)]
    if bad:
        raise ValueError(f"{enc.t.source}.verbalizer: word(s) {', '.join(bad[:5])} not in the model's vocabulary")


def load_examples(task, fam, paths: list[Path], state: dict) -> tuple[list[dict], bool]:
    """Examples with labels where the file has them (then scored), else without."""
    try:
        return [e for p in paths for e in fam.load(task, p, state, True)], True
    except TaskDataError as exc:
        if "missing field" not in str(exc) and "no answer" not in str(exc) and "_answer.json" not in str(exc):
            raise
    except FileNotFoundError:
        if not all(p.is_file() for p in paths):
            raise
    return [e for p in paths for e in fam.load(task, p, state, False)], False


def zeroshot(task_name: str, model_dir: str | Path, input_file: str, out_file: str | Path | None,
             template: str | None = None, calibration: str = "none", prompts: str | Path | None = None,
             batch_size: int = 64, max_length: int | None = None, model=None, precision: str = "fp32",
             at_masks: bool = True) -> dict:
    """Predict ``input_file`` (comma-separated for several) zero-shot; write ``out_file`` if given.
    ``template="all"`` ensembles every template of the task. ``precision``: fp32, bf16 or int8 (``clueforge.model.inference``).
    ``at_masks``: the encoder's last layer only at the [MASK] rows (``score.word_logprobs``; off: the
    plain full forward, for comparison). Returns ``{task, template, calibration, examples, seconds,
    examples_per_s, metric?}``."""
    from clueforge.finetune.loop import prepare_state, write_submission

    task = get_task(task_name)
    fam = importlib.import_module(f"clueforge.tasks.{task.family}")
    paths = [Path(p) for p in str(input_file).split(",")]
    state = prepare_state(fam, task, paths[0].parent)
    labels = state.get("labels")
    templates = templates_for(task, prompts)
    chosen = templates if template == "all" else [pick(templates, template)]
    for t in chosen:
        check_for_task(t, task, labels)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is not allowed: must be ≥ 1")
    tok = load_tokenizer(model_dir)
    model = model if model is not None else load_mlm(model_dir)
    positions = model.cfg.max_position
    if max_length is not None and max_length > positions:
        raise UserError(f"max_length {max_length} exceeds the model's {positions} positions; use {positions} or less")
    if max_length is None and task.max_length > positions:  # the task's default: cut to what the model holds
        log.warning("%s's max_length %d exceeds the model's %d positions: inputs are cut to %d tokens",
                    task.name, task.max_length, positions, positions)
        max_length = positions
    model = optimize_for_inference(model, precision)
    examples, labelled = load_examples(task, fam, paths, state)
    t0 = time.perf_counter()
    slots = [slots_of(task, e) for e in examples]
    scores = None
    for t in chosen:  # several templates: the mean of their label distributions (log-softmax)
        enc = PromptEncoder(tok, t, max_length or task.max_length)
        words = [words_of(t, e, labels) for e in examples]
        if t.verbalizer is not None:  # candidates (CHID idioms) may hold rare characters: scored as [UNK]
            check_vocab(enc, sorted(set(t.verbalizer.values())))
        with torch.inference_mode():
            s_t = score_examples(model, enc, slots, words, batch_size, at_masks=at_masks)
            s_t = calibrate(model, enc, s_t, words, list(SLOTS[task.fmt]), calibration, batch_size, at_masks)
        s_t = [x - x.max() - np.log(np.exp(x - x.max()).sum()) for x in s_t]
        scores = s_t if scores is None else [a + b for a, b in zip(scores, s_t)]
    best = [int(np.argmax(s)) for s in scores]
    preds = best if task.family == "choice" else [labels[i] for i in best]
    seconds = time.perf_counter() - t0
    result = {"task": task.name, "template": ",".join(t.name for t in chosen), "calibration": calibration, "examples": len(examples),
              "seconds": round(seconds, 2), "examples_per_s": round(len(examples) / max(seconds, 1e-9), 1)}
    if out_file is not None:
        write_submission(out_file, fam.submission(task, examples, preds, state))
    if labelled:
        result["metric"] = fam.score(task, preds, examples)
    return result
