"""An HTTP JSON API for a fine-tuned (PyTorch) or exported (ONNX) model, with dynamic batching.

    clueforge serve runs/ft/ocnli/best --port 8000
    clueforge serve runs/onnx/ocnli --runtime onnx --port 8000 --max-batch 32 --max-wait-ms 5 --queue 256
    curl -s 127.0.0.1:8000/predict -d '{"texts": ["他昨天去了北京。", "他去过北京。"]}'

Endpoints (FastAPI on Uvicorn, bound to 127.0.0.1 unless ``--host`` says otherwise):

- ``POST /predict`` one example: ``{"texts": [text]}`` for single-sentence tasks and NER,
  ``{"texts": [text_a, text_b]}`` for sentence-pair tasks (CSL: keywords joined by "；", then the
  abstract). Classification answers ``{"label", "scores": {label: probability}}`` (plus the label
  description where the task has one); NER answers ``{"tags": [one per character], "entities":
  [{"type", "text", "start", "end"}]}`` (``end`` inclusive, as in CLUENER). Labels are the task's.
- ``GET /health``: task, runtime, labels, batching settings.
- ``GET /metrics``: requests by status, batch-size and padded-length histograms, distinct (batch,
  length) shapes run, latency p50/p90/p99 over the last 10,000 answered requests (submission to
  answer, in ms), queue depth, resident memory.

Errors are ``{"error": message}``: 400 body is not a JSON object; 413 body over 1 MiB; 422 unknown
or missing fields, wrong types, wrong number of texts, empty text, or a text longer than the model
takes (no silent truncation: an entity or a clause cut off would be a wrong answer); 503 the queue
is full; 500 the model failed.

Batching: requests are tokenised on the event loop and wait in a queue; as soon as ``max_batch``
wait or the oldest has waited ``max_wait_ms``, one worker forms a batch and runs it, padded to its
longest request rounded up to a multiple of ``--pad-multiple`` tokens (``bucket_length``; default 16
under the torch runtime, 1 — no rounding — under ONNX Runtime, whose memory stays flat without it and
whose dynamic int8 quantisation takes each activation's range over the whole padded tensor, so that
padding can move an int8 model's scores and occasionally its label), in a worker thread (the event
loop keeps accepting). Memory stays flat by three means (docs/benchmarks.md,
"Memory over 10,000 requests"): the buckets bound the set of (batch, length) shapes the model sees
(PyTorch's oneDNN caches a small primitive per shape, and each new one kept ~1 MB of a `mini`
batch's freed activations in the heap: +90 MB over 5,000 requests with exact lengths); glibc's mmap
threshold is fixed at 1 MiB (``tune_allocator``); and the heap is trimmed after each new shape's
first batch and when the server has been idle for a second (``release_free_memory``).

Batches are formed by length (``plan_batch``, on the rounded lengths): a forward of B requests
padded to T tokens costs about ``K + B·T`` token-units, where K (``--overhead-tokens``, measured
at start-up unless given) is what a forward costs beyond its tokens; the waiting requests, sorted by length, are split into the batches of at most
``max_batch`` that minimise the summed cost, and the batch holding the oldest request runs next
(so no request is passed over: the oldest is always in the next batch). The rest wait for the next
round, where new arrivals may join them. (Padding every batch to its longest request made a batch
of 32 OCNLI pairs, 14-87 tokens, cost as much as the same requests one by one on a CPU: see
docs/benchmarks.md.) ``--queue Q`` bounds the requests admitted and not yet answered (waiting or
being computed); the next one gets 503 at once, so memory and latency stay bounded under overload. ``--max-batch 1`` turns batching off.
The answer for an example is the one ``clueforge predict`` writes for it (the same family
``encode``/``decode``), whatever else shares its batch — exactly for fp32 models; an int8 ONNX model's
scores move slightly with the batch's padding (activations quantised over the whole tensor).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import json
import logging
import signal
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clueforge.deploy.runtime import EXPORTABLE, load_any, supported_message
from clueforge.text.normalize import normalize

log = logging.getLogger("clueforge.serve")
MAX_BODY = 1 << 20
LATENCY_WINDOW = 10_000
IDLE_TRIM_S = 1.0
"""A server idle this many seconds after some batches trims its heap (``release_free_memory``)."""
PAD_MULTIPLE = {"torch": 16, "onnx": 1}
"""Default ``--pad-multiple`` per runtime (see the module docstring and ``bucket_length``)."""


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class QueueFull(Exception):
    pass


@dataclass
class Backend:
    """What the server runs: a task's family code and a model called as
    ``model(input_ids, attention_mask, token_type_ids)`` → logits (torch tensors)."""

    task: object
    fam: object
    state: dict
    model: object
    tok: object
    runtime: str
    last_shape: tuple = (0, 0)  # (batch, length) of the last forward as the model received it

    @classmethod
    def load(cls, model_dir: str | Path, runtime: str = "torch", threads: int = 0) -> "Backend":
        task, fam, state, model, tok = load_any(model_dir, runtime, threads=threads)
        if task.family not in EXPORTABLE or task.fmt == "wsc":
            raise ValueError(supported_message(task) if task.family not in EXPORTABLE else
                             f"{task.name} needs span annotations the server does not take; serving supports "
                             f"single-sentence and sentence-pair classification and NER")
        return cls(task, fam, state, model, tok, runtime)

    @property
    def n_texts(self) -> int:
        return 2 if self.task.family == "classify" and self.task.fmt in ("pair", "csl") else 1

    def parse(self, body: bytes) -> tuple[dict, dict]:
        """Validate a request body; ``(example, feature)`` as the family's ``load``/``encode`` make them."""
        if len(body) > MAX_BODY:
            raise RequestError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY}")
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RequestError(400, f'expected a JSON object {{"texts": [...]}}, got {type(obj).__name__}')
        unknown = sorted(set(obj) - {"texts"})
        if unknown:
            raise RequestError(422, f"unknown field {unknown[0]!r}; the only field is 'texts'")
        if "texts" not in obj:
            raise RequestError(422, "missing field 'texts' (a list of strings)")
        texts = obj["texts"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(422, "'texts' must be a list of strings")
        n = self.n_texts
        if len(texts) != n:
            kind = "a sentence pair: 2 texts" if n == 2 else "1 text"
            raise RequestError(422, f"{self.task.name} takes {kind}, got {len(texts)}")
        for i, t in enumerate(texts):
            if not t.strip():
                raise RequestError(422, f"texts[{i}] is empty")
        task, tok = self.task, self.tok
        if task.family == "ner":
            ex = {"id": 0, "chars": list(texts[0]), "tags": None}
            n_tok = len(tok.encode(ex["chars"], is_pretokenized=True).ids)
        else:
            a, b = normalize(texts[0]), normalize(texts[1]) if n == 2 else None
            ex = {"id": 0, "a": a, "b": b, "label": None}
            n_tok = len((tok.encode(a, b) if b is not None else tok.encode(a)).ids)
        if n_tok > task.max_length:
            raise RequestError(422, f"text too long: {n_tok} tokens with [CLS]/[SEP]; this model takes at most "
                                    f"{task.max_length}")
        return ex, self.fam.encode(task, [ex], tok, task.max_length, self.state)[0]

    def overhead_tokens(self, repeats: int = 5) -> float:
        """K of the batch cost model ``K + B·T``: one-request forwards timed at a short and the
        longest length (median of ``repeats``, alternating), K = the time at zero length in tokens."""
        short, long_ = 8, self.task.max_length
        feats = []
        for n in (short, long_):
            texts = ["中" * (n - 3 - n // 2), "文" * (n // 2)] if self.n_texts == 2 else ["中" * (n - 2)]
            ex, feat = self.parse(json.dumps({"texts": texts}).encode())
            feats.append(([ex], [feat], len(feat["input_ids"])))
        times: list[list[float]] = [[], []]
        for _ in range(repeats + 1):  # the first round warms up
            for k, (ex, feat, _) in enumerate(feats):
                t0 = time.perf_counter()
                self.infer(ex, feat)
                times[k].append(time.perf_counter() - t0)
        (t_s, t_l), (n_s, n_l) = (float(np.median(t[1:])) for t in times), (f[2] for f in feats)
        per_token = (t_l - t_s) / (n_l - n_s) if n_l > n_s else 0.0
        if per_token <= 0:  # noise: a longer input did not take longer; batch as much as allowed
            return float(4 * long_)
        return float(min(4 * long_, max(0.0, t_s / per_token - n_s)))

    def infer(self, examples: list[dict], features: list[dict], length: int | None = None) -> list[dict]:
        """One padded batch → one answer per example (runs in the worker thread). ``length``: pad
        the batch to this many tokens rather than to its longest request (masked positions: the
        answers are the same)."""
        pad_id = self.tok.token_to_id("[PAD]")
        batch = self.fam.collate(features, pad_id)
        if length is not None:
            batch = pad_batch(batch, length, pad_id)
        self.last_shape = tuple(batch["input_ids"].shape)  # what the model was given: /metrics reports it
        with torch.inference_mode():
            ling = {"ling": batch["ling"]} if "ling" in batch else {}  # a model with linguistic inputs (torch)
            logits = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **ling)
        logits = logits.float().cpu().numpy()
        preds = self.fam.decode(self.task, [logits], features, examples, self.state)
        if self.task.family == "ner":
            from clueforge.tasks.metrics import bio_spans

            out = []
            for ex, tags in zip(examples, preds):
                ents = [{"type": k, "text": "".join(ex["chars"][s:e + 1]), "start": s, "end": e}
                        for k, s, e in sorted(bio_spans(tags), key=lambda x: x[1])]
                out.append({"tags": tags, "entities": ents})
            return out
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        labels, descs = self.state["labels"], self.state.get("descs") or {}
        out = []
        for label, row in zip(preds, p):
            ans = {"label": label, "scores": {lab: round(float(x), 6) for lab, x in zip(labels, row)}}
            if label in descs:
                ans["label_desc"] = descs[label]
            out.append(ans)
        return out


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "ling")


def pad_batch(batch: dict, length: int, pad_id: int) -> dict:
    """``batch`` with its (B, T) model inputs right-padded to ``length`` tokens: [PAD] ids, mask 0."""
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {batch['input_ids'].shape[1]} tokens to {length}")
    if extra == 0:
        return batch
    return {**batch, **{k: torch.nn.functional.pad(batch[k], (0, extra), value=pad_id if k == "input_ids" else 0)
                        for k in MODEL_INPUTS if k in batch}}


MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation by mmap, set fixed by ``tune_allocator``."""


@functools.cache
def _glibc(name: str):
    """A glibc function (None elsewhere: musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def tune_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (``mallopt(M_MMAP_THRESHOLD)``; False
    where there is no glibc). By default glibc raises the threshold, up to 32 MiB, to the size of
    each mmapped block freed, after which a batch's large activations come from the heap and stay
    resident until a trim: a server's RSS then follows the largest batch since the last trim. Fixed,
    every allocation of ≥ ``threshold`` bytes is mmapped and returned to the OS when freed."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and mallopt(-3, threshold) == 1  # -3: M_MMAP_THRESHOLD


def release_free_memory() -> bool:
    """Give the pages of free heap memory back to the OS (glibc ``malloc_trim(0)``); False where
    there is no glibc. Called after the first batch of each new shape: PyTorch's oneDNN caches a
    small primitive per shape, and allocated among a batch's freed activations it keeps glibc from
    returning them, so without a trim RSS grows by about a batch's activations per new shape."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def bucket_length(n: int, multiple: int, max_length: int) -> int:
    """The length a batch whose longest request has ``n`` tokens is padded to: ``n`` rounded up to
    a multiple of ``multiple``, at most ``max_length`` (``multiple`` 1: ``n``). Bounds the set of
    (batch, length) shapes the model sees to ``max_batch · ⌈max_length / multiple⌉``."""
    return min(-(-n // multiple) * multiple, max(n, max_length))


@dataclass
class Metrics:
    status: Counter = field(default_factory=Counter)
    batch_sizes: Counter = field(default_factory=Counter)
    lengths: Counter = field(default_factory=Counter)  # the padded length of each batch
    shapes: set = field(default_factory=set)  # (batch, padded length) run so far: bounded by max_batch · lengths
    trims: int = 0  # release_free_memory calls after a new shape's first batch (one per shape)
    idle_trims: int = 0  # ... after the server was idle for IDLE_TRIM_S (no request waiting or running)
    latency: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    started: float = field(default_factory=time.time)

    def snapshot(self) -> dict:
        lat = np.array(self.latency) * 1000 if self.latency else None
        pct = {f"p{q}": (round(float(np.percentile(lat, q)), 3) if lat is not None else None) for q in (50, 90, 99)}
        batches = sum(self.batch_sizes.values())
        return {
            "requests": sum(self.status.values()), "by_status": {str(k): v for k, v in sorted(self.status.items())},
            "batches": batches, "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": round(sum(k * v for k, v in self.batch_sizes.items()) / batches, 3) if batches else None,
            "batch_length_histogram": {str(k): v for k, v in sorted(self.lengths.items())},
            "distinct_shapes": len(self.shapes), "memory_trims": self.trims, "idle_trims": self.idle_trims,
            "latency_ms": {**pct, "window": len(self.latency)}, "uptime_s": round(time.time() - self.started, 1),
            "rss_mb": rss_mb(),
        }


def rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


@dataclass
class _Item:
    example: dict
    feature: dict
    future: asyncio.Future
    t0: float
    length: int  # tokens, [CLS]/[SEP] included, rounded up to the server's length bucket


def plan_batch(lengths: list[int], max_batch: int, overhead_tokens: float) -> list[int]:
    """The next batch: indices into ``lengths`` (the waiting requests' token counts, oldest first).

    The requests, sorted by length, are split into consecutive groups of at most ``max_batch``
    minimising Σ (``overhead_tokens`` + size · longest) (dynamic programming over the split points);
    the group holding request 0, the oldest, is returned, in arrival order. Only the first
    ``4 · max_batch`` requests are planned (a bounded cost on the event loop; the oldest is among them).
    """
    n = min(len(lengths), 4 * max_batch)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - max_batch), j):
            cost = best[i] + overhead_tokens + (j - i) * longest
            if cost < best[j]:  # ties keep the earliest split: the larger group
                best[j], cut[j] = cost, i
    oldest, j = order.index(0), n
    while not cut[j] <= oldest < j:
        j = cut[j]
    return sorted(order[cut[j]:j])


class Batcher:
    """A bounded queue of requests and the one worker that runs them in batches."""

    def __init__(self, backend: Backend, metrics: Metrics, max_batch: int, max_wait_ms: float, capacity: int,
                 overhead_tokens: float, pad_multiple: int = 1):
        self.backend, self.metrics = backend, metrics
        self.max_batch, self.max_wait, self.capacity = max_batch, max_wait_ms / 1000, capacity
        self.overhead_tokens, self.pad_multiple = overhead_tokens, pad_multiple
        self.pending: deque[_Item] = deque()
        self.admitted = 0
        self.ran_since_trim = False
        self.wake = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="clueforge-infer")
        self.task: asyncio.Task | None = None

    def submit(self, example: dict, feature: dict) -> asyncio.Future:
        if self.admitted >= self.capacity:
            raise QueueFull
        fut = asyncio.get_running_loop().create_future()
        length = bucket_length(len(feature["input_ids"]), self.pad_multiple, self.backend.task.max_length)
        self.pending.append(_Item(example, feature, fut, time.perf_counter(), length))
        self.admitted += 1
        self.wake.set()
        return fut

    async def _next_batch(self) -> list[_Item]:
        while not self.pending:
            self.wake.clear()
            if not self.ran_since_trim:
                await self.wake.wait()
                continue
            try:  # idle for IDLE_TRIM_S after some batches: give back what they freed
                await asyncio.wait_for(self.wake.wait(), IDLE_TRIM_S)
            except asyncio.TimeoutError:
                self.ran_since_trim = False
                if await asyncio.get_running_loop().run_in_executor(self.pool, release_free_memory):
                    self.metrics.idle_trims += 1
        deadline = self.pending[0].t0 + self.max_wait
        while len(self.pending) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:
                break
        if self.max_batch == 1:
            return [self.pending.popleft()]
        take = set(plan_batch([b.length for b in self.pending], self.max_batch, self.overhead_tokens))
        batch = [b for i, b in enumerate(self.pending) if i in take]
        self.pending = deque(b for i, b in enumerate(self.pending) if i not in take)
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            length = max(b.length for b in batch)
            new_shape = (len(batch), length) not in self.metrics.shapes
            self.backend.last_shape = (len(batch), length)  # the planned shape, if the forward fails first
            try:
                answers = await loop.run_in_executor(self.pool, self._infer, [b.example for b in batch],
                                                     [b.feature for b in batch], length, new_shape)
            except Exception as exc:  # the model failed: every request of the batch gets a 500
                log.exception("inference failed")
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(exc)
            else:
                for b, ans in zip(batch, answers):
                    if not b.future.done():
                        b.future.set_result(ans)
            finally:
                self.admitted -= len(batch)
                self.metrics.batch_sizes[len(batch)] += 1
                shape = tuple(self.backend.last_shape)  # as the model received it
                self.metrics.lengths[shape[1]] += 1
                self.metrics.shapes.add(shape)
                self.ran_since_trim = True

    def _infer(self, examples: list[dict], features: list[dict], length: int, new_shape: bool) -> list[dict]:
        """The worker thread's job: a batch, then, after a shape's first batch, a heap trim."""
        try:
            return self.backend.infer(examples, features, length)
        finally:
            if new_shape and release_free_memory():
                self.metrics.trims += 1

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        while self.pending:
            b = self.pending.popleft()
            if not b.future.done():
                b.future.set_exception(QueueFull())
        self.pool.shutdown(wait=True)


def build_app(backend: Backend, *, max_batch: int = 32, max_wait_ms: float = 5.0, queue: int = 256,
              overhead_tokens: float | None = None, pad_multiple: int | None = None,
              allocator_tuned: bool | None = None):
    """The FastAPI application (the caller runs it under Uvicorn); ``overhead_tokens`` None: measured now;
    ``pad_multiple`` None: the runtime's default (``PAD_MULTIPLE``); ``allocator_tuned``: what
    ``serve`` got from ``tune_allocator`` (shown by /health; None when not started by ``serve``)."""
    if pad_multiple is None:
        pad_multiple = PAD_MULTIPLE[backend.runtime]
    if max_batch < 1 or queue < 1 or max_wait_ms < 0 or pad_multiple < 1:
        raise ValueError(f"--max-batch {max_batch}, --queue {queue}, --max-wait-ms {max_wait_ms}, --pad-multiple "
                         f"{pad_multiple}: batch, queue and multiple must be ≥ 1, wait ≥ 0")
    if overhead_tokens is None:
        overhead_tokens = backend.overhead_tokens() if max_batch > 1 else 0.0
        log.info("batching: a forward costs %.1f tokens beyond its tokens (measured)", overhead_tokens)
    if not 0 <= overhead_tokens < float("inf"):
        raise ValueError(f"--overhead-tokens {overhead_tokens}: must be a finite number ≥ 0")
    metrics = Metrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(backend, metrics, max_batch, max_wait_ms, queue, overhead_tokens, pad_multiple)
        state["batcher"].start()
        yield
        await state["batcher"].stop()

    app = FastAPI(title=f"clueforge {backend.task.name}", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        metrics.status[status] += 1
        return JSONResponse({"error": message}, status_code=status)

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        try:
            example, feature = backend.parse(await request.body())
        except RequestError as exc:
            return error(exc.status, exc.message)
        try:
            fut = state["batcher"].submit(example, feature)
        except QueueFull:
            return error(503, f"queue full ({queue} requests waiting or running); retry later")
        try:
            answer = await fut
        except QueueFull:
            return error(503, "server shutting down")
        except Exception as exc:
            return error(500, f"inference failed: {type(exc).__name__}: {exc}")
        metrics.status[200] += 1
        metrics.latency.append(time.perf_counter() - t0)
        return answer

    @app.get("/health")
    async def health():
        return {"status": "ok", "task": backend.task.name, "family": backend.task.family, "runtime": backend.runtime,
                "texts_per_request": backend.n_texts, "max_length": backend.task.max_length,
                "labels": backend.state["labels"], "max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue": queue,
                "overhead_tokens": round(overhead_tokens, 1), "pad_multiple": pad_multiple,
                "allocator_tuned": allocator_tuned}

    @app.get("/metrics")
    async def get_metrics():
        b = state.get("batcher")
        return {**metrics.snapshot(), "queue": {"capacity": queue, "admitted": b.admitted if b else 0,
                                                "waiting": len(b.pending) if b else 0}}

    return app


def serve(model_dir: str | Path, *, runtime: str = "torch", host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 32, max_wait_ms: float = 5.0, queue: int = 256, threads: int = 0,
          overhead_tokens: float | None = None, pad_multiple: int | None = None,
          backend: Backend | None = None) -> None:
    """Load the model and serve until SIGTERM/SIGINT (Uvicorn's graceful shutdown: in-flight
    requests are answered, then the process exits 0). ``overhead_tokens`` None: measured now."""
    import uvicorn

    tuned = tune_allocator()  # before the first batch; the process is the server's alone
    if not tuned:
        log.warning("no glibc: the mmap threshold is not fixed and the heap is not trimmed; "
                    "RSS may follow the largest batches seen (docs/benchmarks.md, memory)")
    backend = backend or Backend.load(model_dir, runtime, threads)
    app = build_app(backend, max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue,
                    overhead_tokens=overhead_tokens, pad_multiple=pad_multiple, allocator_tuned=tuned)
    log.info("serving %s (%s runtime, batch ≤ %d, wait ≤ %g ms, queue %d) on http://%s:%d", backend.task.name,
             backend.runtime, max_batch, max_wait_ms, queue, host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    # Uvicorn answers SIGTERM/SIGINT with a graceful shutdown, then re-raises the signal to the
    # handler it found: with the defaults the process would die by the signal (exit -15) or raise
    # KeyboardInterrupt after a clean stop. A no-op handler makes the stop an ordinary exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
