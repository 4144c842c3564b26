"""Knowledge for knowledge-enhanced pretraining: triples, typed entity lists, fast mention matching."""

from clueforge.knowledge.sources import EntityTable, entity_name, kg_types, load_entities, load_triples

__all__ = ["EntityTable", "entity_name", "kg_types", "load_entities", "load_triples"]
