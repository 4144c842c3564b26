"""End to end: train → save → reload → identical; kill -9 and resume exactly; 2 processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from clueforge.model.hf import load_hf
from clueforge.pretrain.config import load_config
from clueforge.pretrain.loop import pretrain, state_digest

pytestmark = pytest.mark.slow
TINY = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=3", "train.prefetch=2"]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "clueforge", *args], env


def test_train_save_reload_identical(tmp_path, sample_corpus):
    cfg = load_config("tiny", TINY + ["train.max_steps=6", "train.save_every=3"])
    summary = pretrain(cfg, sample_corpus, tmp_path / "run", show_progress=False)
    final = tmp_path / "run" / "final"
    model = load_hf(final)
    assert state_digest(model) == summary["state_sha"]
    ck = load_hf(tmp_path / "run" / "checkpoints" / "step-6")
    assert state_digest(ck) == summary["state_sha"]
    lines = _metrics(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mlm_acc", "lr", "tokens", "tokens_per_s", "mfu", "data_wait_share", "padding_share"):
        assert key in lines[-1]
    assert all(0 <= r["padding_share"] < 0.5 for r in lines)
    assert "eval_loss" in lines[-1]
    assert any(p.name.startswith("events") for p in (tmp_path / "run" / "tensorboard").iterdir())
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(final).eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    enc = tok("今天天气很好，我们去公园散步。", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits, model.eval()(enc["input_ids"], enc["attention_mask"]).logits,
                                   atol=1e-5, rtol=1e-5)


def test_kill_minus_9_then_resume_is_exact(tmp_path, sample_corpus):
    args = ["pretrain", "--config", "tiny", "--data", str(sample_corpus), "--max-steps", "60", "--save-every", "20",
            "--no-progress"] + sum((["--set", s] for s in TINY), [])
    cmd, env = _cli(*args, "--out", str(tmp_path / "ref"))
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = _cli(*args, "--out", str(tmp_path / "cut"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    target = tmp_path / "cut" / "checkpoints" / "step-20"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "final").exists(), "the run finished before it could be killed"
    cut_at = max(r["step"] for r in _metrics(tmp_path / "cut"))
    assert 20 <= cut_at < 60

    subprocess.run(cmd, env=env, check=True, capture_output=True)  # the same command resumes
    ref, cut = _metrics(tmp_path / "ref"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 61))
    assert [r["loss"] for r in cut] == [r["loss"] for r in ref]  # exactly, at every step
    assert [r["lr"] for r in cut] == [r["lr"] for r in ref]
    assert cut[-1]["tokens"] == ref[-1]["tokens"]


def test_corrupt_latest_checkpoint_falls_back(tmp_path, sample_corpus, caplog):
    run = tmp_path / "run"
    pretrain(load_config("tiny", TINY + ["train.max_steps=8", "train.save_every=4"]), sample_corpus, run, show_progress=False)
    weights = run / "checkpoints" / "step-8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\0" * 100
    weights.write_bytes(bytes(data))
    (run / "checkpoints" / "step-12.tmp").mkdir()  # a half-written checkpoint from a crash
    caplog.set_level("WARNING")
    s = pretrain(load_config("tiny", TINY + ["train.max_steps=10", "train.save_every=4"]), sample_corpus, run,
                 show_progress=False)
    assert "falling back" in caplog.text and "step-8" in caplog.text
    assert s["steps"] == 10
    assert [r["step"] for r in _metrics(run)] == list(range(1, 11))
    assert not (run / "checkpoints" / "step-12.tmp").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_different_data_and_agree(tmp_path, sample_corpus):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "clueforge", "pretrain", "--config", "tiny", "--data",
           str(sample_corpus), "--out", str(out), "--max-steps", "5", "--no-progress"] + sum((["--set", s] for s in TINY), [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [[json.loads(x) for x in (out / "logs" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    batches = [{(x["step"], x["micro"]): x["rows"] for x in log if "rows" in x} for log in logs]
    assert len(batches[0]) == len(batches[1]) == 5
    assert all(batches[0][k] != batches[1][k] for k in batches[0])  # each rank read its own rows
    finals = [log[-1]["final_state_sha"] for log in logs]
    assert finals[0] == finals[1]  # identical weights at the end
    assert state_digest(load_hf(out / "final")) == finals[0]
