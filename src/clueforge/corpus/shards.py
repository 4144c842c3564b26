"""Read the shards written by ``corpus.build``: memory-mapped, nothing loaded until touched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from clueforge.corpus.build import DOC_START, SENT_START, WORD_START


@dataclass
class Shard:
    name: str
    ids: np.ndarray  # (N,) uint16
    flags: np.ndarray  # (N,) uint8
    pos: np.ndarray  # (N,) uint8
    ent: np.ndarray | None = None  # (N,) uint32 entity id (corpora built with knowledge files)
    etype: np.ndarray | None = None  # (N,) uint8 entity type id


class Corpus:
    """A built corpus directory (``manifest.json`` + ``shards/``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: build the corpus with `clueforge corpus build` first")
        try:
            self.manifest = json.loads(manifest.read_text())
            self.names = [s["name"] for s in self.manifest["shards"]]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            from clueforge.utils import UserError

            raise UserError(f"{manifest} is corrupt ({type(exc).__name__}: {exc}); rebuild the corpus with "
                            f"`clueforge corpus build ... --out {self.path}`") from None

    def __len__(self) -> int:
        return len(self.names)

    def shard(self, i: int) -> Shard:
        base = self.path / "shards" / self.names[i]
        n = self.manifest["shards"][i]["tokens"]

        def mm(ext: str, dtype) -> np.ndarray:
            f = Path(f"{base}.{ext}")
            if n == 0:
                return np.zeros(0, dtype=dtype)
            arr = np.memmap(f, dtype=dtype, mode="r")
            if arr.size != n:
                raise ValueError(f"{f}: {arr.size} entries, manifest says {n}: corrupt or partial shard")
            return arr

        has_ent = "ent" in self.manifest.get("channels", {})
        return Shard(self.names[i], mm("ids.u16", np.dtype("<u2")), mm("flags.u8", np.uint8), mm("pos.u8", np.uint8),
                     mm("ent.u32", np.dtype("<u4")) if has_ent else None, mm("etype.u8", np.uint8) if has_ent else None)

    def verify(self) -> None:
        """Raise ``ValueError`` naming the first shard file whose size or sha256 differs from the
        manifest's record (a truncated copy, a disk error): reading it would give wrong tokens."""
        from clueforge.corpus.build import shard_problem

        has_ent = "ent" in self.manifest.get("channels", {})
        exts = ("ids.u16", "flags.u8", "pos.u8") + (("ent.u32", "etype.u8") if has_ent else ())
        for entry in self.manifest["shards"]:
            problem = shard_problem(self.path / "shards", entry["name"], entry, exts)
            if problem is not None:
                raise ValueError(f"{self.path}: shard {entry['name']} is corrupt ({problem}); run `clueforge "
                                 f"corpus build` with the same arguments again to rebuild it")

    @cached_property
    def shards(self) -> list[Shard]:
        return [self.shard(i) for i in range(len(self))]

    def stats(self, vocab_unk_id: int | None = None) -> dict:
        """Distribution figures computed from the shards themselves."""
        doc_lens, sent_lens, word_lens = [], [], []
        pos_counts = np.zeros(256, dtype=np.int64)
        unk = 0
        for sh in self.shards:
            if sh.ids.size == 0:
                continue
            for bit, dest in ((DOC_START, doc_lens), (SENT_START, sent_lens), (WORD_START, word_lens)):
                starts = np.flatnonzero(sh.flags & bit)
                dest.append(np.diff(np.append(starts, sh.ids.size)))
            pos_counts += np.bincount(sh.pos, minlength=256)
            if vocab_unk_id is not None:
                unk += int(np.count_nonzero(sh.ids == vocab_unk_id))

        def summary(parts: list[np.ndarray]) -> dict:
            if not parts:
                return {}
            a = np.concatenate(parts)
            return {"count": int(a.size), "mean": round(float(a.mean()), 2), "p50": int(np.percentile(a, 50)),
                    "p95": int(np.percentile(a, 95)), "max": int(a.max())}

        m = self.manifest
        tags = m.get("pos_tags", [])
        top = np.argsort(-pos_counts)[:10]
        out = {
            "docs_read": m["docs_read"], "docs_kept": m["docs_kept"], "docs_skipped": m["docs_skipped"],
            "tokens": m["tokens"], "chars": m["chars"], "shards": len(self),
            "doc_tokens": summary(doc_lens), "sentence_tokens": summary(sent_lens), "word_tokens": summary(word_lens),
            "pos_top": {tags[i] if i < len(tags) else str(i): int(pos_counts[i]) for i in top if pos_counts[i]},
        }
        if vocab_unk_id is not None:
            out["unk_rate"] = round(unk / max(1, m["tokens"]), 6)
        return out
