"""Tiny random fine-tuned checkpoints (the layout of `clueforge finetune`'s best/) for the export
and serving tests: no training; weights initialised wide and classifier logits centred on the
fixture inputs, so that labels differ between inputs (a test of "same labels" must be able to fail)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clueforge.finetune.loop import _num_labels, family, prepare_state, save_checkpoint
from clueforge.model.bert import ModelConfig
from clueforge.model.heads import TaskModel
from clueforge.tasks.registry import get_task, with_overrides
from clueforge.text.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"


def tiny_finetuned(out: Path, task_name: str, data: Path, vocab: Path, seed: int = 0, max_length: int = 64,
                   pooling: str = "cls") -> Path:
    task = with_overrides(get_task(task_name), max_length=max_length)
    fam = family(task)
    state = prepare_state(fam, task, data)
    n_vocab = sum(1 for _ in open(vocab, encoding="utf-8"))
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=n_vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position=128, initializer_range=0.2)  # wide enough init that outputs depend on the input
    model = TaskModel(cfg, fam.HEAD, _num_labels(fam, state), pooling=pooling).eval()
    with torch.no_grad():
        if fam.HEAD == "sequence":  # centre the logits over the fixture's inputs, so labels differ between them
            examples = []
            for split in ("train", "dev", "test"):
                examples += fam.load(task, data / task.files[split], state, split != "test")
            tok = load_tokenizer(vocab)
            b = fam.collate(fam.encode(task, examples, tok, max_length, state), tok.token_to_id("[PAD]"))
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            model.classifier.bias.sub_(logits.median(0).values)
    save_checkpoint(model, out, vocab, task, state)
    return out


_EXPORTED: dict = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, sample_vocab):
    """{task: (fine-tuned dir, export dir)} shared by the export and serving tests: AFQMC (sentence
    pair; `clueforge export --int8`, checked on 4 of the 6 fixture dev examples) and CLUENER (NER;
    fp32, checked on a random sample)."""
    from clueforge.deploy.export import export_onnx

    if _EXPORTED:  # each test module that imports this fixture gets its own instance: export once
        return _EXPORTED
    from typer.testing import CliRunner

    from clueforge.cli import app

    root = tmp_path_factory.mktemp("export")
    ft = tiny_finetuned(root / "afqmc", "afqmc", FIXTURES / "afqmc", sample_vocab)
    r = CliRunner().invoke(app, ["export", str(ft), "--format", "onnx", "--int8", "--data", str(FIXTURES / "afqmc"),
                                 "--max-check", "4", "--out", str(root / "afqmc-onnx")])  # through the CLI
    assert r.exit_code == 0, r.output
    _EXPORTED["afqmc"] = (ft, root / "afqmc-onnx")
    ft = tiny_finetuned(root / "cluener", "cluener", FIXTURES / "cluener", sample_vocab)
    export_onnx(ft, root / "cluener-onnx")
    _EXPORTED["cluener"] = (ft, root / "cluener-onnx")
    return _EXPORTED
