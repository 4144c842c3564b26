"""P-tuning (``prompts.ptuning``): PET's rows with trainable continuous prompt vectors before the
[MASK]s, on the tiny MLM of ``test_prompts`` that knows the synthetic answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clueforge.finetune.loop import FinetuneConfig, finetune, load_finetuned, predict, run_model, save_checkpoint
from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.model.hf import save_hf
from clueforge.pretrain.config import validate
from clueforge.prompts.pet import PetFamily
from clueforge.prompts.ptuning import PtuningFamily
from clueforge.prompts.spec import Template
from clueforge.tasks import classify
from clueforge.tasks.registry import get_task
from clueforge.text.tokenizer import load_tokenizer
from clueforge.utils import UserError
from test_prompts import _tiny_vocab, synthetic_mlm  # noqa: F401 (fixture)

EXAMPLES = [{"a": "今天好", "b": "东西很不好", "label": "1"}, {"a": "一二三四五六七八", "b": "", "label": "0"},
            {"a": "个人说是", "b": "坏的东西", "label": "1"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one thread


def _random_mlm(tmp_path):
    """A random tiny MLM saved as a checkpoint directory, and its tokenizer."""
    vocab = _tiny_vocab(tmp_path, "今天好坏不很满意的东西个人说是一二三四五六七八")
    tok = load_tokenizer(vocab)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position=64, initializer_range=0.2)  # outputs that move
    save_hf(BertForMLM(cfg), tmp_path / "mlm", vocab=vocab)
    return tmp_path / "mlm", tok


def _logits(fam, model, tok, state, task):
    feats = fam.encode(task, EXAMPLES, tok, 48, state)
    return np.concatenate(run_model(model, fam, feats, 2, tok.token_to_id("[PAD]"), torch.device("cpu")))  # (B, C)


def test_prompt_vectors_replace_the_placeholders_before_sep(tmp_path):
    """k pseudo tokens sit right before each row's final [SEP] (rows of two word lengths and of
    different lengths in one batch): with the prompt vectors set to [UNK]'s word embedding,
    P-tuning equals PET on rows that carry k literal [UNK]s there; any other vectors change the
    label scores."""
    mlm, tok = _random_mlm(tmp_path)
    task = get_task("fewclue-bustm")
    t = Template("t", "{sentence1}的[MASK]是{sentence2}", {"0": "不", "1": "很满意"}, "mean")
    state = {"labels": ["0", "1"], "templates": [t], "ptuning": {"tokens": 3, "encoder": "none", "freeze": False}}
    fam = PtuningFamily(classify, 3, "none", templates=[t])
    model = fam.load_model(mlm, state, tok).eval()
    unk = tok.token_to_id("[UNK]")
    feats = fam.encode(task, EXAMPLES, tok, 48, state)
    for f in feats:
        assert len(f["rows"]) == 2
        for ids, _ in f["rows"]:
            assert ids[-5:] == [tok.token_to_id(EXAMPLES[f["example"]]["b"][-1:] or "是")] + [unk] * 3 + [tok.token_to_id("[SEP]")]
    pet = PetFamily(classify, templates=[t])
    pet_model = pet.load_model(mlm, state, tok).eval()
    b = pet.collate(feats, 0)  # the same rows: k literal [UNK]s before the [MASK]s
    with torch.no_grad():
        want = pet_model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).numpy()
        model.prompt.embedding.copy_(model.encoder.embeddings.word.weight[unk].expand(3, -1))
        got = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)
        model.prompt.embedding.normal_(0, 1)
        moved = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).numpy()
    assert np.abs(moved - want).max() > 1e-3


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_save_reload_gives_identical_predictions(tmp_path, kind):
    """The checkpoint keeps the prompt's final vectors (prompt.safetensors) and the settings: the
    reloaded model (a plain table of those vectors) gives the trained model's logits bit for bit."""
    mlm, tok = _random_mlm(tmp_path)
    task = get_task("fewclue-bustm")
    t = Template("t", "{sentence1}的[MASK]是{sentence2}", {"0": "不", "1": "很满意"}, "mean")
    fam = PtuningFamily(classify, 4, kind, templates=[t])
    state = {"labels": ["0", "1"], "templates": [t], "ptuning": dict(fam.settings), "descs": {}}
    model = fam.load_model(mlm, state, tok)
    with torch.no_grad():  # stands in for training: every weight of the prompt encoder and body moves
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = _logits(fam, model, tok, state, task)
    save_checkpoint(model, tmp_path / "ckpt", mlm, task, state, 1, fam)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())["clueforge_task"]
    assert meta["method"] == "ptuning" and meta["ptuning"] == {"tokens": 4, "encoder": kind, "freeze": False,
                                                                "file": "prompt.safetensors"}
    assert load_file(tmp_path / "ckpt" / "prompt.safetensors")["prompt"].shape == (4, 32)
    _, fam2, state2, model2, tok2 = load_finetuned(tmp_path / "ckpt", "fewclue-bustm")
    after = _logits(fam2, model2, tok2, state2, task)
    np.testing.assert_array_equal(after, before)


def _train(mlm, data, out, **kw):
    cfg = FinetuneConfig(**{"template": "right", "epochs": 2, "batch_size": 16, "lr": 1e-4, "max_eval": 100,
                            "warmup_ratio": 0.0, "max_length": 32, **kw})
    return finetune("fewclue-eprstmt", data, mlm, out, cfg, show_progress=False)


@pytest.mark.slow
def test_ptuning_learns_through_the_mlm_head_and_predict_needs_nothing_else(synthetic_mlm, tmp_path):
    """P-tuning (BiLSTM prompt encoder, everything tuned) on 32 examples: far above chance on dev;
    the swapped verbalizer with the same steps stays below chance. ``predict`` and the FewCLUE
    protocol work from the checkpoint alone; ONNX export refuses it in one line."""
    mlm, data, prompts = synthetic_mlm
    acc = {name: _train(mlm, data, tmp_path / name, method="ptuning", prompts=str(prompts), template=name, epochs=4,
                        ptuning_tokens=4, ptuning_encoder="lstm")["metric"]["accuracy"]
           for name in ("right", "swapped")}
    print(acc)
    assert acc["right"] >= 90 and acc["swapped"] <= 40, acc  # chance: 50
    out = tmp_path / "eprstmt_predict.json"
    assert predict("fewclue-eprstmt", tmp_path / "right", data / "dev.json", out) == 200
    gold = [json.loads(x)["label"] for x in (data / "dev.json").read_text().splitlines()]
    pred = [json.loads(x)["label"] for x in out.read_text().splitlines()]
    assert np.mean([g == p for g, p in zip(gold, pred)]) >= 0.9

    from typer.testing import CliRunner

    from clueforge.cli import app

    res = CliRunner().invoke(app, ["export", str(tmp_path / "right" / "best"), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 2 and "P-tuning checkpoint" in res.output and "Traceback" not in res.output, res.output
    folder = tmp_path / "tasks" / "fewclue" / "eprstmt"
    folder.mkdir(parents=True)
    lines = (data / "dev.json").read_text().splitlines(keepends=True)
    for k in (0, 1):
        shutil.copy(data / "train.json", folder / f"train_{k}.json")
        shutil.copy(data / "dev.json", folder / "dev.json")
        (folder / f"dev_{k}.json").write_text("".join(lines[k * 50:(k + 1) * 50]))
    res = CliRunner().invoke(app, ["benchmark", "fewclue", "--method", "ptuning", "--model", str(mlm), "--data",
                                   str(tmp_path / "tasks"), "--out", str(tmp_path / "few"), "--splits", "0,1",
                                   "--tasks", "fewclue-eprstmt", "--set", "template=right", "--set", f"prompts={prompts}",
                                   "--set", "max_length=32", "--set", "epochs=1", "--set", "lr=1e-4",
                                   "--set", "ptuning_encoder=mlp"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "few" / "report.json").read_text())
    (row,) = report["tasks"]
    assert report["method"] == "ptuning" and list(row["splits"]) == ["dev_0", "dev_1"] and row["mean"] >= 80, report
    assert report["config"]["ptuning_encoder"] == "mlp" and report["config"]["select"] == "last"
    meta = json.loads((tmp_path / "few" / "fewclue-eprstmt" / "split0" / "last" / "config.json").read_text())
    assert meta["clueforge_task"]["ptuning"]["encoder"] == "mlp"


@pytest.mark.slow
def test_zero_prompt_tokens_is_pet(synthetic_mlm, tmp_path):
    """ptuning_tokens=0 trains exactly as PET: the same dev scores and bit-identical weights."""
    mlm, data, prompts = synthetic_mlm
    kw = {"prompts": str(prompts), "max_steps": 3, "epochs": 1, "select": "last", "rdrop": 0.5, "dropout": 0.1}
    pet = _train(mlm, data, tmp_path / "pet", method="pet", **kw)
    pt = _train(mlm, data, tmp_path / "pt", method="ptuning", ptuning_tokens=0, **kw)
    assert pt["metric"] == pet["metric"]
    a, b = load_file(tmp_path / "pet" / "last" / "model.safetensors"), load_file(tmp_path / "pt" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["cls.predictions.bias"], load_file(mlm / "model.safetensors")["cls.predictions.bias"])


@pytest.mark.slow
def test_frozen_body_stays_bit_identical_and_the_prompt_alone_learns(synthetic_mlm, tmp_path):
    """``ptuning_freeze`` (with EMA on): after training, the encoder body and MLM head are the
    pretrained ones bit for bit, and the prompt alone has learned: the random initial vectors cost
    the MLM's answer some points, the trained ones give it back."""
    mlm, data, prompts = synthetic_mlm
    start = load_file(mlm / "model.safetensors")
    kw = {"method": "ptuning", "prompts": str(prompts), "select": "last", "ema": 0.9, "ptuning_freeze": True}
    untrained = _train(mlm, data, tmp_path / "untrained", max_steps=1, lr=1e-12, **kw)["metric"]["accuracy"]
    frozen = _train(mlm, data, tmp_path / "frozen", epochs=4, lr=1e-3, **kw)["metric"]["accuracy"]
    got = load_file(tmp_path / "frozen" / "last" / "model.safetensors")
    assert got.keys() == start.keys()
    changed = [k for k in start if not torch.equal(start[k], got[k])]
    assert not changed, changed[:5]
    print(untrained, frozen)
    assert untrained <= 85 and frozen >= 95, (untrained, frozen)


def test_ptuning_settings_are_validated():
    validate(FinetuneConfig(method="ptuning", ptuning_tokens=0))
    validate(FinetuneConfig(method="ptuning", ptuning_tokens=8, ptuning_encoder="none", ptuning_freeze=True))
    for cfg, field in ((FinetuneConfig(method="ptuning", ptuning_tokens=-1), "ptuning_tokens"),
                       (FinetuneConfig(method="ptuning", ptuning_encoder="gru"), "ptuning_encoder"),
                       (FinetuneConfig(method="pet", ptuning_tokens=8), "ptuning_tokens"),
                       (FinetuneConfig(method="finetune", ptuning_freeze=True), "ptuning_freeze"),
                       (FinetuneConfig(method="efl", ptuning_encoder="mlp"), "ptuning_encoder"),
                       (FinetuneConfig(method="ptuning", ptuning_tokens=0, ptuning_freeze=True), "ptuning_freeze"),
                       (FinetuneConfig(method="ptuning", template="all"), "template"),
                       (FinetuneConfig(method="ptuning", pet_mlm=0.5), "pet_mlm"),
                       (FinetuneConfig(method="ptuning", ptuning_freeze=True, fgm=1.0), "fgm"),
                       (FinetuneConfig(method="ptuning", ptuning_freeze=True, llrd=0.9), "llrd")):
        with pytest.raises(UserError, match=field):
            validate(cfg)


@pytest.mark.parametrize("item", ["ptuning_tokens=-2", "ptuning_encoder=gru", "ptuning_freeze=maybe"])
def test_cli_bad_ptuning_setting_exits_2_in_one_line(tmp_path, item):
    from typer.testing import CliRunner

    from clueforge.cli import app

    res = CliRunner().invoke(app, ["finetune", "fewclue-eprstmt", "--method", "ptuning", "--data", str(tmp_path),
                                   "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--set", item])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and item.split("=")[0] in lines[0], res.output


@pytest.mark.parametrize("method", ["pet", "finetune"])
def test_cli_ptuning_setting_at_its_default_under_another_method_is_refused(tmp_path, method):
    """``--method pet --set ptuning_tokens=4`` (the default value) would be silently ignored: refused."""
    from typer.testing import CliRunner

    from clueforge.cli import app

    res = CliRunner().invoke(app, ["finetune", "fewclue-eprstmt", "--method", method, "--data", str(tmp_path),
                                   "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "ptuning_tokens=4"])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "ptuning_tokens" in lines[0], res.output


def test_too_many_prompt_tokens_for_max_length_is_refused(tmp_path):
    _, tok = _random_mlm(tmp_path)
    t = Template("t", "{sentence1}的[MASK]是{sentence2}", {"0": "不", "1": "很满意"}, "mean")
    fam = PtuningFamily(classify, 14, templates=[t])
    state = {"labels": ["0", "1"], "templates": [t], "ptuning": dict(fam.settings)}
    assert max(len(ids) for f in fam.encode(get_task("fewclue-bustm"), EXAMPLES, tok, 24, state)
               for ids, _ in f["rows"]) == 24  # the slots give way to the pseudo tokens
    with pytest.raises(ValueError, match="ptuning_tokens=14"):
        fam.encode(get_task("fewclue-bustm"), EXAMPLES, tok, 16, state)
