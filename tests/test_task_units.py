"""Metrics against hand-computed values, bad input errors, submission validation, tricks."""

import json

import pytest
import torch

from clueforge.finetune.tricks import EMA, FGM, llrd_param_groups, symmetric_kl
from clueforge.model.bert import ModelConfig
from clueforge.model.heads import TaskModel
from clueforge.tasks import classify, kgclue, ner, span
from clueforge.tasks.io import TaskDataError
from clueforge.tasks.metrics import accuracy, bio_spans, cmrc_em, cmrc_f1, cmrc_scores, entity_prf, kgclue_scores
from clueforge.tasks.registry import TASKS
from clueforge.tasks.submit import validate_and_zip
from conftest import ROOT

FIX = ROOT / "tests" / "fixtures" / "tasks"


# ---- metrics ------------------------------------------------------------------------------------

def test_cmrc_em_strips_listed_punctuation_only():
    assert cmrc_em("《红楼梦》", ["红楼梦"]) == 1.0
    assert cmrc_em("红楼梦。", ["红楼梦"]) == 1.0
    assert cmrc_em("红楼梦…", ["红楼梦"]) == 0.0  # a single "…" is not in the official list ("……" is)
    assert cmrc_em("Red Mansions", ["red mansions"]) == 1.0  # lower-cased
    assert cmrc_em("红 楼梦", ["红楼梦"]) == 0.0  # EM keeps inner whitespace, as the official script
    assert cmrc_em("乙", ["甲", "乙"]) == 1.0  # any of the answers


def test_cmrc_f1_mixed_segmentation():
    # "曹雪芹所著" vs "曹雪芹": LCS 3 tokens; P = 3/5, R = 1 → F1 = 0.75
    assert cmrc_f1("曹雪芹所著", ["曹雪芹"]) == pytest.approx(0.75)
    # English runs are words: "iphone 12 发布" → [iphone, 12, 发, 布]; "iphone 发布" → [iphone, 发, 布]
    # LCS of contiguous tokens = 2 (发布); P = 2/4, R = 2/3 → F1 = 4/7
    assert cmrc_f1("iPhone 12发布", ["iPhone发布"]) == pytest.approx(4 / 7)
    assert cmrc_f1("3.14米", ["3.14米"]) == pytest.approx(1.0)  # the number stays one token
    assert cmrc_f1("，。", ["答案"]) == 0.0
    s = cmrc_scores(["曹雪芹所著", "东海"], [["曹雪芹"], ["东海。"]])
    assert s["em"] == pytest.approx(50.0) and s["f1"] == pytest.approx((75 + 100) / 2)


def test_entity_prf_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]
    # gold 3 entities, pred 3, correct 1 (PER 0-1) → P = R = F1 = 33.33
    r = entity_prf(pred, gold)
    assert r["precision"] == pytest.approx(100 / 3) and r["f1"] == pytest.approx(100 / 3)
    assert bio_spans(["I-LOC", "I-LOC", "B-LOC"]) == {("LOC", 0, 1), ("LOC", 2, 2)}


def test_accuracy_and_kgclue_scores():
    assert accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)
    s = kgclue_scores(["韩玉玲原创音乐", "北京"], ["韩玉玲原创音乐", "北京市"])
    # EM 1/2; F1: 1 and 2·(2/2·2/3)/(1+2/3) = 0.8 → mean 0.9
    assert s["em"] == pytest.approx(50) and s["f1"] == pytest.approx(90)


# ---- bad input ----------------------------------------------------------------------------------

def _state(name, folder):
    import importlib

    return importlib.import_module(f"clueforge.tasks.{TASKS[name].family}").prepare(TASKS[name], folder)


def test_malformed_line_unknown_label_missing_field(tmp_path):
    task = TASKS["afqmc"]
    state = _state("afqmc", FIX / "afqmc")
    bad = tmp_path / "train.json"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "label": "1"}\n{"sentence1": "a", "sentence2"\n')
    with pytest.raises(TaskDataError, match=r"train.json:2: malformed JSON"):
        classify.load(task, bad, state, True)
    bad.write_text('{"sentence1": "a", "sentence2": "b", "label": "7"}\n')
    with pytest.raises(TaskDataError, match=r"train.json:1: unknown label '7'"):
        classify.load(task, bad, state, True)
    bad.write_text('{"sentence1": "a", "label": "1"}\n')
    with pytest.raises(TaskDataError, match=r"train.json:1: missing field 'sentence2'"):
        classify.load(task, bad, state, True)
    bad.write_text('{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(TaskDataError, match=r"train.json:1: missing field 'id'"):
        classify.load(task, bad, state, False)  # a test file must carry ids


def test_wsc_span_mismatch_and_ner_bad_tag(tmp_path):
    wsc = tmp_path / "w.json"
    wsc.write_text(json.dumps({"idx": 0, "text": "小明说他来了", "label": "true",
                               "target": {"span1_index": 0, "span1_text": "小红", "span2_index": 3, "span2_text": "他"}},
                              ensure_ascii=False) + "\n")
    with pytest.raises(TaskDataError, match="w.json:1: span1_text '小红' is not at index 0"):
        classify.load(TASKS["cluewsc2020"], wsc, {"labels": ["false", "true"]}, True)
    assert classify.mark_wsc("小明说他来了", {"span1_index": 0, "span1_text": "小明", "span2_index": 3,
                                            "span2_text": "他"}, "f", 1) == "_小明_说[他]来了"
    bio = tmp_path / "n.txt"
    bio.write_text("张\tB-PER\n三\tI-PER\n\n去\tO\n京\tB-CITY\n")
    with pytest.raises(TaskDataError, match="n.txt:5: unknown label 'B-CITY'"):
        ner.load(TASKS["msra-ner"], bio, _state("msra-ner", tmp_path), True)


def test_kgclue_answer_format_and_kb_recall(tmp_path):
    with pytest.raises(TaskDataError, match="f:3: answer 'a ||| b' is not"):
        kgclue.parse_answer("a ||| b", "f:3")
    kb = kgclue.KnowledgeBase([("守望星光（歌曲）", "出品公司", "某音乐"), ("守望", "类型", "词语"), ("北京", "人口", "2000万")])
    names = {c[0] for c in kb.candidates("你知道守望星光是哪家公司出品的吗？")}
    assert names == {"守望星光（歌曲）", "守望"}
    assert kb.candidates("守望星光")[0][0] == "守望星光（歌曲）"  # longest mention first


def test_span_answer_realignment(tmp_path):
    ctx = "长江全长约6300公里，注入东海。"
    data = {"data": [{"paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "多长？", "answers": [{"text": "6300公里", "answer_start": 3}]},
        {"id": "q2", "question": "哪里？", "answers": [{"text": "黄海", "answer_start": 0}]}]}]}]}
    f = tmp_path / "d.json"
    f.write_text(json.dumps(data, ensure_ascii=False))
    ex = span.load(TASKS["cmrc2018"], f, {}, True)
    assert ex[0]["start"] == ctx.index("6300公里") and ex[1]["start"] is None


def test_submit_names_file_id_and_problem(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    rows = [{"id": i, "label": "1"} for i in range(5)] + [{"id": 2, "label": "1"}, {"id": 99, "label": "1"}]
    rows[0]["label"] = "yes"
    (sub / "afqmc_predict.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sub / "wrong_name_predict.json").write_text("")
    _, problems = validate_and_zip(sub, FIX)
    text = "\n".join(problems)
    assert "afqmc_predict.json:1: id 0: label 'yes' is not in the label set" in text
    assert "afqmc_predict.json:6: id 2 predicted twice (first at line 3)" in text
    assert "afqmc_predict.json:7: id 99 is not in the test file" in text
    assert "afqmc_predict.json: id 5: no prediction" in text
    assert "wrong_name_predict.json: not a leaderboard file name" in text
    assert not (sub / "submission.zip").exists()


# ---- tricks ------------------------------------------------------------------------------------

def _tiny(head="sequence", labels=3):
    torch.manual_seed(0)
    return TaskModel(ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position=32), head, labels)


def test_rdrop_kl_is_a_real_loss_term():
    m = _tiny().train()
    ids = torch.randint(5, 100, (4, 12))
    a, b = m(ids), m(ids)
    kl = symmetric_kl(a, b)
    assert kl.item() > 0 and kl.requires_grad  # two dropout masks differ
    m.eval()
    assert symmetric_kl(m(ids), m(ids)).item() == pytest.approx(0.0, abs=1e-7)


def _train_once(fgm_eps=0.0, ema=0.0, llrd=1.0, steps=3):
    m = _tiny()
    opt = torch.optim.AdamW(llrd_param_groups(m, 1e-3, llrd, 0.0), lr=1e-3)
    fgm = FGM(m, fgm_eps) if fgm_eps else None
    avg = EMA(m, ema) if ema else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(5, 100, (4, 12), generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        torch.manual_seed(2)
        torch.nn.functional.cross_entropy(m(ids), y).backward()
        if fgm and fgm.attack():
            torch.nn.functional.cross_entropy(m(ids), y).backward()
            fgm.restore()
        opt.step()
        opt.zero_grad()
        if avg:
            avg.update()
    return m, avg


def test_fgm_changes_training_and_restores_embeddings():
    base, _ = _train_once()
    adv, _ = _train_once(fgm_eps=1.0)
    assert not torch.allclose(base.classifier.weight, adv.classifier.weight)
    m = _tiny()
    m(torch.randint(5, 100, (2, 5))).sum().backward()
    f = FGM(m, 0.5)
    before = m.encoder.embeddings.word.weight.detach().clone()
    assert f.attack() and not torch.equal(before, m.encoder.embeddings.word.weight)
    f.restore()
    assert torch.equal(before, m.encoder.embeddings.word.weight)


def test_ema_weights_differ_and_are_swapped_in():
    m, avg = _train_once(ema=0.9)
    live = m.classifier.weight.detach().clone()
    with avg.applied():
        assert not torch.equal(m.classifier.weight, live)
        assert torch.equal(m.classifier.weight, avg.shadow["classifier.weight"])
    assert torch.equal(m.classifier.weight, live)


def test_llrd_learning_rates_by_depth():
    m = _tiny()
    groups = llrd_param_groups(m, 1.0, 0.5, 0.01)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(m.classifier.weight)] == 1.0
    assert lr_of[id(m.encoder.layers[1].mlp_in.weight)] == 0.5
    assert lr_of[id(m.encoder.layers[0].mlp_in.weight)] == 0.25
    assert lr_of[id(m.encoder.embeddings.word.weight)] == 0.125
    flat = llrd_param_groups(m, 1.0, 1.0, 0.01)
    assert {g["lr"] for g in flat} == {1.0}


def test_tricks_are_off_by_default():
    from clueforge.finetune.loop import FinetuneConfig

    c = FinetuneConfig()
    assert (c.rdrop, c.fgm, c.ema, c.llrd) == (0.0, 0.0, 0.0, 1.0)


def test_subsets_are_spread_over_label_sorted_files():
    from clueforge.finetune.loop import subset

    examples = [{"label": str(i // 100)} for i in range(1000)]  # sorted by label, like FewCLUE TNEWS dev
    picked = subset(examples, 100)
    assert len(picked) == 100 and len({e["label"] for e in picked}) == 10
    assert picked == subset(examples, 100)  # fixed, whatever the run seed
    assert subset(examples, None) is examples and subset(examples, 5000) is examples
