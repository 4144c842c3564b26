"""Task distillation (issue 12, point 3): the soft targets of every task family, a student that
starts as its teacher, TinyBERT-style augmentation that keeps labels, a teacher that actually
teaches, and a distilled directory that `predict` and `export` take unchanged."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.testing import assert_close

from clueforge.distill.augment import Augmenter
from clueforge.distill.task import (TaskDistillConfig, TeacherObjective, build_task_student, distill_task,
                                    prediction_rows, split_overrides)
from clueforge.distill.losses import soft_kl
from clueforge.finetune.loop import finetune, load_finetuned
from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.model.heads import TaskModel
from clueforge.model.hf import save_hf
from clueforge.utils import UserError

from deploy_models import FIXTURES, tiny_finetuned

# ---------------------------------------------------------------------------------------------
# Soft targets per family


def _kl(p_logits, q_logits):
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum())


def test_soft_kl_is_zero_for_equal_logits_and_ignores_padding_in_every_head():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"attention_mask": mask, "choice_mask": torch.tensor([[True, True, False], [True, True, True]])}
    shapes = {"sequence": (2, 3), "choice": (2, 3), "token": (2, 4, 5), "span": (2, 4, 2)}
    for head, shape in shapes.items():
        t = torch.randn(*shape, generator=g)
        assert soft_kl(prediction_rows(head, t, batch), prediction_rows(head, t, batch), 2.0).item() == 0.0
        if head == "sequence":
            continue
        s = t.clone()  # differs only where nothing is predicted: padded tokens, a padded choice
        if head == "choice":
            s[0, 2] += 5.0
        else:
            s[1, 2:] += 5.0
        assert soft_kl(prediction_rows(head, s, batch), prediction_rows(head, t, batch), 2.0).item() < 1e-6, head
    # a real difference counts exactly once, at temperature T scaled by T²: token (1, 1) of 5 real tokens
    t = torch.randn(2, 4, 5, generator=g)
    s = t.clone()
    s[1, 1] = torch.randn(5, generator=g)
    got = soft_kl(prediction_rows("token", s, batch), prediction_rows("token", t, batch), 2.0).item()
    assert math.isclose(got, 4 * _kl(t[1, 1] / 2, s[1, 1] / 2) / 5, rel_tol=1e-5)
    # span: start and end are each a distribution over the window's real tokens
    t = torch.randn(2, 4, 2, generator=g)
    s = t.clone()
    s[0, 0, 1] += 3.0
    got = soft_kl(prediction_rows("span", s, batch), prediction_rows("span", t, batch), 1.0).item()
    assert math.isclose(got, _kl(t[0, :3, 1], s[0, :3, 1]) / 4, rel_tol=1e-5)


def _tiny(num_layers=2, hidden=32, heads=4, dropout=0.0, vocab=60, labels=2, head="sequence", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
                      intermediate_size=2 * hidden, max_position=32, dropout=dropout, attention_dropout=dropout,
                      initializer_range=0.2)
    return TaskModel(cfg, head, labels)


def test_every_term_is_zero_for_a_student_identical_to_its_teacher():
    """Soft KL, hidden MSE over the matched layers and the MiniLMv2 relations all read the right
    tensors: a copy of the teacher (no dropout) scores 0 on each, a perturbed copy does not."""
    teacher = _tiny(num_layers=2).eval()
    ids = torch.randint(5, 60, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
         "labels": torch.tensor([0, 1, 0])}
    cfg = TaskDistillConfig(hidden_weight=1.0, attention_weight=1.0, hard_weight=0.5)
    for perturb in (False, True):
        student = copy.deepcopy(teacher).train()
        if perturb:
            with torch.no_grad():
                student.encoder.layers[0].attn.qkv.weight.add_(0.05 * torch.randn(96, 32))
        obj = TeacherObjective(copy.deepcopy(teacher), "sequence", cfg)
        assert obj.attach(student) == []  # same widths: no projection to train
        logits = student(ids, mask, b["token_type_ids"])
        task_loss = F.cross_entropy(logits, b["labels"])
        loss, parts = obj.loss(b, logits, task_loss)
        terms = [parts["soft_kl"], parts["hidden_mse"], parts["relation_kl"]]
        if perturb:
            assert min(terms) > 1e-6
        else:
            assert max(terms) < 1e-10
            assert_close(loss, 0.5 * task_loss)


# ---------------------------------------------------------------------------------------------
# The student starts as the teacher


@pytest.mark.parametrize("task,folder,pooling", [("afqmc", "afqmc", "cls"), ("cluener", "cluener", "cls"),
                                                 ("c3", "c3", "cls"), ("afqmc", "afqmc", "mean")])
def test_a_teacher_shaped_student_starts_at_the_teachers_dev_predictions(tmp_path, sample_vocab, task, folder,
                                                                         pooling):
    """A student config of the teacher's shape, initialised from the teacher, copies every layer
    and the task head (and what the head reads: a mean-pooling teacher's student pools the same
    way): the saved starting checkpoint gives the teacher's dev logits."""
    from clueforge.finetune.loop import run_model

    teacher_dir = tiny_finetuned(tmp_path / "teacher", task, FIXTURES / folder, sample_vocab, pooling=pooling)
    (tmp_path / "same.yaml").write_text("model: {hidden_size: 32, num_layers: 2, num_heads: 4, "
                                        "intermediate_size: 64, max_position: 128}\n")
    distill_task(task, teacher_dir, tmp_path / "same.yaml", FIXTURES / folder, tmp_path / "out",
                 ["max_steps=1", "batch_size=2"], show_progress=False)
    outs = []
    for d in (teacher_dir, tmp_path / "out" / "student-init"):
        t, fam, state, model, tok = load_finetuned(d, task)
        dev = fam.load(t, FIXTURES / folder / t.files["dev"].split(",")[0], state, True)
        feats = fam.encode(t, dev, tok, 64, state)
        logits = run_model(model, fam, feats, 8, tok.token_to_id("[PAD]"), torch.device("cpu"))
        outs.append(torch.from_numpy(np.concatenate(logits)))
    assert_close(outs[1], outs[0])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["distillation"]["head_from_teacher"] == (["classifier"] if task == "cluener" else
                                                            ["pooler", "classifier"])


def test_a_narrower_student_gets_sliced_embeddings_and_a_fresh_head(tmp_path, sample_vocab):
    teacher_dir = tiny_finetuned(tmp_path / "teacher", "afqmc", FIXTURES / "afqmc", sample_vocab)
    _, fam, state, teacher, _ = load_finetuned(teacher_dir, "afqmc")
    (tmp_path / "narrow.yaml").write_text("model: {hidden_size: 16, num_layers: 1, num_heads: 2, "
                                          "intermediate_size: 32, max_position: 128}\n")
    student, init, copied, record = build_task_student(tmp_path / "narrow.yaml", teacher, teacher_dir, fam, state,
                                                       "teacher")
    assert copied == [] and student.cfg.hidden_size == 16 and record["blocks"] == "random"
    assert_close(student.encoder.embeddings.word.weight, teacher.encoder.embeddings.word.weight[:, :16])
    # narrow_layers=slice: the student's layer is the teacher's top layer cut to 16 dims, 2 heads, 32 units
    _, dcfg = split_overrides(["narrow_layers=slice"])
    sliced, _, _, record = build_task_student(tmp_path / "narrow.yaml", teacher, teacher_dir, fam, state, "teacher",
                                              dcfg.embeddings, dcfg.narrow_layers)
    top = teacher.encoder.layers[-1]
    assert record == {"teacher_layers": [teacher.cfg.num_layers], "blocks": "slice", "embeddings": "slice",
                      "heads": [[0, 1]]}
    assert torch.equal(sliced.encoder.layers[0].mlp_in.weight, top.mlp_in.weight[:32, :16])
    assert torch.equal(sliced.encoder.layers[0].attn.out.weight, top.attn.out.weight[:16, :16])
    assert torch.equal(sliced.encoder.layers[0].ln2.bias, top.ln2.bias[:16])
    res = distill_task("afqmc", teacher_dir, tmp_path / "narrow.yaml", FIXTURES / "afqmc", tmp_path / "out",
                       ["max_steps=1", "batch_size=2", "narrow_layers=slice"], show_progress=False)
    assert res["distillation"]["student_init"]["blocks"] == "slice"
    assert json.loads((tmp_path / "out/results.json").read_text())["distillation"]["narrow_layers"] == "slice"
    start = load_file(tmp_path / "out/student-init/model.safetensors")
    assert any(torch.equal(v, top.mlp_in.weight[:32, :16]) for v in start.values())  # the saved start is sliced
    # a deeper student: the message names what the task path accepts (no layer list)
    (tmp_path / "deep.yaml").write_text(f"model: {{hidden_size: 16, num_layers: {teacher.cfg.num_layers + 1}, "
                                        "num_heads: 2, intermediate_size: 32, max_position: 128}\n")
    with pytest.raises(UserError, match="use init=random") as exc:
        build_task_student(tmp_path / "deep.yaml", teacher, teacher_dir, fam, state, "teacher")
    assert "list" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_ner_augmentation_changes_only_words_outside_entities_and_keeps_tags():
    chars = list("张伟昨天在北京的华为公司开会，讨论了新产品。")
    tags = ["B-PER", "I-PER", "O", "O", "O", "B-LOC", "I-LOC", "O", "B-ORG", "I-ORG", "I-ORG", "I-ORG"] + \
        ["O"] * (len(chars) - 12)
    ex = {"id": 0, "chars": chars, "tags": tags, "line": 1}
    pool_text = {"id": 1, "chars": list("我们今天在上海的家里吃饭，研究了旧方法。"), "tags": ["O"] * 20, "line": 2}
    aug = Augmenter("ner", "bio", rate=1.0, copies=3, seed=0)
    out = aug.augment([ex, pool_text])
    mine = [o for o in out if o["id"] == 0]
    assert len(mine) == 3
    for o in mine:
        assert o["tags"] == tags and len(o["chars"]) == len(chars)
        for c_new, c_old, tag in zip(o["chars"], chars, tags):
            if tag != "O" or not "\u4e00" <= c_old <= "\u9fff":  # entities and punctuation stay
                assert c_new == c_old
        assert o["chars"] != chars  # rate 1: some word outside the entities changed
    assert ex["chars"] == chars  # the original is untouched


def test_classification_span_and_kgclue_augmentation_keep_what_labels_depend_on():
    aug = Augmenter("classify", "pair", rate=1.0, copies=1, seed=1)
    exs = [{"id": 0, "a": "今天天气很好，我们去公园散步。", "b": "明天可能会下雨。", "label": "1"},
           {"id": 1, "a": "昨天天气不错，他们去学校跑步。", "b": "后天也许要刮风。", "label": "0"}]
    out = aug.augment(exs)
    assert [o["label"] for o in out] == ["1", "0"]
    for o, e in zip(out, exs):
        assert len(o["a"]) == len(e["a"]) and (o["a"], o["b"]) != (e["a"], e["b"])
        assert o["a"][6] == "，" and o["a"][-1] == "。"
    ctx = "小明昨天在北京吃了烤鸭，今天在上海吃了小笼包。"  # 北京 could replace 上海: both ns, two characters
    span = [{"id": "q", "context": ctx, "question": "小明今天在哪里？", "answers": ["上海"], "start": ctx.index("上海")}]
    for o in Augmenter("span", "squad", rate=1.0, copies=4, seed=2).augment(span):
        assert o["context"][o["start"]:o["start"] + 2] == "上海" and o["context"] != ctx
    kg = [{"id": 0, "question": "刘德华的出生地是哪里？", "gold": ("刘德华（中国香港男演员）", "出生地", "香港"), "line": 1},
          {"id": 1, "question": "张学友和郭富城的出生地在哪里？", "gold": ("张学友", "出生地", "天津"), "line": 2}]
    out = Augmenter("kgclue", "kgclue", rate=1.0, copies=4, seed=3).augment(kg)
    assert {o["id"] for o in out} == {1}  # only the second has a replaceable word (郭富城 → 刘德华)
    for o in out:
        assert o["gold"] == kg[o["id"]]["gold"] and o["question"][:3] == o["gold"][0][:3]
    assert Augmenter("classify", "wsc", rate=1.0, copies=2).augment(
        [{"id": 0, "a": "_小明_说[他]累了", "b": None, "label": "true"}]) == []  # spans live in the text
    assert Augmenter("classify", "pair", rate=0.0, copies=2).augment(exs) == []  # nothing replaced, nothing added


def test_single_characters_are_replaced_by_the_mlm_prediction(sample_vocab):
    """With an MLM, a one-character word becomes one of its top predictions at that position (here
    the MLM predicts one character everywhere); multi-character words still come from the pool."""
    from clueforge.text.tokenizer import load_tokenizer

    tok = load_tokenizer(sample_vocab)
    target = next(t for t in (tok.id_to_token(i) for i in range(tok.get_vocab_size()))
                  if len(t) == 1 and "\u4e00" <= t <= "\u9fff" and t not in "我吃")
    torch.manual_seed(0)
    mlm = BertForMLM(ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=1, num_heads=2,
                                 intermediate_size=32, max_position=64))
    with torch.no_grad():
        mlm.head.bias[tok.token_to_id(target)] = 100.0
    aug = Augmenter("classify", "single", rate=1.0, copies=1, seed=0, mlm=mlm, tok=tok, top_k=1)
    out = aug.augment([{"id": 0, "a": "我吃", "b": None, "label": "1"}])  # two one-character words
    assert out[0]["a"] == target * 2


# ---------------------------------------------------------------------------------------------
# The teacher teaches


def _synthetic(n, g):
    ids = torch.randint(5, 60, (n, 12), generator=g)
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


def _train_student(teacher, soft_weight, hard_weight, steps=200):
    """A 1-layer student on 64 examples whose labels are the teacher's with 40 % replaced at random;
    returns its agreement with the teacher on those inputs."""
    g = torch.Generator().manual_seed(3)
    ids, mask, types = _synthetic(64, g)
    with torch.no_grad():
        gold = teacher(ids, mask, types).argmax(-1)
    noisy = torch.where(torch.rand(64, generator=g) < 0.4, torch.randint(0, 3, (64,), generator=g), gold)
    student = _tiny(num_layers=1, hidden=16, heads=2, labels=3, seed=5).train()
    obj = TeacherObjective(teacher, "sequence", TaskDistillConfig(soft_weight=soft_weight, hard_weight=hard_weight,
                                                                  temperature=2.0))
    opt = torch.optim.AdamW(list(student.parameters()) + obj.attach(student), lr=3e-3)
    for step in range(steps):
        sel = torch.arange(16) + 16 * (step % 4)
        b = {"input_ids": ids[sel], "attention_mask": mask[sel], "token_type_ids": types[sel], "labels": noisy[sel]}
        logits = student(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        loss, _ = obj.loss(b, logits, F.cross_entropy(logits, b["labels"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (student.eval()(ids, mask, types).argmax(-1) == gold).float().mean().item()


def test_the_teacher_term_pulls_the_student_toward_the_teacher():
    """Hard labels are noisy (40 % random): the student taught by the teacher's soft targets ends up
    agreeing with the teacher clearly more often than the one trained on the labels (distillation
    weight 0), which learns their noise."""
    teacher = _tiny(num_layers=2, labels=3, seed=0).eval()
    with torch.no_grad():  # centre its logits over the inputs: the three labels are about equally common
        teacher.classifier.bias.sub_(teacher(*_synthetic(2000, torch.Generator().manual_seed(4))).mean(0))
    distilled, labels_only = _train_student(teacher, 1.0, 0.0), _train_student(teacher, 0.0, 1.0)
    assert distilled > labels_only + 0.15, (distilled, labels_only)


# ---------------------------------------------------------------------------------------------
# End to end: a normal fine-tuned directory


def _mlm_dir(tmp_path, sample_vocab, hidden=16, layers=1):
    n_vocab = sum(1 for _ in open(sample_vocab, encoding="utf-8"))
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(vocab_size=n_vocab, hidden_size=hidden, num_layers=layers, num_heads=2,
                               intermediate_size=2 * hidden, max_position=128))
    return save_hf(m, tmp_path / "student-mlm", vocab=sample_vocab)


def test_with_the_teacher_term_off_distillation_is_plain_fine_tuning(tmp_path, sample_vocab):
    """soft_weight=0, hard_weight=1, no other term: the same weights as `finetune` from the same start."""
    teacher_dir = tiny_finetuned(tmp_path / "teacher", "afqmc", FIXTURES / "afqmc", sample_vocab)
    student = _mlm_dir(tmp_path, sample_vocab)
    common = ["max_steps=3", "batch_size=2", "seed=7"]
    distill_task("afqmc", teacher_dir, student, FIXTURES / "afqmc", tmp_path / "d",
                 common + ["soft_weight=0", "hard_weight=1"], show_progress=False)
    cfg, _ = split_overrides(common)
    finetune("afqmc", FIXTURES / "afqmc", tmp_path / "d" / "student-init", tmp_path / "f", cfg, show_progress=False)
    a, b = load_file(tmp_path / "d/best/model.safetensors"), load_file(tmp_path / "f/best/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], msg=k)
    distill_task("afqmc", teacher_dir, student, FIXTURES / "afqmc", tmp_path / "d2",
                 common + ["soft_weight=1", "hard_weight=1"], show_progress=False)
    c = load_file(tmp_path / "d2/best/model.safetensors")
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the teacher term does change them


@pytest.mark.parametrize("task,folder,test_file", [
    ("afqmc", "afqmc", "test.json"), ("cluener", "cluener", "test.json"), ("c3", "c3", "test1.1.json"),
    ("cmrc2018", "cmrc2018", "test.json"), ("kgclue", "kgclue", "test.json")])
def test_every_family_distils_into_a_directory_predict_takes(tmp_path, sample_vocab, task, folder, test_file):
    """All terms on (soft, hard, hidden through a projection, relations) plus augmentation, a
    narrower student from a directory: `clueforge predict` reads the result as any fine-tuned one."""
    from typer.testing import CliRunner

    from clueforge.cli import app

    teacher_dir = tiny_finetuned(tmp_path / "teacher", task, FIXTURES / folder, sample_vocab)
    res = distill_task(task, teacher_dir, _mlm_dir(tmp_path, sample_vocab), FIXTURES / folder, tmp_path / "out",
                       ["max_steps=2", "batch_size=2", "log_every=1", "hidden_weight=1", "attention_weight=1",
                        "hard_weight=0.5", "augment_copies=1", "augment_rate=0.5", "relation_heads=2",
                        "teacher_layer=1"], show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "soft_kl" in r]
    assert logged and all(math.isfinite(r[k]) for r in logged for k in ("soft_kl", "hidden_mse", "relation_kl"))
    t, fam, state, _, _ = load_finetuned(teacher_dir, task)
    n_train = sum(len(fam.load(t, FIXTURES / folder / f, state, True)) for f in t.files["train"].split(","))
    assert res["train_examples"] > n_train  # augmented copies joined the training set
    pred = tmp_path / "pred.json"
    r = CliRunner().invoke(app, ["predict", task, "--model", str(tmp_path / "out"),
                                 "--input", str(FIXTURES / folder / test_file), "--out", str(pred)])
    assert r.exit_code == 0, r.output
    assert pred.is_file() and pred.stat().st_size > 0


def test_clueforge_distill_task_then_export_and_submit_prediction(tmp_path, sample_vocab):
    """The commands a user types: `distill --task` → `export` (ONNX equal to PyTorch) → `predict
    --runtime onnx` gives the same labels as the PyTorch student; a bad setting is one line, exit 2."""
    from typer.testing import CliRunner

    from clueforge.cli import app

    run = CliRunner().invoke
    teacher_dir = tiny_finetuned(tmp_path / "teacher", "afqmc", FIXTURES / "afqmc", sample_vocab)
    base = ["distill", "--task", "afqmc", "--teacher", str(teacher_dir), "--student", str(_mlm_dir(tmp_path, sample_vocab)),
            "--data", str(FIXTURES / "afqmc"), "--no-progress", "--seed", "3"]
    r = run(app, base + ["--out", str(tmp_path / "out"), "--max-steps", "2", "--set", "batch_size=2"])
    assert r.exit_code == 0, r.output
    assert max(json.loads(x).get("step", 0) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads(r.output.strip().splitlines()[-1])["distillation"]["teacher"] == str(teacher_dir)
    r = run(app, ["export", str(tmp_path / "out" / "best"), "--out", str(tmp_path / "onnx"), "--data",
                  str(FIXTURES / "afqmc")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "onnx" / "export_check.json").read_text())["onnxruntime"]["fp32"][
        "max_abs_logit_diff"] < 1e-4
    preds = []
    for runtime, model in (("torch", tmp_path / "out"), ("onnx", tmp_path / "onnx")):
        r = run(app, ["predict", "afqmc", "--model", str(model), "--runtime", runtime, "--input",
                      str(FIXTURES / "afqmc" / "test.json"), "--out", str(tmp_path / runtime / "afqmc_predict.json")])
        assert r.exit_code == 0, r.output
        preds.append((tmp_path / runtime / "afqmc_predict.json").read_text())
    assert preds[0] == preds[1] and len(preds[0].splitlines()) == 6
    r = run(app, base + ["--out", str(tmp_path / "bad"), "--set", "temperature=0"])
    assert r.exit_code == 2 and "temperature=0.0 is not allowed: must be > 0" in r.output


# ---------------------------------------------------------------------------------------------
# Settings


def test_settings_are_validated_and_split_between_the_loop_and_distillation(tmp_path, sample_vocab):
    cfg, d = split_overrides(["lr=1e-3", "temperature=2", "augment_top_k=5", "augment_corpus=c.txt",
                              "augment_mlm=m", "augment_copies=1", "embeddings=project", "init=random"], seed=3)
    assert (cfg.lr, cfg.seed, d.temperature, d.augment_top_k, d.augment_corpus, d.augment_mlm, d.embeddings,
            d.init) == (1e-3, 3, 2.0, 5, "c.txt", "m", "project", "random")
    for bad in ("temperature=0", "augment_rate=1.5", "init=half", "soft_weight=-1", "embeddings=pca",
                "augment_top_k=0", "narrow_layers=first"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            split_overrides([bad])
    with pytest.raises(UserError, match="nothing to train"):
        split_overrides(["soft_weight=0"])
    with pytest.raises(UserError, match="task distillation also takes"):
        split_overrides(["temprature=2"])
    with pytest.raises(UserError, match="method=finetune"):
        split_overrides(["method=pet"])
    with pytest.raises(UserError, match="disagree"):
        split_overrides(["seed=1"], seed=2)
    teacher_dir = tiny_finetuned(tmp_path / "teacher", "afqmc", FIXTURES / "afqmc", sample_vocab)
    with pytest.raises(UserError, match="not a model directory, not a YAML file"):
        distill_task("afqmc", teacher_dir, "no-such-student", FIXTURES / "afqmc", tmp_path / "o", [])
    with pytest.raises(UserError, match="relation_heads=3 must divide"):
        distill_task("afqmc", teacher_dir, _mlm_dir(tmp_path, sample_vocab), FIXTURES / "afqmc", tmp_path / "o",
                     ["attention_weight=1", "relation_heads=3", "max_steps=1"], show_progress=False)


# ---------------------------------------------------------------------------------------------
# benchmarks/distill.py: its runs in parallel processes, and reusing finished runs


def _bench():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # spawned workers import it too
    import distill

    return distill


def _saved(run):
    return load_file(next(run.glob("*/model.safetensors")))


def test_distill_benchmark_runs_in_parallel_as_in_one_process_and_reuses_only_identical_runs(
        tmp_path, sample_vocab, monkeypatch):
    """``run_arms`` with 2 worker processes gives each (arm, seed) the weights and scores of the
    one-process path; ``--reuse`` takes a finished run's ``arm.json`` without training again, but
    not when a setting differs or when reuse is off."""
    bench = _bench()
    teacher = tiny_finetuned(tmp_path / "teacher", "cluener", FIXTURES / "cluener", sample_vocab)
    common = ["max_steps=2", "epochs=1", "max_eval=6", "max_length=32", "lr=0.001", "batch_size=2"]

    def job(work, reuse=False, common=common):
        return ("cluener", str(teacher), "pico", str(FIXTURES / "cluener"), str(work), common,
                ["soft_weight=1", "hard_weight=1", "temperature=2", "init=random"], "random", None, reuse)

    one = bench.run_arms(job(tmp_path / "one"), [0, 1], 1, False)
    two = bench.run_arms(job(tmp_path / "two"), [0, 1], 2, False)
    assert one.keys() == two.keys() == {(a, s) for a in bench.ARMS for s in (0, 1)}
    for arm, seed in one:
        assert one[arm, seed][0] == two[arm, seed][0]
        for w, res in (("one", one), ("two", two)):  # each result is its own (arm, seed)'s run
            assert res[arm, seed][2]["dir"] == str(bench.run_dir(tmp_path / w, arm, seed, "random"))
        a, b = (_saved(bench.run_dir(tmp_path / w, arm, seed, "random")) for w in ("one", "two"))
        for k in a:
            assert_close(a[k], b[k], msg=f"{arm} seed {seed}: {k}")
    assert not torch.equal(*(_saved(tmp_path / "one" / "distilled" / f"seed{s}")["classifier.weight"] for s in (0, 1)))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(bench, "distill_task", no_training)
    monkeypatch.setattr(bench, "finetune", no_training)
    again = bench.run_arms(job(tmp_path / "one", reuse=True), [0, 1], 1, False)
    for key, (metric, cpu, info) in again.items():
        assert (metric, cpu) == one[key][:2] and info["reused"] and info["dir"] == one[key][2]["dir"]
    with pytest.raises(AssertionError, match="trained again"):  # reuse off: every run trains
        bench.run_arm(job(tmp_path / "one"), "no_teacher", 0)
    for arm in bench.ARMS:  # another learning rate is another run
        with pytest.raises(AssertionError, match="trained again"):
            bench.run_arm(job(tmp_path / "one", True, [*common[:4], "lr=0.002", common[5]]), arm, 0)
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    weights = next(Path(teacher).rglob("model.safetensors"))  # the same teacher folder, retrained: new weights
    state = load_file(weights)
    save_file({k: v + 0.01 for k, v in state.items()}, weights)
    for arm in bench.ARMS:  # every arm starts from what the teacher decides: not reused
        with pytest.raises(AssertionError, match="trained again"):
            bench.run_arm(job(tmp_path / "one", True), arm, 0)
