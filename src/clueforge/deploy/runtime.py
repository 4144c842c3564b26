"""Loading a model for inference from either kind of directory, behind one call signature.

A fine-tuned checkpoint (``clueforge finetune`` → ``best/``) runs in PyTorch; an exported
directory (``clueforge export``) runs in ONNX Runtime. Both give ``(task, family, state, model,
tokenizer)`` where ``model(input_ids, attention_mask, token_type_ids)`` (plus ``ling=`` for a model
with linguistic inputs) takes and returns torch tensors, so the prediction path
(``finetune.loop.run_model`` → ``decode`` → ``submission``) is the same code for both runtimes. For
a model with linguistic inputs both put the same rjieba ``Segmenter`` in ``state``
(``finetune.loop.linguistic_state``), so the family's ``encode`` computes the same ``ling`` channel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

RUNTIMES = ("torch", "onnx")
ONNX_KEY = "clueforge_onnx"
"""config.json key written by ``clueforge export``: which ONNX file to run and how it was made."""
EXPORTABLE = {"classify": "sequence", "ner": "token"}
"""Task families that export and serve (family → head): sentence(-pair) classification and NER."""
LING_INPUT = "ling"
"""The extra graph input of a model with linguistic inputs: the packed (B, T) int64 channel."""


def supported_message(task) -> str:
    return (f"{task.name} is a {task.family} task; export and serving support the classify family "
            f"(single sentence, sentence pair, CSL, CLUEWSC) and the ner family (MSRA NER, CLUENER)")


def read_task_meta(model_dir: str | Path) -> dict:
    """The raw config.json of a fine-tuned or exported directory; refuses a plain pretrained one."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a fine-tuned or exported clueforge directory")
    raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    if "clueforge_task" not in raw:
        raise ValueError(f"{model_dir} is not a fine-tuned clueforge checkpoint (no clueforge_task in config.json)")
    return raw


DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""Session graph rewrites left out: onnxruntime 1.32's CPU SkipLayerNormalization kernel is several
times slower than the Add + LayerNormalization it replaces (``benchmarks/ort_ops.py``)."""


def ort_session(path: str | Path, threads: int = 0, optimized_path: str | Path | None = None):
    """A CPU ``InferenceSession`` at full graph optimisation minus ``DISABLED_OPTIMIZERS``;
    ``threads`` intra-op threads (0: onnxruntime's default). ``optimized_path`` also writes the
    graph the session runs (what a test or a profiler inspects)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


class OnnxModel:
    """An ONNX Runtime session that is called like the PyTorch ``TaskModel``."""

    def __init__(self, path: str | Path, threads: int = 0):
        self.path = Path(path)
        self.session = ort_session(path, threads)
        self.takes_ling = LING_INPUT in {i.name for i in self.session.get_inputs()}

    def eval(self) -> "OnnxModel":
        return self

    def to(self, device) -> "OnnxModel":
        return self

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray,
            ling: np.ndarray | None = None) -> np.ndarray:
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
                "token_type_ids": np.ascontiguousarray(token_type_ids, dtype=np.int64)}
        if self.takes_ling:
            if ling is None:
                raise ValueError(f"{self.path} reads linguistic inputs: pass the packed channel (ling)")
            feed[LING_INPUT] = np.ascontiguousarray(ling, dtype=np.int64)
        return self.session.run(None, feed)[0]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor, ling: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self.run(input_ids.cpu().numpy(), attention_mask.cpu().numpy(),
                                         token_type_ids.cpu().numpy(), None if ling is None else ling.cpu().numpy()))


def load_exported(model_dir: str | Path, task_name: str | None = None, threads: int = 0):
    """``(task, family, state, OnnxModel, tokenizer)`` of a ``clueforge export`` directory."""
    from clueforge.finetune.loop import family, linguistic_state
    from clueforge.tasks.registry import get_task, with_overrides
    from clueforge.text.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    raw = read_task_meta(model_dir)
    meta = raw["clueforge_task"]
    if ONNX_KEY not in raw:
        raise ValueError(f"{model_dir} has no ONNX model (no {ONNX_KEY} in config.json): run `clueforge export` "
                         f"first, or use --runtime torch")
    if task_name is not None and meta["task"] != task_name:
        raise ValueError(f"{model_dir} was fine-tuned for {meta['task']!r}, not {task_name!r}")
    task = with_overrides(get_task(meta["task"]), max_length=meta.get("max_length"))
    fam = family(task)
    state = fam.state_from_json(meta, model_dir) if hasattr(fam, "state_from_json") else {}
    linguistic_state(fam, task, state, model_dir)  # a model with linguistic inputs: the same Segmenter as torch
    onnx_file = model_dir / raw[ONNX_KEY]["model"]
    if not onnx_file.is_file():
        raise FileNotFoundError(f"{onnx_file}: the ONNX model named in config.json is missing")
    return task, fam, state, OnnxModel(onnx_file, threads), load_tokenizer(model_dir)


def load_any(model_dir: str | Path, runtime: str, task_name: str | None = None, threads: int = 0):
    """``(task, family, state, model, tokenizer)`` for ``runtime`` ('torch' or 'onnx')."""
    from clueforge.finetune.loop import checkpoint_dir, load_finetuned

    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        return load_exported(model_dir, task_name, threads)
    model_dir = checkpoint_dir(model_dir)  # a `finetune` output directory → the checkpoint it selected
    raw = read_task_meta(model_dir)
    if ONNX_KEY in raw:
        raise ValueError(f"{model_dir} is an ONNX export without PyTorch weights: use --runtime onnx")
    if threads:
        torch.set_num_threads(threads)
    task, fam, state, model, tok = load_finetuned(model_dir, task_name or raw["clueforge_task"]["task"])
    return task, fam, state, model.eval(), tok
