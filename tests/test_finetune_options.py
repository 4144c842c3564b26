"""Fine-tuning options do what they say. ``select``: keep the best-on-dev epoch (``best/``) or the
last one (``last/``); ``predict`` takes the output directory and uses the checkpoint it selected.
``warmup_ratio``, ``clip_grad`` and ``eval_batch_size`` each change what they name."""

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
    from clueforge.pretrain.config import build_dataclass

    with pytest.raises(ValueError, match='select="first" is not allowed: must be one of'):
        build_dataclass(FinetuneConfig, {"select": "first"}, "--set", overridden={"select"})


def test_warmup_clipping_and_eval_batches_take_effect(tiny_bert, tmp_path, monkeypatch):
    import clueforge.finetune.loop as ft
    from clueforge.model.hf import load_hf_task

    sizes = []
    run_model = ft.run_model

    def spy(model, fam, features, batch_size, *a):
        sizes.append(batch_size)
        return run_model(model, fam, features, batch_size, *a)

    monkeypatch.setattr(ft, "run_model", spy)
    out = tmp_path / "ft"
    cfg = FinetuneConfig(epochs=2, batch_size=2, max_length=32, lr=1e-3, warmup_ratio=0.5, clip_grad=1e-9,
                         eval_batch_size=5, log_every=1, select="last")
    finetune("afqmc", AFQMC, tiny_bert, out, cfg, show_progress=False)
    total, warmup = 6, 3  # 6 rows / 2 per step × 2 epochs; half of it warm-up
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    expect = [(s + 1) / warmup if s < warmup else (total - s) / (total - warmup) for s in range(1, total + 1)]
    assert lrs == pytest.approx([1e-3 * e for e in expect])
    assert sizes == [5, 5]  # dev scored in batches of eval_batch_size after each epoch
    # gradients clipped to norm 1e-9: AdamW's steps (eps 1e-8) leave the encoder all but where it was
    start = load_hf_task(tiny_bert, "sequence", 2).state_dict()
    end = load_hf_task(out / "last", "sequence", 2).state_dict()
    moved = max((end[k] - start[k]).abs().max().item() for k in start if k.startswith("encoder."))
    assert moved < 1e-4  # unclipped: about 4e-3


@pytest.mark.parametrize("wd", [0.0, 0.123])
def test_weight_decay_reaches_the_optimizer(tiny_bert, tmp_path, monkeypatch, wd):
    """``FinetuneConfig.weight_decay`` is the decay of the matrices' AdamW groups (biases and
    LayerNorm: none)."""
    import clueforge.finetune.loop as ft

    made = []
    adamw = torch.optim.AdamW

    class Spy(adamw):
        def __init__(self, params, *a, **kw):
            super().__init__(params, *a, **kw)
            made.append(self)

    monkeypatch.setattr(ft.torch.optim, "AdamW", Spy)
    cfg = FinetuneConfig(epochs=1, batch_size=2, max_length=32, lr=1e-3, max_steps=1, weight_decay=wd, select="last")
    finetune("afqmc", AFQMC, tiny_bert, tmp_path / "ft", cfg, show_progress=False)
    assert len(made) == 1
    groups = made[0].param_groups
    decays = {g["weight_decay"] for g in groups}
    assert decays == ({0.0} if wd == 0 else {0.0, wd})
    matrices = sum(p.numel() for g in groups if g["weight_decay"] == wd for p in g["params"] if p.ndim == 2)
    assert matrices > 0


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory, sample_vocab):
    """A checkpoint pretrained with dropout off, as the ``small`` recipe saves it."""
    n = sum(1 for _ in open(sample_vocab, encoding="utf-8"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    d = tmp_path_factory.mktemp("bert0")
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    shutil.copyfile(sample_vocab, d / "vocab.txt")
    return d


@pytest.mark.parametrize("checkpoint,dropout,want", [("no_dropout_bert", None, 0.0), ("no_dropout_bert", 0.1, 0.1),
                                                     ("tiny_bert", None, 0.1), ("tiny_bert", 0.0, 0.0)])
def test_dropout_setting_reaches_every_layer_and_the_saved_config(request, tmp_path, monkeypatch, checkpoint,
                                                                  dropout, want):
    """``dropout`` sets every dropout module and the attention weights' dropout while fine-tuning,
    and the saved config says so; unset, the checkpoint's own stays (0 for a model pretrained
    without dropout, BERT's 0.1 for the other)."""
    import clueforge.finetune.loop as ft
    from clueforge.model.bert import SelfAttention

    made = []
    load = ft.load_model
    monkeypatch.setattr(ft, "load_model", lambda *a: made.append(load(*a)) or made[-1])
    cfg = FinetuneConfig(epochs=1, batch_size=2, max_length=32, lr=1e-3, max_steps=1, select="last", dropout=dropout)
    finetune("afqmc", AFQMC, request.getfixturevalue(checkpoint), tmp_path / "ft", cfg, show_progress=False)
    model = made[0]
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {want}
    assert {m.p_drop for m in model.modules() if isinstance(m, SelfAttention)} == {want}
    saved = json.loads((tmp_path / "ft" / "last" / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"]) == (want, want)
    model.train()
    ids = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        same = torch.equal(model(ids), model(ids))
    assert same == (want == 0.0)  # train-mode forwards are random only with dropout on


def test_rdrop_without_dropout_is_refused(no_dropout_bert, tiny_bert, tmp_path):
    """R-Drop compares two dropout samples: on a model without dropout it would add nothing, so it is
    refused, naming the fix; with ``dropout`` set it runs."""
    from clueforge.utils import UserError

    base = dict(epochs=1, batch_size=2, max_length=32, lr=1e-3, max_steps=1, select="last", rdrop=1.0)
    with pytest.raises(UserError, match=r"rdrop=1.0 needs dropout.*hidden_dropout_prob 0.*dropout=0.1"):
        finetune("afqmc", AFQMC, no_dropout_bert, tmp_path / "a", FinetuneConfig(**base), show_progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(UserError, match=r"rdrop=1.0 needs dropout, and --set dropout=0 turns it off"):
        finetune("afqmc", AFQMC, tiny_bert, tmp_path / "c", FinetuneConfig(**base, dropout=0.0), show_progress=False)
    finetune("afqmc", AFQMC, no_dropout_bert, tmp_path / "b", FinetuneConfig(**base, dropout=0.1), show_progress=False)
    assert (tmp_path / "b" / "last" / "config.json").is_file()


def test_mean_pooling_reads_the_real_tokens_and_survives_save_and_reload(tiny_bert, tmp_path):
    """``pooling=mean``: the sentence head reads the mean of the real tokens (a direct computation;
    padding changes nothing), the checkpoint records it, and a reload gives the same logits; its
    config keeps transformers' BERT heads (which read [CLS]) from loading it."""
    from clueforge.finetune.loop import load_finetuned

    out = tmp_path / "ft"
    cfg = FinetuneConfig(epochs=1, batch_size=2, max_length=32, lr=1e-3, max_steps=2, select="last", pooling="mean")
    finetune("afqmc", AFQMC, tiny_bert, out, cfg, show_progress=False)
    saved = json.loads((out / "last" / "config.json").read_text())
    assert saved["clueforge"]["pooling"] == "mean" and saved["model_type"] != "bert"
    model = load_finetuned(out, "afqmc")[3].eval()
    assert model.pooling == "mean"
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # the second row: 7 real tokens, then padding
    with torch.no_grad():
        got = model(ids, mask, torch.zeros_like(ids))
        h = model.encoder(ids, mask, torch.zeros_like(ids))
        want = torch.stack([model.classifier(torch.tanh(model.pooler(h[i, :n].mean(0)))) for i, n in enumerate((12, 7))])
        alone = model(ids[1:, :7], mask[1:, :7], torch.zeros_like(ids[1:, :7]))  # the short row without padding
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1:], alone, atol=1e-5, rtol=0)
    with pytest.raises((ValueError, KeyError)):  # transformers does not know the model type
        transformers.AutoModelForSequenceClassification.from_pretrained(out / "last")


@pytest.mark.parametrize("task,data,method", [("cluener", "cluener", "finetune"), ("afqmc", "afqmc", "pet"),
                                               ("afqmc", "afqmc", "ptuning")])
def test_pooling_is_refused_where_no_head_pools(tiny_bert, tmp_path, task, data, method):
    """NER reads every token, PET the MLM head at its [MASK]: ``pooling`` would do nothing, so it is
    refused before any data is read."""
    from clueforge.utils import UserError

    cfg = FinetuneConfig(epochs=1, batch_size=2, max_length=32, max_steps=1, pooling="mean", method=method)
    with pytest.raises(UserError, match="pooling=mean.*reads (every token|its MLM head)"):
        finetune(task, ROOT / "tests" / "fixtures" / "tasks" / data, tiny_bert, tmp_path / "ft", cfg, show_progress=False)


def test_efl_takes_mean_pooling(tiny_bert, tmp_path):
    """EFL scores each label's statement with the choice head: ``pooling=mean`` applies there too."""
    out = tmp_path / "ft"
    cfg = FinetuneConfig(epochs=1, batch_size=2, max_length=32, lr=1e-3, max_steps=1, select="last", pooling="mean",
                         method="efl")
    finetune("afqmc", AFQMC, tiny_bert, out, cfg, show_progress=False)
    assert json.loads((out / "last" / "config.json").read_text())["clueforge"]["pooling"] == "mean"
