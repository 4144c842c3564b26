"""Exact resume of the shipped ``knowledge`` recipe at a tiny shape: every objective (five masking
strategies on the curriculum with span masking, structure, knowledge, both self-distillations),
periodic evaluation; stopped after a checkpoint, resumed, identical at every step."""

import json

import pytest
import torch

from clueforge.corpus.build import BuildConfig, build_corpus
from clueforge.pretrain.config import load_config
from clueforge.pretrain.loop import pretrain
from conftest import SAMPLE
from conftest import run_metrics as _metrics
from conftest import stopped_after_checkpoint

pytestmark = pytest.mark.slow

ENTITIES = {"图书馆": "ORG", "火车站": "LOC", "人工智能": "MISC", "马拉松": "MISC", "博物馆": "ORG", "丝绸之路": "LOC"}
TRIPLES = "图书馆\t开放时间\t晚上九点\n火车站\t用途\t旅客进站\n人工智能\t应用领域\t医疗\n"


@pytest.fixture(scope="module")
def kg_corpus(tmp_path_factory, sample_vocab):
    d = tmp_path_factory.mktemp("kg")
    (d / "entities.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in ENTITIES.items()), encoding="utf-8")
    (d / "triples.tsv").write_text(TRIPLES, encoding="utf-8")
    build_corpus([SAMPLE], d / "corpus", BuildConfig(vocab=str(sample_vocab), doc_sep="blank",
                                                     entities=(str(d / "entities.tsv"),)))
    return d / "corpus", d / "triples.tsv"


def _config(triples):
    # the knowledge recipe as shipped, at a tiny shape; the two settings that are not portable
    # (a triple path relative to the project, a layer tap for 6 layers) are overridden
    return load_config("knowledge", [
        "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.num_layers=2",
        "model.max_position=64", "train.seq_len=48", "train.batch_size=4", "train.structure_batch_size=2",
        "train.knowledge_batch_size=2", "train.max_steps=8", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=2", "train.save_every=4", "train.prefetch=4",
        "train.peak_tflops=1.0", "train.self_distill_layers=[1]", f"train.knowledge_triples={triples}"])


def test_knowledge_recipe_stopped_and_resumed_is_exact(tmp_path, kg_corpus, monkeypatch, one_thread):
    corpus, triples = kg_corpus
    cfg = _config(triples)
    assert cfg.train.curriculum and cfg.train.eval_every
    assert len({k for s in cfg.train.curriculum for k in s.get("weights", {})}) == 6  # every strategy
    assert any(s.get("weights", {}).get("span") for s in cfg.train.curriculum)
    pretrain(cfg, corpus, tmp_path / "ref", show_progress=False)

    with stopped_after_checkpoint(monkeypatch, 4):
        pretrain(_config(triples), corpus, tmp_path / "cut", show_progress=False)
    assert max(r["step"] for r in _metrics(tmp_path / "cut")) == 4
    pretrain(_config(triples), corpus, tmp_path / "cut", show_progress=False)

    ref, cut = _metrics(tmp_path / "ref"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in ref] == list(range(1, 9))
    keys = [k for k in ref[-1] if k.endswith(("loss", "_kl", "_acc")) or k.startswith(("eval_", "mask_"))]
    assert {"loss", "mlm_loss", "reorder_loss", "distance_loss", "replace_loss", "triple_mlm_loss", "relation_loss",
            "sd_instance_kl", "sd_layer_kl", "eval_loss", "mask_ratio"} <= set(keys)
    for a, b in zip(ref, cut):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, a["step"]  # exactly, at every step
