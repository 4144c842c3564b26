"""Autoregressive MLM (``train.ar_mlm_groups``) does what it claims: one group is the plain path;
group j's input holds exactly the ground truth of the earlier groups and the collator's input
elsewhere; every predicted position is predicted once; the loss is the mean over groups; the group
draw is uniform and balanced; a run resumes exactly."""

import json
import types

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.pretrain import ar_mlm
from clueforge.pretrain.config import load_config
from clueforge.pretrain.model import PretrainingModel, mlm_objective
from clueforge.utils import UserError
from conftest import run_metrics as _metrics
from conftest import stopped_after_checkpoint

MASK = 3


def _model(layers=2):
    torch.manual_seed(0)
    return PretrainingModel(BertForMLM(ModelConfig(vocab_size=101, hidden_size=32, num_layers=layers, num_heads=4,
                                                   intermediate_size=64, max_position=32, dropout=0.0,
                                                   attention_dropout=0.0)))


def _t(k=1, **kw):
    base = dict(self_distill_instance=0.0, self_distill_layers=None, self_distill_layer_weight=1.0,
                structure_weights=None, knowledge_weights=None, ar_mlm_groups=k)
    return types.SimpleNamespace(**{**base, **kw})


def _batch(rows=4, T=20, seed=1):
    """Predicted positions in runs of 1-3 tokens, inputs [MASK] / random / kept as a collator draws."""
    g = np.random.default_rng(seed)
    ids = g.integers(5, 101, (rows, T))
    labels = np.full_like(ids, -100)
    inputs = ids.copy()
    for i in range(rows):
        p = 1
        while p < T - 1:
            n = int(g.integers(1, 4))
            if g.random() < 0.35:
                labels[i, p:p + n] = ids[i, p:p + n]
                fate = g.random()
                inputs[i, p:p + n] = MASK if fate < 0.8 else (g.integers(5, 101, n) if fate < 0.9 else ids[i, p:p + n])
            p += n + int(g.integers(0, 3))
    labels[:, -1] = -100
    inputs[:, -1] = ids[:, -1]
    return {"input_ids": inputs, "attention_mask": np.ones_like(ids), "labels": labels}


def _torch(batch):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class Spy(torch.nn.Module):
    """The model, recording the inputs it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, **kw):
        self.seen.append({k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)})
        return self.model(**kw)


def test_mask_units_are_the_runs_of_predicted_positions():
    labels = np.array([[-100, 7, 8, -100, 9, -100, 4, 4, 4, -100, 5, 6]])
    assert mask_units_list(labels) == [0, 1, 1, 0, 2, 0, 3, 3, 3, 0, 4, 4]


def mask_units_list(labels):
    return ar_mlm.mask_units(labels)[0].tolist()


def test_one_group_is_exactly_the_plain_path():
    """``ar_mlm_groups = 1`` through the AR path (one copy, one group) gives the plain loss and
    gradients (≤ 1e-6)."""
    b = _batch()
    groups = ar_mlm.assign_groups(ar_mlm.mask_units(b["labels"]), 1, np.random.default_rng(0))
    assert set(np.unique(groups)) == {-1, 0}
    m = _model()
    loss, o, parts = mlm_objective(m, _torch(b), _t(1))
    plain = [p.grad.clone() for p in (loss.backward(), m.parameters())[1]]
    m.zero_grad()
    loss1, o1, parts1 = mlm_objective(m, _torch({**b, "ar_groups": groups}), _t(1))
    loss1.backward()
    assert abs(loss1.item() - loss.item()) <= 1e-6
    assert parts1["mlm_loss"].item() == pytest.approx(parts["mlm_loss"].item(), abs=1e-6)
    for a, p in zip(plain, m.parameters()):
        assert_close(p.grad, a, atol=1e-6, rtol=0)


def test_group_j_sees_exactly_the_ground_truth_of_earlier_groups():
    """A hand-checkable row: units A (1-2), B (4), C (6-8), D (10) in groups 1, 0, 2, 1 of k = 3.
    The model gets 3 copies: copy 0 the collator's input, copy 1 with B's original token, copy 2
    with A, B and D's; each copy's labels are its own group's positions."""
    ids = np.array([[2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
    inp = np.array([[2, MASK, MASK, 13, 50, 15, MASK, MASK, MASK, 19, 20, 21]])  # A masked, B random, C masked, D kept
    labels = np.full_like(ids, -100)
    pred = [1, 2, 4, 6, 7, 8, 10]
    labels[0, pred] = ids[0, pred]
    units = ar_mlm.mask_units(labels)
    assert units[0].tolist() == [0, 1, 1, 0, 2, 0, 3, 3, 3, 0, 4, 0]
    groups = np.array([[-1, 1, 1, -1, 0, -1, 2, 2, 2, -1, 1, -1]])
    spy = Spy(_model())
    batch = {"input_ids": inp, "attention_mask": np.ones_like(ids), "labels": labels, "ar_groups": groups}
    _, o, _ = mlm_objective(spy, _torch(batch), _t(3))
    seen = spy.seen[0]
    want_inputs = [
        [2, MASK, MASK, 13, 50, 15, MASK, MASK, MASK, 19, 20, 21],  # group 0 (B): nothing revealed
        [2, MASK, MASK, 13, 14, 15, MASK, MASK, MASK, 19, 20, 21],  # group 1 (A, D): B revealed
        [2, 11, 12, 13, 14, 15, MASK, MASK, MASK, 19, 20, 21],  # group 2 (C): A, B, D revealed
    ]
    assert seen["input_ids"].tolist() == want_inputs
    x = -100
    assert seen["labels"].tolist() == [
        [x, x, x, x, 14, x, x, x, x, x, x, x],
        [x, 11, 12, x, x, x, x, x, x, x, 20, x],
        [x, x, x, x, x, x, 16, 17, 18, x, x, x],
    ]
    assert seen["attention_mask"].tolist() == [[1] * 12] * 3
    assert o.labels.tolist() == [14, 11, 12, 20, 16, 17, 18]  # group by group, each position once


def test_groups_partition_the_units_and_every_position_is_predicted_once():
    b = _batch(rows=16, T=40, seed=3)
    k = 3
    units = ar_mlm.mask_units(b["labels"])
    groups = ar_mlm.assign_groups(units, k, np.random.default_rng(5))
    assert ((groups >= 0) == (b["labels"] != -100)).all()  # every predicted position has one group, others none
    for i in range(units.shape[0]):
        n = int(units[i].max())
        per_unit = [set(groups[i, units[i] == u].tolist()) for u in range(1, n + 1)]
        assert all(len(s) == 1 for s in per_unit)  # a unit is never split
        sizes = np.bincount([s.pop() for s in per_unit], minlength=k)
        assert sizes.max() - sizes.min() <= 1  # balanced
    b["doc_ids"] = np.repeat(np.arange(4), 10)[None].repeat(16, 0)  # (B, T) every other input is repeated
    ex = ar_mlm.expand(_torch(b), torch.from_numpy(groups), k)
    assert (ex["doc_ids"].view(k, 16, 40) == torch.from_numpy(b["doc_ids"])).all()
    lab = ex["labels"].view(k, *b["labels"].shape)
    predicted = (lab != -100).sum(0)
    assert (predicted == torch.from_numpy((b["labels"] != -100).astype(np.int64))).all()  # exactly once
    assert (lab.max(0).values == torch.from_numpy(b["labels"])).all()  # with its own label
    # a position is revealed in copy j iff its group is < j; else the collator's input
    inp = ex["input_ids"].view(k, *b["labels"].shape)
    for j in range(k):
        revealed = torch.from_numpy((groups >= 0) & (groups < j))
        assert (inp[j][revealed] == torch.from_numpy(b["labels"])[revealed]).all()
        assert (inp[j][~revealed] == torch.from_numpy(b["input_ids"])[~revealed]).all()


def test_the_loss_is_the_mean_over_groups_of_hand_built_passes():
    """The loss equals, computed by hand: for each group, the plain model on the input with the
    earlier groups' ground truth, mean cross-entropy at the group's positions; then the mean over
    the groups (not over tokens: the groups differ in size here)."""
    b = _batch(rows=3, T=24, seed=7)
    k = 3
    groups = ar_mlm.assign_groups(ar_mlm.mask_units(b["labels"]), k, np.random.default_rng(11))
    m = _model()
    loss, _, parts = mlm_objective(m, _torch({**b, "ar_groups": groups}), _t(k))
    per = []
    with torch.no_grad():
        for j in range(k):
            inp = np.where((groups >= 0) & (groups < j), b["labels"], b["input_ids"])
            lab = np.where(groups == j, b["labels"], -100)
            h = m.mlm.encoder(torch.from_numpy(inp), torch.from_numpy(b["attention_mask"]))
            sel = torch.from_numpy(lab != -100)
            per.append(torch.nn.functional.cross_entropy(m.mlm.head(h[sel]), torch.from_numpy(lab)[sel]).item())
    sizes = np.bincount(groups[groups >= 0], minlength=k)
    assert len(set(sizes.tolist())) > 1  # token means and group means differ here
    assert loss.item() == pytest.approx(sum(per) / k, abs=1e-5)
    assert [parts[f"ar_group{j}_loss"].item() for j in range(k)] == pytest.approx(per, abs=1e-5)
    assert parts["mlm_loss"].item() == pytest.approx(sum(per) / k, abs=1e-5)


@pytest.mark.parametrize("n,k", [(5, 3), (1, 4), (7, 2)])
def test_each_units_group_is_uniform(n, k):
    """Over 4,000 draws each unit lands in each group with frequency 1/k (within 5 binomial
    standard deviations), also with fewer units than groups."""
    trials = 4000
    units = np.zeros((trials, 2 * n + 1), dtype=np.int64)
    units[:, 1::2] = np.arange(1, n + 1)  # n one-token units per row
    groups = ar_mlm.assign_groups(units, k, np.random.default_rng(123))[:, 1::2]  # (trials, n)
    counts = np.stack([(groups == j).sum(0) for j in range(k)])  # (k, n)
    p = 1 / k
    sd = np.sqrt(trials * p * (1 - p))
    assert np.abs(counts - trials * p).max() <= 5 * sd, counts


def test_the_group_draw_is_a_function_of_seed_step_micro_rank():
    units = np.tile(np.arange(1, 9), (4, 1))
    a = ar_mlm.assign_groups(units, 3, ar_mlm.group_rng(1, 5, 0, 0))
    assert (a == ar_mlm.assign_groups(units, 3, ar_mlm.group_rng(1, 5, 0, 0))).all()
    draws = [ar_mlm.assign_groups(units, 3, ar_mlm.group_rng(*key)) for key in
             [(2, 5, 0, 0), (1, 6, 0, 0), (1, 5, 1, 0), (1, 5, 0, 1)]]
    assert all((d != a).any() for d in draws)


@pytest.mark.parametrize("value", ["0", "1.5", "-2"])
def test_bad_group_counts_are_refused(value):
    with pytest.raises(UserError, match="ar_mlm_groups"):
        load_config("tiny", [f"train.ar_mlm_groups={value}"])


@pytest.mark.parametrize("value", [2.0, True, 0])
def test_a_config_built_in_code_needs_an_integer_group_count(value):
    from clueforge.pretrain.config import TrainConfig, validate

    with pytest.raises(UserError, match="ar_mlm_groups"):
        validate(TrainConfig(ar_mlm_groups=value))


def test_instance_self_distillation_with_groups_is_refused():
    with pytest.raises(UserError, match="self_distill_instance"):
        load_config("tiny", ["train.ar_mlm_groups=2", "train.self_distill_instance=0.5"])
    assert load_config("tiny", ["train.ar_mlm_groups=1", "train.self_distill_instance=0.5"]).train.ar_mlm_groups == 1


@pytest.mark.slow
def test_a_grouped_run_stopped_and_resumed_is_exact(sample_corpus, tmp_path, monkeypatch, one_thread):
    """k = 2 with layer-wise self-distillation on: identical at every step after a kill and resume;
    each step runs the main batch twice through the encoder; ``mlm_loss`` is the mean of the
    groups' losses."""
    from clueforge.pretrain.loop import pretrain

    def cfg():
        return load_config("tiny", ["train.ar_mlm_groups=2", "train.max_steps=6", "train.save_every=3",
                                    "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
                                    "train.warmup_steps=1", "train.prefetch=2", "train.peak_tflops=1.0",
                                    "train.self_distill_layers=[1]", "train.batch_size=8"])

    pretrain(cfg(), sample_corpus, tmp_path / "ref", show_progress=False)
    with stopped_after_checkpoint(monkeypatch, 3):
        pretrain(cfg(), sample_corpus, tmp_path / "cut", show_progress=False)
    pretrain(cfg(), sample_corpus, tmp_path / "cut", show_progress=False)
    ref, cut = _metrics(tmp_path / "ref"), _metrics(tmp_path / "cut")
    keys = ["loss", "mlm_loss", "ar_group0_loss", "ar_group1_loss", "sd_layer_kl", "mlm_acc", "tokens", "step_tokens"]
    assert [r["step"] for r in cut] == [r["step"] for r in ref] == list(range(1, 7))
    for a, b in zip(ref, cut):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
    assert ref[-1]["eval_fixed_loss"] == cut[-1]["eval_fixed_loss"]
    read = [r["tokens"] - p for r, p in zip(ref, [0] + [r["tokens"] for r in ref])]
    assert [r["step_tokens"] for r in ref] == [2 * x for x in read]
    for r in ref:
        assert r["mlm_loss"] == pytest.approx((r["ar_group0_loss"] + r["ar_group1_loss"]) / 2, rel=1e-5)
