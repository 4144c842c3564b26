"""The onnxruntime CPU costs behind the export's graph (session 7): why it has no SkipLayerNormalization
and adds the padding mask instead of a boolean mask's Where.

    python benchmarks/ort_ops.py --out bench-out/ort_ops.json

1. One-node graphs on (1, 128, D) float32, one thread, median of ``--calls`` runs after warm-up, the
   three alternating in rounds: ``SkipLayerNormalization`` (input + skip, then LayerNorm: what
   onnxruntime's fusion makes) against ``Add`` then ``LayerNormalization`` (what it replaces) and
   ``LayerNormalization`` alone, at D = 128, 312, 384, 768.
2. A random ``mini`` classifier (``--config``) exported three ways: ``before`` (the export until
   session 7: boolean padding mask, SkipLayerNormalization fused by the optimizer and the session),
   ``mask_only`` (additive mask, SkipLayerNormalization still fused) and ``shipped`` (what ``clueforge
   export`` writes and ``runtime.ort_session`` runs), fp32 and int8 (the same ``quantize_dynamic``
   call): latency at batch 1, length 128, one thread (median, alternating rounds) and kernel time by
   operator type from onnxruntime's profiler. Logits are checked against PyTorch first (fp32 ≤ 1e-4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_ms_by_op, machine, write_json  # noqa: E402


def one_node_sessions(D: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(nodes, inputs):
        vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 128, D]) for n in inputs]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        init = [helper.make_tensor("g", TensorProto.FLOAT, [D], np.ones(D, np.float32)),
                helper.make_tensor("b", TensorProto.FLOAT, [D], np.zeros(D, np.float32))]
        model = helper.make_model(helper.make_graph(nodes, "g", vi, [out], init),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the nodes as written
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    ln = dict(axis=-1, epsilon=1e-12)
    return {
        "skip_layer_norm": session([helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"],
                                                     domain="com.microsoft", epsilon=1e-12)], ["x", "s"]),
        "add_then_layer_norm": session([helper.make_node("Add", ["x", "s"], ["h"]),
                                        helper.make_node("LayerNormalization", ["h", "g", "b"], ["y"], **ln)], ["x", "s"]),
        "layer_norm": session([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], **ln)], ["x"]),
    }


def rounds(fns: dict, calls: int, n_rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each function, alternating in rounds after a warm-up."""
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for _ in range(n_rounds):
        for k, f in fns.items():
            for _ in range(max(1, calls // n_rounds)):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def exported_variants(config: str, d: Path):
    import onnxruntime as ort
    import transformers

    from clueforge.deploy import export as ex
    from clueforge.deploy.runtime import DISABLED_OPTIMIZERS
    from clueforge.model.hf import load_hf_classifier
    from clueforge.pretrain.config import load_config

    mc = load_config(config).model
    hc = transformers.BertConfig(vocab_size=21128, hidden_size=mc.hidden_size, num_hidden_layers=mc.num_layers,
                                 num_attention_heads=mc.num_heads, intermediate_size=mc.intermediate_size,
                                 max_position_embeddings=mc.max_position, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hc).eval()
    hf.save_pretrained(d)
    ours = load_hf_classifier(d, 3).eval()
    files = {}
    for name, additive, skip in (("before", False, True), ("mask_only", True, True), ("shipped", True, False)):
        ex.ExportGraph.additive_mask = additive
        try:
            with ex._quiet():
                ex._to_onnx(ours, d / f"{name}.raw.onnx", mc.max_position)
        finally:
            ex.ExportGraph.additive_mask = True
        ex._optimize(d / f"{name}.raw.onnx", d / f"{name}.onnx", ours.cfg, skip_layer_norm=skip)
        ex._quantize(d / f"{name}.onnx", d / f"{name}.int8.onnx")
        for kind, path in (("fp32", d / f"{name}.onnx"), ("int8", d / f"{name}.int8.onnx")):
            def factory(profile=False, path=path, skip=skip):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
                if profile:
                    opts.enable_profiling, opts.profile_file_prefix = True, str(path.parent / f"prof-{path.stem}")
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=[] if skip else list(DISABLED_OPTIMIZERS))
            files[f"{name}_{kind}"] = factory
    return hf, ours, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=int, default=[128, 312, 384, 768])
    ap.add_argument("--calls", type=int, default=200, help="calls per one-node graph")
    ap.add_argument("--config", default="mini")
    ap.add_argument("--repeats", type=int, default=30, help="calls per exported graph")
    ap.add_argument("--out", default="bench-out/ort_ops.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    ops = []
    for D in args.widths:
        x, s = np.random.randn(1, 128, D).astype(np.float32), np.random.randn(1, 128, D).astype(np.float32)
        sess = one_node_sessions(D)
        feeds = {"skip_layer_norm": {"x": x, "s": s}, "add_then_layer_norm": {"x": x, "s": s}, "layer_norm": {"x": x}}
        t = rounds({k: (lambda se=se, f=feeds[k]: se.run(None, f)) for k, se in sess.items()}, args.calls)
        row = {"width": D, **{f"{k}_us": round(v * 1e6, 1) for k, v in t.items()}}
        row["skip_vs_add_then_layer_norm"] = round(t["skip_layer_norm"] / t["add_then_layer_norm"], 2)
        ops.append(row)
        print(row, flush=True)

    d = Path(tempfile.mkdtemp())
    hf, ours, files = exported_variants(args.config, d)
    ids = torch.randint(100, 20000, (1, 128))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
            "token_type_ids": np.zeros_like(ids.numpy())}
    with torch.inference_mode():
        ref = ours(ids, torch.ones_like(ids), torch.zeros_like(ids))[1].numpy()
    sessions = {k: f() for k, f in files.items()}
    check = {k: float(np.abs(se.run(None, feed)[0] - ref).max()) for k, se in sessions.items()}
    assert all(v <= 1e-4 for k, v in check.items() if k.endswith("fp32")), check
    fns = {k: (lambda se=se: se.run(None, feed)) for k, se in sessions.items()}
    with torch.inference_mode():
        fns["pytorch_eager_fp32"] = lambda: ours(ids, torch.ones_like(ids), torch.zeros_like(ids))
        t = rounds(fns, args.repeats)
    graphs = {k: {"ms": round(1000 * v, 2)} for k, v in t.items()}
    for k, f in files.items():
        graphs[k]["max_abs_logit_diff_vs_pytorch"] = check[k]
        graphs[k]["kernel_ms_by_op"] = kernel_ms_by_op(f(profile=True), feed)
    for kind in ("fp32", "int8"):
        graphs[f"shipped_{kind}"]["speedup_vs_before"] = round(t[f"before_{kind}"] / t[f"shipped_{kind}"], 3)
    for k, g in graphs.items():
        print(k, g["ms"], g.get("speedup_vs_before", ""), flush=True)
    write_json(args.out, {"benchmark": "ort_ops", "one_node": ops, "config": args.config, "batch": 1, "seq_len": 128,
                          "threads": 1, "graphs": graphs, "machine": machine()})


if __name__ == "__main__":
    main()
