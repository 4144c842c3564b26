"""Issue 11, short sequences first (``train.short_seq_len``, ``short_seq_fraction``,
``short_batch_size``): off is the plain path batch for batch; the short phase reads short rows
that never touch held-out text, then ``seq_len`` rows; evaluation stays on ``seq_len`` rows; a
budget times both phases; stop/resume on either side of the switch is exact; changed settings on
resume are refused or recorded; the structure objectives keep their own rows."""

import json

import numpy as np
import pytest

from clueforge.corpus.shards import Corpus
from clueforge.pretrain import loop
from clueforge.pretrain.config import load_config
from clueforge.pretrain.data import Collator, RowIndex, Sampler, build_row_index, outside, split_heldout
from clueforge.pretrain.loop import pretrain
from clueforge.text.tokenizer import load_tokenizer, special_ids
from clueforge.utils import UserError
from conftest import run_metrics
from conftest import stopped_after_checkpoint

pytestmark = pytest.mark.slow
# tiny shapes; dropout stays on (tiny's 0.1): the per-phase calibration must leave the run's RNG untouched
BASE = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=1", "train.prefetch=1",
        "train.peak_tflops=1.0", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "train.batch_size=4", "train.seq_len=32"]
SHORT = ["train.short_seq_len=16", "train.short_seq_fraction=0.5"]


def _run(corpus, out, *overrides, allow=False):
    return pretrain(load_config("tiny", BASE + list(overrides)), corpus, out, show_progress=False,
                    allow_config_change=allow)


@pytest.fixture
def seen(monkeypatch):
    """The batches the loop trains on, in order (calibration batches included: none without a budget)."""
    got = []
    objective = loop.mlm_objective

    def spy(model, batch, t, layers):
        got.append({k: (v.numpy().copy() if not isinstance(v, dict) else {n: b["input_ids"].numpy().copy()
                                                                          for n, b in v.items()})
                    for k, v in batch.items()})
        return objective(model, batch, t, layers)

    monkeypatch.setattr(loop, "mlm_objective", spy)
    return got


def test_off_trains_on_the_plain_path_batches(sample_corpus, tmp_path, seen, one_thread):
    """With the fields at their defaults the loop reads, step for step, the batches of the plain
    path (one ``Sampler`` over the ``seq_len`` rows, masking seeded by the step) bit for bit."""
    cfg = load_config("tiny", BASE + ["train.max_steps=5"])
    assert (cfg.train.short_seq_len, cfg.train.short_seq_fraction, cfg.train.short_batch_size) == (0, 0.0, 0)
    _run(sample_corpus, tmp_path / "r", "train.max_steps=5")
    corpus = Corpus(sample_corpus)
    tok = load_tokenizer(sample_corpus / "vocab.txt")
    train_rows, _ = split_heldout(build_row_index(corpus, 32, True), corpus)
    sampler = Sampler(len(train_rows), 4, 1, 1, cfg.train.seed)
    collate = Collator(corpus, special_ids(tok), tok.get_vocab_size(), loop.masking_config(cfg.train), tokenizer=tok)
    assert len(seen) == 5
    for step, got in enumerate(seen):
        rows = train_rows.select(sampler.rows(step, 0, 0))
        ref = collate(list(zip(rows.shard.tolist(), rows.span[:, 0].tolist(), rows.span[:, 1].tolist())),
                      np.random.default_rng([cfg.train.seed, 1, step, 0, 0]), progress=step / 5)
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"step {step} {k}")
    assert "seq_len" not in run_metrics(tmp_path / "r")[0]


def test_short_rows_first_then_seq_len_rows(sample_corpus, tmp_path, seen, one_thread):
    """Steps 0-2 of 6 (fraction 0.5) read 16-token rows, twice the rows (the tokens per step of
    the long phase) or ``short_batch_size``; steps 3-5 read 32-token rows of ``batch_size``."""
    _run(sample_corpus, tmp_path / "r", "train.max_steps=6", *SHORT)
    widths = [b["input_ids"].shape for b in seen]
    assert all(w[0] == 8 and w[1] <= 16 for w in widths[:3]), widths
    assert all(w[0] == 4 for w in widths[3:]) and max(w[1] for w in widths[3:]) > 16, widths
    assert [r["seq_len"] for r in run_metrics(tmp_path / "r")] == [16, 16, 16, 32, 32, 32]
    seen.clear()
    _run(sample_corpus, tmp_path / "b2", "train.max_steps=4", *SHORT, "train.short_batch_size=2")
    assert [b["input_ids"].shape[0] for b in seen] == [2, 2, 4, 4]


def test_short_rows_never_touch_held_out_text(sample_corpus):
    """``outside``: the short packing keeps every row before the held-out text and none inside it,
    both when a whole last shard is held out and when the last rows of the only shard are."""
    corpus = Corpus(sample_corpus)
    assert len(corpus) >= 2
    _, held = split_heldout(build_row_index(corpus, 32, True), corpus)
    short = build_row_index(corpus, 16, True)
    kept = outside(short, held)
    last = len(corpus) - 1
    assert set(kept.shard.tolist()) == set(range(last)) and len(kept) == int((short.shard != last).sum())
    one = RowIndex(np.zeros(6, np.int32), np.array([[0, 10], [10, 20], [20, 30], [30, 40], [40, 50], [50, 60]]))
    long = RowIndex(np.zeros(3, np.int32), np.array([[0, 20], [20, 35], [35, 60]]))
    _, held1 = split_heldout(long, ["one shard"])  # its last row, [35, 60)
    assert held1.span.tolist() == [[35, 60]]
    assert outside(one, held1).span.tolist() == [[0, 10], [10, 20], [20, 30]]  # [30, 40) overlaps [35, 60)


def test_evaluation_stays_on_seq_len_rows(sample_corpus, tmp_path, fresh_accelerate, one_thread):
    """The held-out scores of a short-first run are the fixed protocol on ``seq_len`` rows: the
    benchmark's external evaluator at 32 tokens reproduces the loop's ``eval_fixed_loss``."""
    from test_budget import _budget_module

    s = _run(sample_corpus, tmp_path / "r", "train.max_steps=2", "train.precision=fp32", *SHORT)
    got = _budget_module().fixed_heldout(s["final"], sample_corpus, seq_len=32)
    assert got["loss"] == pytest.approx(s["eval_fixed_loss"], abs=1e-5)
    short = _budget_module().fixed_heldout(s["final"], sample_corpus, seq_len=16)
    assert short["loss"] != pytest.approx(s["eval_fixed_loss"], abs=1e-5)  # the rows matter


def _costs(short_s, long_s):
    """A calibration stub: ``short_s`` CPU seconds per step on short rows, ``long_s`` on long ones."""
    def cal(model, make_batch, *a, **kw):
        s = short_s if make_batch(0, 0)[0]["input_ids"].shape[1] <= 16 else long_s
        return {"cpu_s_per_step": s, "wall_s_per_step": s, "warmup_steps": 0, "steps": 0, "threads": 1,
                "cpu_s_steps": []}
    return cal


def test_budget_times_both_phases(sample_corpus, tmp_path, monkeypatch, one_thread):
    """``max_minutes`` with short rows first: each phase is timed on its own batches and the step
    count follows from their cost weighted by the steps each gets (budget.json records both)."""
    monkeypatch.setattr(loop, "calibrate_steps", _costs(0.25, 0.75))
    # fraction 0.75: 0.75 · 0.25 + 0.25 · 0.75 = 0.375 CPU s per step: 0.05 min → 8 steps (phase weights
    # swapped: 0.625 s → 5 steps; long rows alone: 4; short rows alone: 12)
    s = _run(sample_corpus, tmp_path / "r", "train.max_minutes=0.05", "train.short_seq_len=16",
             "train.short_seq_fraction=0.75")
    budget = json.loads((tmp_path / "r" / "budget.json").read_text())
    assert s["steps"] == budget["max_steps"] == 8
    cal = budget["calibration"]
    assert cal["cpu_s_per_step"] == pytest.approx(0.375)
    assert (cal["phases"]["short"]["cpu_s_per_step"], cal["phases"]["long"]["cpu_s_per_step"]) == (0.25, 0.75)
    assert (cal["phases"]["short"]["seq_len"], cal["phases"]["short"]["batch_size"]) == (16, 8)
    assert [r["seq_len"] for r in run_metrics(tmp_path / "r")] == [16] * 6 + [32] * 2


@pytest.mark.parametrize("stop_at", [2, 6])
def test_stopped_and_resumed_before_or_after_the_switch_is_exact(sample_corpus, tmp_path, monkeypatch, one_thread,
                                                                 stop_at):
    """A budgeted short-first run (switch at step 4 of 8) stopped at a checkpoint before or after
    the switch resumes to the same step count, batches and weights as an uninterrupted run, even
    when a new calibration would give another count."""
    args = ("train.max_minutes=0.05", "train.save_every=2", *SHORT)  # 0.5 · 0.25 + 0.5 · 0.5 = 0.375 s: 8 steps
    monkeypatch.setattr(loop, "calibrate_steps", _costs(0.25, 0.5))
    ref = _run(sample_corpus, tmp_path / "ref", *args)
    assert ref["steps"] == 8
    with stopped_after_checkpoint(monkeypatch, stop_at):
        _run(sample_corpus, tmp_path / "cut", *args)
    monkeypatch.setattr(loop, "calibrate_steps", _costs(0.0625, 0.125))  # would now mean 32 steps
    got = _run(sample_corpus, tmp_path / "cut", *args)
    assert got["steps"] == 8 and got["state_sha"] == ref["state_sha"]
    m, r = run_metrics(tmp_path / "cut"), run_metrics(tmp_path / "ref")
    assert [x["loss"] for x in m] == [x["loss"] for x in r]
    assert [x["seq_len"] for x in m] == [16] * 4 + [32] * 4


def test_extending_max_steps_on_resume_keeps_the_switch(sample_corpus, tmp_path, one_thread):
    """``train.max_steps`` may grow on resume (a longer run); the switch stays at the step the run
    started with, so a run never goes back to short rows (audit: recomputed, a 4-step run extended
    to 8 read 16, 16, 32, 32 and then 16, 16 again — or re-read long rows of steps 2-3)."""
    _run(sample_corpus, tmp_path / "r", "train.max_steps=4", "train.save_every=2", *SHORT)
    s = _run(sample_corpus, tmp_path / "r", "train.max_steps=8", "train.save_every=2", *SHORT)
    assert s["steps"] == 8
    assert [r["seq_len"] for r in run_metrics(tmp_path / "r")] == [16, 16] + [32] * 6
    state = json.loads((tmp_path / "r" / "checkpoints" / "step-8" / "trainer_state.json").read_text())
    assert state["short_switch"] == 2


def test_changed_schedule_on_resume_is_refused_or_recorded(sample_corpus, tmp_path, one_thread):
    """A changed schedule on resume is refused; with ``--allow-config-change`` it applies from the
    resumed step and is recorded (the switch is a share of ``max_steps``, which may move it back)."""
    _run(sample_corpus, tmp_path / "r", "train.max_steps=2", *SHORT)
    changed = ("train.max_steps=4", "train.short_seq_len=16", "train.short_seq_fraction=0.75")
    with pytest.raises(UserError, match="short_seq_fraction"):
        _run(sample_corpus, tmp_path / "r", *changed)
    s = _run(sample_corpus, tmp_path / "r", *changed, allow=True)
    assert s["steps"] == 4
    history = json.loads((tmp_path / "r" / "config.json").read_text())["history"]
    assert history[-1]["changes"]["train.short_seq_fraction"] == {"from": 0.5, "to": 0.75}
    # steps 0-1 as run (switch round(0.5 · 2) = 1), then the new schedule from step 2 (switch round(0.75 · 4) = 3)
    assert [r["seq_len"] for r in run_metrics(tmp_path / "r")] == [16, 32, 16, 32]


def test_structure_objectives_keep_their_own_rows(sample_corpus, tmp_path, seen, one_thread):
    """The structure/knowledge objectives' own examples stay at ``seq_len`` in the short phase."""
    _run(sample_corpus, tmp_path / "r", "train.max_steps=2", "train.structure_weights={reorder: 1.0}",
         "train.short_seq_len=8", "train.short_seq_fraction=0.5")
    assert seen[0]["input_ids"].shape[1] <= 8 < seen[0]["aux"]["reorder"].shape[1] <= 32
    assert "reorder_loss" in run_metrics(tmp_path / "r")[0]


@pytest.mark.parametrize("items, field", [
    (["train.short_seq_len=128", "train.short_seq_fraction=0.3"], "short_seq_len"),  # = seq_len
    (["train.short_seq_len=2", "train.short_seq_fraction=0.3"], "short_seq_len"),
    (["train.short_seq_len=64"], "short_seq_fraction"),  # fraction 0 with a short phase
    (["train.short_seq_len=64", "train.short_seq_fraction=1"], "short_seq_fraction"),
    (["train.short_seq_fraction=0.3"], "short_seq_fraction"),  # without short_seq_len: refused, not ignored
    (["train.short_batch_size=8"], "short_batch_size"),
    (["train.short_seq_len=64", "train.short_seq_fraction=0.3", "train.short_batch_size=-1"], "short_batch_size"),
])
def test_schedule_settings_are_validated(items, field):
    with pytest.raises(UserError, match=f"train.{field}="):
        load_config("small", items)
    load_config("small", ["train.short_seq_len=64", "train.short_seq_fraction=0.3", "train.short_batch_size=8"])
