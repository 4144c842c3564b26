"""Entity mentions in text: dictionary matches (ahocorasick-rs, leftmost-longest) plus the person /
place / organisation / proper-noun words rjieba tags (``nr ns nt nz``), as character spans.

Dictionary matches win over tagged words; a tagged word overlapping a dictionary match is dropped.
Mentions are snapped to word boundaries by the caller when it aligns them to tokens.
"""

from __future__ import annotations

import ahocorasick_rs

from clueforge.knowledge.sources import EntityTable

POS_ENTITY_TYPES = {"nr": "PER", "nrfg": "PER", "nrt": "PER", "ns": "LOC", "nt": "ORG", "nz": "MISC"}


class EntityMatcher:
    def __init__(self, table: EntityTable, use_pos: bool = True):
        self.table = table
        self.use_pos = use_pos
        for kind in POS_ENTITY_TYPES.values():
            if use_pos and kind not in table.type_names:
                table.type_names.append(kind)
        self._ac = ahocorasick_rs.AhoCorasick(table.names, matchkind=ahocorasick_rs.MATCHKIND_LEFTMOST_LONGEST) \
            if table.names else None

    def find(self, text: str, tagged: list[tuple[str, str]] | None = None) -> list[tuple[int, int, int, int]]:
        """Mentions ``(start, end, entity_id, type_id)`` (end exclusive), sorted, non-overlapping.
        ``entity_id`` is 0 for a POS-tagged name absent from the dictionary."""
        spans: list[tuple[int, int, int, int]] = []
        if self._ac is not None:
            for idx, s, e in self._ac.find_matches_as_indexes(text):
                spans.append((s, e, idx + 1, self.table.type_id(self.table.types[idx])))
        if self.use_pos and tagged:
            taken = [False] * (len(text) + 1)
            for s, e, _, _ in spans:
                for k in range(s, e):
                    taken[k] = True
            pos = 0
            for word, tag in tagged:
                end = pos + len(word)
                kind = POS_ENTITY_TYPES.get(tag)
                if kind and len(word) >= 2 and not any(taken[pos:end]):
                    spans.append((pos, end, self.table.id(word), self.table.type_id(kind)))
                pos = end
        spans.sort()
        return spans
