"""What the pretraining loop logs and checks means what it says: ``loss`` is the total, throughput
counts the work done, every run is also scored with one fixed evaluation protocol, ``init_from``
is checked against the loaded model, and the options nothing else exercises do something."""

import hashlib
import json
import shutil

import pytest
import torch

from clueforge.model.bert import flops_per_token
from clueforge.pretrain.config import load_config
from clueforge.pretrain.loop import pretrain

pytestmark = pytest.mark.slow
BASE = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=1", "train.prefetch=1",
        "train.peak_tflops=1.0"]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(sample_corpus, out, *overrides):
    return pretrain(load_config("tiny", BASE + list(overrides)), sample_corpus, out, show_progress=False)


def test_loss_is_the_total_and_each_part_is_logged(sample_corpus, tmp_path):
    _run(sample_corpus, tmp_path / "r", "train.max_steps=2", "train.self_distill_instance=0.5",
         "train.self_distill_layers=[1]", "train.self_distill_layer_weight=0.25", "train.structure_weights={reorder: 0.5}",
         "train.structure_batch_size=2")
    for r in _metrics(tmp_path / "r"):
        total = r["mlm_loss"] + 0.5 * r["sd_instance_kl"] + 0.25 * r["sd_layer_kl"] + 0.5 * r["reorder_loss"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert r["loss"] > r["mlm_loss"] + 0.1


def test_throughput_counts_the_doubled_batch_and_options_take_effect(sample_corpus, tmp_path):
    """Instance self-distillation runs each batch twice: twice the encoder tokens per step for the
    same data tokens. ``peak_tflops`` is the MFU denominator; ``keep_checkpoints`` bounds the disk;
    ``betas`` and ``eps`` reach the optimizer."""
    _run(sample_corpus, tmp_path / "plain", "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=2",
         "train.betas=[0.8, 0.9]", "train.eps=1.0e-5")
    _run(sample_corpus, tmp_path / "sd", "train.max_steps=3", "train.self_distill_instance=0.5")
    plain, sd = _metrics(tmp_path / "plain"), _metrics(tmp_path / "sd")
    assert [r["tokens"] for r in sd] == [r["tokens"] for r in plain]  # the same data read
    steps = [r["tokens"] - p for r, p in zip(plain, [0] + [r["tokens"] for r in plain])]
    assert [r["step_tokens"] for r in plain] == steps
    assert [r["step_tokens"] for r in sd] == [2 * s for s in steps]
    cfg = load_config("tiny")
    cfg.model.vocab_size = len((sample_corpus / "vocab.txt").read_text(encoding="utf-8").splitlines())
    flops = flops_per_token(cfg.model, cfg.train.seq_len, mlm_fraction=cfg.train.mask_ratio)
    for r in plain + sd:  # MFU = achieved FLOP/s over the configured peak (1 TFLOP/s here)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e12, rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()) == ["step-2", "step-3"]
    state = json.loads((tmp_path / "plain" / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert {(tuple(g["betas"]), g["eps"]) for g in state["optimizer"]["param_groups"]} == {((0.8, 0.9), 1e-5)}


def _eval_inputs(monkeypatch) -> list:
    """Every evaluation batch (collated on the main thread; training batches come from the
    prefetch thread) as ``(protocol, sha of inputs + labels, rows in the batch)``."""
    import threading

    from clueforge.pretrain import loop
    from clueforge.pretrain.data import Collator

    seen = []
    call = Collator.__call__

    def spy(self, rows, rng, progress=0.0):
        batch = call(self, rows, rng, progress)
        if threading.current_thread() is threading.main_thread():
            h = hashlib.sha256(batch["input_ids"].tobytes() + batch["labels"].tobytes()).hexdigest()
            seen.append(("fixed" if self.m is loop.FIXED_EVAL_MASKING else "own", h, len(rows)))
        return batch

    monkeypatch.setattr(Collator, "__call__", spy)
    return seen


def test_every_run_is_also_scored_on_the_same_fixed_masked_rows(sample_corpus, tmp_path, monkeypatch):
    """Runs with different masking strategies and seeds evaluate on identical masked inputs under
    the fixed protocol, beside their own masking."""
    seen = _eval_inputs(monkeypatch)
    runs = {}
    for name, extra in {"token": ["train.masking=token", "train.seed=1"],
                        "span": ["train.masking=span", "train.seed=2", "train.mask_ratio=0.3"]}.items():
        seen.clear()
        _run(sample_corpus, tmp_path / name, "train.max_steps=1", *extra)
        runs[name] = list(seen)
        last = _metrics(tmp_path / name)[-1]
        assert {"eval_loss", "eval_mlm_acc", "eval_fixed_loss", "eval_fixed_mlm_acc"} <= set(last)
    a, b = runs["token"], runs["span"]
    fixed = [[x for x in r if x[0] == "fixed"] for r in (a, b)]
    own = [[x for x in r if x[0] == "own"] for r in (a, b)]
    assert fixed[0] and own[0] and fixed[0] == fixed[1]  # the fixed protocol: identical masked inputs
    assert own[0] != own[1]  # each run's own masking differs


def test_the_fixed_protocol_scores_the_same_rows_whatever_the_batch_size(sample_corpus, tmp_path, monkeypatch):
    """The fixed protocol's rows and batches do not follow the run's ``batch_size`` or
    ``eval_batches``: two runs that differ only there score identical inputs and, on the same
    weights (a learning rate too small to move them), the same ``eval_fixed_loss``."""
    from clueforge.pretrain.loop import FIXED_EVAL_BATCH

    seen = _eval_inputs(monkeypatch)
    runs = {}
    for bs, nb in ((2, 2), (5, 3)):
        seen.clear()
        runs[bs] = (_run(sample_corpus, tmp_path / f"b{bs}", "train.max_steps=1", f"train.batch_size={bs}",
                         f"train.eval_batches={nb}", "train.lr=1.0e-12", "train.weight_decay=0"), list(seen))
    (s2, seen2), (s5, seen5) = runs[2], runs[5]
    fixed2, fixed5 = ([x for x in r if x[0] == "fixed"] for r in (seen2, seen5))
    assert fixed2 and fixed2 == fixed5
    assert {n for *_, n in fixed2[:-1]} <= {FIXED_EVAL_BATCH}
    assert [n for p, _, n in seen2 if p == "own"] != [n for p, _, n in seen5 if p == "own"]  # the run's own follows
    assert s2["eval_fixed_loss"] == pytest.approx(s5["eval_fixed_loss"], rel=1e-6)
    assert s2["eval_fixed_mlm_acc"] == s5["eval_fixed_mlm_acc"]


def test_a_curriculum_sets_the_ratio_behind_mfu_and_triple_mlm(sample_corpus, tmp_path, monkeypatch):
    """``mask_ratio`` is refused beside a curriculum that sets every stage's ratio, so neither the
    MFU FLOPs nor the ``triple_mlm`` budget may read it: they take the curriculum's ratio."""
    import clueforge.pretrain.objectives as objectives
    from clueforge.pretrain.loop import build_objectives, effective_mask_ratio

    stages = "[{at: 0.0, ratio: 0.1, weights: {token: 1.0}}, {at: 1.0, ratio: 0.4, weights: {token: 1.0}}]"
    _run(sample_corpus, tmp_path / "c", "train.max_steps=4", f"train.curriculum={stages}")
    cfg = load_config("tiny", [f"train.curriculum={stages}"])
    cfg.model.vocab_size = len((sample_corpus / "vocab.txt").read_text(encoding="utf-8").splitlines())
    for r in _metrics(tmp_path / "c"):  # at step s the rows were masked at ratio 0.1 + 0.3 * s / 4
        ratio = 0.1 + 0.3 * r["step"] / 4
        assert effective_mask_ratio(cfg.train, r["step"] / 4) == pytest.approx(ratio)
        flops = flops_per_token(cfg.model, cfg.train.seq_len, mlm_fraction=ratio)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e12, rel=1e-9)

    got = {}

    class Spy:
        def __init__(self, *a, mask_ratio, **kw):
            got["mask_ratio"] = mask_ratio
            raise RuntimeError("stop")

    monkeypatch.setattr(objectives, "KnowledgeData", Spy)
    cfg.train.knowledge_weights = {"replace": 1.0}
    with pytest.raises(RuntimeError, match="stop"):
        build_objectives(cfg, [], None, {})
    assert got["mask_ratio"] == pytest.approx(0.4)  # the curriculum's final ratio, not mask_ratio (0.15)


def _hf_bert(tmp_path, vocab, layers, max_position=128):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    cfg = transformers.BertConfig(vocab_size=n, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=max_position)
    model = transformers.BertForMaskedLM(cfg)
    out = tmp_path / f"hf{layers}"
    model.save_pretrained(out)
    shutil.copyfile(vocab, out / "vocab.txt")
    return model, out


def test_continued_pretraining_from_a_deeper_transformers_bert(sample_corpus, tmp_path):
    """The YAML model has 2 layers; the checkpoint 4: its layer 3 is a valid tap, the run trains
    the loaded weights and writes a 4-layer model. Gradients clipped to norm 1e-9 (AdamW eps 1e-3)
    leave the weights where the checkpoint put them."""
    from clueforge.model.hf import load_hf

    hf, path = _hf_bert(tmp_path, sample_corpus / "vocab.txt", layers=4)
    _run(sample_corpus, tmp_path / "r", "train.max_steps=1", f"train.init_from={path}", "train.self_distill_layers=[3]",
         "train.clip_grad=1.0e-9", "train.eps=1.0e-3")
    final = load_hf(tmp_path / "r" / "final")
    assert final.cfg.num_layers == 4 and "sd_layer_kl" in _metrics(tmp_path / "r")[-1]
    start = hf.bert.embeddings.word_embeddings.weight.detach()
    moved = (final.encoder.embeddings.word.weight.detach() - start).abs().max().item()
    assert moved < 1e-5  # the checkpoint's weights (a fresh initialisation: std 0.02); unclipped: about 1e-3


@pytest.mark.parametrize("overrides,match", [
    (["model.num_layers=6", "train.self_distill_layers=[3]"], r"self_distill_layers \[3\].*2-layer model.*init_from"),
    (["train.seq_len=64"], r"seq_len 64 exceeds model.max_position 32.*init_from"),
])
def test_a_shallower_checkpoint_is_refused_at_start(sample_corpus, tmp_path, overrides, match):
    """Checks run against the loaded model (the YAML's passed them, and the run crashed later)."""
    # 2 layers: a 1-layer model has no intermediate layer and skips the taps (with a warning)
    _, path = _hf_bert(tmp_path, sample_corpus / "vocab.txt", layers=2, max_position=32)
    if "train.seq_len=64" in overrides:
        overrides = overrides + ["model.max_position=128"]
    with pytest.raises(ValueError, match=match):
        _run(sample_corpus, tmp_path / "r", "train.max_steps=1", f"train.init_from={path}", *overrides)
