"""`clueforge serve` as a subprocess on 127.0.0.1: batched answers equal offline `predict`, bad
requests get 4xx with a message, a full queue gets 503, SIGTERM exits 0 promptly."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from clueforge.cli import app
from conftest import ROOT
from deploy_models import FIXTURES, exported  # noqa: F401 (a fixture)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
runner = CliRunner()
logging.getLogger("httpx").setLevel(logging.WARNING)
START_TIMEOUT = 90  # a shared 2-core CI machine imports torch slowly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model_dir, *args):
    """A running `clueforge serve` subprocess; yields (base url, process). Killed if still alive."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "clueforge", "serve", str(model_dir), "--port", str(port),
                             "--threads", "1", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {proc.stdout.read().decode()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not start")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def afqmc(tmp_path_factory, exported):
    """A tiny AFQMC (sentence pair) checkpoint and its offline predictions on the fixture test file."""
    root = tmp_path_factory.mktemp("serve")
    ft = exported["afqmc"][0]
    test = FIXTURES / "afqmc" / "test.json"
    r = runner.invoke(app, ["predict", "afqmc", "--model", str(ft), "--input", str(test), "--out", str(root / "p.json")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    preds = [json.loads(line)["label"] for line in (root / "p.json").read_text().splitlines()]
    assert len(set(preds)) > 1  # the labels tell inputs apart
    return ft, [[r["sentence1"], r["sentence2"]] for r in rows], preds


def test_batched_answers_equal_offline_predict_and_bad_requests(afqmc):
    ft, pairs, preds = afqmc
    with server(ft, "--max-batch", "8", "--max-wait-ms", "300") as (url, _):
        health = httpx.get(url + "/health").json()
        assert health["task"] == "afqmc" and health["labels"] == ["0", "1"] and health["texts_per_request"] == 2
        items = pairs * 3  # 18 concurrent requests: batches of several
        with ThreadPoolExecutor(len(items)) as pool:
            answers = list(pool.map(lambda p: httpx.post(url + "/predict", json={"texts": p}, timeout=30), items))
        assert [a.status_code for a in answers] == [200] * len(items)
        assert [a.json()["label"] for a in answers] == preds * 3
        assert all(abs(sum(a.json()["scores"].values()) - 1) < 1e-4 for a in answers)
        m = httpx.get(url + "/metrics").json()
        assert m["by_status"] == {"200": len(items)}
        assert max(int(k) for k in m["batch_size_histogram"]) > 1  # requests really were batched
        assert sum(int(k) * v for k, v in m["batch_size_histogram"].items()) == len(items)
        assert m["latency_ms"]["p50"] is not None and m["latency_ms"]["p99"] >= m["latency_ms"]["p50"]

        bad = [(b"{not json", 400, "invalid JSON"), (b'["a", "b"]', 400, "JSON object"),
               (b'{"texts": ["a", "b"], "x": 1}', 422, "unknown field 'x'"), (b'{"text": "a"}', 422, "unknown field"),
               (b"{}", 422, "missing field 'texts'"), (b'{"texts": "ab"}', 422, "list of strings"),
               (b'{"texts": ["a", 3]}', 422, "list of strings"), (b'{"texts": ["only one"]}', 422, "2 texts, got 1"),
               (b'{"texts": ["a", "b", "c"]}', 422, "2 texts, got 3"), (b'{"texts": ["a", "  "]}', 422, "texts[1] is empty"),
               (json.dumps({"texts": ["长" * 200, "b"]}).encode(), 422, "too long")]
        for body, status, msg in bad:
            r = httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status and msg in r.json()["error"], (body, r.status_code, r.text)
        m = httpx.get(url + "/metrics").json()
        assert m["by_status"]["422"] == 9 and m["by_status"]["400"] == 2


def test_full_queue_answers_503_then_recovers(afqmc):
    ft, pairs, preds = afqmc
    # queue 2 < max batch 4, wait 3 s: two requests sit in the queue, deterministically full
    with server(ft, "--max-batch", "4", "--max-wait-ms", "3000", "--queue", "2") as (url, _):
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, httpx.post(url + "/predict", json={"texts": pairs[i]}, timeout=30))) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/metrics").json()["queue"]["admitted"] < 2:
            assert time.monotonic() < deadline, "requests never queued"
            time.sleep(0.02)
        r = httpx.post(url + "/predict", json={"texts": pairs[2]})
        assert r.status_code == 503 and "queue full" in r.json()["error"]
        for t in threads:
            t.join()
        assert [results[i].status_code for i in range(2)] == [200, 200]
        assert [results[i].json()["label"] for i in range(2)] == preds[:2]
        r = httpx.post(url + "/predict", json={"texts": pairs[2]})  # room again
        assert r.status_code == 200 and r.json()["label"] == preds[2]
        assert httpx.get(url + "/metrics").json()["by_status"] == {"200": 3, "503": 1}


def test_onnx_ner_server_and_sigterm(exported, tmp_path):
    onnx_dir = exported["cluener"][1]
    test = FIXTURES / "cluener" / "test.json"
    r = runner.invoke(app, ["predict", "cluener", "--model", str(onnx_dir), "--runtime", "onnx",
                            "--input", str(test), "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    texts = [json.loads(line)["text"] for line in test.read_text().splitlines() if line.strip()]
    offline = [json.loads(line)["label"] for line in (tmp_path / "p.json").read_text().splitlines()]
    from clueforge.deploy.serve import _glibc

    with server(onnx_dir, "--runtime", "onnx") as (url, proc):
        health = httpx.get(url + "/health").json()
        assert health["runtime"] == "onnx" and health["pad_multiple"] == 1, health  # ONNX: exact lengths by default
        assert health["allocator_tuned"] is (_glibc("mallopt") is not None), health  # serve() tuned glibc at start
        for text, want in zip(texts, offline):
            ans = httpx.post(url + "/predict", json={"texts": [text]}).json()
            assert len(ans["tags"]) == len(text)
            got: dict = {}
            for e in ans["entities"]:
                assert text[e["start"]:e["end"] + 1] == e["text"]
                got.setdefault(e["type"], {}).setdefault(e["text"], []).append([e["start"], e["end"]])
            assert got == want
        assert httpx.post(url + "/predict", json={"texts": ["a", "b"]}).status_code == 422  # NER takes one text
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10


def test_serve_refuses_other_families(tmp_path, sample_vocab):
    from deploy_models import tiny_finetuned

    ft = tiny_finetuned(tmp_path / "c3", "c3", FIXTURES / "c3", sample_vocab)
    # --queue 0 is refused too, later: without the family check this fails on the message, never serves
    r = runner.invoke(app, ["serve", str(ft), "--port", str(_free_port()), "--queue", "0"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "c3 is a choice task" in text and "classify family" in text, r.output


def _plan_cost(lengths, groups, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def test_plan_batch_groups_by_length_and_always_takes_the_oldest():
    import itertools
    import random

    from clueforge.deploy.serve import plan_batch

    assert plan_batch([10] * 8 + [60] * 8, 16, 4) == list(range(8))  # short ones apart from the long ones
    assert plan_batch([60] + [10] * 8 + [60] * 7, 16, 4) == [0, *range(9, 16)]  # the oldest's group runs first
    assert plan_batch([60] + [10] * 8 + [60] * 7, 16, 1e6) == list(range(16))  # large overhead: one padded batch
    rng = random.Random(0)
    for _ in range(300):
        n, max_batch, overhead = rng.randint(1, 40), rng.randint(1, 12), rng.choice([0, 3, 25, 200])
        lengths = [rng.randint(3, 128) for _ in range(n)]
        got = plan_batch(lengths, max_batch, overhead)
        assert 0 in got and got == sorted(set(got)) and len(got) <= max_batch and got[-1] < n
        if n <= 7:  # the planned partition is the cheapest: brute force over the sorted split points
            order = sorted(range(n), key=lambda i: (lengths[i], i))
            best = min(_plan_cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], overhead)
                       for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                       if all(b - a <= max_batch for a, b in zip((0, *cuts), (*cuts, n))))
            rest = [i for i in order if i not in got]
            cost_got = overhead + len(got) * max(lengths[i] for i in got)
            # what remains, planned the same way, completes a partition of cost `best`
            groups, left = [], rest
            while left:
                sub = plan_batch([lengths[i] for i in left], max_batch, overhead)
                groups.append([left[i] for i in sub])
                left = [x for k, x in enumerate(left) if k not in sub]
            assert cost_got + _plan_cost(lengths, groups, overhead) <= best + 1e-9, (lengths, max_batch, overhead)


def test_mixed_length_batches_answer_what_each_request_alone_answers(afqmc):
    from clueforge.deploy.serve import Backend

    ft, pairs, _ = afqmc
    short = [[a[:3], b[:3]] for a, b in pairs[:4]] * 2
    long_ = [[(a * 5)[:n], (b * 5)[:n]] for n in (27, 23) for a, b in pairs[:4]]  # 9 tokens; 57 and 49 tokens
    items = [x for pair in zip(short, long_) for x in pair]  # interleaved arrivals, 16 requests
    backend = Backend.load(ft, "torch", 1)
    alone = []
    for texts in items:
        ex, feat = backend.parse(json.dumps({"texts": texts}).encode())
        alone.append(backend.infer([ex], [feat])[0])
    assert len({round(a["scores"]["1"], 4) for a in alone}) > 4  # the scores tell the requests apart
    # 16 = max batch: planned at once. Overhead 40 tokens: two batches of 8 (short; long, 49-57 tokens
    # padded to 57) cost 2·40 + 8·9 + 8·57, less than one padded batch (40 + 16·57) or three (3·40 + 8·9 + 4·49 + 4·57)
    with server(ft, "--max-batch", "16", "--max-wait-ms", "5000", "--overhead-tokens", "40") as (url, _):
        assert httpx.get(url + "/health").json()["overhead_tokens"] == 40
        with ThreadPoolExecutor(len(items)) as pool:
            answers = list(pool.map(lambda p: httpx.post(url + "/predict", json={"texts": p}, timeout=60), items))
        assert httpx.get(url + "/metrics").json()["batch_size_histogram"] == {"8": 2}
    for got, want in zip(answers, alone):
        got = got.json()
        assert got["label"] == want["label"]
        assert got["scores"].keys() == want["scores"].keys()
        assert all(abs(got["scores"][k] - want["scores"][k]) <= 2e-6 for k in want["scores"]), (got, want)


def test_bucket_length_and_pad_batch():
    import torch

    from clueforge.deploy.serve import bucket_length, pad_batch

    assert [bucket_length(n, 16, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 48, 64]
    assert {bucket_length(n, 16, 64) for n in range(1, 65)} == {16, 32, 48, 64}
    assert [bucket_length(n, 16, 100) for n in (96, 97, 100)] == [96, 100, 100]  # never past the model's length
    assert all(bucket_length(n, 1, 64) == n for n in range(1, 65))  # --pad-multiple 1: no padding
    batch = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.tensor([[1, 1, 1]]),
             "token_type_ids": torch.tensor([[0, 0, 1]]), "labels": torch.tensor([1])}
    got = pad_batch(batch, 5, 0)
    assert got["input_ids"].tolist() == [[2, 5, 3, 0, 0]] and got["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert got["token_type_ids"].tolist() == [[0, 0, 1, 0, 0]] and got["labels"].tolist() == [1]


def test_padded_batches_answer_what_unpadded_ones_do(afqmc, exported):
    """The bucketing switch's equivalence: a batch padded to the model's full length answers what the
    same batch padded only to its longest request answers (classification on torch, NER on ONNX)."""
    from clueforge.deploy.serve import Backend, build_app

    ft, pairs, _ = afqmc
    cls = Backend.load(ft, "torch", 1)
    ner = Backend.load(exported["cluener"][1], "onnx", 1)
    with pytest.raises(ValueError, match="--pad-multiple 0"):
        build_app(cls, pad_multiple=0, overhead_tokens=0)
    ner_texts = [[a[:30]] for a, _ in pairs] + [["北京市朝阳区的张三去了上海。"]]
    for backend, items in ((cls, [list(p) for p in pairs]), (ner, ner_texts)):
        parsed = [backend.parse(json.dumps({"texts": t}).encode()) for t in items]
        ex, feats = [p[0] for p in parsed], [p[1] for p in parsed]
        assert max(len(f["input_ids"]) for f in feats) < backend.task.max_length  # the padding is real
        plain, padded = backend.infer(ex, feats), backend.infer(ex, feats, backend.task.max_length)
        if backend is ner:
            assert plain == padded and any(a["entities"] for a in plain)
        else:
            for got, want in zip(padded, plain):
                assert got["label"] == want["label"]
                assert all(abs(got["scores"][k] - want["scores"][k]) <= 2e-6 for k in want["scores"]), (got, want)


def test_server_runs_a_bounded_set_of_shapes(afqmc):
    """Every batch is padded to a multiple of --pad-multiple (16, the torch default) tokens: requests of 29
    different lengths give at most ⌈64 / 16⌉ lengths and shapes as the model receives them (/metrics
    reports the input tensor's shape), and the answers are unchanged.
    (Each new shape costs memory: docs/benchmarks.md, "Memory over 10,000 requests".)"""
    from clueforge.deploy.serve import Backend, _glibc, release_free_memory

    ft, pairs, _ = afqmc
    a, b = pairs[0]
    items = [[(a * 9)[:n], (b * 9)[:n]] for n in range(2, 31)]  # 7-63 tokens: 29 lengths
    backend = Backend.load(ft, "torch", 1)
    parsed = [backend.parse(json.dumps({"texts": t}).encode()) for t in items]
    lengths = {len(f["input_ids"]) for _, f in parsed}
    assert len(lengths) == 29 and max(lengths) <= 64
    alone = [backend.infer([ex], [f])[0] for ex, f in parsed]
    with server(ft, "--max-batch", "1") as (url, _):
        health = httpx.get(url + "/health").json()
        assert health["pad_multiple"] == 16 and health["allocator_tuned"] is (_glibc("mallopt") is not None), health
        answers = [httpx.post(url + "/predict", json={"texts": t}, timeout=30).json() for t in items]
        m = httpx.get(url + "/metrics").json()
        if release_free_memory():  # idle 1 s after batches, the server trims its heap, once
            deadline = time.monotonic() + 30
            while httpx.get(url + "/metrics").json()["idle_trims"] < 1:
                assert time.monotonic() < deadline, "no trim while idle"
                time.sleep(0.2)
    assert set(m["batch_length_histogram"]) <= {"16", "32", "48", "64"} and m["distinct_shapes"] <= 4, m
    assert sum(m["batch_length_histogram"].values()) == 29
    if release_free_memory():  # glibc: the heap is trimmed once after each new shape's first batch
        assert m["memory_trims"] == m["distinct_shapes"], m
    for got, want in zip(answers, alone):
        assert got["label"] == want["label"]
        assert all(abs(got["scores"][k] - want["scores"][k]) <= 2e-6 for k in want["scores"]), (got, want)


def test_tune_allocator_keeps_large_buffers_out_of_the_heap():
    """glibc raises its mmap threshold to the size of a freed mmapped block; after that a batch's
    large activations stay resident in the heap. With the threshold fixed (what `clueforge serve`
    does at start), a 4 MiB buffer allocated after an 8 MiB one was freed is still mmapped."""
    script = """
import ctypes, sys
from clueforge.deploy.serve import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
try:
    libc = ctypes.CDLL("libc.so.6")
except OSError:
    print("no-glibc"); sys.exit()
if not hasattr(libc, "mallinfo2"):
    print("no-glibc"); sys.exit()
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "tuned":
    assert tune_allocator()
libc.free(ctypes.c_void_p(libc.malloc(8 << 20)))  # without a fixed threshold glibc now serves < 8 MiB from the heap
before = libc.mallinfo2().hblkhd
p = libc.malloc(4 << 20)
print("mmapped" if libc.mallinfo2().hblkhd - before >= 4 << 20 else "heap")
libc.free(ctypes.c_void_p(p))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = {mode: subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                                timeout=120) for mode in ("tuned", "default")}
    if out["tuned"].stdout.strip() == "no-glibc":
        pytest.skip("not glibc: nothing to tune")
    assert out["tuned"].stdout.strip() == "mmapped", out["tuned"].stderr
    assert out["default"].stdout.strip() == "heap", out["default"].stderr  # the test can tell the two apart
