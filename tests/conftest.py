"""Shared fixtures: a vocab and corpus built from the embedded sample, and the real data in
``../shared/data`` (tests that need it skip, saying why, where it is absent)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "src" / "clueforge" / "data" / "sample_corpus.txt"


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} is absent (expected ../shared/data beside the project)")
    return p


@pytest.fixture(scope="session")
def bert_vocab() -> Path:
    return shared("vocab", "bert-chinese-vocab.txt")


@pytest.fixture(scope="session")
def sample_vocab(tmp_path_factory) -> Path:
    from clueforge.corpus.build import BuildConfig, iter_texts
    from clueforge.text.vocab import build_vocab

    out = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    build_vocab(iter_texts([SAMPLE], BuildConfig(vocab="", doc_sep="blank")), out, vocab_size=2000, min_frequency=1)
    return out


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory, sample_vocab) -> Path:
    from clueforge.corpus.build import BuildConfig, build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus([SAMPLE], out, BuildConfig(vocab=str(sample_vocab), doc_sep="blank", docs_per_shard=25))
    return out


def hf_tokenizer_dir(vocab: Path, tmp: Path):
    """transformers 5.x builds a 5-token vocab from ``vocab_file=``: load from a directory."""
    import shutil

    from transformers import BertTokenizerFast

    d = tmp / "hf_tok"
    d.mkdir(exist_ok=True)
    shutil.copyfile(vocab, d / "vocab.txt")
    return BertTokenizerFast.from_pretrained(d)


def run_metrics(run: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class StopRun(Exception):
    """Raised by ``stopped_after_checkpoint``: a run killed right after a checkpoint."""


@contextmanager
def stopped_after_checkpoint(monkeypatch, stop_step: int):
    """Inside the block, a pretraining run stops (``StopRun``, expected) right after writing the
    checkpoint of ``stop_step``, as a crash would; checkpointing is back to normal after it."""
    from clueforge.pretrain import checkpoint as ckpt

    save = ckpt.save_checkpoint

    def save_then_stop(root, step, *a, **kw):
        save(root, step, *a, **kw)
        if step == stop_step:
            raise StopRun

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    try:
        with pytest.raises(StopRun):
            yield
    finally:
        monkeypatch.setattr(ckpt, "save_checkpoint", save)


@pytest.fixture
def one_thread():
    """A tiny model on 2 shared cores: many BLAS threads make each step ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one process-wide state whose precision cannot change: start and leave clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
