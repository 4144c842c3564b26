"""Each ``TrainConfig`` option that only a direct attribute write or a validation test used to
name, taken through the config into what ``pretrain`` builds and runs: a test here fails when the
loop ignores the option."""

import json

import numpy as np
import pytest
import torch

import clueforge.model.bert as bert
from clueforge.pretrain.config import load_config
from clueforge.pretrain.loop import pretrain

pytestmark = pytest.mark.slow
BASE = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=1", "train.prefetch=1",
        "train.peak_tflops=1.0", "train.max_steps=1"]


def _run(sample_corpus, out, *overrides):
    return pretrain(load_config("tiny", BASE + list(overrides)), sample_corpus, out, show_progress=False)


def _corpus_parts(sample_corpus):
    from clueforge.corpus.shards import Corpus
    from clueforge.text.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(sample_corpus / "vocab.txt")
    return Corpus(sample_corpus), tok, special_ids(tok)


def _train_forward_spy(monkeypatch, seen: list):
    """Record, for every training forward of the encoder, what the loop hands it."""
    forward = bert.Encoder.forward

    def spy(self, input_ids, attention_mask=None, token_type_ids=None, doc_ids=None, *a, **kw):
        out = forward(self, input_ids, attention_mask, token_type_ids, doc_ids, *a, **kw)
        if self.training:
            matmul = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))  # autocast decides its dtype
            seen.append({"dtype": matmul.dtype, "doc_ids": doc_ids, "attention_mask": attention_mask,
                         "checkpointing": self.gradient_checkpointing})
        return out

    monkeypatch.setattr(bert.Encoder, "forward", spy)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_autocasts_the_training_forward(sample_corpus, tmp_path, monkeypatch, fresh_accelerate, precision,
                                                  dtype):
    seen = []
    _train_forward_spy(monkeypatch, seen)
    _run(sample_corpus, tmp_path / "r", f"train.precision={precision}")
    assert seen and {s["dtype"] for s in seen} == {dtype}


@pytest.mark.parametrize("on", [True, False])
def test_compile_wraps_the_model_the_loop_steps(sample_corpus, tmp_path, monkeypatch, on):
    compiled = []

    def fake_compile(model, *a, **kw):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    _run(sample_corpus, tmp_path / "r", f"train.compile={str(on).lower()}")
    assert len(compiled) == (1 if on else 0)
    if on:
        assert isinstance(compiled[0], torch.nn.Module) and hasattr(compiled[0], "mlm")  # the trained model


@pytest.mark.parametrize("on", [True, False])
def test_gradient_checkpointing_recomputes_the_trained_model_blocks(sample_corpus, tmp_path, monkeypatch, on):
    calls, seen = [], []
    checkpoint = bert.checkpoint

    def spy(fn, *a, **kw):
        calls.append(fn)
        return checkpoint(fn, *a, **kw)

    monkeypatch.setattr(bert, "checkpoint", spy)
    _train_forward_spy(monkeypatch, seen)
    _run(sample_corpus, tmp_path / "r", f"train.gradient_checkpointing={str(on).lower()}")
    assert {s["checkpointing"] for s in seen} == {on}
    layers = load_config("tiny").model.num_layers
    assert len(calls) == (layers * len(seen) if on else 0)


@pytest.mark.parametrize("on", [True, False])
def test_doc_attention_gives_the_model_a_block_mask(sample_corpus, tmp_path, monkeypatch, on):
    seen, masks = [], []
    bias = bert.attention_bias

    def spy(attention_mask, doc_ids):
        m = bias(attention_mask, doc_ids)
        masks.append(m)
        return m

    monkeypatch.setattr(bert, "attention_bias", spy)
    _train_forward_spy(monkeypatch, seen)
    _run(sample_corpus, tmp_path / "r", f"train.doc_attention={str(on).lower()}", "train.pack_docs=true",
         "train.batch_size=8")
    first = seen[0]
    if not on:
        assert first["doc_ids"] is None and masks[0].shape[-2] == 1
        return
    doc = first["doc_ids"]
    assert doc is not None and masks[0].shape[-2] == masks[0].shape[-1] == doc.shape[1]
    real = first["attention_mask"].bool()
    m = masks[0][:, 0].bool()
    # real tokens attend exactly to the real tokens of their own document
    want = (doc[:, :, None] == doc[:, None, :]) & real[:, :, None] & real[:, None, :]
    assert torch.equal(m & real[:, :, None] & real[:, None, :], want)
    assert (doc.max(1).values > doc.masked_fill(~real, 10**9).min(1).values).any()  # some row holds two documents


def test_weight_decay_reaches_the_optimizer(sample_corpus, tmp_path):
    _run(sample_corpus, tmp_path / "r", "train.weight_decay=0.123", "train.save_every=1")
    state = json.loads((tmp_path / "r" / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert sorted(g["weight_decay"] for g in state["optimizer"]["param_groups"]) == [0.0, 0.123]


def _heldout_rows(sample_corpus):
    """The corpus, tokenizer, special ids and the first 64 held-out rows as the loop indexes them."""
    from clueforge.pretrain.data import build_row_index, split_heldout

    corpus, tok, specials = _corpus_parts(sample_corpus)
    rows = split_heldout(build_row_index(corpus, 64, True), corpus)[1]
    return corpus, tok, specials, [(int(s), int(a), int(b)) for s, (a, b) in zip(rows.shard, rows.span)][:64]


def test_extra_connectives_are_masked_by_discourse_masking(sample_corpus):
    from clueforge.pretrain.data import Collator
    from clueforge.pretrain.loop import masking_config  # what pretrain() builds its collator's masking from

    corpus, tok, specials, rows = _heldout_rows(sample_corpus)
    probe = Collator(corpus, specials, tok.get_vocab_size(), masking_config(load_config("tiny").train), tokenizer=tok)
    counts: dict = {}
    for r in rows:  # pick a frequent two-character word that is not a built-in connective
        row, _ = probe._row(*r)
        starts = np.flatnonzero(np.diff(np.concatenate([[-2], row.word])) != 0)
        for s in starts:
            n = int((row.word == row.word[s]).sum())
            if row.word[s] >= 0 and n == 2:
                key = tuple(row.ids[s:s + 2].tolist())
                counts[key] = counts.get(key, 0) + 1
    key = max(counts, key=counts.get)
    word = tok.decode(list(key)).replace(" ", "")

    def hit_rate(extra):
        over = ["train.masking=discourse", "train.mask_ratio=0.3"] + ([f"train.extra_connectives=[{word}]"] if extra else [])
        t = load_config("tiny", over).train
        col = Collator(corpus, specials, tok.get_vocab_size(), masking_config(t), tokenizer=tok)
        hit = total = 0
        for i, r in enumerate(rows):
            row, _ = col._row(*r)
            lab = col([r], np.random.default_rng(i))["labels"][0]
            for s in np.flatnonzero(row.ids[:-1] == key[0]):
                if tuple(row.ids[s:s + 2].tolist()) == key and row.word[s] == row.word[s + 1]:
                    total += 1
                    hit += int(lab[s] != -100)
        return hit / max(1, total), total

    (with_extra, n), (without, _) = hit_rate(True), hit_rate(False)
    assert n >= 3 and with_extra > 0.9 and without < 0.5, (word, with_extra, without, n)


@pytest.mark.parametrize("m", [2, 4])
def test_reorder_max_segments_sets_the_classes_and_segments(sample_corpus, m):
    from clueforge.pretrain.loop import build_objectives
    from clueforge.pretrain.objectives import n_reorder_classes

    corpus, tok, specials = _corpus_parts(sample_corpus)
    cfg = load_config("tiny", ["train.structure_weights={reorder: 1.0}", f"train.reorder_max_segments={m}"])
    structure, _, aux = build_objectives(cfg, corpus, tok, specials)
    assert aux.heads["reorder"].out_features == n_reorder_classes(m)  # 3 classes for 2 segments, 33 for 4
    labels = np.concatenate([structure.batch("reorder", 64, np.random.default_rng(i))["labels"] for i in range(4)])
    assert labels.max() < n_reorder_classes(m)
    if m == 4:
        assert labels.max() >= n_reorder_classes(3)  # 4-segment permutations are drawn


def test_one_layer_model_runs_a_config_with_layer_taps(sample_corpus, tmp_path, caplog):
    """``self_distill_layers: [0.5]`` (the knowledge config's) on a 1-layer model: the layer-wise
    term is skipped with a warning, the rest trains."""
    _run(sample_corpus, tmp_path / "r", "model.num_layers=1", "train.self_distill_layers=[0.5]",
         "train.self_distill_instance=0.5")
    rec = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "sd_instance_kl" in rec and "sd_layer_kl" not in rec
    assert "no intermediate layer" in caplog.text
