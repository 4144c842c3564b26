"""Prompts as data, label-word scoring through the MLM head, calibration, and zero-shot on a tiny
MLM trained on synthetic text whose label words follow the pattern."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clueforge.finetune.loop import FinetuneConfig, finetune, predict
from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.model.hf import save_hf
from clueforge.prompts.score import PromptEncoder, calibrate, example_rows, score_examples
from clueforge.prompts.spec import PromptError, Template, check_for_task, load_file, pick, shipped_files, templates_for
from clueforge.prompts.zeroshot import zeroshot
from clueforge.tasks.registry import get_task
from clueforge.text.tokenizer import load_tokenizer
from conftest import SHARED

SLOT_TEXT = {"sentence": "这家店的东西很好", "sentence1": "今天天气怎么样", "sentence2": "今天会下雨吗",
             "keywords": "查询；隐私", "abstract": "本文提出一种查询协议", "text": "张三说他明天来", "span1": "张三",
             "span2": "他", "before": "他做事总是", "after": "，让人放心"}


def _labels(task) -> list[str] | None:
    if task.labels is not None:
        return list(task.labels)
    listed = SHARED / "tasks" / "fewclue" / task.name.removeprefix("fewclue-") / "labels_all.txt"
    return [x.strip() for x in listed.read_text(encoding="utf-8").splitlines() if x.strip()] if listed.is_file() else None


def test_every_shipped_template(bert_vocab):
    """Each shipped template loads, fits its tasks' slots and labels, its words are in the standard
    vocabulary, and each word gets one [MASK] per token (words of one length share a row)."""
    tok = load_tokenizer(bert_vocab)
    mask, unk = tok.token_to_id("[MASK]"), tok.token_to_id("[UNK]")
    covered, multi = set(), 0
    for f in shipped_files():
        tasks, templates = load_file(f)
        for name in tasks:
            task = get_task(name)
            covered.add(name)
            labels = _labels(task)
            for t in templates:
                check_for_task(t, task, labels)
                enc = PromptEncoder(tok, t, task.max_length)
                words = list(t.verbalizer.values()) if t.verbalizer else ["胸有成竹", "一蹴而就", "画蛇添足"]
                for w in words:
                    assert unk not in enc.word_ids(w), f"{t.source}: {w!r} is not in {bert_vocab.name}"
                    # one token per character: the rows an example costs are the lengths one sees
                    # (IFLYTEK's "MOBA" was one token, a third row for every example)
                    assert len(enc.word_ids(w)) == len(w), f"{t.source}: {w!r} is {len(enc.word_ids(w))} token(s)"
                rows, queries, where = example_rows(enc, [SLOT_TEXT], [words])
                for (ids, start), q, (_, members) in zip(rows, queries, where):
                    n = ids.count(mask)
                    assert ids[start:start + n] == [mask] * n
                    for m in members:
                        assert len(enc.word_ids(words[m])) == n, f"{t.source}: {words[m]!r}"
                        multi += n > 1
                assert sorted(m for _, ms in where for m in ms) == list(range(len(words)))
    few = {f"fewclue-{t}" for t in ("eprstmt", "csldcp", "tnews", "iflytek", "ocnli", "bustm", "chid", "csl", "cluewsc")}
    clue = {"afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl", "chid"}
    assert few | clue <= covered, sorted((few | clue) - covered)
    assert multi > 100  # multi-character words are the rule (TNEWS, IFLYTEK, CSLDCP, NLI, CHID)


BAD = [
    ("tasks: [fewclue-eprstmt]\ntemplates:\n  a:\n    verbalizer: {Negative: 不, Positive: 很}\n", "templates.a.pattern"),
    ("tasks: [fewclue-eprstmt]\ntemplates:\n  a:\n    pattern: '[MASK][MASK]满意{sentence}'\n"
     "    verbalizer: {Negative: 不, Positive: 很}\n", "templates.a.pattern"),
    ("tasks: [fewclue-eprstmt]\ntemplates:\n  a:\n    pattern: '[MASK]满意{text}'\n"
     "    verbalizer: {Negative: 不, Positive: 很}\n", "templates.a.pattern"),
    ("tasks: [fewclue-eprstmt]\ntemplates:\n  a:\n    pattern: '[MASK]满意{sentence}'\n    verbalizer: {Negative: 不}\n",
     "templates.a.verbalizer"),
    ("tasks: [fewclue-eprstmt]\ntemplates:\n  a:\n    pattern: '[MASK]满意{sentence}'\n"
     "    verbalizer: {Negative: 不, Positive: 很}\n    score: max\n", "templates.a.score"),
    ("templates:\n  a:\n    pattern: '[MASK]{sentence}'\n    verbalizer: {Negative: 不, Positive: 很}\n", "tasks"),
    ("tasks: [fewclue-eprstmt]\ntemplates: [oops\n", "not valid YAML"),
    ("tasks: [fewclue-eprstm]\ntemplates:\n  a:\n    pattern: '[MASK]{sentence}'\n    verbalizer: {Negative: 不, Positive: 很}\n",
     "tasks"),
]


@pytest.mark.parametrize("text,field", BAD, ids=["no-pattern", "two-masks", "unknown-slot", "missing-label",
                                                 "bad-score", "no-tasks", "not-yaml", "unknown-task"])
def test_bad_prompt_file_names_file_and_field(tmp_path, text, field):
    f = tmp_path / "my_prompts.yaml"
    f.write_text(text, encoding="utf-8")
    task = get_task("fewclue-eprstmt")
    with pytest.raises(PromptError) as err:
        for t in templates_for(task, f):
            check_for_task(t, task, list(task.labels))
    msg = str(err.value)
    assert str(f) in msg and field in msg and "\n" not in msg, msg


def test_cli_bad_prompt_file_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from clueforge.cli import app

    f = tmp_path / "my_prompts.yaml"
    f.write_text(BAD[1][0], encoding="utf-8")
    res = CliRunner().invoke(app, ["zeroshot", "fewclue-eprstmt", "--model", str(tmp_path), "--input",
                                   str(tmp_path / "dev.json"), "--out", str(tmp_path / "p.json"), "--prompts", str(f)])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and str(f) in lines[0] and "templates.a.pattern" in lines[0] and "[MASK]" in lines[0], res.output


def _tiny_vocab(tmp: Path, chars: str) -> Path:
    v = tmp / "vocab.txt"
    v.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(chars))) + "\n", encoding="utf-8")
    return v


def test_scores_equal_a_dense_forward(tmp_path):
    """The fast path (rows batched by length, MLM head only at [MASK]s, one row per word length)
    equals the full (B, T, V) forward of each row alone; mean and sum; PMI subtracts the
    empty-input score."""
    tok = load_tokenizer(_tiny_vocab(tmp_path, "今天好坏不很满意的东西个人说是一二三四五六七八"))
    torch.manual_seed(0)
    model = BertForMLM(ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                                   intermediate_size=64, max_position=64)).eval()
    slots = [{"sentence": s} for s in ("今天好", "东西很不好的一二三四五六七八", "")]
    words = [["不", "很满意", "好"]] * 3
    for score in ("mean", "sum"):
        t = Template("t", "{sentence}。[MASK]意", {"0": "不", "1": "很满意", "2": "好"}, score)
        enc = PromptEncoder(tok, t, 64)
        got = score_examples(model, enc, slots, words, batch_size=2)
        for s, ws, g in zip(slots, words, got):
            for w, gw in zip(ws, g):
                w_ids = tok.encode(w, add_special_tokens=False).ids
                ids = tok.encode(s["sentence"] + "。" + "[MASK]" * len(w_ids) + "意").ids
                with torch.no_grad():
                    lp = F.log_softmax(model(torch.tensor([ids])).logits[0], -1)  # (T, V)
                pos = [i for i, x in enumerate(ids) if x == enc.mask_id]
                per_tok = [lp[p, x].item() for p, x in zip(pos, w_ids)]
                assert gw == pytest.approx(np.mean(per_tok) if score == "mean" else np.sum(per_tok), abs=1e-4)
        empty = score_examples(model, enc, [{"sentence": ""}], [words[0]])[0]
        pmi = calibrate(model, enc, got, words, ["sentence"], "pmi")
        np.testing.assert_allclose(pmi[1], got[1] - empty, atol=1e-5)
        # contextual (Zhao et al.): log of p(y|x) normalised over the labels, divided by the mean of the
        # same distribution on the paper's three content-free inputs "N/A", "" and "[MASK]" (here the
        # real mask token in the slot: a dense forward by hand, the template's [MASK]s after it)
        na = score_examples(model, enc, [{"sentence": "N/A"}], [words[0]])[0]
        masked = []
        for w in words[0]:
            w_ids = tok.encode(w, add_special_tokens=False).ids
            ids = tok.encode("[MASK]。" + "[MASK]" * len(w_ids) + "意").ids
            with torch.no_grad():
                lp = F.log_softmax(model(torch.tensor([ids])).logits[0], -1)  # (T, V)
            per_tok = [lp[3 + i, x].item() for i, x in enumerate(w_ids)]  # [CLS] [MASK] 。 then the word's
            masked.append(np.mean(per_tok) if score == "mean" else np.sum(per_tok))
        masked = np.array(masked)
        p_cf = sum(np.exp(x) / np.exp(x).sum() for x in (na, empty, masked)) / 3
        ctx = calibrate(model, enc, got, words, ["sentence"], "contextual")
        for g, c in zip(got, ctx):
            np.testing.assert_allclose(c, np.log(np.exp(g) / np.exp(g).sum()) - np.log(p_cf), atol=1e-5)


def test_batch_calibration_removes_the_bias_the_inputs_show(caplog):
    """Batch calibration (Zhou et al. 2024): log p(y|x) − log mean_x p(y|x), p normalised over the
    classes, computed by hand. On scores where every example prefers label 0 (a constant answer: 50 %
    of a balanced set) but label 1 gains on the label-1 examples, it recovers every answer; the
    uncalibrated scores and PMI/contextual (which never see the inputs' bias) cannot be this test."""
    rng = np.random.default_rng(0)
    gold = np.array([0, 1] * 20)
    scores = [np.array([2.0, 0.0 + 1.5 * g]) + rng.normal(0, 0.1, 2) for g in gold]  # label 0 always ahead
    assert all(np.argmax(s) == 0 for s in scores)
    got = calibrate(None, None, scores, [["不", "很"]] * len(scores), ["sentence"], "batch")
    p = np.array([np.exp(s) / np.exp(s).sum() for s in scores])
    for s, g in zip(p, got):
        np.testing.assert_allclose(g, np.log(s) - np.log(p.mean(0)), atol=1e-12)
    assert (np.array([np.argmax(g) for g in got]) == gold).all()
    chid = [np.array([0.1, 0.5, 0.2]), np.array([0.3, 0.0, 0.2])]  # candidates: the classes are positions
    got = calibrate(None, None, chid, [["甲", "乙", "丙"], ["丁", "戊", "己"]], ["before", "after"], "batch")
    q = np.array([np.exp(s) / np.exp(s).sum() for s in chid])
    np.testing.assert_allclose(got[1], np.log(q[1]) - np.log(q.mean(0)), atol=1e-12)
    with pytest.raises(ValueError, match="same number of classes"):
        calibrate(None, None, [np.zeros(2), np.zeros(3)], [["a", "b"], ["a", "b", "c"]], ["sentence"], "batch")

    # one example: the prior is that example's own distribution, every calibrated score 0 — warned
    with caplog.at_level("WARNING", logger="clueforge.prompts"):
        one = calibrate(None, None, scores[:1], [["不", "很"]], ["sentence"], "batch")
    np.testing.assert_allclose(one[0], 0.0, atol=1e-12)
    assert "batch calibration on 1 examples for 2 classes" in caplog.text


def test_pet_model_scores_equal_the_zeroshot_path(tmp_path):
    """PET's PromptModel ((B, R, T) rows → (B, C) label scores, one row per word length) gives the
    log-softmax of the zero-shot scorer's scores on the same weights, template and examples."""
    from clueforge.prompts.pet import PetFamily, PromptModel
    from clueforge.tasks import classify

    tok = load_tokenizer(_tiny_vocab(tmp_path, "今天好坏不很满意的东西个人说是一二三四五六七八"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position=64)
    mlm = BertForMLM(cfg).eval()
    task = get_task("fewclue-bustm")  # labels "0", "1": words of one and three characters
    t = Template("t", "{sentence1}，[MASK]，{sentence2}", {"0": "不", "1": "很满意"}, "mean")
    examples = [{"a": "今天好", "b": "东西很不好", "label": "1"}, {"a": "一二三四五六七八", "b": "", "label": "0"}]
    state = {"labels": ["0", "1"], "templates": [t]}
    pet = PetFamily(classify, templates=[t])
    feats = pet.encode(task, examples, tok, 64, state)
    assert all(len(f["rows"]) == 2 for f in feats)  # one row per word length
    model = PromptModel(cfg, [[tok.encode(w, add_special_tokens=False).ids for w in ("不", "很满意")]],
                        tok.token_to_id("[MASK]"), ["mean"])
    model.load_state_dict(mlm.state_dict(), strict=False)
    b = pet.collate(feats, 0)
    with torch.no_grad():
        got = model.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"]).numpy()  # (B, C)
    want = score_examples(mlm, PromptEncoder(tok, t, 64), [{"sentence1": e["a"], "sentence2": e["b"]} for e in examples],
                          [["不", "很满意"]] * 2)
    want = np.stack(want)
    np.testing.assert_allclose(got, want - np.log(np.exp(want).sum(1, keepdims=True)), atol=1e-4)  # log-softmax


POS, NEG = "好棒赞美爽优", "差烂糟坏臭劣"
FILL = "这个东西质量服务物流包装价格外观味道声音颜色大小我们他们买了用过觉得"


def _synthetic(rng: random.Random, n: int) -> list[tuple[str, bool]]:
    out = []
    for _ in range(n):
        pos = rng.random() < 0.5
        chars = [rng.choice(FILL) for _ in range(rng.randint(5, 9))]
        for _ in range(2):
            chars.insert(rng.randint(0, len(chars)), rng.choice(POS if pos else NEG))
        out.append(("".join(chars), pos))
    return out


PROMPTS = ("tasks: [fewclue-eprstmt]\ntemplates:\n"
           "  right:\n    pattern: '{sentence}。[MASK]满意'\n    verbalizer: {Negative: 不, Positive: 很}\n"
           "  swapped:\n    pattern: '{sentence}。[MASK]满意'\n    verbalizer: {Negative: 很, Positive: 不}\n")


@pytest.fixture(scope="module")
def synthetic_mlm(tmp_path_factory):
    """A tiny MLM trained for seconds on "<phrase>。很满意" (positive phrases) / "<phrase>。不满意"
    (negative), an EPRSTMT-format folder of held-out phrases (train: 32, dev: 200) and a prompt file."""
    tmp = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    torch.manual_seed(0)
    vocab = _tiny_vocab(tmp, POS + NEG + FILL + "。很不满意")
    tok = load_tokenizer(vocab)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128, max_position=32, dropout=0.0, attention_dropout=0.0)
    model = BertForMLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mask_id, cls_id, sep_id = (tok.token_to_id(x) for x in ("[MASK]", "[CLS]", "[SEP]"))
    texts = [s + "。" + ("很" if pos else "不") + "满意" for s, pos in _synthetic(rng, 4000)]
    encs = [e.ids for e in tok.encode_batch(texts)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on shared cores: one thread is ~20x faster than two contended
    try:
        model.train()
        for _ in range(300):  # MLM: 20% of tokens masked, and the 很/不 position in half of the rows
            batch = rng.sample(encs, 64)
            T = max(map(len, batch))
            ids = torch.tensor([b + [0] * (T - len(b)) for b in batch])  # (B, T)
            att = (ids != 0).long()
            sel = (torch.rand(ids.shape) < 0.2) & (att == 1) & (ids != cls_id) & (ids != sep_id)
            rows = torch.nonzero(torch.rand(len(batch)) < 0.5)[:, 0]
            sel[rows, att.sum(1)[rows] - 4] = True  # [..., 很|不, 满, 意, SEP]
            out = model(ids.masked_fill(sel, mask_id), att, labels=torch.where(sel, ids, torch.full_like(ids, -100)))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    save_hf(model, tmp / "mlm", vocab=vocab)
    data = tmp / "eprstmt"
    data.mkdir()
    for split, n, seed in (("train", 32, 2), ("dev", 200, 1), ("test", 50, 3)):
        rows = [{"id": i, "sentence": s, "label": "Positive" if p else "Negative"}
                for i, (s, p) in enumerate(_synthetic(random.Random(seed), n))]
        if split == "test":
            rows = [{"id": r["id"], "sentence": r["sentence"]} for r in rows]
        (data / f"{split}.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prompts = tmp / "prompts.yaml"
    prompts.write_text(PROMPTS, encoding="utf-8")
    return tmp / "mlm", data, prompts


@pytest.mark.slow
def test_zeroshot_mechanism_on_a_tiny_mlm_that_knows_the_answer(synthetic_mlm, tmp_path):
    """Zero-shot through the prompt classifies held-out phrases; the swapped verbalizer does not."""
    mlm, data, prompts = synthetic_mlm
    acc = {}
    for name in ("right", "swapped"):
        for cal in ("none", "pmi", "contextual", "batch"):
            res = zeroshot("fewclue-eprstmt", mlm, str(data / "dev.json"), tmp_path / f"{name}.json",
                           template=name, calibration=cal, prompts=prompts)
            acc[name, cal] = res["metric"]["accuracy"]
    for precision in ("bf16", "int8"):  # the CPU inference paths keep the answer
        res = zeroshot("fewclue-eprstmt", mlm, str(data / "dev.json"), None, template="right",
                       prompts=prompts, precision=precision)
        acc["right", precision] = res["metric"]["accuracy"]
        assert acc["right", precision] >= 90, acc
    both = tmp_path / "both.yaml"  # --template all: two right templates, their distributions averaged
    both.write_text(PROMPTS.split("  swapped:")[0] + "  sum:\n    pattern: '{sentence}。[MASK]满意'\n"
                    "    verbalizer: {Negative: 不, Positive: 很}\n    score: sum\n", encoding="utf-8")
    res = zeroshot("fewclue-eprstmt", mlm, str(data / "dev.json"), None, template="all", prompts=both)
    assert res["template"] == "right,sum" and res["metric"]["accuracy"] >= 90, res
    print(acc)
    for cal in ("none", "pmi", "contextual", "batch"):
        assert acc["right", cal] >= 90, acc
        assert acc["swapped", cal] <= 10, acc
    rows = [json.loads(x) for x in (tmp_path / "right.json").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(200)) and {r["label"] for r in rows} <= {"Positive", "Negative"}


@pytest.mark.slow
def test_pet_trains_through_the_mlm_head_and_predict_needs_nothing_else(synthetic_mlm, tmp_path):
    """PET on 32 examples through the loop: far above chance on dev; with the swapped verbalizer and
    the same few steps it stays below chance (the prompt's prior is what few-shot reuses). The
    checkpoint keeps template and verbalizer: ``predict`` writes the submission from it alone."""
    mlm, data, prompts = synthetic_mlm
    acc = {}
    for name in ("right", "swapped"):
        cfg = FinetuneConfig(method="pet", template=name, prompts=str(prompts), epochs=2, batch_size=16, lr=1e-4, max_eval=100,
                             warmup_ratio=0.0, max_length=32)
        res = finetune("fewclue-eprstmt", data, mlm, tmp_path / name, cfg, show_progress=False)
        acc[name] = res["metric"]["accuracy"]
    print(acc)
    assert acc["right"] >= 90 and acc["swapped"] <= 40, acc
    meta = json.loads((tmp_path / "right" / "best" / "config.json").read_text())["clueforge_task"]
    assert meta["method"] == "pet" and meta["prompts"][0]["verbalizer"] == {"Negative": "不", "Positive": "很"}
    out = tmp_path / "eprstmt_predict.json"
    assert predict("fewclue-eprstmt", tmp_path / "right" / "best", data / "test.json", out) == 50
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(50)) and {r["label"] for r in rows} <= {"Positive", "Negative"}
    from typer.testing import CliRunner  # ONNX export of a prompt checkpoint: refused in one line, not a traceback

    from clueforge.cli import app

    res = CliRunner().invoke(app, ["export", str(tmp_path / "right" / "best"), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 2 and "PET checkpoint" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.slow
def test_fewclue_protocol_over_splits(synthetic_mlm, tmp_path):
    """`benchmark fewclue --method zeroshot|pet|finetune`: each train_k → dev_k split, mean ± std; tasks
    without splits are listed as skipped."""
    import shutil

    from typer.testing import CliRunner

    from clueforge.cli import app

    mlm, data, prompts = synthetic_mlm
    folder = tmp_path / "tasks" / "fewclue" / "eprstmt"
    folder.mkdir(parents=True)
    shutil.copy(data / "dev.json", folder / "dev.json")
    for k in (0, 1):
        shutil.copy(data / "train.json", folder / f"train_{k}.json")
        lines = (data / "dev.json").read_text().splitlines(keepends=True)
        (folder / f"dev_{k}.json").write_text("".join(lines[k * 50:(k + 1) * 50]))
    common = ["--model", str(mlm), "--data", str(tmp_path / "tasks"), "--set", "template=right",
              "--set", f"prompts={prompts}", "--set", "max_length=32"]
    for method, extra in (("zeroshot", ["--calibration", "pmi"]), ("pet", ["--set", "epochs=1", "--set", "lr=1e-4", "--set", "pet_mlm=0.5"]),
                          ("finetune", ["--set", "epochs=1"]), ("zeroshot", ["--splits", "1", "--tasks", "fewclue-eprstmt"])):
        out = tmp_path / (method + str(len(extra)))
        res = CliRunner().invoke(app, ["benchmark", "fewclue", "--method", method, "--out", str(out)] + common + extra)
        assert res.exit_code == 0, res.output
        report = json.loads((out / "report.json").read_text())
        (row,) = report["tasks"]
        subset = "--tasks" in extra  # one split, one task: nothing else is run or listed as skipped
        assert row["task"] == "fewclue-eprstmt" and list(row["splits"]) == (["dev_1"] if subset else ["dev_0", "dev_1"]), row
        assert len(report["skipped"]) == (0 if subset else 8) and report["method"] == method, report
        if method != "finetune":  # a new head after one epoch on 32 examples knows nothing yet
            assert row["mean"] >= 80, report  # chance: 50
        assert "± " in (out / "report.md").read_text()
        run = report["run"]  # the conditions the figures were measured under
        assert run["wall_seconds"] > 0 and run["cpu_seconds"] >= 0 and len(run["load_average_end"]) == 3, run
        if method in ("pet", "finetune"):  # no model selection on the split that is reported
            assert report["config"]["select"] == "last", report["config"]
        if method == "pet":
            assert report["config"]["pet_mlm"] == 0.5


@pytest.mark.parametrize("args", [["--splits", "0,5"], ["--splits", "x"], ["--splits", "1,1"], ["--tasks", "fewclue-nope"]])
def test_fewclue_protocol_bad_subsets_exit_2(tmp_path, args):
    from typer.testing import CliRunner

    from clueforge.cli import app

    (tmp_path / "tasks").mkdir()
    res = CliRunner().invoke(app, ["benchmark", "fewclue", "--method", "zeroshot", "--model", str(tmp_path), "--data",
                                   str(tmp_path / "tasks"), "--out", str(tmp_path / "o")] + args)
    assert res.exit_code == 2 and args[1] in res.output, res.output


def test_pet_refuses_candidate_tasks():
    from clueforge.finetune.loop import family, with_method

    fam = with_method(family(get_task("fewclue-chid")), FinetuneConfig(method="pet"))
    with pytest.raises(ValueError, match="fixed verbalizer"):
        fam.prepare(get_task("fewclue-chid"), Path("."))


def test_pick_unknown_template_names_the_known_ones():
    ts = templates_for(get_task("fewclue-eprstmt"))
    with pytest.raises(PromptError, match="satisfied"):
        pick(ts, "nope")
