"""Sentence-pair classification latency: clueforge against transformers.BertForSequenceClassification.

    python benchmarks/inference.py --out bench-out/inference.json
    python benchmarks/inference.py --configs mini --batches 1 --threads 1 --repeats 50
    python benchmarks/inference.py --configs mini --batches 1 --threads 1 --students nano pico --no-onnx-teacher

For each config (tiny, mini), batch size (1, 32) and thread count (1, all cores): the same random
weights in both models (ours loaded from the transformers model through the HF key map, so the
outputs are checked equal first), the same sentence pairs of length 128 (real OCNLI pairs when
``../shared/data`` is there), median latency over ``--repeats`` calls after warm-up, sides
alternating, all under ``torch.inference_mode``; transformers with its default attention.

Contenders: transformers fp32 (what a user runs by default) and the same model with dynamic int8
quantisation (so the int8 comparison is like for like); clueforge fp32, bf16 and int8
(``clueforge.model.inference.optimize_for_inference``); ONNX Runtime fp32 and int8 (the files
``clueforge export`` writes: BERT-optimised graph, dynamic int8), sessions with the same thread
count, their fp32 logits checked against transformers' first (skipped with ``--no-onnx``).
``latency_ratio`` = clueforge fp32 / transformers fp32; ``int8_ratio`` = clueforge int8 /
transformers fp32; ``int8_vs_int8`` = clueforge int8 / transformers int8; ``ort_fp32_speedup`` =
clueforge fp32 (PyTorch eager) / ORT fp32; ``ort_int8_vs_transformers`` = transformers fp32 / ORT
int8 (speed-ups: higher is better).

``hf_ort_fp32`` / ``hf_ort_int8``: what a user would otherwise ship, transformers' own model through
the TorchScript exporter (``dynamo=False``, the route Optimum and onnxruntime's BERT tutorials take)
and onnxruntime's BERT optimizer, which fuses its attention (``Attention`` ×L, ``EmbedLayerNormalization``,
``SkipLayerNormalization``), int8 by the same ``quantize_dynamic`` call, default session at full
optimisation (``hf_ort_*_vs_ort_*``: their time / ours). ``--ort-profile`` adds, per ORT file, the
kernel time by operator type from onnxruntime's profiler (``ort_profile``: ms per call, one thread,
30 calls) and ``ort_fp32_speedup_bound`` = clueforge eager / the fp32 graph's MatMul time alone: the
speed-up ORT fp32 would reach if every other operator were free.

``--students nano pico`` (shipped student configs, ``configs/students/``, or YAML files) adds, for
each student, a random-weight classifier of that shape built the same way (a transformers model
loaded through the HF key map, outputs checked equal) and timed in the same rounds as the config's
transformers fp32 model, its teacher: ``{student}_clueforge_fp32``, ``{student}_clueforge_int8``
and ``{student}_ort_int8`` (the file ``clueforge export --int8`` writes), with
``{student}_int8_vs_transformers`` / ``{student}_ort_int8_vs_transformers`` = transformers fp32 /
student int8 (the issue's target: nano int8 ≥ 10× transformers mini fp32). ``--no-onnx-teacher``
skips the teacher's own ONNX rows (the student's ORT row stays).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BERT_VOCAB, SHARED, kernel_ms_by_op, machine, timed, write_json  # noqa: E402

from clueforge.deploy.export import write_onnx  # noqa: E402
from clueforge.deploy.runtime import OnnxModel  # noqa: E402
from clueforge.distill.student import student_config  # noqa: E402
from clueforge.model.bert import ModelConfig  # noqa: E402
from clueforge.model.hf import load_hf_classifier  # noqa: E402
from clueforge.model.inference import optimize_for_inference  # noqa: E402
from clueforge.pretrain.config import load_config  # noqa: E402


def pairs(n: int) -> list[tuple[str, str]]:
    f = SHARED / "tasks" / "ocnli" / "dev.json"
    if f.is_file():
        rows = [json.loads(line) for line in f.open(encoding="utf-8")]
        return [(r["sentence1"] * 4, r["sentence2"] * 4) for r in rows[:n]]  # long enough to fill 128
    return [("今天天气很好，我们一起去公园散步吧。" * 6, "天气不错，适合出门。" * 8)] * n


def tokenizer():
    from transformers import BertTokenizerFast

    d = Path(tempfile.mkdtemp())
    if BERT_VOCAB.is_file():
        (d / "vocab.txt").write_bytes(BERT_VOCAB.read_bytes())
    else:
        chars = sorted(set("".join(a + b for a, b in pairs(1))))
        (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n")
    return BertTokenizerFast.from_pretrained(d)


def hf_onnx(hf, d: Path, mc, T: int) -> dict[str, Path]:
    """transformers' model exported the usual way (TorchScript exporter, eager attention), optimised
    with its fusions and quantised like ours: ``{"fp32": path, "int8": path}``."""
    import warnings

    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    m = transformers.BertForSequenceClassification.from_pretrained(d, attn_implementation="eager").eval()
    ids = torch.full((1, T), 5)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(d / "hf.onnx"), input_names=names,
                          output_names=["logits"], dynamic_axes={k: {0: "batch", 1: "seq"} for k in names},
                          opset_version=17, dynamo=False)
    opt = optimizer.optimize_model(str(d / "hf.onnx"), model_type="bert", num_heads=mc.num_heads,
                                   hidden_size=mc.hidden_size, opt_level=0)
    opt.save_model_to_file(str(d / "hf_opt.onnx"))
    print("transformers → ONNX fusions:", {k: v for k, v in opt.get_fused_operator_statistics().items() if v}, flush=True)
    quantize_dynamic(str(d / "hf_opt.onnx"), str(d / "hf_opt.int8.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, extra_options={"DefaultTensorType": 1})  # its fused ops hide the types
    return {"fp32": d / "hf_opt.onnx", "int8": d / "hf_opt.int8.onnx"}


def default_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_profile(path: Path, feed: dict, threads: int, calls: int = 30) -> dict[str, float]:
    """Kernel ms per call by operator type, the session built as ``OnnxModel`` builds it."""
    import onnxruntime as ort

    from clueforge.deploy.runtime import DISABLED_OPTIMIZERS

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling, opts.profile_file_prefix = True, str(path.parent / f"profile-{path.stem}")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
    return kernel_ms_by_op(sess, feed, calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "mini"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, os.cpu_count()])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-onnx", action="store_true", help="Skip the ONNX Runtime rows.")
    ap.add_argument("--no-onnx-teacher", action="store_true", help="Skip the config's own ONNX Runtime rows.")
    ap.add_argument("--students", nargs="*", default=[], help="Student configs timed beside each config (nano, pico, YAML).")
    ap.add_argument("--no-hf-onnx", action="store_true", help="Skip transformers' own ONNX route (hf_ort_* rows).")
    ap.add_argument("--ort-profile", action="store_true", help="Kernel time by operator type for each ORT file.")
    ap.add_argument("--out", default="bench-out/inference.json")
    args = ap.parse_args()

    import transformers

    tok = tokenizer()

    def random_pair(mc):
        """A random transformers classifier of ``mc``'s shape and ours loaded from it (same weights)."""
        hc = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=mc.hidden_size,
                                     num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                                     intermediate_size=mc.intermediate_size, max_position_embeddings=mc.max_position,
                                     num_labels=3)
        torch.manual_seed(0)
        hf = transformers.BertForSequenceClassification(hc).eval()
        d = Path(tempfile.mkdtemp())
        hf.save_pretrained(d)
        return hf, load_hf_classifier(d, 3).eval(), d

    results = []
    for name in args.configs:
        hf, ours, d = random_pair(load_config(name).model)
        variants = {"clueforge_fp32": ours, "clueforge_bf16": optimize_for_inference(ours, "bf16"),
                    "clueforge_int8": optimize_for_inference(ours, "int8")}
        hf_int8 = torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8)
        onnx_files = {} if args.no_onnx or args.no_onnx_teacher else write_onnx(ours.eval(), d / "onnx", int8=True)[0]
        hf_files = {} if not onnx_files or args.no_hf_onnx else hf_onnx(hf, d, load_config(name).model, args.seq_len)
        students = {}  # name → (transformers model, ours, ORT int8 file or None)
        for s in args.students:
            s_hf, s_ours, s_d = random_pair(student_config(s, ModelConfig(vocab_size=tok.vocab_size)))
            s_onnx = None if args.no_onnx else s_d / "onnx" / write_onnx(s_ours, s_d / "onnx", int8=True)[0]["int8"]
            students[s] = (s_hf, s_ours, s_onnx)
            variants[f"{s}_clueforge_fp32"] = s_ours
            variants[f"{s}_clueforge_int8"] = optimize_for_inference(s_ours, "int8")
        for bs in args.batches:
            a, b = zip(*pairs(bs))
            enc = tok(list(a), list(b), truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
            with torch.inference_mode():
                ref = hf(**enc).logits
                got = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[1]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            for s, (s_hf, s_ours, _) in students.items():  # each student: ours = transformers of its shape
                with torch.inference_mode():
                    torch.testing.assert_close(s_ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[1],
                                               s_hf(**enc).logits, atol=1e-4, rtol=1e-4)
            feed = (enc["input_ids"].numpy(), enc["attention_mask"].numpy(), enc["token_type_ids"].numpy())
            for threads in args.threads:
                torch.set_num_threads(threads)
                fns = {"transformers_fp32": lambda: hf(**enc), "transformers_int8": lambda: hf_int8(**enc)}
                for k, m in variants.items():
                    fns[k] = lambda m=m: m(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
                for k, f in onnx_files.items():
                    sess = OnnxModel(d / "onnx" / f, threads)
                    if k == "fp32":
                        torch.testing.assert_close(torch.from_numpy(sess.run(*feed)), ref, atol=1e-4, rtol=1e-4)
                    fns[f"ort_{k}"] = lambda sess=sess: sess.run(*feed)
                names = ("input_ids", "attention_mask", "token_type_ids")
                for k, f in hf_files.items():
                    sess = default_session(f, threads)
                    if k == "fp32":
                        torch.testing.assert_close(torch.from_numpy(sess.run(None, dict(zip(names, feed)))[0]), ref,
                                                   atol=1e-4, rtol=1e-4)
                    fns[f"hf_ort_{k}"] = lambda sess=sess: sess.run(None, dict(zip(names, feed)))
                for s, (_, _, s_onnx) in students.items():
                    if s_onnx is not None:
                        sess = OnnxModel(s_onnx, threads)
                        fns[f"{s}_ort_int8"] = lambda sess=sess: sess.run(*feed)
                times: dict[str, list[float]] = {k: [] for k in fns}
                with torch.inference_mode():
                    for fn in fns.values():
                        timed(fn, 3)
                    for _ in range(3):  # alternate in rounds
                        for k, fn in fns.items():
                            times[k] += timed(fn, max(1, args.repeats // 3))
                row = {"config": name, "batch": bs, "seq_len": args.seq_len, "threads": threads}
                row.update({f"{k}_ms": round(1000 * statistics.median(v), 2) for k, v in times.items()})
                row["latency_ratio"] = round(row["clueforge_fp32_ms"] / row["transformers_fp32_ms"], 3)
                row["int8_ratio"] = round(row["clueforge_int8_ms"] / row["transformers_fp32_ms"], 3)
                row["int8_vs_int8"] = round(row["clueforge_int8_ms"] / row["transformers_int8_ms"], 3)
                if onnx_files:
                    row["ort_fp32_speedup"] = round(row["clueforge_fp32_ms"] / row["ort_fp32_ms"], 3)
                    row["ort_int8_vs_transformers"] = round(row["transformers_fp32_ms"] / row["ort_int8_ms"], 3)
                for k in hf_files:
                    row[f"hf_ort_{k}_vs_ort_{k}"] = round(row[f"hf_ort_{k}_ms"] / row[f"ort_{k}_ms"], 3)
                if args.ort_profile and onnx_files:
                    prof = {k: op_profile(d / "onnx" / f, dict(zip(names, feed)), threads) for k, f in onnx_files.items()}
                    row["ort_profile"] = prof
                    row["ort_fp32_speedup_bound"] = round(row["clueforge_fp32_ms"] / prof["fp32"]["MatMul"], 3)
                for s in students:
                    for k in ("clueforge_int8", "ort_int8"):
                        if f"{s}_{k}_ms" in row:
                            short = "int8" if k == "clueforge_int8" else k
                            row[f"{s}_{short}_vs_transformers"] = round(row["transformers_fp32_ms"] / row[f"{s}_{k}_ms"], 3)
                results.append(row)
                print(row, flush=True)
    write_json(args.out, {"benchmark": "inference", "rows": results, "machine": machine()})


if __name__ == "__main__":
    main()
