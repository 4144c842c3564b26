"""Helpers shared by the benchmarks: where the data is, a corpus to read, machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BERT_VOCAB = SHARED / "vocab" / "bert-chinese-vocab.txt"
CORPUS = SHARED / "corpus" / "corpus.jsonl"


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["cpu"] = model
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"],
                                 cwd=ROOT, capture_output=True, text=True).stdout.strip()
        info["git_dirty"] = bool(changed)  # the code run is not exactly that commit's
    except OSError:
        pass
    return info


def benchmark_corpus(data: str | None, lines: int = 20000) -> Path:
    """A built corpus: ``data`` if given, else the first ``lines`` documents of the real corpus with
    the Chinese BERT vocab, else the embedded sample with its own vocab."""
    from clueforge.corpus.build import BuildConfig, build_corpus, iter_texts
    from clueforge.text.vocab import build_vocab

    if data:
        return Path(data)
    tmp = Path(tempfile.mkdtemp(prefix="clueforge-bench-"))
    if CORPUS.is_file() and BERT_VOCAB.is_file():
        src = tmp / "head.jsonl"
        with open(CORPUS, "rb") as fh, open(src, "wb") as out:
            for _, line in zip(range(lines), fh):
                out.write(line)
        build_corpus([src], tmp / "corpus", BuildConfig(vocab=str(BERT_VOCAB)), workers=1)
        return tmp / "corpus"
    sample = ROOT / "src" / "clueforge" / "data" / "sample_corpus.txt"
    cfg = BuildConfig(vocab="", doc_sep="blank")
    build_vocab(iter_texts([sample], cfg), tmp / "vocab.txt", vocab_size=2000, min_frequency=1)
    cfg.vocab = str(tmp / "vocab.txt")
    build_corpus([sample], tmp / "corpus", cfg)
    return tmp / "corpus"


def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux keeps ``ru_maxrss`` across fork/exec, so a
    child would otherwise report its parent's peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's RSS high-water mark since the last ``reset_peak_rss`` (VmHWM), in MiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def kernel_ms_by_op(sess, feed: dict, calls: int = 30) -> dict[str, float]:
    """Kernel ms per call by operator type, from an onnxruntime session made with
    ``enable_profiling``: ``calls`` runs of ``feed``, then its profile, most expensive first."""
    import collections

    for _ in range(calls):
        sess.run(None, feed)
    by_op: collections.Counter = collections.Counter()
    for e in json.loads(Path(sess.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    return {op: round(us / calls / 1000, 3) for op, us in by_op.most_common()}
