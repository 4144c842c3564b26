"""The fine-tuning methods that go through a prompt, beyond single-template PET: several templates
in one model (ensembled), PET's auxiliary MLM loss on unlabeled text, and EFL; on the tiny MLM of
``test_prompts`` that knows the synthetic answer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from clueforge.finetune.loop import FinetuneConfig, finetune, load_finetuned, predict
from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.pretrain.config import validate
from clueforge.prompts.pet import PetFamily, PromptModel
from clueforge.prompts.spec import Template
from clueforge.tasks import classify
from clueforge.tasks.registry import get_task
from clueforge.text.tokenizer import load_tokenizer
from clueforge.utils import UserError
from test_prompts import FILL, PROMPTS, _synthetic, _tiny_vocab, synthetic_mlm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one thread


ENSEMBLE = ("tasks: [fewclue-eprstmt]\ntemplates:\n"
            "  right:\n    pattern: '{sentence}。[MASK]满意'\n    verbalizer: {Negative: 不, Positive: 很}\n"
            "  two_chars:\n    pattern: '{sentence}。[MASK]意'\n    verbalizer: {Negative: 不满, Positive: 很满}\n"
            "    score: sum\n")


def _rows_model(tmp_path, templates: list[Template]):
    tok = load_tokenizer(_tiny_vocab(tmp_path, "今天好坏不很满意的东西个人说是一二三四五六七八"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position=64)
    weights = BertForMLM(cfg).state_dict()
    state = {"labels": ["0", "1"], "templates": templates}
    words = [[tok.encode(t.verbalizer[lab], add_special_tokens=False).ids for lab in ("0", "1")] for t in templates]
    model = PromptModel(cfg, words, tok.token_to_id("[MASK]"), [t.score for t in templates])
    model.load_state_dict(weights, strict=False)
    examples = [{"a": "今天好", "b": "东西很不好", "label": "1"}, {"a": "一二三四五六七八", "b": "", "label": "0"}]
    pet = PetFamily(classify, templates=templates)
    b = pet.collate(pet.encode(get_task("fewclue-bustm"), examples, tok, 64, state), 0)
    with torch.no_grad():
        return model.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"]).numpy()  # (B, C)


def test_ensemble_is_the_mean_of_each_templates_log_probs(tmp_path):
    """One PromptModel over K templates (each with its rows, word lengths and mean/sum) gives the
    mean of what each template's own model gives: the ensemble averages label log-probabilities."""
    t1 = Template("a", "{sentence1}，[MASK]，{sentence2}", {"0": "不", "1": "很满意"}, "mean")
    t2 = Template("b", "{sentence2}[MASK]{sentence1}", {"0": "坏的", "1": "好"}, "sum")
    t3 = Template("c", "[MASK]：{sentence1}{sentence2}", {"0": "是", "1": "不是"}, "mean")
    alone = [_rows_model(tmp_path, [t]) for t in (t1, t2, t3)]
    together = _rows_model(tmp_path, [t1, t2, t3])
    np.testing.assert_allclose(together, np.mean(alone, axis=0), atol=1e-5)
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # the templates do disagree


@pytest.mark.slow
def test_pet_on_all_templates_trains_one_ensemble_and_predict_needs_nothing_else(synthetic_mlm, tmp_path):
    mlm, data, _ = synthetic_mlm
    prompts = tmp_path / "ensemble.yaml"
    prompts.write_text(ENSEMBLE, encoding="utf-8")
    cfg = FinetuneConfig(method="pet", template="all", prompts=str(prompts), epochs=2, batch_size=16, lr=1e-4,
                         max_eval=100, warmup_ratio=0.0, max_length=32)
    res = finetune("fewclue-eprstmt", data, mlm, tmp_path / "pet", cfg, show_progress=False)
    assert res["metric"]["accuracy"] >= 90, res["metric"]
    meta = json.loads((tmp_path / "pet" / "best" / "config.json").read_text())["clueforge_task"]
    assert [p["name"] for p in meta["prompts"]] == ["right", "two_chars"] and meta["prompts"][1]["score"] == "sum"
    out = tmp_path / "eprstmt_predict.json"
    assert predict("fewclue-eprstmt", tmp_path / "pet", data / "dev.json", out) == 200  # the checkpoint alone
    gold = [json.loads(x)["label"] for x in (data / "dev.json").read_text().splitlines()]
    pred = [json.loads(x)["label"] for x in out.read_text().splitlines()]
    assert np.mean([g == p for g, p in zip(gold, pred)]) >= 0.9
    _, fam, state, model, _ = load_finetuned(tmp_path / "pet", "fewclue-eprstmt")
    assert len(state["templates"]) == 2 and model.word_ids.shape[0] == 2


UNLABELED = "我们买了东西觉得质量价格外观"  # one fixed phrase the MLM has never seen in this order


def _mlm_loss_on(model_dir, tok_dir, texts: list[str]) -> float:
    """The masked-LM loss of ``model_dir`` on ``texts`` with every third character masked."""
    from clueforge.model.hf import from_hf_state_dict, read_hf_config, read_hf_weights

    cfg, _ = read_hf_config(model_dir)
    model = BertForMLM(cfg)
    from_hf_state_dict(model, read_hf_weights(model_dir))
    tok = load_tokenizer(tok_dir)
    ids = torch.tensor([e.ids for e in tok.encode_batch(texts)])  # (B, T) one length
    sel = torch.zeros_like(ids, dtype=torch.bool)
    sel[:, 1:-1:3] = True
    with torch.no_grad():
        out = model.eval()(ids.masked_fill(sel, tok.token_to_id("[MASK]")), labels=torch.where(sel, ids, -100))
    return out.loss.item()


@pytest.mark.slow
def test_pet_auxiliary_mlm_loss_learns_the_unlabeled_text(synthetic_mlm, tmp_path):
    """With ``pet_mlm`` the same PET steps also fit the unlabeled file's text (its MLM loss falls far
    below the run without it), the loss parts are logged, and classification still works."""
    mlm, data, prompts = synthetic_mlm
    for f in data.iterdir():
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f.name).write_bytes(f.read_bytes())
    rows = [{"id": i, "sentence": UNLABELED} for i in range(64)]
    (tmp_path / "data" / "unlabeled.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    before = _mlm_loss_on(mlm, mlm, [UNLABELED] * 4)
    loss, acc = {}, {}
    for weight in (0.0, 4.0):
        cfg = FinetuneConfig(method="pet", template="right", prompts=str(prompts), max_steps=40, epochs=20,
                             batch_size=16, lr=1e-3, max_eval=50, warmup_ratio=0.0, max_length=32, log_every=1,
                             select="last", pet_mlm=weight, unlabeled_file="unlabeled.json" if weight else None)
        out = tmp_path / f"w{weight}"
        res = finetune("fewclue-eprstmt", tmp_path / "data", mlm, out, cfg, show_progress=False)
        loss[weight] = _mlm_loss_on(out / "last", mlm, [UNLABELED] * 4)
        acc[weight] = res["metric"]["accuracy"]
        logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("mlm_loss" in r for r in logged) == bool(weight)
    print(before, loss, acc)
    assert loss[4.0] < loss[0.0] - 1.0 and loss[4.0] < before - 1.0, (before, loss)  # nats
    assert acc[4.0] >= 90, acc


def test_pet_only_settings_are_validated():
    validate(FinetuneConfig(method="pet", pet_mlm=0.5, unlabeled_file="test.json"))
    validate(FinetuneConfig(method="pet", pet_mlm=0.5))  # the training file's inputs
    for cfg, field in ((FinetuneConfig(method="pet", pet_mlm=-1.0), "pet_mlm"),
                       (FinetuneConfig(method="finetune", pet_mlm=0.5), "pet_mlm"),
                       (FinetuneConfig(method="efl", unlabeled_file="x.json"), "unlabeled_file"),
                       (FinetuneConfig(method="pet", unlabeled_file="x.json"), "unlabeled_file"),
                       (FinetuneConfig(method="p-tuning"), "method")):
        with pytest.raises(UserError, match=field):
            validate(cfg)


@pytest.mark.slow
def test_efl_learns_from_the_label_statements(synthetic_mlm, tmp_path):
    """EFL (each label's statement judged by a new [CLS] head) learns the synthetic task; with one
    word for both labels the statements are identical and it cannot beat chance. The checkpoint
    keeps the template: ``predict`` needs nothing else."""
    mlm, fixture_data, _ = synthetic_mlm
    data = tmp_path / "data"  # a new head on [CLS]: 32 examples make a fragile run, 256 a stable one
    data.mkdir()
    for f in fixture_data.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    rows = [{"id": i, "sentence": s, "label": "Positive" if p else "Negative"}
            for i, (s, p) in enumerate(_synthetic(random.Random(5), 256))]
    (data / "train.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prompts = tmp_path / "efl.yaml"
    prompts.write_text(PROMPTS + "  same:\n    pattern: '{sentence}。[MASK]满意'\n"
                       "    verbalizer: {Negative: 很, Positive: 很}\n", encoding="utf-8")
    acc = {}
    for name in ("right", "same"):
        cfg = FinetuneConfig(method="efl", template=name, prompts=str(prompts), epochs=3, batch_size=16, lr=1e-3,
                             max_eval=100, warmup_ratio=0.0, max_length=32, seed=1)
        acc[name] = finetune("fewclue-eprstmt", data, mlm, tmp_path / name, cfg, show_progress=False)["metric"]["accuracy"]
    print(acc)
    assert acc["right"] >= 90 and acc["same"] <= 60, acc  # chance: 50 (dev subset: 57 % negative)
    meta = json.loads((tmp_path / "right" / "best" / "config.json").read_text())["clueforge_task"]
    assert meta["method"] == "efl" and meta["prompts"][0]["pattern"] == "{sentence}。[MASK]满意"
    out = tmp_path / "eprstmt_predict.json"
    assert predict("fewclue-eprstmt", tmp_path / "right", data / "test.json", out) == 50
