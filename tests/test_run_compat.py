"""Runs stay usable as the project grows: a run saved before a setting existed resumes, YAML
booleans are not numbers, and several runs with different precisions share one process."""

import json

import pytest
from typer.testing import CliRunner

from clueforge.cli import app

FAST = ["--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
        "--set", "train.warmup_steps=0", "--set", "train.prefetch=1", "--set", "train.peak_tflops=1",
        "--set", "train.schedule=constant", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
        "--set", "model.num_layers=1", "--no-progress"]
# settings added after runs already existed (issues 11, 12, 14): an old run's config lacks them
NEWER = {"train": ("ar_mlm_groups", "threads", "max_minutes", "students"),
         "model": ("attn_residual_decay", "pos_embeddings", "syntax_heads", "syntax_constraint")}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _forget_newer_settings(path):
    rec = json.loads(path.read_text())
    cfg = rec["config"]
    for section, names in NEWER.items():
        for n in names:
            assert n in cfg[section], n  # the run did record it: the test removes something real
            del cfg[section][n]
    path.write_text(json.dumps(rec))


def test_a_run_saved_before_a_setting_existed_resumes_and_a_real_change_is_still_refused(tmp_path, sample_corpus):
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--save-every", "2", *FAST]
    assert cli(*base, "--max-steps", "2").exit_code == 0
    _forget_newer_settings(run / "checkpoints" / "step-2" / "trainer_state.json")
    _forget_newer_settings(run / "config.json")

    r = cli(*base, "--max-steps", "3", "--set", "train.ar_mlm_groups=2")  # not the old behaviour: refused
    assert r.exit_code == 2 and "train.ar_mlm_groups" in " ".join(r.output.split()), r.output
    r = cli(*base, "--max-steps", "3")  # the defaults are the old behaviour: resumes
    assert r.exit_code == 0, r.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("override", ["train.ar_mlm_groups=true", "train.lr=true", "model.syntax_heads=false"])
def test_yaml_booleans_are_not_numbers(override):
    from clueforge.pretrain.config import load_config
    from clueforge.utils import UserError

    with pytest.raises(UserError, match=override.split("=")[0].split(".")[1]):
        load_config("tiny", [override])


def test_runs_with_different_precisions_share_one_process(tmp_path, sample_corpus):
    """Accelerate's process-wide state cannot change precision: a bf16 run, then an fp32 run."""
    for i, precision in enumerate(("bf16", "fp32")):
        r = cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / f"r{i}", "--max-steps", "1",
                "--set", f"train.precision={precision}", *FAST)
        assert r.exit_code == 0, (precision, r.output, r.exception)


def test_max_steps_replaces_a_configs_cpu_time_budget(tmp_path, sample_corpus):
    """`--config small` trains to a CPU-time budget; `--max-steps N` asks for N steps and gets them."""
    run = tmp_path / "run"
    r = cli("pretrain", "--config", "small", "--data", sample_corpus, "--out", run, "--max-steps", "3",
            "--set", "train.max_minutes=0.02", "--set", "train.precision=fp32", *FAST)
    assert r.exit_code == 0, r.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and not (run / "budget.json").exists()


def test_threads_may_change_on_resume(tmp_path, sample_corpus):
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--save-every", "2", *FAST]
    assert cli(*base, "--max-steps", "2", "--set", "train.threads=1").exit_code == 0
    r = cli(*base, "--max-steps", "3", "--set", "train.threads=2")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["config"]["train"]["threads"] == 2


def test_init_from_a_plain_model_adds_the_requested_architecture_options(tmp_path, sample_corpus):
    """Adding POS embeddings / the attention residual to a trained model: applied and recorded, the
    checkpoint's weights kept, the new ones at zero — never silently dropped."""
    import torch
    from safetensors.torch import load_file

    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, *FAST]
    assert cli(*base, "--out", tmp_path / "p0", "--max-steps", "1").exit_code == 0
    r = cli(*base, "--out", tmp_path / "p1", "--max-steps", "1", "--set", "train.lr=1e-9",
            "--set", f"train.init_from={tmp_path / 'p0' / 'final'}", "--set", "model.pos_embeddings=true",
            "--set", "model.attn_residual_decay=0.5")
    assert r.exit_code == 0, r.output
    from clueforge.model.hf import load_hf

    m = load_hf(tmp_path / "p1" / "final")
    assert m.cfg.pos_embeddings and m.cfg.attn_residual_decay == 0.5
    rec = json.loads((tmp_path / "p1" / "config.json").read_text())["config"]["model"]
    assert rec["pos_embeddings"] is True and rec["attn_residual_decay"] == 0.5
    old = load_file(tmp_path / "p0" / "final" / "model.safetensors")
    new = load_file(tmp_path / "p1" / "final" / "model.safetensors")
    assert set(old) < set(new)
    for k in old:  # lr 1e-9, one step: the checkpoint's weights carried over
        torch.testing.assert_close(new[k], old[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,needle", [
    (["fewclue", "--method", "pet", "--calibration", "pmi"], "--calibration pmi is for --method zeroshot"),
    (["clue1.1", "--calibration", "contextual"], "--calibration contextual is for --method zeroshot"),
    (["clue1.1", "--splits", "0,1"], "--splits and --tasks are for the FewCLUE protocol"),
    (["fewclue", "--tasks", "fewclue-eprstmt"], "--splits and --tasks are for the FewCLUE protocol"),
    (["fewclue", "--method", "finetune", "--seeds", "2"], "--seeds: the FewCLUE protocol runs each split once"),
])
def test_benchmark_options_that_would_be_ignored_are_refused(tmp_path, args, needle):
    r = cli("benchmark", *args, "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "out")
    assert r.exit_code == 2 and needle in " ".join(r.output.split()) and "Traceback" not in r.output, r.output


def test_task_distillation_refuses_augmentation_settings_without_copies():
    from clueforge.distill.task import TaskDistillConfig

    with pytest.raises(ValueError, match="augment_rate, augment_mlm set but augment_copies=0"):
        TaskDistillConfig(augment_rate=0.2, augment_mlm="runs/mini/final")
    assert TaskDistillConfig(augment_rate=0.2, augment_copies=1).augment_copies == 1


def test_task_distillation_refuses_rdrop_that_hard_weight_zero_would_switch_off(tmp_path):
    from clueforge.distill.task import distill_task
    from clueforge.utils import UserError

    with pytest.raises(UserError, match="rdrop=1.0 with hard_weight=0 would do nothing"):
        distill_task("afqmc", tmp_path / "teacher", "pico", tmp_path, tmp_path / "out", ["rdrop=1"], show_progress=False)
