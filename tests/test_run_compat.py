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
