"""Issue 11, learning fast on a small budget: bf16 and torch.compile training paths against fp32
eager, thread settings, the CPU-minute budget (calibration, recording, exact resume) and the
fixed-protocol evaluator the budget benchmark scores every model with."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import clueforge.model.bert as bert
from clueforge.pretrain import loop
from clueforge.pretrain.config import load_config
from clueforge.pretrain.loop import pretrain, resumed_budget_steps
from clueforge.utils import UserError
from conftest import run_metrics as _metrics
from conftest import stopped_after_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# dropout stays on (tiny's 0.1): the calibration must leave the run's RNG untouched
BASE = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=1", "train.prefetch=1",
        "train.peak_tflops=1.0", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "train.batch_size=8", "train.seq_len=32"]


def _run(corpus, out, *overrides):
    return pretrain(load_config("tiny", BASE + list(overrides)), corpus, out, show_progress=False)


def test_bf16_training_tracks_fp32(sample_corpus, tmp_path, fresh_accelerate, one_thread):
    """bf16 autocast on the CPU against fp32 eager, 6 steps: every step's training loss and the
    fixed-protocol held-out loss within 0.02 (stated tolerance), yet not bit-equal (bf16 ran)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        s = _run(sample_corpus, tmp_path / precision, f"train.precision={precision}", "train.max_steps=6")
        runs[precision] = ([m["loss"] for m in _metrics(tmp_path / precision)], s)
    (ref, s32), (got, s16) = runs["fp32"], runs["bf16"]
    assert s16["precision"] == "bf16" and s32["precision"] == "no"
    assert len(ref) == len(got) == 6
    assert max(abs(a - b) for a, b in zip(ref, got)) < 0.02, (ref, got)
    assert abs(s16["eval_fixed_loss"] - s32["eval_fixed_loss"]) < 0.02
    assert ref != got  # bf16 actually changed the arithmetic


def test_compile_training_matches_eager(sample_corpus, tmp_path, one_thread):
    """``train.compile`` (inductor on the CPU) against eager, fp32, dropout off (inductor draws
    dropout masks from its own generator), 2 steps: losses and held-out loss within 1e-4 relative."""
    import torch._dynamo

    torch._dynamo.reset()
    common = ("train.max_steps=2", "train.precision=fp32", "model.dropout=0", "model.attention_dropout=0")
    eager = _run(sample_corpus, tmp_path / "eager", *common)
    compiled = _run(sample_corpus, tmp_path / "compiled", *common, "train.compile=true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    torch._dynamo.reset()
    ref, got = [m["loss"] for m in _metrics(tmp_path / "eager")], [m["loss"] for m in _metrics(tmp_path / "compiled")]
    assert got == pytest.approx(ref, rel=1e-4)
    assert compiled["eval_fixed_loss"] == pytest.approx(eager["eval_fixed_loss"], rel=1e-4)


def test_threads_set_for_training_then_restored(sample_corpus, tmp_path, monkeypatch):
    seen = []
    forward = bert.Encoder.forward

    def spy(self, *a, **kw):
        if self.training:
            seen.append(torch.get_num_threads())
        return forward(self, *a, **kw)

    monkeypatch.setattr(bert.Encoder, "forward", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        s = _run(sample_corpus, tmp_path / "r", "train.threads=1", "train.max_steps=2")
        assert seen and set(seen) == {1} and s["threads"] == 1
        assert torch.get_num_threads() == 3  # the caller's setting is back
    finally:
        torch.set_num_threads(before)


def test_budget_calibrates_then_trains_the_same_as_a_step_count(sample_corpus, tmp_path, one_thread):
    """``train.max_minutes``: a short calibration on a throw-away copy fixes ``max_steps`` (recorded
    in budget.json and config.json); the run is then identical to one given that step count —
    the calibration touches neither the weights nor the RNG (dropout is on)."""
    s = _run(sample_corpus, tmp_path / "budget", "train.max_minutes=0.004")
    budget = json.loads((tmp_path / "budget" / "budget.json").read_text())
    steps = budget["max_steps"]
    assert steps == loop.budget_steps(0.004, budget["calibration"]["cpu_s_per_step"]) == s["steps"]
    assert json.loads((tmp_path / "budget" / "config.json").read_text())["config"]["train"]["max_steps"] == steps
    assert budget["calibration"]["threads"] == 1 and "process CPU time" in budget["unit"]
    plain = _run(sample_corpus, tmp_path / "plain", f"train.max_steps={steps}")
    assert s["state_sha"] == plain["state_sha"]
    assert 0 < s["cpu_min"] and _metrics(tmp_path / "budget")[-1]["cpu_min"] == pytest.approx(s["cpu_min"], abs=0.01)


def test_budgeted_run_stopped_and_resumed_is_exact(sample_corpus, tmp_path, monkeypatch, one_thread):
    """A budgeted run stopped after a checkpoint resumes to the same step count and weights, even
    when a new calibration would have given another count (the recorded one is kept); the CPU
    clock carries on from the checkpoint."""
    def cost(s):
        return lambda *a, **kw: {"cpu_s_per_step": s, "wall_s_per_step": s, "warmup_steps": 0, "steps": 0,
                                 "threads": 1}

    args = ("train.max_minutes=0.06", "train.save_every=2")  # 0.06 min at 0.6 s/step: 6 steps
    monkeypatch.setattr(loop, "calibrate_steps", cost(0.6))
    ref = _run(sample_corpus, tmp_path / "ref", *args)
    assert ref["steps"] == 6
    with stopped_after_checkpoint(monkeypatch, 4):
        _run(sample_corpus, tmp_path / "cut", *args)
    cut_cpu = _metrics(tmp_path / "cut")[3]["cpu_min"]
    monkeypatch.setattr(loop, "calibrate_steps", cost(0.3))  # would now mean 12 steps
    got = _run(sample_corpus, tmp_path / "cut", *args)
    assert got["steps"] == 6 and got["state_sha"] == ref["state_sha"]
    m = _metrics(tmp_path / "cut")
    assert [r["loss"] for r in m] == [r["loss"] for r in _metrics(tmp_path / "ref")]
    assert m[4]["cpu_min"] >= cut_cpu  # the clock resumed from the checkpoint, not from 0


def _fake_cpu(monkeypatch, cost_per_step):
    """Process CPU time that advances ``cost_per_step(step)`` seconds per training micro-step (the
    objective's calls), so a budgeted run's cost is known exactly whatever the machine does."""
    import time as real_time
    from types import SimpleNamespace

    now, calls = [0.0], [0]
    objective = loop.mlm_objective

    def charged(*a, **kw):
        now[0] += cost_per_step(calls[0])
        calls[0] += 1
        return objective(*a, **kw)

    fake_time = SimpleNamespace(**{k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")})
    fake_time.process_time = lambda: now[0]
    monkeypatch.setattr(loop, "time", fake_time)
    monkeypatch.setattr(loop, "mlm_objective", charged)
    monkeypatch.setattr(loop, "calibrate_steps", lambda *a, **kw: {"cpu_s_per_step": 0.6, "wall_s_per_step": 0.6,
                                                                   "warmup_steps": 0, "steps": 0, "threads": 1})
    return calls


@pytest.mark.parametrize("cost, steps", [(0.3, 12), (1.2, 3)])
def test_budget_rechecked_ends_the_run_at_its_budget(sample_corpus, tmp_path, monkeypatch, one_thread, cost, steps):
    """The calibration says 0.6 CPU s a step (0.06 min: 6 steps) but the steps cost ``cost``: with
    ``train.budget_recheck=2`` the step count is re-estimated from the measured cost and the run ends
    at its budget (3.6 CPU s: 12 steps at 0.3, 3 at 1.2 — the first estimate comes after 2 steps
    at the calibration's count), the LR schedule decaying to the new end; with 0 it keeps 6."""
    _fake_cpu(monkeypatch, lambda i: cost)
    args = ("train.max_minutes=0.06", "train.save_every=100", "train.warmup_steps=0")
    got = _run(sample_corpus, tmp_path / "on", *args, "train.budget_recheck=2")
    assert got["steps"] == steps and got["cpu_min"] * 60 == pytest.approx(steps * cost)
    m = _metrics(tmp_path / "on")
    assert m[-1]["max_steps"] == steps and m[-1]["lr"] == 0.0  # the linear schedule ended at the new last step
    budget = json.loads((tmp_path / "on" / "budget.json").read_text())
    assert (budget["max_steps"], budget["steps_run"]) == (6, steps) and budget["cpu_min_run"] == got["cpu_min"]
    off = _run(sample_corpus, tmp_path / "off", *args, "train.budget_recheck=0")
    assert off["steps"] == 6 and "max_steps" not in _metrics(tmp_path / "off")[-1]


CURRICULUM = ("train.curriculum=[{at: 0.0, ratio: 0.1, weights: {token: 1.0}}, {at: 0.2, ratio: 0.3, weights: {token: 1.0}}, "
              "{at: 0.4, ratio: 0.5, weights: {token: 1.0}}, {at: 0.6, ratio: 0.7, weights: {token: 1.0}}]")


@pytest.mark.parametrize("curriculum", [(), (CURRICULUM, "train.prefetch=4")], ids=["plain", "curriculum"])
def test_budget_recheck_resumes_from_the_last_estimate(sample_corpus, tmp_path, monkeypatch, one_thread, curriculum):
    """A run re-estimated to 12 steps, stopped after step 4's checkpoint, resumes to the same 12
    steps and weights as the uninterrupted run: the estimate travels in the checkpoint, and with a
    masking curriculum (whose stage follows step / max_steps) the batches built ahead are rebuilt
    when the estimate moves the end."""
    _fake_cpu(monkeypatch, lambda i: 0.3)
    args = ("train.max_minutes=0.06", "train.save_every=2", "train.budget_recheck=2", *curriculum)
    ref = _run(sample_corpus, tmp_path / "ref", *args)
    assert ref["steps"] == 12
    with stopped_after_checkpoint(monkeypatch, 4):
        _run(sample_corpus, tmp_path / "cut", *args)
    got = _run(sample_corpus, tmp_path / "cut", *args)
    assert got["steps"] == 12 and got["state_sha"] == ref["state_sha"]
    assert got["cpu_min"] == pytest.approx(ref["cpu_min"])


def test_budget_recheck_measures_the_long_steps_after_short_rows(sample_corpus, tmp_path, monkeypatch, one_thread):
    """Short rows first: 3 short steps (0.1 CPU s each, not re-checked), then long ones at 0.3. The
    first estimate after the switch is measured on long steps only: 14 steps (0.3 + 11 × 0.3 = 3.6 s),
    never the 24 an average with the cheap short steps would give."""
    _fake_cpu(monkeypatch, lambda i: 0.1 if i < 3 else 0.3)
    got = _run(sample_corpus, tmp_path / "r", "train.max_minutes=0.06", "train.budget_recheck=2", "train.save_every=100",
               "train.short_seq_len=16", "train.short_seq_fraction=0.5")
    assert got["steps"] == 14
    ends = [r["max_steps"] for r in _metrics(tmp_path / "r")]
    assert ends[:4] == [6, 6, 6, 14] and set(ends[4:]) == {14}, ends


def test_budget_recheck_needs_a_budget():
    with pytest.raises(UserError, match=r"budget_recheck.*unless train.max_minutes is set"):
        load_config("tiny", ["train.budget_recheck=100"])
    assert load_config("tiny", ["train.budget_recheck=100", "train.max_minutes=1"]).train.budget_recheck == 100


def test_rebudget_steps():
    assert loop.rebudget_steps(100, 50.0, 120.0, 0, 0.0) == 240  # 0.5 s a step, 70 s left: 140 more
    assert loop.rebudget_steps(200, 60.0, 120.0, 100, 50.0) == 800  # the cost since the reference: 0.1 s
    assert loop.rebudget_steps(100, 130.0, 120.0, 0, 0.0) == 100  # over budget: stop here
    assert loop.rebudget_steps(100, 50.0, 120.0, 100, 50.0) is None  # nothing measured


def test_resumed_budget_keeps_or_scales_the_recorded_steps():
    assert resumed_budget_steps({"max_minutes": 2.0, "max_steps": 100}, 2.0) == 100
    assert resumed_budget_steps({"max_minutes": 2.0, "max_steps": 100}, 3.0) == 150  # --allow-config-change
    assert resumed_budget_steps({"max_minutes": None, "max_steps": 100}, 3.0) is None  # calibrate then


@pytest.mark.parametrize("item", ["train.max_minutes=0", "train.max_minutes=-1", "train.threads=-1"])
def test_budget_and_threads_are_validated(item):
    with pytest.raises(UserError, match=item.split("=")[0]):
        load_config("small", [item])


def test_small_config_is_the_budget_recipe():
    cfg = load_config("small")
    assert cfg.train.max_minutes == 20 and cfg.model.dropout == 0.0 and cfg.train.precision == "bf16"


def _budget_module():
    spec = importlib.util.spec_from_file_location("budget_bench", ROOT / "benchmarks" / "budget.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_evaluator_reproduces_the_loop_fixed_protocol(sample_corpus, tmp_path, fresh_accelerate,
                                                                 one_thread):
    """``benchmarks/budget.py``'s ``fixed_heldout`` scores a saved model exactly as the training
    loop's ``eval_fixed_*`` does (fp32), so models from other recipes or tools are comparable."""
    s = _run(sample_corpus, tmp_path / "r", "train.max_steps=2", "train.precision=fp32")
    got = _budget_module().fixed_heldout(s["final"], sample_corpus, seq_len=32)
    assert got["loss"] == pytest.approx(s["eval_fixed_loss"], abs=1e-5)
    assert got["acc"] == pytest.approx(s["eval_fixed_mlm_acc"], abs=1e-6)


def test_quickstart_trains_the_small_recipe_and_scores_held_out_probes(tmp_path, fresh_accelerate):
    """The quickstart pretrains with ``configs/small.yaml`` (at a step count, not the CPU budget)
    and its demo scores every held-out probe against the training shards' unigram distribution
    (recomputed here from the shards)."""
    import numpy as np
    from typer.testing import CliRunner

    from clueforge.cli import FILL_MASK_PROBES, app
    from clueforge.corpus.shards import Corpus
    from clueforge.text.tokenizer import load_tokenizer

    out = tmp_path / "qs"
    res = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--steps", "3"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run" / "config.json").read_text())["config"]
    small = load_config("small")
    assert run["model"]["pre_ln"] is small.model.pre_ln is True
    assert (run["train"]["lr"], run["train"]["masking"], run["train"]["mask_ratio"], run["train"]["max_minutes"]) == \
        (small.train.lr, small.train.masking, small.train.mask_ratio, None)
    demo = json.loads((out / "demo.json").read_text())
    assert [p["answer"] for p in demo["probes"]] == [a for _, a in FILL_MASK_PROBES]
    tok = load_tokenizer(out / "vocab.txt")
    corpus = Corpus(out / "corpus")
    ids = np.concatenate([np.asarray(sh.ids) for sh in corpus.shards[:-1]])
    for p in demo["probes"]:
        gold = tok.token_to_id(p["answer"])
        assert gold != tok.token_to_id("[UNK]")
        expected = -np.log((np.sum(ids == gold) + 1) / (ids.size + tok.get_vocab_size()))
        assert p["unigram_loss"] == pytest.approx(expected, rel=1e-6)
        assert p["hit"] == (p["answer"] in p["top5"]) and len(p["top5"]) == 5
    assert demo["hits"] == sum(p["hit"] for p in demo["probes"])


def test_finetune_reruns_an_earlier_run_with_other_settings(tmp_path, monkeypatch):
    """``budget.py finetune`` reuses a finished run only when its recorded settings and model are the
    ones asked for: an earlier protocol's run in the same --work is fine-tuned again, not relabelled."""
    b = _budget_module()
    from dataclasses import asdict

    from clueforge.finetune.loop import FinetuneConfig

    res = tmp_path / "results.json"
    recorded = {**asdict(FinetuneConfig()), "lr": 0.0003, "epochs": 2, "max_train": 3000, "select": "last", "seed": 1}
    res.write_text(json.dumps({"model": str(tmp_path / "m"), "hyperparameters": recorded}))
    same = {"lr": "3e-4", "epochs": 2, "max_train": 3000, "select": "last", "ema": "0.0", "kb": "null"}
    assert b._changed_settings(res, same, str(tmp_path / "m")) == []
    res.write_text(json.dumps({"model": str(tmp_path / "m"), "hyperparameters": {**recorded, "rdrop": 1.0}}))
    assert b._changed_settings(res, same, str(tmp_path / "m")) == ["rdrop: 1.0 → 0.0"]  # an extra --ft-set then
    res.write_text(json.dumps({"model": str(tmp_path / "m"), "hyperparameters": recorded}))
    assert b._changed_settings(res, {**same, "epochs": 3, "max_train": 9000, "pooling": "mean"}, str(tmp_path / "m")) == [
        "epochs: 2 → 3", "max_train: 3000 → 9000", "pooling: None → mean"]
    assert b._changed_settings(res, same, str(tmp_path / "other")) == [f"model: {tmp_path / 'm'} → {tmp_path / 'other'}"]
    assert b._changed_settings(tmp_path / "none.json", same, "m") == []
    # finetune_one: the run with the asked settings is reused; the earlier protocol's is run again
    runs = []

    def fake_child(cmd, env, log):
        runs.append(cmd)
        sets = dict(cmd[i + 1].split("=", 1) for i, c in enumerate(cmd) if c == "--set")
        (out / "results.json").write_text(json.dumps({"model": cmd[cmd.index("--model") + 1], "metric": {"accuracy": 50.0},
                                                      "hyperparameters": {**asdict(FinetuneConfig()), **sets}}))

    out = tmp_path / "ocnli" / "seed0"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"model": "m", "metric": {"accuracy": 33.0}, "hyperparameters": {
        **asdict(FinetuneConfig()), **b.FT_COMMON, **b.FT_TASKS["ocnli"], "epochs": 2, "max_train": 3000}}))
    monkeypatch.setattr(b, "_run_child", fake_child)
    assert b.finetune_one("m", "ocnli", 0, out) == 50.0 and len(runs) == 1  # stale: fine-tuned again
    assert b.finetune_one("m", "ocnli", 0, out) == 50.0 and len(runs) == 1  # now current: reused


def test_pool_averages_fine_tuning_seeds_then_pretraining_seeds(tmp_path, capsys):
    """``budget.py pool``: a pretraining seed's score is the mean over its fine-tuning seeds; the recipe's
    the mean and sample std over pretraining seeds; a later file's task replaces an earlier one's (and
    says so); a task missing for one seed is left out, named."""
    import statistics

    b = _budget_module()

    def ft_file(name, **tasks):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({"finetuned": [{"name": name, "tasks": {t: {"mean": statistics.fmean(v), "seeds": v}
                                                                        for t, v in tasks.items()}}]}))
        return str(f)

    a0 = ft_file("a0", ocnli=[30.0, 40.0], **{"fewclue-tnews": [10.0]})
    a0_new = ft_file("a0new", ocnli=[50.0, 52.0])
    a1 = ft_file("a1", ocnli=[44.0, 46.0])
    out = tmp_path / "pooled.json"
    args = type("A", (), {"seed": [["A", "0", a0, a0_new], ["A", "1", a1]], "out": str(out)})
    b.pool(args)
    printed = capsys.readouterr().out
    assert "ocnli from" in printed and "replaces" in printed and "left out" in printed and "fewclue-tnews" in printed
    row = json.loads(out.read_text())["pooled"][0]
    assert list(row["tasks"]) == ["ocnli"]
    assert row["tasks"]["ocnli"]["per_pretrain_seed"] == [51.0, 45.0]
    assert row["tasks"]["ocnli"]["mean"] == pytest.approx(48.0)
    assert row["tasks"]["ocnli"]["std"] == pytest.approx(statistics.stdev([51.0, 45.0]))
    with pytest.raises(SystemExit, match="expected RECIPE SEED FILE"):
        b.pool(type("A", (), {"seed": [["A", "0"]], "out": str(out)}))


def test_eval_every_is_kept_when_it_is_not_a_multiple_of_log_every(sample_corpus, tmp_path, one_thread):
    """``eval_every=2`` with ``log_every=3``: held-out scores at steps 2, 4 and 6 (each with its own
    metrics line), not only where the two meet (step 6): ``small.yaml``'s 250 / 20 evaluated every 500."""
    _run(sample_corpus, tmp_path / "r", "train.max_steps=7", "train.log_every=3", "train.eval_every=2")
    m = _metrics(tmp_path / "r")
    assert [r["step"] for r in m if "eval_fixed_loss" in r] == [2, 4, 6, 7]
    assert [r["step"] for r in m] == [2, 3, 4, 6, 7]
