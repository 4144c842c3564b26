"""Knowledge sources: KG triples and typed entity lists, read with file/line errors.

- Triples: ``head<TAB>relation<TAB>tail`` per line (e.g. ``kgclue_triples.tsv``). A head's
  parenthesised disambiguation (``守望星光（韩玉玲、刘东考演唱歌曲）``) is stripped for matching.
- Typed entities: ``entity<TAB>type`` files, or a folder of one file per type (the file stem is the
  type, one entity per line; e.g. ``medical_entities/drug.txt``).

``EntityTable`` assigns every distinct surface name an id (1-based; 0 means "no entity") and a type
id; its list is written beside the corpus shards (``entities.tsv``) so the ids stay meaningful.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_PAREN = re.compile(r"[（(][^（）()]*[）)]\s*$")
KG_TYPE = "KG"  # the type of names that come only from triples


def entity_name(head: str) -> str:
    """``守望星光（歌曲）`` → ``守望星光``."""
    return _PAREN.sub("", head).strip() or head.strip()


def kg_types(triples: list[tuple[str, str, str]], min_relations: int = 2) -> dict[str, str]:
    """A type for the KG head names with at least ``min_relations`` relations: their relation
    signature, ``KG:<relation>|<relation>…`` (sorted).

    Heads that carry the same several relations are things of one kind (``作者|出版社|页数`` →
    books), so same-type entity replacement swaps a book for a book, never for a person. One
    relation is no type: in ``kgclue_triples.tsv`` every head has exactly one triple, and ``语言``
    alone groups songs, newspapers and a person; such names get no type (never swapped).
    """
    rels: dict[str, set[str]] = {}
    for h, r, _ in triples:
        rels.setdefault(entity_name(h), set()).add(r)
    return {name: f"{KG_TYPE}:" + "|".join(sorted(rs)) for name, rs in rels.items() if len(rs) >= min_relations}


def load_triples(path: str | Path) -> list[tuple[str, str, str]]:
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or not all(p.strip() for p in parts):
                raise ValueError(f"{path}:{lineno}: expected head<TAB>relation<TAB>tail, got {line.strip()[:80]!r}")
            out.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return out


def load_entities(path: str | Path) -> list[tuple[str, str]]:
    """``(name, type)`` pairs from an ``entity<TAB>type`` file or a folder of per-type files."""
    path = Path(path)
    out: list[tuple[str, str]] = []
    if path.is_dir():
        for f in sorted(path.glob("*.txt")):
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out.append((line.strip(), f.stem))
        if not out:
            raise ValueError(f"{path}: no *.txt entity files")
        return out
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path}:{lineno}: expected entity<TAB>type, got {line.strip()[:80]!r}")
            out.append((parts[0].strip(), parts[1].strip()))
    return out


@dataclass
class EntityTable:
    """Distinct entity names with ids and types; the first type given for a name wins."""

    names: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)  # per name
    type_names: list[str] = field(default_factory=lambda: ["<none>"])
    _index: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, kind: str, min_len: int = 2) -> None:
        name = name.strip()
        if len(name) < min_len or name in self._index:
            return
        if kind not in self.type_names:
            self.type_names.append(kind)
        self._index[name] = len(self.names) + 1
        self.names.append(name)
        self.types.append(kind)

    def id(self, name: str) -> int:
        return self._index.get(name, 0)

    def type_id(self, kind: str) -> int:
        return self.type_names.index(kind) if kind in self.type_names else 0

    @classmethod
    def build(cls, entity_files: list[str | Path] = (), triple_files: list[str | Path] = ()) -> "EntityTable":
        table = cls()
        for f in entity_files:
            for name, kind in load_entities(f):
                table.add(name, kind)
        for f in triple_files:
            for h, _, t in load_triples(f):
                table.add(entity_name(h), KG_TYPE)
        return table

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{n}\t{t}\n" for n, t in zip(self.names, self.types)), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> "EntityTable":
        table = cls()
        for name, kind in load_entities(path):
            table.add(name, kind, min_len=1)
        return table
