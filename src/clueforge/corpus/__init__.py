"""Sharded, memory-mapped training data: build, read, stats."""

from clueforge.corpus.build import DOC_START, SENT_START, WORD_START, BuildConfig, build_corpus
from clueforge.corpus.shards import Corpus

__all__ = ["BuildConfig", "build_corpus", "Corpus", "WORD_START", "SENT_START", "DOC_START"]
