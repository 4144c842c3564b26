"""Export a fine-tuned model (encoder + task head) to ONNX, optimise it, optionally quantise it to
int8, and check it against PyTorch.

    clueforge export runs/ft/ocnli/best --format onnx --out runs/onnx/ocnli
    clueforge export runs/ft/ocnli/best --format onnx --int8 --data ../shared/data/tasks/ocnli --out runs/onnx/ocnli
    clueforge predict ocnli --model runs/onnx/ocnli --runtime onnx --input test.json --out ocnli_50k_predict.json

The output directory holds ``model.onnx`` (fp32, optimised), ``model.int8.onnx`` (with
``--int8``; then it is the one the ONNX runtime loads), ``config.json`` (the checkpoint's, task
metadata included, plus ``clueforge_onnx`` naming the model file), the tokenizer files, and
``export_check.json``: max |Δlogit| of each ONNX file against PyTorch eager and the agreement of
their labels, on the task's dev set (``--data``) or else on a fixed sample of random token
sequences of varied lengths with padding.

A model with linguistic inputs (``pos_embeddings`` / ``syntax_heads``; classification or NER, whose
families feed them) exports with a fourth graph input ``ling`` (B, T) int64, the packed
channel of ``model.bert.pack_ling``: the ONNX runtime computes it with the same rjieba
segmentation as ``clueforge predict`` (``finetune.loop.linguistic_state`` → the family's
``encode``). Its check runs on the dev set's real channel, or on random sequences with a random
channel (random word lengths, sentence starts and POS tags). Other models keep the three inputs.

Design choices:
- The graph always takes the padding mask (the eager encoder skips it when a batch has no padding,
  a data-dependent branch an exported graph must not bake in). Batch and length are dynamic, the
  length bounded by the position table.
- The torch.export-based exporter (``dynamo=True``, the default since PyTorch 2.9), then
  onnxruntime's BERT optimizer (GELU fusions), then ``quantize_dynamic`` (int8 weights per channel,
  activations quantised on the fly: the usual CPU path, no calibration data).
- The padding mask enters the graph once, additive (0 / float32 min, shape (B, 1, 1, T)), so each
  layer's attention adds it; a boolean mask would cost every layer a ``Where`` plus SDPA's NaN guard
  for fully masked rows (``IsNaN`` + ``Where`` over (B, H, T, T)), 5.6 % of the int8 model's time.
  Models with syntax heads keep the boolean mask their structure is built from.
- No ``SkipLayerNormalization``: onnxruntime 1.32's CPU kernel for it measured several times slower
  than the ``Add`` + ``LayerNormalization`` it replaces (``benchmarks/ort_ops.py``), a fifth of the
  int8 model's time; the optimizer here and the session (``runtime``) both leave it
  unfused (docs/benchmarks.md, "ONNX Runtime: what the time goes to").
- Only the families whose output is one tensor of logits decoded without extra state export
  (classification, NER); the others are refused up front, naming what is supported.
"""

from __future__ import annotations

import json
import logging
import os
import io
import shutil
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clueforge.deploy.runtime import EXPORTABLE, LING_INPUT, ONNX_KEY, OnnxModel, read_task_meta, supported_message

log = logging.getLogger("clueforge.export")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FORMATS = ("onnx",)


class ExportGraph(nn.Module):
    """``TaskModel`` forward for export: the padding mask is always applied (see module doc).
    ``ling`` (B, T): the packed linguistic channel, given only to a model with linguistic inputs."""

    additive_mask = True
    """False: the boolean mask every graph had before session 7 (``benchmarks/ort_ops.py`` times both)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor, ling: torch.Tensor | None = None) -> torch.Tensor:
        m, enc = self.model, self.model.encoder
        if enc.cfg.syntax_heads or not self.additive_mask:  # the syntax structure is built from a boolean mask
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        else:  # additive, once for every layer: an Add per layer, not a Where (and no NaN guard)
            mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        x = enc.embeddings(input_ids, token_type_ids, ling)  # (B, T, D)
        x, _ = enc.run_layers(x, mask, ling)  # plain blocks, or the option path (residual, syntax heads)
        if enc.final_ln is not None:
            x = enc.final_ln(x)
        if m.head == "sequence":
            return m.classifier(m.pool(x, attention_mask))  # (B, C): [CLS] or the mean of the real tokens
        return m.classifier(x)  # (B, T, C)


@contextmanager
def _quiet():
    """The exporter, optimizer and quantiser log every pass at INFO/WARNING: keep our own lines."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def graph_inputs(cfg) -> tuple[str, ...]:
    """The graph's input names: ``INPUTS``, plus ``LING_INPUT`` for a model with linguistic inputs."""
    return INPUTS + (LING_INPUT,) if cfg.linguistic_inputs else INPUTS


def _example_ling(B: int, T: int) -> torch.Tensor:
    """A (B, T) channel for tracing: [CLS], then text tokens in two-token words under varied POS
    tags (a chunk delimiter among them), one sentence start, [SEP]. Values only steer the trace's
    example run; the graph is the same for any channel."""
    from clueforge.model.bert import pack_ling
    from clueforge.text.segment import POS_ID

    body = torch.arange(T - 2)
    pos = torch.tensor([POS_ID["n"], POS_ID["v"], POS_ID["p"], POS_ID["a"]])[(body // 2) % 4]
    row = torch.zeros(T, dtype=torch.long)
    row[1:T - 1] = pack_ling(pos, (body % 2 == 0).long(), (body == 0).long(), 1)
    return row.expand(B, T).contiguous()


def _onnx_isin():
    """``aten.isin`` (the chunk constraint's delimiter test, ``model.bert.syntax_units``) as ONNX ops:
    the exporter's own decomposition goes through ``searchsorted``, which it cannot translate. Any
    element equal to any test element: Equal over a broadcast last axis, then a max over it."""
    from onnxscript import opset18 as op

    def isin(elements, test_elements, assume_unique: bool = False, invert: bool = False):
        hit = op.Equal(op.Unsqueeze(elements, [-1]), op.Reshape(test_elements, [-1]))  # (..., K)
        found = op.Cast(op.ReduceMax(op.Cast(hit, to=7), [-1], keepdims=0), to=9)  # int64 max → bool
        return op.Not(found) if invert else found

    return {torch.ops.aten.isin.Tensor_Tensor: isin}


def _to_onnx(model: nn.Module, path: Path, max_len: int) -> None:
    graph = ExportGraph(model).eval()
    names = graph_inputs(model.cfg)
    ids = torch.full((2, 8), 5, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    if LING_INPUT in names:
        args += (_example_ling(*ids.shape),)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_len)
    shapes = {k: {0: batch, 1: seq} for k in names}
    with _quiet(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), input_names=list(names), output_names=["logits"],
                          dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False,
                          **({"custom_translation_table": _onnx_isin()} if LING_INPUT in names else {}))


def _optimize(src: Path, dst: Path, cfg, skip_layer_norm: bool = False) -> dict:
    """onnxruntime's transformers optimizer for BERT, SkipLayerNormalization fusion off unless asked
    (see ``runtime.DISABLED_OPTIMIZERS``); returns its fused-operator counts."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = skip_layer_norm
    printed = io.StringIO()  # its symbolic shape inference prints (not logs) when it gives up on a graph
    with _quiet(), redirect_stdout(printed):
        opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=cfg.num_heads,
                                       hidden_size=cfg.hidden_size, opt_level=0, optimization_options=options)
        opt.save_model_to_file(str(dst))
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if printed.getvalue().strip():
        log.debug("optimizer: %s", printed.getvalue().strip())
    return fused


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():  # also its "consider pre-processing" hint, which concerns static quantisation
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def write_onnx(model: nn.Module, out_dir: Path, int8: bool = False) -> tuple[dict[str, str], dict]:
    """``model.onnx`` (optimised fp32) and, with ``int8``, ``model.int8.onnx`` in ``out_dir``.
    Returns ``({"fp32": name, "int8": name}, fused operator counts)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _to_onnx(model, out_dir / "raw.onnx", model.cfg.max_position)
    log.info("optimise: onnxruntime transformers optimizer (bert)")
    fused = _optimize(out_dir / "raw.onnx", out_dir / "model.onnx", model.cfg)
    (out_dir / "raw.onnx").unlink()
    files = {"fp32": "model.onnx"}
    if int8:
        log.info("quantise: dynamic int8 (per-channel weights)")
        _quantize(out_dir / "model.onnx", out_dir / "model.int8.onnx")
        files["int8"] = "model.int8.onnx"
    return files, fused


def sample_features(task, tok, n: int = 64, max_len: int = 64, seed: int = 0, ling: bool = False) -> list[dict]:
    """Random token sequences of varied lengths (second segment typed 1 for pair tasks): the
    check's inputs when no dev set is given. With ``ling``, each also gets a random linguistic
    channel (``random_ling``)."""
    rng = np.random.default_rng(seed)
    specials = {tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    vocab = np.array([i for i in range(tok.get_vocab_size()) if i not in specials])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    pair = task.family == "classify" and task.fmt in ("pair", "csl")
    out = []
    for _ in range(n):
        length = int(rng.integers(3, max(4, max_len - 1)))
        body = rng.choice(vocab, length).tolist()
        if pair:
            cut = length // 2
            ids = [cls, *body[:cut], sep, *body[cut:], sep]
            types = [0] * (cut + 2) + [1] * (length - cut + 1)
        else:
            ids, types = [cls, *body, sep], [0] * (length + 2)
        out.append({"input_ids": ids, "token_type_ids": types})
        if ling:
            out[-1]["ling"] = random_ling(rng, ids, (cls, sep))
    return out


def random_ling(rng, ids: list[int], specials: tuple[int, ...]) -> list[int]:
    """A random packed channel for one sequence: each run of text tokens between special tokens
    is one text, cut into words of 1-4 tokens with random POS tags, the text's first word and a
    few others starting a sentence; special tokens get 0 (as ``tasks.io.encoding_ling`` does)."""
    from clueforge.model.bert import pack_ling
    from clueforge.text.segment import POS_TAGS

    out, first, left = [], True, 0
    for t in ids:
        if t in specials:
            out.append(0)
            first, left = True, 0
            continue
        start = left == 0
        if start:
            left, tag = int(rng.integers(1, 5)), int(rng.integers(1, len(POS_TAGS)))
            sent = first or bool(rng.random() < 0.1)
        out.append(int(pack_ling(tag, int(start), int(start and sent), 1)))
        first, left = False, left - 1
    return out


def _logits(model, fam, features: list[dict], pad_id: int, batch_size: int = 32):
    """Per batch: (logits as numpy, attention mask as numpy)."""
    from clueforge.tasks.io import pad_features, pad_ling

    out = []
    with torch.inference_mode():
        for i in range(0, len(features), batch_size):
            batch = features[i:i + batch_size]
            ids, types, mask = pad_features(batch, pad_id)
            kw = {"ling": pad_ling(batch)} if "ling" in batch[0] else {}  # a model with linguistic inputs
            out.append((model(ids, mask, types, **kw).float().numpy(), mask.numpy().astype(bool)))
    return out


def compare(ref: list, got: list, head: str) -> dict:
    """Max |Δlogit| over real positions and the share of equal argmax labels."""
    diff, same, total = 0.0, 0, 0
    for (r, mask), (g, _) in zip(ref, got):
        if head == "token":  # only the real tokens carry labels
            r, g = r[mask], g[mask]
        diff = max(diff, float(np.abs(r - g).max()))
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += int(r.shape[0])
    return {"max_abs_logit_diff": diff, "label_agreement": same / max(1, total), "labels_compared": total}


def export_onnx(model_dir: str | Path, out: str | Path, *, int8: bool = False, data: str | Path | None = None,
                max_check: int = 1000, fmt: str = "onnx") -> dict:
    """Export ``model_dir`` (a fine-tuned checkpoint) into ``out``; returns the check report."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    model_dir, out = Path(model_dir), Path(out)
    check_export_out(model_dir, out)
    from clueforge.runs import LOCK_NAME, run_lock

    created = not out.exists()
    try:
        with run_lock(out, "export"):
            check_export_out(model_dir, out)  # again under the lock: another export may have written it
            return _export(model_dir, out, int8, data, max_check, fmt)
    except BaseException:
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_NAME]:  # a failed first export
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_export_out(model_dir: Path, out: Path) -> None:
    """``--out`` is replaced whole: refuse one that is, holds or lies inside the model directory, and
    a non-empty one that is not an earlier export (a fine-tune run, a corpus, a home directory)."""
    from clueforge.runs import LOCK_NAME
    from clueforge.utils import UserError

    m, o = model_dir.resolve(), out.resolve()
    if o == m or o in m.parents or m in o.parents:
        raise UserError(f"--out {out} would replace the model directory {model_dir} (or the folder holding it); "
                        f"export into a new directory")
    if o.is_file():
        raise UserError(f"--out {out} is a file; export into a directory")
    if o.is_dir() and any(p.name != LOCK_NAME for p in o.iterdir()):
        meta = o / "config.json"
        try:
            earlier = ONNX_KEY in json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            earlier = False
        if not earlier:
            raise UserError(f"--out {out} is not empty and is not an earlier export (no config.json with "
                            f"{ONNX_KEY!r}); export replaces it whole, so name a new or export directory")


def _export(model_dir: Path, out: Path, int8: bool, data, max_check: int, fmt: str) -> dict:
    from clueforge.finetune.loop import load_finetuned, load_split, subset
    from clueforge.runs import LOCK_NAME
    from clueforge.utils import replace_dir

    raw = read_task_meta(model_dir)
    if ONNX_KEY in raw:
        raise ValueError(f"{model_dir} is already an ONNX export; export its fine-tuned checkpoint instead")
    from clueforge.utils import UserError

    if raw["clueforge_task"].get("method") in ("pet", "efl", "ptuning"):
        method = raw["clueforge_task"]["method"]
        raise UserError(f"{model_dir}: ONNX export of a {'P-tuning' if method == 'ptuning' else method.upper()} checkpoint (scored "
                        f"through prompts) is not supported; predict with `clueforge predict` instead")
    task, fam, state, model, tok = load_finetuned(model_dir, raw["clueforge_task"]["task"])
    if task.family not in EXPORTABLE:
        raise ValueError(supported_message(task))
    model.eval()
    cfg = model.cfg
    if cfg.linguistic_inputs and "segmenter" not in state:  # ``linguistic_state`` sets it for a family that feeds it
        raise UserError(f"{model_dir}: the {task.family} family does not feed the linguistic inputs "
                        f"({', '.join(cfg.arch_options)}) this model reads; nothing to export")
    if data is not None:  # read before the slow export, so that a wrong --data fails at once
        data = Path(data)
        examples = subset(load_split(task, fam, data, task.files["dev"], state, True), max_check)
        features = fam.encode(task, examples, tok, task.max_length, state)
        source = f"dev set {data / task.files['dev']} ({len(examples)} examples)"
    else:
        examples = None
        features = sample_features(task, tok, max_len=min(64, task.max_length), ling=cfg.linguistic_inputs)
        source = (f"random sample ({len(features)} sequences of 5-{min(64, task.max_length)} tokens"
                  f"{' with a random linguistic channel' if cfg.linguistic_inputs else ''}, seed 0)")
    pad_id = tok.token_to_id("[PAD]")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        log.info("export: %s (%s, %s head, %d layers × %d) → ONNX", model_dir, task.name, model.head,
                 cfg.num_layers, cfg.hidden_size)
        files, fused = write_onnx(model, tmp, int8)
        log.info("check: PyTorch eager vs ONNX Runtime on the %s", source)
        ref = _logits(model, fam, features, pad_id)
        report = {"task": task.name, "family": task.family, "head": model.head, "source": model_dir.as_posix(),
                  "inputs": list(graph_inputs(cfg)), "checked_on": source, "fused_operators": fused,
                  "model": files.get("int8", "model.onnx"), "onnxruntime": {}}
        for kind, name in files.items():
            got = _logits(OnnxModel(tmp / name), fam, features, pad_id)
            row = compare(ref, got, model.head)
            row["file"], row["bytes"] = name, (tmp / name).stat().st_size
            if examples is not None:
                row["dev_score"] = fam.score(task, fam.decode(task, [g for g, _ in got], features, examples, state),
                                             examples)
            report["onnxruntime"][kind] = row
        if examples is not None:
            report["pytorch_dev_score"] = fam.score(task, fam.decode(task, [r for r, _ in ref], features, examples,
                                                                     state), examples)
        report["pytorch_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())

        raw[ONNX_KEY] = {"model": report["model"], "files": files, "format": fmt}
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8")
        for f in model_dir.iterdir():  # tokenizer files and any family state files, not the weights
            if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.endswith(".bin"):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "export_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        if (out / LOCK_NAME).exists():  # the held lock's inode moves in with the new directory
            os.link(out / LOCK_NAME, tmp / LOCK_NAME)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report
