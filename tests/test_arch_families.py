"""Linguistic inputs in every task family (issue 14, point 2): a model trained with
``pos_embeddings`` / ``syntax_heads`` gets its ``ling`` channel from the rjieba segmentation the
corpus build uses in the NER, choice, span and KgCLUE families too (``classify`` is covered in
``test_arch.py``), fine-tunes, reloads and predicts; a model without the options is unaffected."""

import numpy as np
import pytest
import torch

from clueforge.model.bert import LING_SENT_START, LING_TEXT, LING_WORD_START, BertForMLM, ModelConfig
from clueforge.model.hf import load_hf_task, save_hf
from clueforge.finetune.loop import family
from clueforge.tasks.registry import TASKS
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
TINY = dict(vocab_size=2000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=128,
            dropout=0.0, attention_dropout=0.0)
OPTIONS = {"plain": {}, "pos": dict(pos_embeddings=True),
           "syntax": dict(syntax_heads=2, syntax_constraint="chunk")}
# task → (data folder, test file(s), max_length)
FAMILY_TASKS = {"cluener": ("cluener", "test.json", 64), "c3": ("c3", "test1.1.json", 96),
                "chid": ("chid", "test1.1.json", 64), "cmrc2018": ("cmrc2018", "test.json", 32),
                "kgclue": ("kgclue", "test.json", 64)}


@pytest.fixture(scope="module")
def tools(sample_vocab):
    from clueforge.text.segment import Segmenter
    from clueforge.text.tokenizer import FastChineseEncoder, load_tokenizer

    tok = load_tokenizer(sample_vocab)
    return tok, Segmenter(), FastChineseEncoder(tok)


def _builder(tools, text: str):
    """The shard builder's ``(ids, word_start, sent_start, pos)`` for ``text`` as one document."""
    from clueforge.corpus.build import SENT_START, WORD_START, encode_documents

    tok, seg, fast = tools
    ids, flags, pos, _ = encode_documents([text], tok, seg, fast)
    return (ids.tolist(), ((flags & WORD_START) != 0).tolist(), ((flags & SENT_START) != 0).tolist(),
            pos.tolist())


def _same_as_builder(tools, text: str, ids: list[int], ling: list[int], at: int = 0) -> None:
    """``ids`` / ``ling`` are tokens ``at…`` of ``text`` as the shard builder encodes it (a prefix
    of them when ``at`` is 0 and the text was truncated), with the builder's channels."""
    b_ids, b_ws, b_ss, b_pos = _builder(tools, text)
    n = len(ids)
    assert n and ids == b_ids[at:at + n]
    mine = np.asarray(ling, dtype=np.int64)
    assert ((mine & LING_TEXT) != 0).all()
    assert ((mine & LING_WORD_START) != 0).tolist() == b_ws[at:at + n]
    assert ((mine & LING_SENT_START) != 0).tolist() == b_ss[at:at + n]
    assert (mine & 0xFF).tolist() == b_pos[at:at + n]


def _state(task, data):
    fam = family(task)
    state = fam.prepare(task, data) if hasattr(fam, "prepare") else {}
    return fam, state


def _examples(name: str, split: str = "dev"):
    task = TASKS[name]
    data = FIXTURES / FAMILY_TASKS[name][0]
    fam, state = _state(task, data)
    ex = []
    for f in task.files[split].split(","):
        ex.extend(fam.load(task, data / f, state, True))
    return task, fam, state, ex


# --- the channel of an encoded example equals the shard builder's features ----------------------------


def test_ner_features_equal_the_shard_builder(tools, tmp_path):
    from clueforge.text.features import token_features

    tok, seg, _ = tools
    task, fam, state, ex = _examples("cluener")
    bio = tmp_path / "dev.txt"  # MSRA's char<TAB>tag format, a space character included
    chars = "今天北京的天气很好，我们去公园散步。明天 下雨吗？"
    bio.write_text("".join(f"{c}\tO\n" for c in chars) + "\n", encoding="utf-8")
    ex = ex + fam.load(TASKS["msra-ner"], bio, state, True)
    feats = fam.encode(task, ex, tok, 64, {**state, "segmenter": seg})
    compared = 0
    for e, f in zip(ex, feats):
        text = "".join(e["chars"])
        enc = tok.encode(e["chars"], is_pretokenized=True)
        inner = [t for t, w in enumerate(enc.word_ids) if w is not None][:len(f["input_ids"]) - 2]
        ling = np.asarray(f["ling"])
        assert ling[0] == 0 and ling[len(f["input_ids"]) - 1] == 0 and len(f["ling"]) == len(f["input_ids"])
        # every token is one character here: it starts at its character's index
        ws, ss, pos = token_features(seg, text, [enc.word_ids[t] for t in inner])
        assert ((ling[inner] & LING_WORD_START) != 0).tolist() == ws.tolist()
        assert ((ling[inner] & LING_SENT_START) != 0).tolist() == ss.tolist()
        assert (ling[inner] & 0xFF).tolist() == pos.tolist()
        ids = [f["input_ids"][t] for t in inner]
        if ids == _builder(tools, text)[0][:len(ids)]:  # Chinese text: the corpus build's tokens too
            _same_as_builder(tools, text, ids, ling[inner].tolist())
            compared += 1
    assert compared >= 3
    assert ((np.asarray(feats[-1]["ling"]) & LING_SENT_START) != 0).sum() >= 2


def test_choice_features_equal_the_shard_builder(tools):
    from clueforge.tasks.choice import _window
    from clueforge.tasks.io import text_ling

    tok, seg, _ = tools
    for name in ("c3", "chid"):
        task, fam, state, ex = _examples(name)
        ex = ex[:6]
        max_len = 96 if name == "c3" else 64
        feats = fam.encode(task, ex, tok, max_len, {**state, "segmenter": seg})
        plain = fam.encode(task, ex, tok, max_len, state)
        for e, f, p in zip(ex, feats, plain):
            assert f["rows"] == p["rows"] and "ling" not in p
            assert len(f["ling"]) == len(f["rows"])
            for k, ((ids, types), ling) in enumerate(zip(f["rows"], f["ling"])):
                assert len(ling) == len(ids) and ling[0] == 0 and ling[-1] == 0
                types = np.asarray(types)
                if name == "c3":
                    a = [t for t in range(1, len(ids) - 1) if types[t] == 0 and ids[t] != tok.token_to_id("[SEP]")]
                    b = [t for t in range(len(ids) - 1) if types[t] == 1]
                    _same_as_builder(tools, e["context"], [ids[t] for t in a], [ling[t] for t in a])
                    _same_as_builder(tools, e["question"] + e["choices"][k], [ids[t] for t in b],
                                     [ling[t] for t in b])
                else:  # the window with the candidate written in: its [MASK] blanks are text too
                    text, _ = _window(e["content"].replace("#idiom#", "\x00"), e["content"].index("#idiom#"),
                                      max_len - 6)
                    text = text.replace("\x00", e["choices"][k])
                    enc = tok.encode(text)
                    want = text_ling(seg, text, [o[0] for o in enc.offsets[1:-1]]).tolist()
                    assert ling[1:-1] == want[:len(ids) - 2]
                    if tok.token_to_id("[MASK]") not in ids:
                        _same_as_builder(tools, text, ids[1:-1], ling[1:-1])


def test_span_features_equal_the_shard_builder(tools):
    tok, seg, _ = tools
    task, fam, state, ex = _examples("cmrc2018")
    ex = ex[:4]
    feats = fam.encode(task, ex, tok, 32, {**state, "segmenter": seg})
    plain = fam.encode(task, ex, tok, 32, state)
    assert len(feats) > len(ex)  # sliding windows
    for f, p in zip(feats, plain):
        assert {k: v for k, v in f.items() if k != "ling"} == p and "ling" not in p
    for f in feats:
        e = ex[f["example"]]
        enc = tok.encode(e["question"], e["context"])  # untruncated: every context token once
        seq = np.asarray([-1 if s is None else s for s in enc.sequence_ids])
        full_ctx = np.flatnonzero(seq == 1)
        ling = f["ling"]
        ctx = [t for t, o in enumerate(f["offsets"]) if o is not None]
        q = list(range(1, ctx[0] - 1))
        assert ling[0] == 0 and ling[ctx[0] - 1] == 0 and ling[-1] == 0
        _same_as_builder(tools, e["question"], [f["input_ids"][t] for t in q], [ling[t] for t in q])
        # a window is a slice of the whole context's tokens, with the whole context's channels
        at = [enc.offsets[t][0] for t in full_ctx].index(f["offsets"][ctx[0]][0])
        _same_as_builder(tools, e["context"], [f["input_ids"][t] for t in ctx], [ling[t] for t in ctx], at)


def test_kgclue_features_equal_the_shard_builder(tools):
    from clueforge.knowledge.sources import entity_name

    tok, seg, _ = tools
    task, fam, state, ex = _examples("kgclue")
    ex = ex[:5]
    feats = fam.encode(task, ex, tok, 64, {**state, "segmenter": seg})
    plain = fam.encode(task, [dict(e) for e in ex], tok, 64, state)
    assert len(feats) == len(plain)
    for f, p in zip(feats, plain):
        assert {k: v for k, v in f.items() if k != "ling"} == p and "ling" not in p
    k = 0
    for i, e in enumerate(ex):
        for h, r, _ in e["candidates"]:
            f = feats[k]
            k += 1
            assert f["example"] == i
            ids, types, ling = f["input_ids"], np.asarray(f["token_type_ids"]), f["ling"]
            sep = [t for t, x in enumerate(ids) if x == tok.token_to_id("[SEP]")]
            a, b = list(range(1, sep[0])), list(range(sep[0] + 1, len(ids) - 1))
            assert (types[b] == 1).all() and ling[0] == ling[sep[0]] == ling[-1] == 0
            _same_as_builder(tools, e["question"], [ids[t] for t in a], [ling[t] for t in a])
            _same_as_builder(tools, f"{entity_name(h)}：{r}", [ids[t] for t in b], [ling[t] for t in b])


# --- end to end: fine-tune → save → reload (identical logits) → predict -----------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, sample_vocab):
    out = {}
    for name, opts in OPTIONS.items():
        torch.manual_seed(0)
        m = BertForMLM(ModelConfig(**TINY, **opts))
        d = tmp_path_factory.mktemp(f"m_{name}")
        save_hf(m, d, vocab=sample_vocab)
        out[name] = d
    return out


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(FAMILY_TASKS))
def test_family_finetunes_reloads_predicts(name, option, models, tmp_path):
    from clueforge.finetune.loop import FinetuneConfig, finetune, load_finetuned, predict

    folder, test_file, max_len = FAMILY_TASKS[name]
    data = FIXTURES / folder
    cfg = FinetuneConfig(epochs=2, max_steps=2, batch_size=2, seed=0, max_train=16, max_eval=8, max_length=max_len)
    ft = finetune(name, data, models[option], tmp_path / "ft", cfg, show_progress=False)
    assert ft["steps"] == 2
    task, fam, state, tm, tok = load_finetuned(tmp_path / "ft", name)
    linguistic = option != "plain"
    assert tm.cfg.linguistic_inputs == linguistic and ("segmenter" in state) == linguistic
    _, _, _, ex = _examples(name)
    ex = ex[:3]
    feats = fam.encode(task, ex, tok, task.max_length, state)
    assert all(("ling" in f) == linguistic for f in feats)
    b = fam.collate(feats[:4], tok.token_to_id("[PAD]"))
    assert ("ling" in b) == linguistic
    if linguistic:
        assert b["ling"].shape == b["input_ids"].shape and (b["ling"][b["attention_mask"] == 0] == 0).all()
    kw = {"ling": b["ling"]} if linguistic else {}
    again = load_hf_task(tmp_path / "ft" / "best", fam.HEAD,
                         {"choice": 1, "span": 2}.get(fam.HEAD, len(state.get("labels") or [])) or 2).eval()
    with torch.no_grad():
        got = tm.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"], **kw)
        assert torch.isfinite(got).all()
        assert torch.equal(got, again(b["input_ids"], b["attention_mask"], b["token_type_ids"], **kw))
    out = tmp_path / "pred.json"
    n = predict(name, tmp_path / "ft", data / test_file, out)
    assert n > 0 and out.is_file()


def test_prompt_methods_still_refuse_a_linguistic_model(models):
    """PET / EFL feed no ``ling`` channel: a one-line refusal, not a silent plain-BERT run."""
    from clueforge.finetune.loop import FinetuneConfig, finetune
    from clueforge.utils import UserError

    with pytest.raises(UserError, match=r"classify family \(PET\)") as err:
        finetune("tnews", FIXTURES / "tnews", models["pos"], models["pos"] / "ft",
                 FinetuneConfig(max_steps=1, method="pet"), show_progress=False)
    assert "\n" not in str(err.value)


def test_plain_model_batches_unchanged(tools):
    """Without a segmenter in the state no family adds a ``ling`` key to its features or batches."""
    tok, seg, _ = tools
    for name in FAMILY_TASKS:
        task, fam, state, ex = _examples(name)
        feats = fam.encode(task, ex[:3], tok, 64, state)
        assert not any("ling" in f for f in feats)
        assert "ling" not in fam.collate(feats[:4], 0)
