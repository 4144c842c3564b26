"""Every task fine-tunes and predicts end to end (tiny model, a few steps) on real data where
../shared/data/tasks has it and on the fixtures otherwise; predictions pass `submit`."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from clueforge.finetune.loop import FinetuneConfig, finetune, predict
from clueforge.tasks.registry import TASKS
from clueforge.tasks.submit import task_dir, validate_and_zip
from conftest import ROOT, SHARED

FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory, sample_vocab):
    """A tiny random transformers BertForMaskedLM directory (the Chinese BERT vocab when present)."""
    vocab = SHARED / "vocab" / "bert-chinese-vocab.txt"
    vocab = vocab if vocab.is_file() else sample_vocab
    n = sum(1 for _ in open(vocab, encoding="utf-8"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=512)
    d = tmp_path_factory.mktemp("hf_bert")
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    shutil.copyfile(vocab, d / "vocab.txt")
    return d


def _where(name: str):
    """(data folder, test folder, finetune overrides) — real data first, fixtures otherwise."""
    task = TASKS[name]
    real = task_dir(SHARED / "tasks", task) if SHARED.is_dir() else None
    fixture = task_dir(FIXTURES, task)
    if name == "drcd" and real:
        return real, real, {"train_file": "dev.json", "dev_file": "test.json"}
    if name == "msra-ner" and real:
        return real, None, {}
    if real and (real / task.files["train"].split(",")[0]).is_file():
        test_ok = all((real / f).is_file() for f in task.files["test"].split(","))
        return real, real if test_ok else fixture, {}
    if fixture is None:
        pytest.skip(f"{name}: neither ../shared/data/tasks nor a fixture has it")
    return fixture, fixture, {}


def _truncated_copy(folder: Path, task, dest: Path, n: int = 40) -> Path:
    """The test files cut to their first ``n`` records (real test sets are thousands long)."""
    out = dest / "fewclue" / folder.name if task.name.startswith("fewclue-") else dest / folder.name
    out.mkdir(parents=True, exist_ok=True)
    for f in task.files["test"].split(","):
        src = folder / f
        if task.family == "span":
            data = json.loads(src.read_text(encoding="utf-8"))
            data["data"] = data["data"][:3]
            (out / f).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        elif task.fmt == "c3":
            shutil.copyfile(src, out / f)
        else:
            text = src.read_text(encoding="utf-8")
            parts = text.split("\n\n") if task.fmt == "bio" else text.split("\n")
            sep = "\n\n" if task.fmt == "bio" else "\n"
            (out / f).write_text(sep.join(parts[:n]).rstrip("\n") + "\n", encoding="utf-8")
    for extra in ("labels_all.txt", "train.json", "dev.json"):  # label sets / KB sources
        if (folder / extra).is_file() and not (out / extra).exists():
            (out / extra).symlink_to(folder / extra)
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_task_end_to_end(name, hf_model, tmp_path):
    task = TASKS[name]
    data, test_dir, extra = _where(name)
    max_len = 128 if task.family in ("span", "choice") else 64
    cfg = FinetuneConfig(epochs=1, max_steps=2, max_train=24, max_eval=24, max_length=max_len, batch_size=8, **extra)
    res = finetune(name, data, hf_model, tmp_path / "ft", cfg, show_progress=False)
    assert res["task"] == name and task.metric in res["metric"] and res["best_epoch"] == 1
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["hyperparameters"]["max_length"] == max_len
    if test_dir is None:  # MSRA NER has no test set: predict its dev file as one
        test_dir = tmp_path / "msra"
        test_dir.mkdir()
        lines = (data / "dev.txt").read_text(encoding="utf-8").split("\n\n")[:50]
        (test_dir / "test.txt").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    test_dir = _truncated_copy(test_dir, task, tmp_path / "test")
    test_files = ",".join(str(test_dir / f) for f in task.files["test"].split(","))
    sub = tmp_path / "sub"
    n = predict(name, tmp_path / "ft" / "best", test_files, sub / task.submission)
    assert n > 0
    zip_path, problems = validate_and_zip(sub, test_dir.parent if name.startswith("fewclue-") else test_dir)
    assert problems == [] and zip_path.is_file()


def test_predict_refuses_another_tasks_model(hf_model, tmp_path):
    data = FIXTURES / "afqmc"
    finetune("afqmc", data, hf_model, tmp_path / "ft", FinetuneConfig(epochs=1, max_steps=1), show_progress=False)
    with pytest.raises(ValueError, match="fine-tuned for 'afqmc', not 'cmnli'"):
        predict("cmnli", tmp_path / "ft" / "best", str(FIXTURES / "cmnli" / "test.json"), tmp_path / "x.json")
    with pytest.raises(ValueError, match="not a fine-tuned clueforge checkpoint"):
        predict("afqmc", hf_model, str(data / "test.json"), tmp_path / "x.json")


def test_local_hf_classifier_checkpoint_as_model(tmp_path, hf_model):
    """A fine-tuned transformers BertForSequenceClassification directory also works as --model."""
    m = transformers.BertForSequenceClassification.from_pretrained(hf_model, num_labels=2)
    m.save_pretrained(tmp_path / "cls")
    shutil.copyfile(hf_model / "vocab.txt", tmp_path / "cls" / "vocab.txt")
    res = finetune("afqmc", FIXTURES / "afqmc", tmp_path / "cls", tmp_path / "ft", FinetuneConfig(epochs=1, max_steps=1),
                   show_progress=False)
    assert "accuracy" in res["metric"]


@pytest.mark.parametrize("trick,key", [("rdrop", "rdrop_kl"), ("fgm", "fgm_loss")])
def test_tricks_in_the_loop_add_their_loss(trick, key, hf_model, tmp_path):
    cfg = FinetuneConfig(epochs=1, max_steps=2, log_every=1, **{trick: 1.0})
    finetune("afqmc", FIXTURES / "afqmc", hf_model, tmp_path / "ft", cfg, show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any(key in x and x[key] > 0 for x in lines)


def test_ema_in_the_loop_saves_averaged_weights(hf_model, tmp_path):
    from safetensors.torch import load_file

    for name, ema in (("plain", 0.0), ("ema", 0.5)):
        finetune("afqmc", FIXTURES / "afqmc", hf_model, tmp_path / name,
                 FinetuneConfig(epochs=1, max_steps=1, ema=ema), show_progress=False)
    a = load_file(tmp_path / "plain" / "best" / "model.safetensors")["classifier.weight"]
    b = load_file(tmp_path / "ema" / "best" / "model.safetensors")["classifier.weight"]
    assert not torch.equal(a, b)


def test_benchmark_suite_report_and_resume(hf_model, tmp_path, monkeypatch):
    from clueforge.tasks import suite

    cfg = FinetuneConfig(epochs=1, max_steps=1)
    monkeypatch.setitem(suite.SUITES, "mini-suite", ("afqmc", "cmnli"))
    rep = suite.run_suite("mini-suite", hf_model, FIXTURES, tmp_path / "b", seeds=2, cfg=cfg, show_progress=False)
    assert [r["task"] for r in rep["tasks"]] == ["afqmc", "cmnli"] and len(rep["tasks"][0]["seeds"]) == 2
    md = (tmp_path / "b" / "report.md").read_text()
    assert "| afqmc | accuracy |" in md and "74.63" in md  # beside the published BERT-base number
    stamp = (tmp_path / "b" / "afqmc" / "seed0" / "results.json").stat().st_mtime_ns
    again = suite.run_suite("mini-suite", hf_model, FIXTURES, tmp_path / "b", seeds=2, cfg=cfg, show_progress=False)
    assert (tmp_path / "b" / "afqmc" / "seed0" / "results.json").stat().st_mtime_ns == stamp  # reused, not rerun
    assert again["tasks"][0]["seeds"] == rep["tasks"][0]["seeds"]
