"""Preprocessing throughput and memory of ``clueforge corpus build``, against the whole-word-masking
preparation a transformers user runs (jieba segmentation in Python + ``BertTokenizerFast``).

    python benchmarks/corpus_build.py --out bench-out/corpus_build.json
    python benchmarks/corpus_build.py --repeat 3 --skip-baseline     # quicker

Measures, on ``../shared/data/corpus/corpus.jsonl`` (37.7 MB):
1. MB/s of input with 1 and 2 workers (normalise, sentence split, segment + POS, tokenise, align
   side channels, write shards), per worker, and the 2-worker scaling;
2. peak RSS (main process and largest worker) when the input is the corpus repeated ``--repeat``
   times, against the same for 1× (memory must stay flat: the build streams);
3. the baseline on the same input in one process: ``jieba.lcut`` for word boundaries plus
   ``BertTokenizerFast`` (batched) for ids — what the HF Chinese WWM recipe does before training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BERT_VOCAB, CORPUS, machine, write_json  # noqa: E402

CHILD = r"""
import json, resource, sys, time
open("/proc/self/clear_refs", "w").write("5")  # a forked child starts with its parent's peak otherwise
from clueforge.corpus.build import BuildConfig, build_corpus
src, out, vocab, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
m = build_corpus([src], out, BuildConfig(vocab=vocab), workers=workers)
dt = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": dt, "bytes": m["input_bytes"], "tokens": m["tokens"], "docs": m["docs_kept"],
                  "main_rss_mb": hwm / 1024,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def build(src: Path, vocab: Path, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cf-build-"))
    try:
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out / "c"), str(vocab), str(workers)],
                             capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["mb_per_s"] = r["bytes"] / r["seconds"] / 1e6
    return r


def baseline(src: Path, vocab: Path, batch: int = 1000) -> dict:
    """jieba (Python) word boundaries + BertTokenizerFast ids, streaming, one process."""
    import jieba
    from transformers import BertTokenizerFast

    jieba.setLogLevel(60)
    jieba.initialize()
    d = Path(tempfile.mkdtemp())
    shutil.copyfile(vocab, d / "vocab.txt")
    tok = BertTokenizerFast.from_pretrained(d)
    n_bytes = src.stat().st_size
    t0 = time.perf_counter()
    texts: list[str] = []
    tokens = 0

    def flush():
        nonlocal tokens
        refs = [jieba.lcut(t) for t in texts]
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        tokens += sum(map(len, enc))
        assert len(refs) == len(enc)
        texts.clear()

    with open(src, encoding="utf-8") as fh:
        for line in fh:
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError):
                continue
            if len(texts) == batch:
                flush()
    if texts:
        flush()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": n_bytes, "tokens": tokens, "mb_per_s": n_bytes / dt / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=CORPUS)
    ap.add_argument("--vocab", type=Path, default=BERT_VOCAB)
    ap.add_argument("--repeat", type=int, default=10, help="size of the big input for the memory check")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--out", default="bench-out/corpus_build.json")
    args = ap.parse_args()
    if not args.input.is_file() or not args.vocab.is_file():
        sys.exit(f"needs {args.input} and {args.vocab} (../shared/data beside the project)")

    one = build(args.input, args.vocab, 1)
    two = build(args.input, args.vocab, 2)
    result = {
        "benchmark": "corpus_build",
        "input": str(args.input), "input_mb": round(one["bytes"] / 1e6, 2), "tokens": one["tokens"],
        "workers1_mb_per_s": round(one["mb_per_s"], 3),
        "workers2_mb_per_s": round(two["mb_per_s"], 3),
        "per_worker_mb_per_s_at_2": round(two["mb_per_s"] / 2, 3),
        "scaling_2_workers": round(two["mb_per_s"] / one["mb_per_s"], 3),
        "rss_1x_main_mb": round(one["main_rss_mb"], 1),
        "rss_1x_worker_mb": round(two["worker_rss_mb"], 1),
    }
    if args.repeat > 1:
        big = Path(tempfile.mkdtemp(prefix="cf-big-")) / "big.jsonl"
        with open(big, "wb") as out:
            data = args.input.read_bytes()
            for _ in range(args.repeat):
                out.write(data)
        try:
            big1 = build(big, args.vocab, 1)
            big2 = build(big, args.vocab, 2)
        finally:
            shutil.rmtree(big.parent, ignore_errors=True)
        result.update({
            "repeat": args.repeat,
            f"rss_{args.repeat}x_main_mb": round(big1["main_rss_mb"], 1),
            f"rss_{args.repeat}x_worker_mb": round(big2["worker_rss_mb"], 1),
            "rss_growth_main": round(big1["main_rss_mb"] / one["main_rss_mb"] - 1, 4),
            "rss_growth_worker": round(big2["worker_rss_mb"] / two["worker_rss_mb"] - 1, 4),
            f"workers1_mb_per_s_{args.repeat}x": round(big1["mb_per_s"], 3),
        })
    if not args.skip_baseline:
        base = baseline(args.input, args.vocab)
        result.update({
            "baseline": "jieba.lcut (Python) + BertTokenizerFast, one process",
            "baseline_mb_per_s": round(base["mb_per_s"], 3),
            "ratio_vs_baseline_1_worker": round(one["mb_per_s"] / base["mb_per_s"], 3),
        })
    result["machine"] = machine()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
