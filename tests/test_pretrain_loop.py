"""What the pretraining loop logs and checks means what it says: ``loss`` is the total, throughput
counts the work done, every run is also scored with one fixed evaluation protocol, ``init_from``
is checked against the loaded model, and the options nothing else exercises do something."""

import hashlib
import json
import shutil

import pytest
import torch

from clueforge.model.bert import BertForMLM, flops_per_token
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


def test_every_run_is_also_scored_on_the_same_fixed_masked_rows(sample_corpus, tmp_path, monkeypatch):
    """Runs with different masking strategies and seeds evaluate on identical masked inputs under
    the fixed protocol, beside their own masking."""
    seen: list[list[str]] = []
    forward = BertForMLM.forward

    def spy(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *a, **kw):
        if not self.training:
            seen[-1].append(hashlib.sha256(input_ids.numpy().tobytes() + labels.numpy().tobytes()).hexdigest())
        return forward(self, input_ids, attention_mask, token_type_ids, labels, *a, **kw)

    monkeypatch.setattr(BertForMLM, "forward", spy)
    runs = {}
    for name, extra in {"token": ["train.masking=token", "train.seed=1"],
                        "span": ["train.masking=span", "train.seed=2", "train.mask_ratio=0.3"]}.items():
        seen.append([])
        _run(sample_corpus, tmp_path / name, "train.max_steps=1", *extra)
        runs[name] = seen[-1]
        last = _metrics(tmp_path / name)[-1]
        assert {"eval_loss", "eval_mlm_acc", "eval_fixed_loss", "eval_fixed_mlm_acc"} <= set(last)
    a, b = runs["token"], runs["span"]
    n = len(a) // 2  # own masking first, then the fixed protocol
    assert n >= 1 and len(a) == len(b) == 2 * n
    assert a[n:] == b[n:]  # the fixed protocol: identical masked inputs
    assert a[:n] != b[:n]  # each run's own masking differs


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
    (["model.num_layers=6", "train.self_distill_layers=[3]"], r"self_distill_layers \[3\].*1-layer model.*init_from"),
    (["train.seq_len=64"], r"seq_len 64 exceeds model.max_position 32.*init_from"),
])
def test_a_shallower_checkpoint_is_refused_at_start(sample_corpus, tmp_path, overrides, match):
    """Checks run against the loaded model (the YAML's passed them, and the run crashed later)."""
    _, path = _hf_bert(tmp_path, sample_corpus / "vocab.txt", layers=1, max_position=32)
    if "train.seq_len=64" in overrides:
        overrides = overrides + ["model.max_position=128"]
    with pytest.raises(ValueError, match=match):
        _run(sample_corpus, tmp_path / "r", "train.max_steps=1", f"train.init_from={path}", *overrides)
