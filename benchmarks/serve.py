"""`clueforge serve` under load: requests/s and p50/p99 latency at concurrency 1/8/32, batching on
vs off, and a plain transformers BertForSequenceClassification behind the same HTTP stack.

    python benchmarks/serve.py --out bench-out/serve.json
    python benchmarks/serve.py --config tiny --requests 200 --memory-requests 2000 --out bench-out/serve-quick.json
    python benchmarks/serve.py --config mini --compute --out bench-out/serve-compute.json  # no HTTP: why batching pays or not
    nice -n 5 python benchmarks/serve.py --config tiny --memory --variants batch_on batch_exact onnx_on onnx_exact \
        --memory-requests 10000 --out bench-out/serve-memory.json  # RSS every 1,000 requests at concurrency 32

The model: a random ``--config`` (mini: 6 layers, hidden 384) sentence-pair classifier with 3
labels, saved as a fine-tuned OCNLI checkpoint with the Chinese BERT vocabulary (``--model DIR``
takes a real fine-tuned directory instead). Requests are real OCNLI dev pairs when
``../shared/data`` is there. Every server is a ``clueforge serve`` subprocess on 127.0.0.1 with
``--threads``; the load generator (one process, asyncio streams, keep-alive connections) sends ``--requests`` requests per
(variant, concurrency), stopping early after ``--max-seconds``; each variant gets a warm-up first.

All the variants' servers run at once; each concurrency's requests are split into ``--rounds``
rounds and the variants take turns within a round (rotating who goes first), so a change in the
machine's load reaches every variant alike.

Variants: ``batch_on`` (``--max-batch 32 --max-wait-ms W``, batches formed by length with the
server's measured ``--overhead-tokens``), ``batch_pad`` (the same with ``--overhead-tokens 1e9``:
every batch is all the waiting requests padded together, the server before length-aware batching),
``batch_on`` and ``onnx_on`` pass ``--pad-multiple 16`` (the ONNX server's default is 1),
``batch_exact`` (``batch_on`` with ``--pad-multiple 1``: batches padded to their longest request
only, the server before length buckets), ``batch_off`` (``--max-batch 1 --pad-multiple 1``),
the same on the ONNX export (``onnx_on``, ``onnx_exact``, ``onnx_off``: ``--runtime onnx``, fp32),
``transformers`` (the same checkpoint loaded by ``transformers.BertForSequenceClassification``,
one request per forward, served by the same FastAPI/Uvicorn app). ``batching_speedup_{torch,onnx}_c32``
= requests/s with batching / without at concurrency 32. Memory: RSS of the ``--memory-variant``
server sampled over ``--memory-requests`` more requests at concurrency 32. ``--memory``: only
that check, on every ``--variants`` server, with the 10,000 OCNLI train+dev pairs (14-107 tokens):
each server process's RSS (from /proc) and distinct shapes after every ``--memory-every`` requests,
the variants taking turns, and the failed requests.

``--compute`` measures, in one process and without HTTP, what a batch costs per request: groups
of 32 requests (random OCNLI dev pairs) run one by one, as one batch padded to the longest, and
split by ``plan_batch`` (the server's length-aware batching, with the overhead it measures at
start-up), in alternating rounds; plus the one-request forward at a short and the full length (the
server's overhead measurement).

On a shared machine the load generator competes with the server for the same cores: read the
figures as ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BERT_VOCAB, ROOT, SHARED, machine, write_json  # noqa: E402


def pairs(n: int, splits: tuple[str, ...] = ("dev",)) -> list[list[str]]:
    """The first ``n`` OCNLI sentence pairs of ``splits`` (a fixed pair without the shared data)."""
    rows = []
    for split in splits:
        f = SHARED / "tasks" / "ocnli" / f"{split}.json"
        if f.is_file():
            rows += [json.loads(line) for line in f.open(encoding="utf-8")]
    if rows:
        return [[r["sentence1"], r["sentence2"]] for r in rows[:n]]
    return [["今天天气很好，我们一起去公园散步吧。", "天气不错，适合出门。"]] * n


def make_model(config: str, out: Path) -> Path:
    """A random ``config`` OCNLI classifier saved as a fine-tuned checkpoint (HF layout)."""
    import torch

    from clueforge.finetune.loop import save_checkpoint
    from clueforge.model.heads import TaskModel
    from clueforge.pretrain.config import load_config
    from clueforge.tasks.registry import get_task

    if not BERT_VOCAB.is_file():
        sys.exit(f"{BERT_VOCAB} is absent: pass --model DIR (a fine-tuned checkpoint)")
    mc = load_config(config).model
    mc.vocab_size = sum(1 for _ in open(BERT_VOCAB, encoding="utf-8"))
    torch.manual_seed(0)
    task = get_task("ocnli")
    save_checkpoint(TaskModel(mc, "sequence", 3).eval(), out, BERT_VOCAB, task, {"labels": list(task.labels), "descs": {}})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start in 180 s")


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _post(reader, writer, request: bytes) -> int:
    """One request on a keep-alive connection; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def load(port: int, items: list[list[str]], concurrency: int, n: int, max_seconds: float, offset: int = 0) -> dict:
    """``n`` requests (``items`` from ``offset`` on) from ``concurrency`` keep-alive connections
    (stopping after ``max_seconds``).
    A minimal HTTP/1.1 client on asyncio streams, requests pre-encoded: an httpx client costs
    about as much CPU per request as the server, and on a 2-core machine it would be the bottleneck."""
    bodies = [json.dumps({"texts": t}, ensure_ascii=False).encode() for t in items]
    requests = [b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies]
    lat, codes = [], {}
    sent = 0
    t_end = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while sent < n and time.perf_counter() < t_end:
                req = requests[(offset + sent) % len(requests)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    code = await _post(reader, writer, req)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    code = type(exc).__name__
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                lat.append(time.perf_counter() - t0)
                codes[str(code)] = codes.get(str(code), 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"lat": lat, "codes": codes, "wall": time.perf_counter() - t0}


def summarise(parts: list[dict]) -> dict:
    """The rounds of one (variant, concurrency) cell as one row."""
    lat = sorted(x for p in parts for x in p["lat"])
    wall = sum(p["wall"] for p in parts)
    codes: dict = {}
    for p in parts:
        for k, v in p["codes"].items():
            codes[k] = codes.get(k, 0) + v
    q = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2)  # noqa: E731
    return {"requests": len(lat), "seconds": round(wall, 2), "rps": round(len(lat) / wall, 1), "p50_ms": q(0.5),
            "p99_ms": q(0.99), "mean_ms": round(1000 * statistics.fmean(lat), 2),
            "failed": sum(v for k, v in codes.items() if k != "200"), "status": codes}


def compute(model_dir: Path, items: list[list[str]], threads: int, groups: int, max_batch: int) -> dict:
    """Per-request compute of a group of ``max_batch`` requests: one by one, one padded batch, and
    the batches ``plan_batch`` forms (the server's code: ``Backend.parse``/``infer``), interleaved."""
    import random

    from clueforge.deploy.serve import Backend, plan_batch

    backend = Backend.load(model_dir, "torch", threads)
    overhead = backend.overhead_tokens()
    parsed = [backend.parse(json.dumps({"texts": t}, ensure_ascii=False).encode()) for t in items]
    lens = [len(f["input_ids"]) for _, f in parsed]
    rng = random.Random(0)
    samples = [rng.sample(range(len(parsed)), max_batch) for _ in range(groups + 1)]

    def planned(g: list[int]) -> list[list[int]]:
        out, left = [], list(g)
        while left:
            take = plan_batch([lens[i] for i in left], max_batch, overhead)
            out.append([left[k] for k in take])
            left = [x for k, x in enumerate(left) if k not in take]
        return out

    ways = {"one_by_one": lambda g: [[i] for i in g], "padded": lambda g: [g], "by_length": planned}
    times: dict = {k: [] for k in ways}
    sizes = []
    for n, g in enumerate(samples):
        for k, way in ways.items():
            t0 = time.perf_counter()
            for b in way(g):
                backend.infer([parsed[i][0] for i in b], [parsed[i][1] for i in b])
            if n:  # the first group warms up
                times[k].append((time.perf_counter() - t0) / len(g))
        sizes.append([len(b) for b in planned(g)])
    ms = {f"{k}_ms_per_request": round(1000 * statistics.median(v), 2) for k, v in times.items()}
    return {**ms, "padded_speedup": round(ms["one_by_one_ms_per_request"] / ms["padded_ms_per_request"], 2),
            "by_length_speedup": round(ms["one_by_one_ms_per_request"] / ms["by_length_ms_per_request"], 2),
            "overhead_tokens": round(overhead, 1), "groups": groups, "group_size": max_batch,
            "mean_tokens": round(statistics.fmean(lens), 1), "max_tokens": max(lens),
            "mean_padded_tokens": round(statistics.fmean(max(lens[i] for i in g) for g in samples), 1),
            "by_length_batch_sizes": sizes[:5]}


def proc_rss_mb(pid: int) -> dict:
    """Resident memory of process ``pid`` in MB: total, anonymous (heap, arenas, caches) and file-backed."""
    names = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key = line.split(":")[0]
        if key in names:
            out[names[key]] = round(int(line.split()[1]) / 1024, 1)
    return out


def memory(servers: dict, items: list[list[str]], requests: int, every: int, concurrency: int,
           on_step=None) -> dict:
    """RSS of every server process after each ``every`` requests (at ``concurrency``), the variants
    taking turns chunk by chunk: at the end of the chunk (``rss_busy_mb``) and after 1.5 s idle, once
    the server has trimmed its heap (``rss_mb``, the memory it keeps). The flatness figure is the
    growth of ``rss_mb`` from the sample at ``requests / 5`` (after warm-up) to the end.
    ``on_step(result so far)`` after each chunk (a run cut short keeps its curve)."""
    import httpx

    curves: dict = {v: [] for v in servers}

    def sample(variant: str, done: int, part: dict | None) -> None:
        proc, _, url = servers[variant]
        busy = proc_rss_mb(proc.pid)["rss_mb"]  # as the last batch left it
        time.sleep(1.5)  # idle for 1 s, the server trims its heap: the RSS it keeps
        m = httpx.get(url + "/metrics").json()
        curves[variant].append({"requests": done, **proc_rss_mb(proc.pid), "rss_busy_mb": busy,
                                "distinct_shapes": m.get("distinct_shapes"),
                                "memory_trims": m.get("memory_trims"), "idle_trims": m.get("idle_trims"),
                                "failed": part["failed"] if part else 0,
                                "rps": part["rps"] if part else None})

    for v in servers:
        sample(v, 0, None)
    done, t0 = 0, time.time()
    while done < requests:
        n = min(every, requests - done)
        for v in servers:
            part = summarise([asyncio.run(load(servers[v][1], items, concurrency, n, 600, offset=done))])
            sample(v, done + n, part)
        done += n
        print(json.dumps({"requests": done, **{v: c[-1]["rss_mb"] for v, c in curves.items()}}), flush=True)
        out = _memory_summary(curves, requests, every, concurrency, time.time() - t0, len(items), done)
        if on_step is not None:
            on_step(out)
    return out


def save_partial(path: str, obj: dict) -> None:
    """``obj`` to ``path`` without printing it (the result so far of a long run)."""
    from clueforge.utils import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False))  # a kill mid-write leaves the last one whole


def _memory_summary(curves: dict, requests: int, every: int, concurrency: int, seconds: float, texts: int,
                    done: int) -> dict:
    out = {"requests": done, "planned_requests": requests, "every": every, "concurrency": concurrency,
           "seconds": round(seconds, 1), "distinct_texts": texts, "variants": {}}
    warm = min(len(next(iter(curves.values()))) - 1, max(1, round(requests / 5 / every)))  # 2,000 of 10,000
    for v, c in curves.items():
        rss, busy = [x["rss_mb"] for x in c], [x["rss_busy_mb"] for x in c]
        out["variants"][v] = {
            "curve": c, "failed": sum(x["failed"] for x in c), "rss_start_mb": rss[0], "rss_end_mb": rss[-1],
            "after_warmup_requests": c[warm]["requests"],
            "growth_after_warmup_mb": round(rss[-1] - rss[warm], 1),
            "growth_after_warmup_pct": round(100 * (rss[-1] - rss[warm]) / rss[warm], 2),
            "max_step_after_warmup_mb": round(max((b - a for a, b in zip(rss[warm:], rss[warm + 1:])), default=0), 1),
            "busy_max_until_warmup_mb": max(busy[:warm + 1]),
            "busy_max_after_warmup_mb": max(busy[warm + 1:], default=None)}
    return out


def serve_transformers(model_dir: str, port: int, max_batch: int, threads: int) -> None:
    """Run the clueforge HTTP app with transformers' BertForSequenceClassification as the model."""
    from transformers import BertForSequenceClassification

    from clueforge.deploy.serve import Backend, serve

    backend = Backend.load(model_dir, "torch", threads)
    hf = BertForSequenceClassification.from_pretrained(model_dir).eval()
    backend.model = lambda ids, mask, types: hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    backend.runtime = "transformers"  # Backend.infer runs it under torch.inference_mode, like ours
    serve(model_dir, port=port, max_batch=max_batch, max_wait_ms=5, queue=1024, backend=backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="A fine-tuned sentence-pair checkpoint (default: a random --config one).")
    ap.add_argument("--config", default="mini")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--variants", nargs="+",
                    default=["batch_on", "batch_pad", "batch_off", "onnx_on", "onnx_off", "transformers"])
    ap.add_argument("--rounds", type=int, default=3, help="Turns each variant takes per concurrency (interleaved).")
    ap.add_argument("--memory-variant", default="batch_on", help="The variant whose RSS is followed.")
    ap.add_argument("--requests", type=int, default=400, help="Requests per (variant, concurrency).")
    ap.add_argument("--max-seconds", type=float, default=40, help="Time cap per (variant, concurrency), all rounds.")
    ap.add_argument("--memory-requests", type=int, default=10_000, help="Requests for the memory check (0 = skip).")
    ap.add_argument("--memory-every", type=int, default=1000, help="Requests between two RSS samples.")
    ap.add_argument("--memory", action="store_true",
                    help="Only the memory check, on every --variants server (taking turns every --memory-every "
                         "requests), with OCNLI train+dev pairs (10,000 distinct texts of varied length).")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5)
    ap.add_argument("--threads", type=int, default=1, help="Server compute threads.")
    ap.add_argument("--out", default="bench-out/serve.json")
    ap.add_argument("--compute", action="store_true", help="Only the in-process per-request compute comparison.")
    ap.add_argument("--groups", type=int, default=8, help="--compute: groups of --max-batch requests timed.")
    ap.add_argument("--serve-transformers", help=argparse.SUPPRESS)  # internal: the transformers server
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_transformers:
        return serve_transformers(args.serve_transformers, args.port, 1, args.threads)

    model = Path(args.model) if args.model else make_model(args.config, Path(tempfile.mkdtemp()) / "ocnli")
    items = pairs(20_000, ("train", "dev")) if args.memory else pairs(500)
    if args.compute:
        import torch

        torch.set_num_threads(args.threads)
        row = compute(model, items, args.threads, args.groups, args.max_batch)
        print(json.dumps(row), flush=True)
        return write_json(args.out, {"benchmark": "serve-compute", "threads": args.threads, **row, "machine": machine()})
    results: dict = {"benchmark": "serve", "model": str(model) if args.model else f"random {args.config} OCNLI",
                     "threads": args.threads, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                     "rows": [], "machine": machine()}
    onnx_dir = None
    if any(v.startswith("onnx") for v in args.variants):
        from clueforge.deploy.export import export_onnx

        onnx_dir = Path(tempfile.mkdtemp()) / "onnx"
        export_onnx(model, onnx_dir)
    import httpx

    servers = {}
    for variant in args.variants:
        port = free_port()
        if variant == "transformers":
            cmd = [sys.executable, __file__, "--serve-transformers", str(model), "--port", str(port),
                   "--threads", str(args.threads)]
        else:
            onnx = variant.startswith("onnx")
            cmd = [sys.executable, "-m", "clueforge", "serve", str(onnx_dir if onnx else model), "--runtime",
                   "onnx" if onnx else "torch", "--threads", str(args.threads), "--queue", "1024", "--port", str(port),
                   "--max-batch", str(1 if variant.endswith("_off") else args.max_batch),
                   "--max-wait-ms", str(args.max_wait_ms)]
            if variant.endswith("_pad"):
                cmd += ["--overhead-tokens", "1e9"]
            if variant.endswith(("_exact", "_off")):  # one request per forward: at most max_length shapes anyway
                cmd += ["--pad-multiple", "1"]
            else:  # buckets of 16 on both runtimes (the server's own default is 1 under ONNX)
                cmd += ["--pad-multiple", "16"]
        servers[variant] = (start(cmd, port), port, f"http://127.0.0.1:{port}")
        results.setdefault("overhead_tokens", {})[variant] = httpx.get(servers[variant][2] + "/health").json().get(
            "overhead_tokens")
    if args.memory:
        results["benchmark"] = "serve-memory"
        results["memory"] = memory(servers, items, args.memory_requests, args.memory_every, 32,
                                   on_step=lambda m: save_partial(args.out, {**results, "memory": m}))
        results["exit_codes"] = {v: stop(proc) for v, (proc, _, _) in servers.items()}
        return write_json(args.out, results)
    for variant, (_, port, _) in servers.items():
        asyncio.run(load(port, items, 8, 40, 30))  # warm-up
    for c in args.concurrency:
        parts: dict = {v: [] for v in servers}
        before = {v: httpx.get(url + "/metrics").json() for v, (_, _, url) in servers.items()}
        names = list(servers)
        for r in range(args.rounds):
            for variant in names[r % len(names):] + names[:r % len(names)]:
                n = args.requests // args.rounds
                parts[variant].append(asyncio.run(load(servers[variant][1], items, c, n, args.max_seconds / args.rounds,
                                                       offset=r * n)))
        for variant, (_, _, url) in servers.items():
            m = httpx.get(url + "/metrics").json()
            batches = m["batches"] - before[variant]["batches"]  # this cell's batches (the server counts since start)
            row = {"variant": variant, "concurrency": c, **summarise(parts[variant]),
                   "server_mean_batch": round((m["requests"] - before[variant]["requests"]) / max(1, batches), 2),
                   "server_rss_mb": m["rss_mb"]}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.memory_variant in servers and args.memory_requests:
        results["memory"] = memory({args.memory_variant: servers[args.memory_variant]}, items,
                                   args.memory_requests, args.memory_every, 32)
    for variant, (proc, _, _) in servers.items():
        results.setdefault("exit_codes", {})[variant] = stop(proc)

    def rps(v, c):
        return next((r["rps"] for r in results["rows"] if r["variant"] == v and r["concurrency"] == c), None)

    for c in args.concurrency:
        hf = rps("transformers", c)
        for rt, on, off in (("torch", "batch_on", "batch_off"), ("onnx", "onnx_on", "onnx_off"),
                            ("torch_padded", "batch_pad", "batch_off"), ("onnx_padded", "onnx_pad", "onnx_off")):
            if rps(on, c) and rps(off, c):
                results[f"batching_speedup_{rt}_c{c}"] = round(rps(on, c) / rps(off, c), 2)
            if rps(on, c) and hf:
                results[f"{on}_vs_transformers_c{c}"] = round(rps(on, c) / hf, 2)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
