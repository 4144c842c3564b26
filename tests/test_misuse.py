"""Misuse never corrupts a run (issue 9): locks, validated settings, clean errors, atomic outputs.

Each test names the issue item it covers; docs/reliability.md lists them as a table. New names
are imported inside the tests so that each one fails on its own against the code before the fix.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clueforge.cli import app
from conftest import ROOT, SAMPLE

FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
SRC = str(Path(__import__("clueforge").__file__).resolve().parents[1])  # the code under test, for subprocesses
FAST = ["--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
        "--set", "train.warmup_steps=0", "--set", "train.prefetch=1", "--set", "train.peak_tflops=1",
        "--set", "train.schedule=constant", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
        "--set", "model.num_layers=1", "--no-progress"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    """Exit 2, no traceback, one ``error:`` line holding every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    text = " ".join(result.output.split())  # rich may wrap a long line
    for n in needles:
        assert n in text, (n, result.output)
    return text


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, sample_vocab):
    """A clueforge HF-layout model directory with 64 positions."""
    from clueforge.model.bert import BertForMLM, ModelConfig
    from clueforge.model.hf import save_hf

    n = sum(1 for _ in open(sample_vocab, encoding="utf-8"))
    torch.manual_seed(0)
    model = BertForMLM(ModelConfig(vocab_size=n, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                   max_position=64))
    return save_hf(model, tmp_path_factory.mktemp("m") / "model", vocab=sample_vocab)


# 1. One process per run directory ---------------------------------------------------------------

def test_1_second_process_on_a_run_dir_is_refused_with_the_holders_pid(tmp_path, sample_vocab, sample_corpus):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom clueforge.runs import run_lock\n"
         f"with run_lock({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "clueforge", "corpus", "build", str(SAMPLE), "--out", str(run),
                                 "--vocab", str(sample_vocab), "--no-progress"], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "400"})
        assert second.returncode == 2, second.stderr
        assert f"pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr
        assert not (run / "manifest.json").exists()
        for args in (["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--max-steps", "1"],
                     ["finetune", "afqmc", "--data", FIXTURES / "afqmc", "--model", sample_corpus, "--out", run]):
            one_line_error(cli(*args), f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the dead holder's lock file (its pid still inside) does not block the next run
    assert (run / ".lock").read_text().split() == [str(holder.pid), "run"]
    from clueforge.runs import run_lock

    with run_lock(run):
        assert (run / ".lock").read_text().split()[0] == str(os.getpid())


# 2. Resume with changed settings -----------------------------------------------------------------

def test_2_resume_refuses_changed_settings_applies_allowed_ones_and_records_them(tmp_path, sample_corpus):
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--save-every", "2", *FAST]
    assert cli(*base, "--max-steps", "2").exit_code == 0
    saved = json.loads((run / "config.json").read_text())
    one_line_error(cli(*base, "--max-steps", "3", "--set", "train.lr=2e-3"), "train.lr", "0.001", "0.002",
                   "--allow-config-change")
    assert json.loads((run / "config.json").read_text()) == saved  # the recorded config is the one that trained
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    assert cli(*base, "--max-steps", "3").exit_code == 0  # max_steps may change on resume
    rec = json.loads((run / "config.json").read_text())
    assert rec["config"]["train"]["max_steps"] == 3
    assert rec["history"][-1]["changes"] == {"train.max_steps": {"from": 2, "to": 3}}

    r = cli(*base, "--max-steps", "4", "--set", "train.lr=2e-3", "--allow-config-change")
    assert r.exit_code == 0, r.output
    rec = json.loads((run / "config.json").read_text())
    assert rec["config"]["train"]["lr"] == 2e-3
    assert rec["history"][-1]["changes"]["train.lr"] == {"from": 1e-3, "to": 2e-3}
    assert rec["history"][-1]["allowed_by"] == "--allow-config-change"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[2]["lr"] == pytest.approx(1e-3) and lines[3]["lr"] == pytest.approx(2e-3)  # applied, not ignored


def test_2b_initialisation_settings_are_refused_on_resume_even_when_changes_are_allowed(tmp_path, sample_corpus):
    """``model.position_init`` / ``model.initializer_range`` act only on the weights a run starts
    with: a resume cannot apply them, so even --allow-config-change refuses them (recording them
    would claim a change that never happened)."""
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--save-every", "2", *FAST]
    assert cli(*base, "--max-steps", "2").exit_code == 0
    saved = (run / "config.json").read_text()
    for change in ("model.position_init=sinusoidal", "model.initializer_range=0.05"):
        one_line_error(cli(*base, "--max-steps", "3", "--set", change, "--allow-config-change"),
                       change.split("=")[0], "only when a run starts")
    # a setting that decides which weights exist cannot be resumed into (not a KeyError traceback)
    one_line_error(cli(*base, "--max-steps", "3", "--set", "model.relative_attention=4", "--allow-config-change"),
                   "model.relative_attention: 0 → 4", "--set model.relative_attention=0")
    assert (run / "config.json").read_text() == saved
    assert cli(*base, "--max-steps", "3", "--allow-config-change").exit_code == 0  # no change: resumes
    # train.init_from loads trained weights: an initialisation setting would be ignored, so it is refused
    one_line_error(cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "warm", *FAST,
                       "--max-steps", "1", "--set", f"train.init_from={run / 'final'}",
                       "--set", "model.position_init=sinusoidal"),
                   "model.position_init='sinusoidal' acts only on fresh weights", "train.init_from")


# 3. A corrupt shard is verified, rebuilt and reported --------------------------------------------

def test_3_corrupt_shard_is_rebuilt_and_stats_reports_it(tmp_path, sample_vocab, sample_corpus):
    out = tmp_path / "c"
    shutil.copytree(sample_corpus, out)  # built from SAMPLE with --doc-sep blank --docs-per-shard 25
    good = {f.name: f.read_bytes() for f in (out / "shards").iterdir()}
    ids = out / "shards" / "shard-000001.ids.u16"
    ids.write_bytes(ids.read_bytes()[:-10])  # truncated copy
    flags = out / "shards" / "shard-000002.flags.u8"
    flags.write_bytes(bytes([flags.read_bytes()[0] ^ 0xFF]) + flags.read_bytes()[1:])  # same size, wrong bytes

    one_line_error(cli("corpus", "stats", out), "shard-000001", "corrupt")
    r = cli("corpus", "build", SAMPLE, "--out", out, "--vocab", sample_vocab, "--doc-sep", "blank",
            "--docs-per-shard", "25", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "rebuilt 2 corrupt shard(s): shard-000001, shard-000002" in " ".join(r.output.split())
    assert {f.name: f.read_bytes() for f in (out / "shards").iterdir()} == good
    assert cli("corpus", "stats", out, "--json").exit_code == 0


# 4. Every field validated at load time -----------------------------------------------------------

PRETRAIN_BAD = [
    ("train.grad_accum=0", "≥ 1"), ("train.max_steps=0", "≥ 1"), ("train.max_steps=-3", "≥ 1"),
    ("train.warmup_steps=-1", "≥ 0"), ("train.mask_ratio=0", "(0, 1)"), ("train.mask_ratio=1", "(0, 1)"),
    ("train.schedule=cosin", "linear, cosine, constant"), ("train.precision=fp8", "auto, fp32, bf16, fp16"),
    ("train.save_every=0", "≥ 1"), ("train.batch_size=0", "≥ 1"), ("train.batch_size=-2", "≥ 1"),
    ("train.lr=0", "> 0"), ("train.masking=wwwm", "token, wwm"), ("train.log_every=0", "≥ 1"),
    ("train.random_token_prob=0.5", "1 - mask_token_prob"), ("train.betas=[0.9, 1.5]", "[0, 1)"),
    ("train.masking_weights={wwm: 0}", "not all 0"), ("model.dropout=1.0", "[0, 1)"), ("model.num_layers=0", "≥ 1"),
]


@pytest.mark.parametrize("override,allowed", PRETRAIN_BAD)
def test_4_pretrain_settings_validated_at_load(override, allowed):
    from clueforge.pretrain.config import load_config
    from clueforge.utils import UserError

    key, value = override.split("=", 1)
    with pytest.raises(UserError, match="is not allowed") as exc:
        load_config("tiny", [override])
    msg = str(exc.value)
    assert f"--set {key}=" in msg and allowed in msg


def test_4_bad_value_in_a_config_file_names_the_file(tmp_path, sample_corpus):
    f = tmp_path / "mine.yaml"
    f.write_text("model: {hidden_size: 64, num_heads: 4}\ntrain: {grad_accum: 0}\n")
    one_line_error(cli("pretrain", "--config", f, "--data", sample_corpus, "--out", tmp_path / "r"),
                   "mine.yaml [train]: train.grad_accum=0 is not allowed: must be ≥ 1")


FINETUNE_BAD = [("epochs=0", "≥ 1"), ("batch_size=0", "≥ 1"), ("rdrop=-0.5", "≥ 0"), ("ema=1", "[0, 1)"),
                ("ema=-0.1", "[0, 1)"), ("max_length=0", "≥ 8"), ("lr=-1e-5", "> 0"), ("warmup_ratio=1", "[0, 1)"),
                ("llrd=0", "(0, 1]"), ("fgm=-1", "≥ 0"), ("max_steps=0", "≥ 1"), ("log_every=0", "≥ 1")]


@pytest.mark.parametrize("override,allowed", FINETUNE_BAD)
def test_4_finetune_settings_validated_before_anything_runs(override, allowed, tmp_path):
    r = cli("finetune", "afqmc", "--data", FIXTURES / "afqmc", "--model", tmp_path / "no-model", "--out",
            tmp_path / "ft", "--set", override)
    key = override.split("=")[0]
    one_line_error(r, f"--set {key}=", allowed)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("option,value,allowed", [("--docs-per-shard", "0", "≥ 1"), ("--min-chars", "-1", "≥ 0"),
                                                  ("--doc-sep", "para", "line, blank")])
def test_4_corpus_build_settings_validated(tmp_path, sample_vocab, option, value, allowed):
    r = cli("corpus", "build", SAMPLE, "--out", tmp_path / "c", "--vocab", sample_vocab, option, value)
    assert r.exit_code == 2 and allowed in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "c" / "manifest.json").exists()


# 5. Length beyond the model ----------------------------------------------------------------------

def test_5_max_length_beyond_the_models_positions_is_refused_before_loading_data(tmp_path, tiny_model):
    from clueforge.tasks.registry import TASKS

    assert TASKS["afqmc"].max_length > 64
    r = cli("finetune", "afqmc", "--data", tmp_path / "not-read", "--model", tiny_model, "--out", tmp_path / "ft")
    one_line_error(r, "64 positions", "--set max_length=64")
    r = cli("finetune", "afqmc", "--data", tmp_path / "not-read", "--model", tiny_model, "--out", tmp_path / "ft",
            "--set", "max_length=100")
    one_line_error(r, "--set max_length 100", "--set max_length=64")


# 6. Atomic outputs -------------------------------------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "aside"])
def test_6_best_dir_is_old_or_new_whatever_step_fails(tmp_path, tiny_model, monkeypatch, exchange):
    """Fail at every file-system step of replacing ``best/``: the old or the new is always whole."""
    import clueforge.model.hf as hf
    import clueforge.utils as utils
    from clueforge.pretrain.loop import state_digest

    old_model = hf.load_hf(tiny_model)
    new_model = hf.load_hf(tiny_model)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(1.0)
    old_sha, new_sha = state_digest(old_model), state_digest(new_model)
    vocab = tiny_model / "vocab.txt"
    if not exchange:
        monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    calls = {"n": 0, "fail_at": -1}
    targets = [(os, "replace"), (shutil, "rmtree"), (hf, "save_file"), (utils, "_exchange")]
    originals = {(id(m), name): getattr(m, name) for m, name in targets}

    def wrap(m, name):
        orig = originals[(id(m), name)]

        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise Boom(f"injected failure in {name}")
            return orig(*a, **k)
        return f

    best = tmp_path / "best"
    seen_new = False
    for k in range(1, 30):
        shutil.rmtree(best, ignore_errors=True)
        hf.save_hf(old_model, best, vocab=vocab)
        for m, name in targets:
            monkeypatch.setattr(m, name, wrap(m, name))
        calls.update(n=0, fail_at=k)
        try:
            hf.save_hf(new_model, best, vocab=vocab)
            failed = False
        except Boom:
            failed = True
        finally:
            for m, name in targets:
                monkeypatch.setattr(m, name, originals[(id(m), name)])
        utils.recover_dir(best)  # what the next save does after a crash between two renames
        got = state_digest(hf.load_hf(best))
        assert got in (old_sha, new_sha), f"failure at step {k}: best/ holds neither"
        seen_new |= got == new_sha
        if not failed:
            break
    assert not failed and seen_new


def test_6_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from clueforge.utils import atomic_write

    f = tmp_path / "results.json"
    f.write_text("old")

    def fail(fd):
        raise Boom("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(Boom):
        atomic_write(f, "new")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_6_finetune_writes_through_temporary_names(tmp_path, tiny_model, monkeypatch):
    """results.json and best/ (KgCLUE's kb.tsv inside it) only ever appear by rename."""
    import clueforge.finetune.loop as loop

    written = []
    real_write_text = Path.write_text

    def spy(self, *a, **k):
        written.append(self.name)
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", spy)
    cfg = loop.FinetuneConfig(epochs=1, max_steps=1, max_length=32, batch_size=4, max_train=8, max_eval=8)
    loop.finetune("afqmc", FIXTURES / "afqmc", tiny_model, tmp_path / "ft", cfg, show_progress=False)
    assert "results.json" not in written  # it was written in place before
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["task"] == "afqmc"


# 7. No raw tracebacks for user errors ------------------------------------------------------------

def test_7_malformed_yaml_is_one_line_with_file_and_line(tmp_path, sample_corpus):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [64\ntrain: {}\n")
    one_line_error(cli("pretrain", "--config", bad, "--data", sample_corpus, "--out", tmp_path / "r"),
                   "bad.yaml:", "not valid YAML")


def test_7_truncated_or_pickled_weights_are_user_errors(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "cut")
    w = tmp_path / "cut" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = cli("finetune", "afqmc", "--data", FIXTURES / "afqmc", "--model", tmp_path / "cut", "--out", tmp_path / "o",
            "--set", "max_length=32", "--set", "max_steps=1")
    one_line_error(r, "model.safetensors", "not a readable safetensors file")

    shutil.copytree(tiny_model, tmp_path / "pkl")
    (tmp_path / "pkl" / "model.safetensors").unlink()
    torch.save({"bad": Boom("x")}, tmp_path / "pkl" / "pytorch_model.bin")  # a class weights_only refuses
    r = cli("finetune", "afqmc", "--data", FIXTURES / "afqmc", "--model", tmp_path / "pkl", "--out", tmp_path / "o2",
            "--set", "max_length=32", "--set", "max_steps=1")
    one_line_error(r, "pytorch_model.bin", "refused to load")


def test_7_vocab_build_into_a_directory_and_no_temporary_left(tmp_path):
    d = tmp_path / "vocabdir"
    d.mkdir()
    r = cli("vocab", "build", SAMPLE, "--out", d, "--vocab-size", "500", "--min-frequency", "1", "--doc-sep", "blank")
    assert r.exit_code == 0, r.output
    assert (d / "vocab.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocabdir"] and os.listdir(d) == ["vocab.txt"]


def test_7_wrong_set_key_is_blamed_on_set_not_the_file(tmp_path, sample_corpus):
    text = one_line_error(cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "r",
                              "--set", "train.warmup=10"), "--set 'train.warmup=10'", "train.warmup_steps")
    assert "tiny.yaml" not in text


def test_7_a_bug_still_shows_its_traceback(tmp_path, sample_corpus, monkeypatch):
    import clueforge.pretrain.loop as loop

    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop, "pretrain", bug)
    r = cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "r")
    assert isinstance(r.exception, RuntimeError)


# 8. Messages -------------------------------------------------------------------------------------

def test_8_closing_quotes_are_kept(tmp_path, tiny_model):
    d = tmp_path / "afqmc-model"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "clueforge_task": {"task": "afqmc", "max_length": 32}}))
    text = one_line_error(cli("predict", "cmnli", "--model", d, "--input", tmp_path / "t.json", "--out",
                              tmp_path / "p.json"), "fine-tuned for 'afqmc', not 'cmnli'")
    assert text.endswith("'cmnli'")


def test_8_no_earlier_checkpoint_says_it_restarts_from_zero(tmp_path, caplog):
    from clueforge.pretrain import checkpoint as ckpt

    (tmp_path / "step-5").mkdir()
    (tmp_path / "step-5" / "trainer_state.json").write_text("{broken")
    with caplog.at_level("WARNING", logger="clueforge.pretrain"):
        assert ckpt.latest_valid(tmp_path) is None
    assert "falling back" not in caplog.text and "restarts from step 0" in caplog.text


# 9. Nothing usable -------------------------------------------------------------------------------

def test_9_corpus_with_no_usable_document_fails_with_the_reasons(tmp_path, sample_vocab):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "今天天气很好。"}\n{"body": "我们去公园。"}\n', encoding="utf-8")
    one_line_error(cli("corpus", "build", src, "--out", tmp_path / "c", "--vocab", sample_vocab, "--no-progress"),
                   "no usable documents", "missing_field: 2", "--text-field")


def test_9_vocab_on_empty_input_writes_nothing(tmp_path):
    src = tmp_path / "empty.txt"
    src.write_text("\n\n", encoding="utf-8")
    one_line_error(cli("vocab", "build", src, "--out", tmp_path / "v.txt"), "no usable text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


# 11. Output that helps ---------------------------------------------------------------------------

def test_11_version_and_short_help():
    from clueforge import __version__

    assert cli("--version").output.strip() == f"clueforge {__version__}"
    r = cli("pretrain", "-h")
    assert r.exit_code == 0 and "Usage:" in r.output and "--max-steps" in r.output


def test_11_config_show_documents_every_set_key():
    from dataclasses import fields

    from clueforge.finetune.loop import FinetuneConfig
    from clueforge.model.bert import ModelConfig
    from clueforge.pretrain.config import TrainConfig

    r = cli("config", "show", "tiny")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    for prefix, cls in (("model.", ModelConfig), ("train.", TrainConfig), ("", FinetuneConfig)):
        for f in fields(cls):
            i = next(i for i, x in enumerate(lines) if x.startswith(f"{prefix}{f.name} = "))
            assert lines[i + 1].startswith("    ") and lines[i + 1].strip(), f"{prefix}{f.name} has no description"


def test_11_pretrain_ends_with_a_human_line_json_in_a_file_and_logs_progress(tmp_path, sample_corpus):
    r = cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "r", "--max-steps", "2",
            *FAST[:-1])  # progress on, but stderr is not a terminal: log lines instead of a bar
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("pretrained 2 steps") and not last.startswith("{")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 2
    assert "step 2/2 loss" in r.output


def test_11_ctrl_c_says_how_to_resume(tmp_path, sample_corpus, monkeypatch):
    import clueforge.pretrain.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "pretrain", interrupted)
    (tmp_path / "r" / "checkpoints" / "step-000002").mkdir(parents=True)  # a checkpoint was saved before the ^C
    r = cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "r")
    assert r.exit_code == 130 and "run the same command to resume" in " ".join(r.output.split())


def test_11_finetuned_checkpoint_carries_label_names(tmp_path, tiny_model):
    from clueforge.finetune.loop import FinetuneConfig, finetune

    finetune("afqmc", FIXTURES / "afqmc", tiny_model, tmp_path / "ft",
             FinetuneConfig(epochs=1, max_steps=1, max_length=32, max_train=8, max_eval=8), show_progress=False)
    cfg = json.loads((tmp_path / "ft" / "best" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "0", "1": "1"} and cfg["label2id"] == {"0": 0, "1": 1}
    assert not any(p.name.startswith("best.") for p in (tmp_path / "ft").iterdir())


# 12. Sharded index inside the model directory ----------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/../../outside.safetensors"])
def test_12_sharded_index_files_must_stay_inside_the_model_dir(tmp_path, tiny_model, name):
    from clueforge.model.hf import read_hf_weights
    from clueforge.utils import UserError

    d = tmp_path / "model"
    shutil.copytree(tiny_model, d)
    (d / "model.safetensors").rename(tmp_path / "outside.safetensors")
    if name.startswith("/"):
        name = str(tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
    with pytest.raises(UserError, match="outside the model directory"):
        read_hf_weights(d)


# 13. Audit of issue 9: every stage that replaces a directory locks it and refuses another's ------

def _finetune_run(tmp_path, tiny_model):
    """A directory shaped like a fine-tune run (best/ a model, results.json beside it)."""
    ft = tmp_path / "ftx"
    shutil.copytree(tiny_model, ft / "best")
    (ft / "results.json").write_text('{"task": "afqmc"}')
    return ft, sorted(p.relative_to(ft).as_posix() for p in ft.rglob("*"))


def test_13_export_refuses_to_replace_the_run_holding_the_model_or_a_non_export(tmp_path, tiny_model):
    ft, before = _finetune_run(tmp_path, tiny_model)
    one_line_error(cli("export", ft / "best", "--out", ft), "would replace the model directory")
    one_line_error(cli("export", ft / "best", "--out", ft / "best"), "would replace the model directory")
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    one_line_error(cli("export", ft / "best", "--out", other), "is not empty and is not an earlier export")
    assert sorted(p.relative_to(ft).as_posix() for p in ft.rglob("*")) == before
    assert (other / "manifest.json").read_text() == "{}"


def test_13_export_takes_the_lock_on_out(tmp_path, tiny_model):
    from clueforge.runs import run_lock

    ft, _ = _finetune_run(tmp_path, tiny_model)
    out = tmp_path / "onnx"
    with run_lock(out, "export"):
        one_line_error(cli("export", ft / "best", "--out", out), "in use by export", f"pid {os.getpid()}")


def test_13_quickstart_refuses_a_run_in_use_and_deletes_nothing(tmp_path):
    from clueforge.runs import run_lock

    qs = tmp_path / "qs"
    for d in ("run", "corpus"):
        (qs / d).mkdir(parents=True)
        (qs / d / "keep.txt").write_text("x")
    with run_lock(qs / "run", "pretrain"):
        one_line_error(cli("quickstart", "--out", qs, "--steps", "1"), "in use by pretrain", f"pid {os.getpid()}")
    assert (qs / "run" / "keep.txt").exists() and (qs / "corpus" / "keep.txt").exists()


def test_13_resume_with_another_model_shape_is_refused_before_loading(tmp_path, sample_corpus):
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--save-every", "1", *FAST]
    assert cli(*base, "--max-steps", "1").exit_code == 0
    one_line_error(cli(*base, "--max-steps", "2", "--set", "model.num_layers=2"), "model.num_layers: 1 → 2",
                   "--allow-config-change")


def test_13_resume_on_another_corpus_is_refused_unless_allowed_and_recorded(tmp_path, sample_corpus):
    from clueforge.corpus.build import BuildConfig, build_corpus

    run, other, moved = tmp_path / "run", tmp_path / "other", tmp_path / "moved"
    build_corpus([SAMPLE], other, BuildConfig(vocab=str(sample_corpus / "vocab.txt"), doc_sep="blank",
                                              docs_per_shard=20))  # the same text cut otherwise
    shutil.copytree(sample_corpus, moved)
    m = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**m, "shards_resumed": 3}))  # a rerun of corpus build
    base = ["pretrain", "--config", "tiny", "--out", run, "--save-every", "1", *FAST]
    assert cli(*base, "--data", sample_corpus, "--max-steps", "1").exit_code == 0
    r = cli(*base, "--data", moved, "--max-steps", "1")  # the same corpus elsewhere: accepted
    assert r.exit_code == 0, r.output
    saved = (run / "config.json").read_text()
    assert json.loads(saved)["data"]["manifest_sha256"]
    one_line_error(cli(*base, "--data", other, "--max-steps", "2"), "another corpus", "--allow-config-change")
    assert (run / "config.json").read_text() == saved
    r = cli(*base, "--data", other, "--max-steps", "2", "--allow-config-change")
    assert r.exit_code == 0, r.output
    rec = json.loads((run / "config.json").read_text())
    assert rec["data"]["path"] == str(other) and "data" in rec["history"][-1]["changes"]


def test_13_zeroshot_cuts_a_task_longer_than_the_model_and_checks_batch_size(tmp_path, tiny_model):
    from clueforge.prompts.zeroshot import zeroshot
    from clueforge.tasks.registry import TASKS
    from clueforge.utils import UserError

    assert TASKS["csl"].max_length > 64
    res = zeroshot("csl", tiny_model, str(FIXTURES / "csl" / "dev.json"), None)
    assert res["examples"] > 0
    with pytest.raises(UserError, match="max_length 100 exceeds the model's 64 positions"):
        zeroshot("csl", tiny_model, str(FIXTURES / "csl" / "dev.json"), None, max_length=100)
    one_line_error(cli("zeroshot", "csl", "--model", tiny_model, "--input", FIXTURES / "csl" / "dev.json", "--out",
                       tmp_path / "p.json", "--batch-size", "0"), "--batch-size 0", "≥ 1")


@pytest.mark.parametrize("override,allowed", [("train.lr=.inf", "> 0"), ("train.lr=-.inf", "> 0"),
                                              ("train.seed=-1", "≥ 0"), ("train.curriculum=[1, 2]", "a list of stages"),
                                              ("train.curriculum=[{at: 0, ratio: 0.1, bogus: 1}]", "keys among"),
                                              ("model.pad_token_id=99999", "< vocab_size")])
def test_13_more_settings_validated_at_load(override, allowed):
    from clueforge.pretrain.config import load_config
    from clueforge.utils import UserError

    with pytest.raises(UserError, match="is not allowed") as exc:
        load_config("tiny", [override])
    assert allowed in str(exc.value)


def test_13_pad_token_beyond_the_corpus_vocabulary_is_a_user_error(tmp_path, sample_corpus):
    one_line_error(cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "r",
                       "--max-steps", "1", *FAST, "--set", "model.pad_token_id=5000"), "pad_token_id=5000",
                   "vocabulary size")


def test_13_finetune_set_seed_and_method_are_not_overwritten_by_the_option_defaults(tmp_path, monkeypatch):
    import clueforge.finetune.loop as loop

    seen = []

    def fake(task, data, model, out, cfg, **k):
        seen.append(cfg)
        return {"task": task, "metric": {}, "checkpoint": "x", "selected_epoch": 1}

    monkeypatch.setattr(loop, "finetune", fake)
    base = ["finetune", "afqmc", "--data", FIXTURES / "afqmc", "--model", tmp_path, "--out", tmp_path / "ft"]
    assert cli(*base, "--set", "seed=7", "--set", "method=pet").exit_code == 0
    assert (seen[-1].seed, seen[-1].method) == (7, "pet")
    assert cli(*base).exit_code == 0 and (seen[-1].seed, seen[-1].method) == (42, "finetune")
    assert cli(*base, "--seed", "3", "--method", "pet").exit_code == 0
    assert (seen[-1].seed, seen[-1].method) == (3, "pet")
    one_line_error(cli(*base, "--seed", "3", "--set", "seed=7"), "--seed 3", "seed=7", "disagree")
    one_line_error(cli(*base, "--set", "seed=-1"), "seed=-1", "≥ 0")


def test_13_fewclue_report_is_written_atomically(tmp_path, monkeypatch):
    import clueforge.prompts.fewclue as fewclue

    written = []
    real = Path.write_text

    def spy(self, *a, **k):
        written.append(self.name)
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", spy)
    (tmp_path / "data").mkdir()
    fewclue.run_fewclue("finetune", tmp_path / "m", tmp_path / "data", tmp_path / "out")  # every task skipped
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"]
    assert "report.json" not in written and "report.md" not in written


@pytest.mark.parametrize("args,needles", [
    (["config", "show", "bogus"], ["config 'bogus'", "not a shipped config"]),
    (["serve", "X", "--threads", "-1"], ["--threads -1", "≥ 0"]),
    (["serve", "X", "--port", "99999"], ["--port 99999", "[1, 65535]"]),
    (["serve", "X", "--overhead-tokens", "-1"], ["--overhead-tokens -1.0", "finite number ≥ 0"]),
    (["benchmark", "clue1.1", "--model", "/nonexist", "--data", FIXTURES, "--out", "OUT"], ["--model /nonexist"]),
    (["benchmark", "clue1.1", "--model", FIXTURES, "--data", "/nonexist", "--out", "OUT"], ["--data /nonexist"]),
    (["benchmark", "clue1.1", "--model", FIXTURES, "--data", FIXTURES, "--out", "OUT", "--seeds", "0"],
     ["--seeds 0", "≥ 1"]),
])
def test_13_more_user_errors_are_one_line(tmp_path, args, needles):
    one_line_error(cli(*[tmp_path / "out" if a == "OUT" else a for a in args]), *needles)


def test_13_yaml_section_of_the_wrong_type_and_corrupt_manifest(tmp_path, sample_corpus):
    f = tmp_path / "five.yaml"
    f.write_text("model: 5\ntrain: {}\n")
    one_line_error(cli("pretrain", "--config", f, "--data", sample_corpus, "--out", tmp_path / "r"),
                   "five.yaml", "'model' must be a mapping")
    bad = tmp_path / "c"
    shutil.copytree(sample_corpus, bad)
    (bad / "manifest.json").write_text('{"shards": [')
    one_line_error(cli("corpus", "stats", bad), "manifest.json is corrupt", "rebuild")
    one_line_error(cli("pretrain", "--config", "tiny", "--data", bad, "--out", tmp_path / "r2", *FAST),
                   "manifest.json is corrupt")


def test_13_lock_names_the_holders_stage_and_ctrl_c_before_a_checkpoint_claims_none(tmp_path, sample_corpus,
                                                                                    monkeypatch):
    from clueforge.runs import RunLocked, run_lock

    with run_lock(tmp_path / "r", "corpus build"):
        with pytest.raises(RunLocked, match=r"in use by corpus build \(pid \d+\); this pretrain"):
            with run_lock(tmp_path / "r", "pretrain"):
                pass
    import clueforge.pretrain.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "pretrain", interrupted)
    r = cli("pretrain", "--config", "tiny", "--data", sample_corpus, "--out", tmp_path / "r")
    text = " ".join(r.output.split())
    assert r.exit_code == 130 and "is kept" not in text and "before the first checkpoint" in text


@pytest.mark.parametrize("target", ["config.json", "metrics.jsonl"])
def test_13_resume_rewrites_of_config_and_metrics_leave_the_old_file_when_the_write_fails(tmp_path, sample_corpus,
                                                                                          monkeypatch, target):
    """A failure injected into every write of ``target`` on resume: the old file stays whole."""
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--out", run, "--save-every", "1", *FAST]
    assert cli(*base, "--max-steps", "2").exit_code == 0
    old = (run / target).read_bytes()
    real_open, real_replace, real_write = open, os.replace, Path.write_text

    def fail_open(file, mode="r", *a, **k):  # any in-place or temporary write of the target fails mid-way
        if Path(file).name.startswith(target) and any(c in mode for c in "wx"):
            fh = real_open(file, mode, *a, **k)
            fh.write(b"{" if "b" in mode else "{")
            fh.close()
            raise Boom(f"disk full writing {file}")
        return real_open(file, mode, *a, **k)

    def fail_write_text(self, *a, **k):
        if self.name.startswith(target):
            real_open(self, "w").write("{")
            raise Boom(f"disk full writing {self}")
        return real_write(self, *a, **k)

    import builtins

    monkeypatch.setattr(builtins, "open", fail_open)
    monkeypatch.setattr(Path, "write_text", fail_write_text)
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: fail_open(self, mode, *a, **k))
    r = cli(*base, "--max-steps", "3", "--set", "train.lr=2e-3", "--allow-config-change")
    monkeypatch.undo()
    assert isinstance(r.exception, Boom), r.output
    assert (run / target).read_bytes() == old


def test_13_export_again_into_an_earlier_export_swaps_it_and_keeps_the_lock(tmp_path, sample_vocab):
    pytest.importorskip("onnxruntime")
    from deploy_models import tiny_finetuned
    from clueforge.runs import RunLocked, run_lock

    ft = tiny_finetuned(tmp_path / "ft", "afqmc", FIXTURES / "afqmc", sample_vocab)
    out = tmp_path / "onnx"
    for _ in range(2):  # the second replaces the first export (allowed: config.json names the ONNX model)
        r = cli("export", ft, "--out", out)
        assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["ft", "onnx"]
    with run_lock(out, "export"):  # the lock file in the swapped-in directory is the one locked
        with pytest.raises(RunLocked):
            with run_lock(out, "export"):
                pass


def test_14_two_dropout_samples_without_dropout_are_refused(tmp_path, sample_corpus):
    """Session 7: instance self-distillation (pretraining) compares two dropout samples of a batch;
    with dropout off (the small recipe) they are equal and the term is 0, so it is refused in one line.
    (R-Drop in fine-tuning: tests/test_finetune_options.py.)"""
    base = ["pretrain", "--config", "tiny", "--data", sample_corpus, "--max-steps", "1", *FAST,
            "--set", "train.self_distill_instance=1.0"]
    one_line_error(cli(*base, "--out", tmp_path / "a", "--set", "model.dropout=0", "--set", "model.attention_dropout=0"),
                   "train.self_distill_instance=1", "model.dropout and model.attention_dropout are 0", "model.dropout=0.1")
    assert cli(*base, "--out", tmp_path / "b").exit_code == 0  # with dropout (tiny: 0.1) it runs


def test_a_refused_stage_leaves_no_directory_it_created(tmp_path, sample_corpus):
    """A stage refused inside its run lock (here: fine-tuning a model that does not exist) removes
    the ``--out`` it created with only the lock in it; a directory that was there stays."""
    args = ("finetune", "fewclue-eprstmt", "--data", sample_corpus, "--model", tmp_path / "no-such-model")
    r = cli(*args, "--out", tmp_path / "new" / "run")
    assert r.exit_code == 2 and not (tmp_path / "new").exists(), r.output
    (tmp_path / "old").mkdir()
    assert cli(*args, "--out", tmp_path / "old").exit_code == 2 and (tmp_path / "old").is_dir()
    r = cli(*args, "--out", f"{tmp_path}/new/missing/../run")  # the path names new/run: nothing left, one line
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "shared" / "other").mkdir(parents=True)  # a sibling run under a parent: the parent stays
    assert cli(*args, "--out", tmp_path / "shared" / "run").exit_code == 2
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["other"]
