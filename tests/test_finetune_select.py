"""``select``: keep the best-on-dev epoch (``best/``) or the last one (``last/``); ``predict``
takes the output directory and uses the checkpoint it selected."""

import json
import shutil

import pytest
import torch

from clueforge.finetune.loop import FinetuneConfig, finetune, predict
from conftest import ROOT

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
AFQMC = ROOT / "tests" / "fixtures" / "tasks" / "afqmc"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, sample_vocab):
    n = sum(1 for _ in open(sample_vocab, encoding="utf-8"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    d = tmp_path_factory.mktemp("bert")
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    shutil.copyfile(sample_vocab, d / "vocab.txt")
    return d


def _epoch_of(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())["clueforge_task"]["epoch"]


@pytest.mark.parametrize("select", ["best", "last"])
def test_select_keeps_the_chosen_epoch(tiny_bert, tmp_path, select):
    out = tmp_path / "ft"
    cfg = FinetuneConfig(epochs=3, batch_size=4, max_length=32, lr=1e-3, select=select)
    res = finetune("afqmc", AFQMC, tiny_bert, out, cfg, show_progress=False)
    dev = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "dev_" in x]
    assert [d["epoch"] for d in dev] == [1, 2, 3]
    chosen = 3 if select == "last" else res["best_epoch"]
    assert res["checkpoint"] == select and res["selected_epoch"] == chosen
    key = res["main_metric"]
    assert res["metric"][key] == dev[chosen - 1][f"dev_{key}"]
    assert _epoch_of(out / select) == chosen
    assert not (out / ("best" if select == "last" else "last")).exists()
    n = predict("afqmc", out, AFQMC / "test.json", tmp_path / "sub" / "afqmc_predict.json")  # the output directory
    assert n == len((AFQMC / "test.json").read_text(encoding="utf-8").splitlines())


def test_unknown_select_is_refused():
    with pytest.raises(ValueError, match="select 'first'"):
        FinetuneConfig(select="first")
