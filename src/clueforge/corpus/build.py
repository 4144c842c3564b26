"""Raw text → memory-mapped training shards with aligned side channels.

Layout of ``OUT/``::

    manifest.json                 totals, skipped-document counts and examples, config + hashes
    shards/shard-000000.ids.u16   token ids (uint16; the vocab must have < 65,536 entries)
    shards/shard-000000.flags.u8  per token: bit 0 word start, bit 1 sentence start, bit 2 doc start
    shards/shard-000000.pos.u8    per token: POS id of the word it belongs to (``POS_TAGS``)
    shards/shard-000000.ent.u32   with knowledge files: entity id of the mention a token is in (0: none;
                                  ids index ``entities.tsv``), and flag bit 3 on a mention's first token
    shards/shard-000000.etype.u8  with knowledge files: entity type id (0: none; ``entity_types`` in the manifest)
    shards/shard-000000.json      the shard's own statistics; written last, it marks completion

Design choices:

- **Deterministic.** Shard *k* holds raw documents ``[k·D, (k+1)·D)`` of the inputs in order, so
  its bytes depend only on its documents and the config, never on ``--workers``.
- **Streaming.** The main process reads raw lines (with a per-line byte cap) and hands chunks of
  ``D`` documents to a bounded pool; memory does not grow with the corpus.
- **Crash-safe, resumable.** Every file is written under a temporary name and renamed; the shard
  JSON comes last. A re-run skips shards whose JSON exists with the same config hash.
- **Bad input is skipped and counted** (reason → count, first examples with file and line): invalid
  UTF-8, broken JSON, a missing or non-string field, binary or empty lines, over-long lines, a
  truncated compressed file. Good documents around them are kept.
- Text is tokenised per document in one ``encode_batch`` call per chunk; word boundaries and POS
  come from one rjieba ``tag`` call per document and are aligned to tokens through the tokeniser's
  character offsets, vectorised over the chunk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from clueforge.text.normalize import is_probably_binary, normalize, sentence_starts
from clueforge.utils import Rule, UserError, atomic_write, sha256_file
from clueforge.text.segment import POS_ID, Segmenter

log = logging.getLogger("clueforge.corpus")

FORMAT_VERSION = 1
WORD_START, SENT_START, DOC_START, ENT_START = 1, 2, 4, 8
MAX_EXAMPLES = 5
INPUT_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")


@dataclass
class BuildConfig:
    """Everything that decides the bytes of a shard (hashed into ``config_hash``)."""

    vocab: str
    """WordPiece vocab.txt (or a directory with one)."""
    text_field: str = "text"
    """JSON-lines field that holds the document text."""
    doc_sep: str = "line"
    """Plain-text inputs: ``line`` (a document per line) or ``blank`` (blank-line-separated)."""
    docs_per_shard: int = 10_000
    """Raw documents per shard; the unit of parallel work and of resume."""
    min_chars: int = 2
    """Documents shorter than this after normalisation are skipped as ``too_short``."""
    max_line_bytes: int = 4 << 20
    """Lines longer than this are skipped as ``line_too_long`` without being held in memory."""
    t2s: bool = False
    """Convert traditional to simplified script (OpenCC)."""
    user_dict: str | None = None
    """rjieba user dictionary (``word [freq] [tag]`` per line)."""
    entities: tuple[str, ...] = ()
    """Typed entity lists (``entity<TAB>type`` files or folders of per-type files) to mark."""
    triples: tuple[str, ...] = ()
    """KG triple files whose head and tail names are marked as entities too."""
    pos_entities: bool = True
    """With knowledge files: also mark rjieba's person/place/organisation/proper-noun words."""

    @property
    def marks_entities(self) -> bool:
        return bool(self.entities or self.triples)

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)!r} is not allowed: must be {r.describe()}"
               for k, r in BUILD_RULES.items() if not r.ok(getattr(self, k))]
        if bad:
            raise UserError("; ".join(bad))


BUILD_RULES = {  # checked when a BuildConfig is made (``--docs-per-shard 0`` would loop forever)
    "docs_per_shard": Rule(lo=1), "min_chars": Rule(lo=0), "max_line_bytes": Rule(lo=1),
    "doc_sep": Rule(choices=("line", "blank")),
}


@dataclass
class RawDoc:
    file: str
    line: int
    payload: bytes | None  # None: the reader already knows it is bad
    problem: str | None = None


@dataclass
class ShardStats:
    name: str
    docs_read: int = 0
    docs_kept: int = 0
    docs_skipped: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    tokens: int = 0
    chars: int = 0
    sentences: int = 0
    entity_tokens: int = 0
    mentions: int = 0
    config_hash: str = ""
    files: dict[str, dict] = field(default_factory=dict)
    """Channel extension → ``{bytes, sha256}`` of its file: a re-run verifies them before skipping."""


# ---------------------------------------------------------------------------------------------
# Reading: raw lines with file/line numbers, never more than max_line_bytes held per line.


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(INPUT_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{p}: no input files ({', '.join(INPUT_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return files


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True))
    return open(path, "rb")


def _read_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Yield ``(lineno, line_without_newline | None, problem | None)``."""
    lineno = 0
    try:
        with _open_binary(path) as fh:
            while True:
                line = fh.readline(max_bytes + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > max_bytes and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # drain the rest of the long line
                        line = fh.readline(max_bytes)
                    yield lineno, None, "line_too_long"
                    continue
                yield lineno, line.rstrip(b"\r\n"), None
    except (EOFError, OSError, zlib.error, ValueError) as exc:  # truncated/corrupt compressed stream
        if isinstance(exc, FileNotFoundError):
            raise
        log.warning("%s: stopped after line %d: %s", path, lineno, exc)
        yield lineno + 1, None, "truncated_file"
    except Exception as exc:  # zstandard.ZstdError and friends
        if type(exc).__name__ != "ZstdError":
            raise
        log.warning("%s: stopped after line %d: %s", path, lineno, exc)
        yield lineno + 1, None, "truncated_file"


def iter_raw_docs(files: list[Path], cfg: BuildConfig) -> Iterator[RawDoc]:
    for path in files:
        name = str(path)
        is_json = ".json" in path.name
        if is_json or cfg.doc_sep == "line":
            for lineno, data, problem in _read_lines(path, cfg.max_line_bytes):
                yield RawDoc(name, lineno, data, problem)
            continue
        buf: list[bytes] = []
        start = 0
        for lineno, data, problem in _read_lines(path, cfg.max_line_bytes):
            if problem:
                if buf:
                    yield RawDoc(name, start, b"\n".join(buf))
                    buf = []
                yield RawDoc(name, lineno, None, problem)
            elif data.strip():
                if not buf:
                    start = lineno
                buf.append(data)
            elif buf:
                yield RawDoc(name, start, b"\n".join(buf))
                buf = []
        if buf:
            yield RawDoc(name, start, b"\n".join(buf))


# ---------------------------------------------------------------------------------------------
# Processing one chunk of documents into one shard (runs in a worker process).

_STATE: dict = {}


def _init_worker(cfg_dict: dict, matcher=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from clueforge.text.tokenizer import FastChineseEncoder, load_tokenizer

    cfg = BuildConfig(**{**cfg_dict, "entities": tuple(cfg_dict.get("entities", ())),
                         "triples": tuple(cfg_dict.get("triples", ()))})
    _STATE["cfg"] = cfg
    if matcher is None and cfg.marks_entities:
        from clueforge.knowledge.matcher import EntityMatcher
        from clueforge.knowledge.sources import EntityTable

        matcher = EntityMatcher(EntityTable.build(cfg.entities, cfg.triples), use_pos=cfg.pos_entities)
    _STATE["matcher"] = matcher
    _STATE["tok"] = load_tokenizer(cfg.vocab)
    _STATE["fast"] = FastChineseEncoder(_STATE["tok"])
    _STATE["seg"] = Segmenter(cfg.user_dict)


def _decode(doc: RawDoc, cfg: BuildConfig) -> tuple[str | None, str | None]:
    """Return ``(text, None)`` or ``(None, reason)``."""
    if doc.payload is None:
        return None, doc.problem or "unreadable"
    try:
        raw = doc.payload.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if doc.file.endswith((".jsonl", ".json", ".jsonl.gz", ".jsonl.zst")):
        if not raw.strip():
            return None, "empty"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return None, "bad_json"
        if not isinstance(obj, dict) or cfg.text_field not in obj:
            return None, "missing_field"
        raw = obj[cfg.text_field]
        if not isinstance(raw, str):
            return None, "bad_field_type"
    if is_probably_binary(raw):
        return None, "binary"
    text = normalize(raw, t2s=cfg.t2s, keep_newlines=True)
    if not text:
        return None, "empty"
    if len(text) < cfg.min_chars:
        return None, "too_short"
    return text, None


def encode_documents(texts: list[str], tok, seg: Segmenter, fast=None, matcher=None):
    """Tokenise ``texts`` and align word/sentence/document starts and POS ids to the tokens.

    ``fast`` is a ``FastChineseEncoder`` for ``tok`` (table lookups for Chinese characters and
    punctuation; equal ids, see the equivalence test) or ``None`` for plain ``encode_batch``.
    Returns ``ids (int64), flags (uint8), pos (uint8), tokens_per_doc (int64)`` and, with an
    ``EntityMatcher``, two more: ``entity ids (uint32), entity types (uint8)`` per token.
    """
    if fast is not None:
        ids, tok_char, ntok = fast.encode(texts)  # tok_char: chunk-relative token starts
        total = int(ids.size)
    else:
        encs = tok.encode_batch(texts, add_special_tokens=False)
        ntok = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        total = int(ntok.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int64, count=total)
        offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), dtype=np.int64,
                           count=2 * total)
    doc_len = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    doc_base = np.cumsum(doc_len) - doc_len
    if fast is None:
        tok_char = offs[0::2] + np.repeat(doc_base, ntok)  # (N,) chunk-relative token starts

    words: list[int] = []
    tags: list[int] = []
    pos_lookup = POS_ID.get
    mentions: list[tuple[int, int, int, int]] = []
    for base, text in zip(doc_base.tolist(), texts):
        tagged = seg.tag(text)
        if matcher is not None:
            mentions.extend((base + s, base + e, i, t) for s, e, i, t in matcher.find(text, tagged))
        ws, ts = zip(*tagged) if tagged else ((), ())
        lens = list(map(len, ws))
        if sum(lens) != len(text):  # never seen; keep alignment safe: one word per char
            lens, ts = [1] * len(text), ["x"] * len(text)
        words.extend(lens)
        tags.extend(pos_lookup(t, 0) for t in ts)
    wlen = np.asarray(words, dtype=np.int64)
    char_is_word_start = np.zeros(int(doc_len.sum()) + 1, dtype=bool)
    char_is_word_start[np.cumsum(wlen) - wlen] = True
    char_pos = np.repeat(np.asarray(tags, dtype=np.uint8), wlen)

    flags = np.zeros(total, dtype=np.uint8)
    if total:
        flags[char_is_word_start[tok_char]] |= WORD_START
        sent_chars = np.fromiter(
            chain.from_iterable((b + s for s in sentence_starts(t)) for b, t in zip(doc_base.tolist(), texts)), dtype=np.int64
        )
        sent_tok = np.searchsorted(tok_char, sent_chars)
        flags[sent_tok[sent_tok < total]] |= SENT_START
        doc_first = (np.cumsum(ntok) - ntok)[ntok > 0]
        flags[doc_first] |= DOC_START | SENT_START | WORD_START
    pos = char_pos[tok_char] if total else np.zeros(0, dtype=np.uint8)
    if matcher is None:
        return ids, flags, pos, ntok
    n_chars = int(doc_len.sum()) + 1
    char_mention = np.zeros(n_chars, dtype=np.int64)  # mention number (1-based) per character
    char_ent = np.zeros(n_chars, dtype=np.uint32)
    char_type = np.zeros(n_chars, dtype=np.uint8)
    for k, (s, e, ent, kind) in enumerate(mentions, 1):
        char_mention[s:e], char_ent[s:e], char_type[s:e] = k, ent, kind
    tm = char_mention[tok_char] if total else np.zeros(0, dtype=np.int64)
    starts = (tm > 0) & (tm != np.concatenate([[0], tm[:-1]]))
    flags[starts] |= ENT_START
    return ids, flags, pos, ntok, char_ent[tok_char], char_type[tok_char]


def process_chunk(shard_dir: str, name: str, docs: list[RawDoc], config_hash: str) -> dict:
    cfg: BuildConfig = _STATE["cfg"]
    stats = ShardStats(name=name, docs_read=len(docs), config_hash=config_hash)
    skipped: Counter[str] = Counter()
    texts: list[str] = []
    for doc in docs:
        text, reason = _decode(doc, cfg)
        if reason:
            skipped[reason] += 1
            if skipped[reason] <= MAX_EXAMPLES:  # the first few of each reason, with file and line
                preview = (doc.payload or b"")[:60].decode("utf-8", "replace")
                stats.examples.append({"file": doc.file, "line": doc.line, "reason": reason, "preview": preview})
            continue
        texts.append(text)
    ids, flags, pos, ntok, *ent = encode_documents(texts, _STATE["tok"], _STATE["seg"], _STATE["fast"],
                                                   _STATE["matcher"])
    empty = int((ntok == 0).sum())  # e.g. only characters the tokenizer drops
    if empty:
        skipped["no_tokens"] += empty
    if ids.size and int(ids.max()) > 0xFFFF:
        raise ValueError(f"token id {int(ids.max())} does not fit uint16: vocabulary too large")
    stats.docs_skipped = dict(sorted(skipped.items()))
    stats.docs_kept = len(texts) - empty
    stats.tokens = int(ids.size)
    stats.chars = sum(len(t) for t, n in zip(texts, ntok.tolist()) if n)
    stats.sentences = int(np.count_nonzero(flags & SENT_START))
    out = Path(shard_dir)

    def put(ext: str, data: bytes) -> None:
        atomic_write(out / f"{name}.{ext}", data)
        stats.files[ext] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    put("ids.u16", ids.astype("<u2").tobytes())
    put("flags.u8", flags.tobytes())
    put("pos.u8", pos.astype(np.uint8).tobytes())
    if ent:
        put("ent.u32", ent[0].astype("<u4").tobytes())
        put("etype.u8", ent[1].tobytes())
        stats.entity_tokens = int(np.count_nonzero(ent[1]))
        stats.mentions = int(np.count_nonzero(flags & ENT_START))
    atomic_write(out / f"{name}.json", json.dumps(asdict(stats), ensure_ascii=False).encode())
    return asdict(stats)


# ---------------------------------------------------------------------------------------------
# Driver.


def _sha256_path(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.txt")):
            h.update(f.name.encode() + sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(path)


def config_fingerprint(cfg: BuildConfig, files: list[Path]) -> dict:
    from clueforge.text.tokenizer import resolve_vocab

    vocab_sha = sha256_file(resolve_vocab(cfg.vocab))
    fields = {k: v for k, v in asdict(cfg).items() if k not in ("vocab", "user_dict", "entities", "triples")}
    fields["user_dict_sha256"] = sha256_file(Path(cfg.user_dict)) if cfg.user_dict else None
    fields["knowledge_sha256"] = [_sha256_path(Path(p)) for p in (*cfg.entities, *cfg.triples)]
    fields["inputs"] = [{"name": f.name, "bytes": f.stat().st_size} for f in files]
    fields["format_version"] = FORMAT_VERSION
    blob = json.dumps({"config": fields, "vocab_sha256": vocab_sha}, sort_keys=True)
    return {"config": fields, "vocab_sha256": vocab_sha, "config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def _chunks(docs: Iterator[RawDoc], size: int) -> Iterator[list[RawDoc]]:
    buf: list[RawDoc] = []
    for doc in docs:
        buf.append(doc)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


CHANNEL_BYTES = {"ids.u16": 2, "flags.u8": 1, "pos.u8": 1, "ent.u32": 4, "etype.u8": 1}


def shard_problem(shard_dir: Path, name: str, stats: dict, exts) -> str | None:
    """Why a shard's files do not match what was recorded when it was written (``None``: intact).
    Sizes and sha256 come from the shard's JSON; a shard written before hashes were recorded is
    checked by size against its token count."""
    recorded = stats.get("files") or {}
    for ext in exts:
        f = shard_dir / f"{name}.{ext}"
        if not f.is_file():
            return f"{f.name} is missing"
        size = f.stat().st_size
        want = recorded.get(ext, {}).get("bytes", stats.get("tokens", 0) * CHANNEL_BYTES[ext])
        if size != want:
            return f"{f.name} has {size:,} bytes, {want:,} recorded"
        if ext in recorded and sha256_file(f) != recorded[ext]["sha256"]:
            return f"{f.name}: sha256 differs from the one recorded"
    return None


def _shard_done(shard_dir: Path, name: str, config_hash: str, with_entities: bool = False,
                rebuilt: list | None = None) -> dict | None:
    """The stats of a complete, intact shard, else ``None`` (to be built). A shard whose files do
    not match their recorded sizes/hashes is reported (appended to ``rebuilt``) and rebuilt."""
    meta = shard_dir / f"{name}.json"
    if not meta.is_file():
        return None
    try:
        stats = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    if stats.get("config_hash") != config_hash:
        return None
    exts = ("ids.u16", "flags.u8", "pos.u8") + (("ent.u32", "etype.u8") if with_entities else ())
    problem = shard_problem(shard_dir, name, stats, exts)
    if problem is not None:
        log.warning("shard %s is corrupt (%s): rebuilding it", name, problem)
        if rebuilt is not None:
            rebuilt.append(name)
        meta.unlink(missing_ok=True)
        return None
    return stats


def build_corpus(inputs: list[str | Path], out: str | Path, cfg: BuildConfig, *, workers: int = 1, progress=None) -> dict:
    """Build shards under ``out`` and return the manifest. Re-running resumes."""
    files = expand_inputs(inputs)
    out = Path(out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg, files)
    chash = fp["config_hash"]
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("config_hash") != chash:
            raise FileExistsError(
                f"{out} holds a corpus built with another config or vocabulary (hash {old.get('config_hash')} ≠ {chash}); "
                "use a new --out directory"
            )
    from clueforge.text.tokenizer import resolve_vocab

    # The corpus carries its vocabulary (and entity list): pretraining reads them from here.
    atomic_write(out / "vocab.txt", resolve_vocab(cfg.vocab).read_bytes())
    entity_types: list[str] = []
    matcher = None
    if cfg.marks_entities:
        from clueforge.knowledge.matcher import EntityMatcher
        from clueforge.knowledge.sources import EntityTable

        table = EntityTable.build(cfg.entities, cfg.triples)
        matcher = EntityMatcher(table, use_pos=cfg.pos_entities)  # registers the POS types, as in the workers
        table.write(out / "entities.tsv")
        entity_types = table.type_names
    results: dict[int, dict] = {}
    bytes_total = sum(f.stat().st_size for f in files)
    resumed = 0
    rebuilt: list[str] = []

    def finish(idx: int, stats: dict) -> None:
        results[idx] = stats
        if progress:
            progress(stats)

    cfg_dict = asdict(cfg)
    chunks = _chunks(iter_raw_docs(files, cfg), cfg.docs_per_shard)
    if workers <= 1:
        _init_worker(cfg_dict, matcher)  # one process: the automaton built above serves
        for idx, docs in enumerate(chunks):
            name = f"shard-{idx:06d}"
            done = _shard_done(shard_dir, name, chash, cfg.marks_entities, rebuilt)
            if done is None:
                done = process_chunk(str(shard_dir), name, docs, chash)
            else:
                resumed += 1
            finish(idx, done)
    else:
        import multiprocessing as mp

        pending: dict[Future, int] = {}
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(cfg_dict,)) as pool:
            for idx, docs in enumerate(chunks):
                name = f"shard-{idx:06d}"
                done = _shard_done(shard_dir, name, chash, cfg.marks_entities, rebuilt)
                if done is not None:
                    resumed += 1
                    finish(idx, done)
                    continue
                pending[pool.submit(process_chunk, str(shard_dir), name, docs, chash)] = idx
                while len(pending) >= 2 * workers:  # bounded: memory stays flat
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        finish(pending.pop(f), f.result())
            for f in list(pending):
                finish(pending.pop(f), f.result())

    ordered = [results[i] for i in sorted(results)]
    skipped: Counter[str] = Counter()
    examples: list[dict] = []
    for s in ordered:
        skipped.update(s["docs_skipped"])
        for ex in s["examples"]:
            if sum(1 for e in examples if e["reason"] == ex["reason"]) < MAX_EXAMPLES:
                examples.append(ex)
    for ex in examples:
        log.warning("skipped %s:%d (%s): %r", ex["file"], ex["line"], ex["reason"], ex["preview"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "docs_read": sum(s["docs_read"] for s in ordered),
        "docs_kept": sum(s["docs_kept"] for s in ordered),
        "docs_skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "tokens": sum(s["tokens"] for s in ordered),
        "chars": sum(s["chars"] for s in ordered),
        "sentences": sum(s["sentences"] for s in ordered),
        "mentions": sum(s.get("mentions", 0) for s in ordered),
        "entity_tokens": sum(s.get("entity_tokens", 0) for s in ordered),
        "input_bytes": bytes_total,
        "shards": [{"name": s["name"], "tokens": s["tokens"], "docs": s["docs_kept"],
                    **({"files": s["files"]} if s.get("files") else {})} for s in ordered],
        "shards_resumed": resumed,
        "shards_rebuilt": rebuilt,
        "channels": {"ids": "uint16", "flags": "uint8 (1 word start, 2 sentence start, 4 doc start, 8 entity start)",
                     "pos": "uint8", **({"ent": "uint32", "etype": "uint8"} if cfg.marks_entities else {})},
        "entity_types": entity_types,
        **fp,
        "pos_tags": list(POS_ID),
    }
    atomic_write(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2).encode())
    return manifest


def iter_texts(inputs: list[str | Path], cfg: BuildConfig) -> Iterator[str]:
    """Normalised document texts of ``inputs``; bad documents are skipped (and counted in
    ``iter_texts.skipped``-style by the caller if needed)."""
    for doc in iter_raw_docs(expand_inputs(inputs), cfg):
        text, _ = _decode(doc, cfg)
        if text is not None:
            yield text
