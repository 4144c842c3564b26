"""Issue 14's architecture options: attention residual (``attn_residual_decay``), POS / word-boundary
embeddings (``pos_embeddings``), syntax-constrained heads (``syntax_heads``, ``syntax_constraint``).

Off ⇒ the plain encoder; on ⇒ hand-computed tiny examples of each mechanism; each option trains,
saves, reloads identically and fine-tunes; transformers loads the all-off model and refuses the
others with a message saying how to load them; fine-tuning features equal the shard builder's.
"""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from clueforge.model.bert import (LING_SENT_START, LING_TEXT, LING_WORD_START, SYNTAX_DISTANCE_BUCKETS, BertForMLM,
                                  ModelConfig, ancestors_mask, pack_ling, syntax_units)
from clueforge.model.heads import TaskModel
from clueforge.model.hf import load_hf, load_hf_task, save_hf
from clueforge.text.segment import POS_ID
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
TINY = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=32,
            dropout=0.0, attention_dropout=0.0)
ON = {"attn_residual_decay": dict(attn_residual_decay=0.5), "pos_embeddings": dict(pos_embeddings=True),
      "syntax_word": dict(syntax_heads=2, syntax_constraint="word"),
      "syntax_chunk": dict(syntax_heads=2, syntax_constraint="chunk"),
      "syntax_sentence": dict(syntax_heads=2, syntax_constraint="sentence"),
      "syntax_distance": dict(syntax_heads=2, syntax_constraint="distance"),
      "relative_attention": dict(relative_attention=3)}
OFF = {"attn_residual_decay": 0.0, "pos_embeddings": False, "syntax_heads": 0, "relative_attention": 0}


def _ling(words, tags=None, sents=(0,), T=None):
    """A packed ling row: [CLS] + words (token counts) + [SEP] (+ padding to T). ``tags``: POS per
    word; ``sents``: word indices that start a sentence."""
    tags = tags or ["n"] * len(words)
    row = [0]
    for w, (n, tag) in enumerate(zip(words, tags)):
        for j in range(n):
            row.append(int(pack_ling(POS_ID[tag], int(j == 0), int(j == 0 and w in sents), 1)))
    row.append(0)
    row += [0] * ((T or len(row)) - len(row))
    return torch.tensor([row])


def _randomise(m):
    """Non-zero option parameters (they start at zero: a no-op)."""
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if name.endswith(("pos_tag.weight", "boundary.weight", "distance_bias", "relative_bias")):
            with torch.no_grad():
                p.normal_(0, 0.5)
                if p.dim() == 2 and not name.endswith("_bias"):
                    p[0].zero_()  # the padding row stays zero


# --- off ⇒ the plain encoder ---------------------------------------------------------------------


@pytest.mark.parametrize("field", list(OFF))
def test_off_value_is_the_plain_encoder(field, monkeypatch):
    torch.manual_seed(0)
    plain = BertForMLM(ModelConfig(**TINY)).eval()
    off = BertForMLM(ModelConfig(**TINY, **{field: OFF[field]})).eval()
    off.load_state_dict(plain.state_dict(), strict=True)  # no extra parameters
    from clueforge.model.bert import SelfAttention

    def boom(*a, **k):
        raise AssertionError("the options path ran with the option off")

    monkeypatch.setattr(SelfAttention, "forward_options", boom)  # the SDPA fast path, untouched
    ids = torch.randint(5, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        assert torch.equal(off(ids, mask).logits, plain(ids, mask).logits)


@pytest.mark.parametrize("name", ["pos_embeddings", "syntax_distance", "relative_attention"])
def test_zero_initialised_option_equals_plain(name):
    """Fresh POS tables / distance bias are zero: the options path equals the fast path (≤1e-6)."""
    torch.manual_seed(0)
    plain = BertForMLM(ModelConfig(**TINY)).eval()
    on = BertForMLM(ModelConfig(**TINY, **ON[name])).eval()
    on.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(5, 101, (1, 9))
    mask = torch.tensor([[1] * 7 + [0] * 2])
    ling = _ling([2, 1, 2, 1], T=9)
    with torch.no_grad():
        assert_close(on(ids, mask, ling=ling).logits, plain(ids, mask).logits, atol=1e-6, rtol=0)


def test_residual_first_layer_equals_sdpa():
    """One layer has no previous scores: the explicit-score path equals SDPA (with padding)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "num_layers": 1})
    plain = BertForMLM(cfg).eval()
    on = BertForMLM(replace(cfg, attn_residual_decay=0.7)).eval()
    on.load_state_dict(plain.state_dict())
    ids = torch.randint(5, 101, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        assert_close(on(ids, mask).logits, plain(ids, mask).logits, atol=1e-6, rtol=0)


# --- on ⇒ hand-computed mechanisms ---------------------------------------------------------------


def _qkv(attn, x):
    B, T, D = x.shape
    H = attn.n_heads
    return attn.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)


def test_residual_scores_are_the_hand_sum():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**{**TINY, "num_layers": 3}, attn_residual_decay=0.5)).eval()
    seen = []
    for layer in m.encoder.layers:
        orig = layer.attn.forward_options

        def spy(x, mask, st, prev, orig=orig):
            out, scores = orig(x, mask, st, prev)
            seen.append((x, prev, scores, out))
            return out, scores

        layer.attn.forward_options = spy
    ids = torch.randint(5, 101, (1, 7))
    mask = torch.tensor([[1] * 6 + [0]])
    with torch.no_grad():
        m(ids, mask)
        prev_hand, prev_seen = None, None
        for layer, (x, prev, scores, out) in zip(m.encoder.layers, seen):
            q, k, v = _qkv(layer.attn, x)
            raw = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)  # (1, H, T, T)
            hand = raw if prev_hand is None else raw + 0.5 * prev_hand  # layer l + decay × layer l-1
            assert_close(scores, hand, atol=1e-6, rtol=1e-6)
            assert prev is prev_seen  # the previous layer's scores, residual included, are carried
            prev_seen = scores
            p = torch.softmax(hand.masked_fill(~mask.bool()[:, None, None, :], float("-inf")), -1)
            y = (p @ v).transpose(1, 2).reshape(1, 7, -1)
            assert_close(out, layer.attn.out(y), atol=1e-6, rtol=1e-6)
            prev_hand = hand
    assert len(seen) == 3


def test_syntax_units_by_hand():
    # [CLS] 我 在 北京(2) 工作(2) 。 他(new sentence) [SEP] [PAD]
    ling = _ling([1, 1, 2, 2, 1, 1], tags=["r", "p", "ns", "v", "x", "r"], sents=(0, 5), T=11)
    assert syntax_units(ling, "word").tolist() == [[1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9]]
    assert syntax_units(ling, "chunk").tolist() == [[1, 2, 3, 4, 4, 4, 4, 5, 6, 7, 8]]
    assert syntax_units(ling, "sentence").tolist() == [[1, 2, 2, 2, 2, 2, 2, 2, 3, 4, 5]]


@pytest.mark.parametrize("constraint", ["word", "chunk", "sentence"])
@pytest.mark.parametrize("residual", [0.0, 0.5])
def test_constrained_heads_put_zero_weight_outside(constraint, residual):
    """All heads constrained, one layer: a token's output is unchanged whatever the tokens outside
    its unit are (exactly zero weight there), and changes when a token inside changes."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "num_layers": 1}, syntax_heads=4, syntax_constraint=constraint,
                      attn_residual_decay=residual)
    m = BertForMLM(cfg).eval()
    ling = _ling([1, 1, 2, 2, 1, 1], tags=["r", "p", "ns", "v", "x", "r"], sents=(0, 5), T=11)
    mask = torch.tensor([[1] * 9 + [0] * 2])
    units = syntax_units(ling, constraint)[0]
    ids = torch.randint(5, 101, (1, 11))
    i = 4  # 京: the second token of 北京
    outside = torch.nonzero(units != units[i]).flatten()
    inside = [j for j in torch.nonzero(units == units[i]).flatten().tolist() if j != i]
    changed = ids.clone()
    changed[0, outside] = torch.randint(5, 101, (outside.numel(),))
    with torch.no_grad():
        a = m.encoder(ids, mask, ling=ling)
        b = m.encoder(changed, mask, ling=ling)
        assert_close(a[0, i], b[0, i], atol=1e-6, rtol=0)
        other = ids.clone()
        other[0, inside[0]] = (ids[0, inside[0]] + 1 - 5) % 96 + 5
        assert not torch.allclose(a[0, i], m.encoder(other, mask, ling=ling)[0, i])
        plain = BertForMLM(replace(cfg, syntax_heads=0)).eval()
        plain.load_state_dict(m.state_dict())
        assert not torch.allclose(plain.encoder(ids, mask)[0, i], plain.encoder(changed, mask)[0, i])


def test_structure_mask_only_on_syntax_heads():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, syntax_heads=1, syntax_constraint="word"))
    ling = _ling([2, 1], T=6)  # [CLS] w w w [SEP] [PAD]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]]).bool()[:, None, None, :]
    st = m.encoder.structure(mask, ling, 6)
    assert st.mask.shape == (1, 4, 6, 6)
    for h in range(3):  # ordinary heads: padding only
        assert st.mask[0, h].tolist() == [[True] * 5 + [False]] * 6
    expect = torch.zeros(6, 6, dtype=torch.bool)
    for group in ([0], [1, 2], [3], [4]):
        for a in group:
            for b in group:
                expect[a, b] = True
    expect[5, :5] = True  # padding's own unit is masked: its row falls back to the padding mask
    assert torch.equal(st.mask[0, 3], expect)


def test_distance_buckets_and_bias():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, syntax_heads=2, syntax_constraint="distance")).eval()
    ling = _ling([1] * 20, T=22)
    st = m.encoder.structure(None, ling, 22)
    assert st.mask is None
    assert st.distance[0, 0, 3].item() == 3 and st.distance[0, 0, 21].item() == SYNTAX_DISTANCE_BUCKETS - 1
    ids = torch.randint(5, 101, (1, 22))
    with torch.no_grad():
        before = m(ids, ling=ling).logits
        m.encoder.layers[0].attn.distance_bias[1, 0] = 5.0  # head 4 prefers its own word
        assert not torch.allclose(before, m(ids, ling=ling).logits)


def test_relative_bias_by_hand():
    """``relative_attention=K``: head h's score for key j seen from query i gets
    ``relative_bias[h, clip(j - i, -K, K) + K]``; the layer's output equals attention computed by
    hand with that bias (and the padding mask), and the bias receives gradient."""
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, relative_attention=2)).eval()
    attn = m.encoder.layers[0].attn
    with torch.no_grad():
        attn.relative_bias.copy_(torch.arange(4 * 5, dtype=torch.float).view(4, 5) / 4)
        attn.qkv.weight.normal_(0, 0.3)
    T = 6
    st = m.encoder.structure(None, None, T)
    assert st.offset.tolist()[0] == [2, 3, 4, 4, 4, 4] and st.offset.tolist()[5] == [0, 0, 0, 0, 1, 2]
    x = torch.randn(2, T, 32)
    mask = torch.ones(2, 1, 1, T, dtype=torch.bool)
    mask[1, ..., 4:] = False
    got, _ = attn.forward_options(x, mask, st, None)
    q, k, v = attn.qkv(x).view(2, T, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5  # (B, H, T, T)
    for h in range(4):
        for i in range(T):
            for j in range(T):
                scores[:, h, i, j] += attn.relative_bias[h, max(-2, min(2, j - i)) + 2]
    scores = scores.masked_fill(~mask, float("-inf"))
    want = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, 32))
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert attn.relative_bias.grad.abs().sum() > 0


def test_ancestors_mask_by_hand():
    # 0 ← 1 ← 2, 3 ← 2 (heads: 1→0, 2→1, 3→2), 4 root
    parent = torch.tensor([[-1, 0, 1, 2, -1]])
    got = ancestors_mask(parent)[0]
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]]).bool()
    assert torch.equal(got, expect)


def test_pos_embeddings_change_only_tagged_tokens():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, pos_embeddings=True)).eval()
    _randomise(m)
    emb = m.encoder.embeddings
    ids = torch.randint(5, 101, (1, 7))
    ling = _ling([2, 1, 2], tags=["n", "v", "nr"])  # [CLS] n n v nr nr [SEP]
    with torch.no_grad():
        plain = emb(ids, None, torch.zeros_like(ling))
        tagged = emb(ids, None, ling)
        assert torch.equal(tagged[0, [0, 6]], plain[0, [0, 6]])  # specials: no linguistic input
        assert not torch.isclose(tagged[0, 1:6], plain[0, 1:6]).all(-1).any()
        d = m.cfg.hidden_size
        hand = emb.word(ids) + emb.position.weight[:7] + emb.token_type.weight[0]
        hand[0, 1] += emb.pos_tag.weight[POS_ID["n"]] + emb.boundary.weight[1]  # word start
        hand[0, 2] += emb.pos_tag.weight[POS_ID["n"]] + emb.boundary.weight[2]  # inside the word
        hand[0, 3] += emb.pos_tag.weight[POS_ID["v"]] + emb.boundary.weight[1]
        assert_close(tagged[0, :4], torch.nn.functional.layer_norm(hand, (d,), emb.ln.weight, emb.ln.bias,
                                                                    1e-12)[0, :4])
        other = ling.clone()
        other[0, 3] = pack_ling(POS_ID["a"], 1, 0, 1)  # retag one token: only it changes
        changed = emb(ids, None, other)
        same = [j for j in range(7) if j != 3]
        assert torch.equal(changed[0, same], tagged[0, same]) and not torch.allclose(changed[0, 3], tagged[0, 3])
    with pytest.raises(ValueError, match="ling"):
        m(ids)


def test_options_with_gradient_checkpointing_equal_plain_backward():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, attn_residual_decay=0.5, syntax_heads=2, syntax_constraint="chunk",
                               pos_embeddings=True, relative_attention=3)).train()
    _randomise(m)  # non-zero option weights (the relative bias included): their gradients are compared too
    ids = torch.randint(5, 101, (2, 9))
    ling = torch.cat([_ling([2, 1, 2, 2], tags=["n", "p", "v", "n"])] * 2)
    m(ids, labels=ids, ling=ling).loss.backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.encoder.gradient_checkpointing = True
    m(ids, labels=ids, ling=ling).loss.backward()
    for a, b in zip(ref, [p.grad for p in m.parameters()]):
        assert_close(a, b)


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["model.syntax_heads=5", "model.syntax_constraint=tree", "model.attn_residual_decay=1.5",
                                 "model.syntax_heads=-1", "model.relative_attention=-2"])
def test_bad_settings_refused(bad):
    from clueforge.pretrain.config import load_config
    from clueforge.utils import UserError

    with pytest.raises(UserError, match=bad.split("=")[0].split(".")[1]):
        load_config("tiny", [bad])


# --- features: fine-tuning equals the shard builder --------------------------------------------------


def test_task_features_equal_the_shard_builder(sample_vocab):
    from clueforge.corpus.build import SENT_START, WORD_START, encode_documents
    from clueforge.tasks.io import encoding_ling
    from clueforge.text.normalize import normalize
    from clueforge.text.segment import Segmenter
    from clueforge.text.tokenizer import FastChineseEncoder, load_tokenizer

    tok, seg = load_tokenizer(sample_vocab), Segmenter()
    a = normalize("今天北京的天气很好，我们去公园散步。明天下雨吗？ABC公司的iPhone 15发布了")
    b = normalize("他说：“这是真的。”然后离开了。")
    enc = tok.encode(a, b)
    got = np.asarray(encoding_ling(seg, enc, (a, b)))
    seq = np.asarray([-1 if s is None else s for s in enc.sequence_ids])
    assert (got[seq < 0] == 0).all()
    for s, text in ((0, a), (1, b)):
        ids, flags, pos, _ = encode_documents([text], tok, seg, FastChineseEncoder(tok))
        assert ids.tolist() == [enc.ids[j] for j in np.flatnonzero(seq == s)]
        mine = got[seq == s]
        assert ((mine & LING_WORD_START) != 0).tolist() == ((flags & WORD_START) != 0).tolist()
        assert ((mine & LING_SENT_START) != 0).tolist() == ((flags & SENT_START) != 0).tolist()
        assert (mine & 0xFF).tolist() == pos.tolist()
        assert ((mine & LING_TEXT) != 0).all()
    assert ((got & LING_SENT_START) != 0).sum() >= 4  # the texts' sentences were found


def test_pretraining_batch_carries_the_shard_channels(sample_corpus):
    from clueforge.corpus.build import SENT_START, WORD_START
    from clueforge.corpus.shards import Corpus
    from clueforge.pretrain.data import Collator
    from clueforge.pretrain.masking import MaskingConfig
    from clueforge.text.tokenizer import load_tokenizer, special_ids

    corpus = Corpus(sample_corpus)
    specials = special_ids(load_tokenizer(sample_corpus / "vocab.txt"))
    col = Collator(corpus, specials, 2000, MaskingConfig(), linguistic=True)
    sh = corpus.shards[0]
    starts = np.flatnonzero(sh.flags & 4)  # documents
    s, e = int(starts[1]), int(starts[1]) + 40
    batch = col([(0, s, e)], np.random.default_rng(0))
    ling = batch["ling"][0]
    assert ling[0] == 0 and ling[41] == 0
    text = ling[1:41]
    assert (text & 0xFF).tolist() == np.asarray(sh.pos[s:e]).tolist()
    assert ((text & LING_WORD_START) != 0).tolist() == ((np.asarray(sh.flags[s:e]) & WORD_START) != 0).tolist()
    assert ((text & LING_SENT_START) != 0).tolist() == ((np.asarray(sh.flags[s:e]) & SENT_START) != 0).tolist()
    assert "ling" not in Collator(corpus, specials, 2000, MaskingConfig())([(0, s, e)], np.random.default_rng(0))


# --- checkpoints: transformers both ways ---------------------------------------------------------------


def test_all_off_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, **OFF)).eval()
    save_hf(m, tmp_path / "m")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(5, 101, (2, 8))
    with torch.no_grad():
        assert_close(hf(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["attn_residual_decay", "pos_embeddings", "syntax_distance", "relative_attention"])
def test_option_on_is_refused_by_transformers_and_reloads_in_clueforge(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**TINY, **ON[name])).eval()
    _randomise(m)
    save_hf(m, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: raw["clueforge"][k] for k in ON[name]} == ON[name]
    with pytest.raises(ValueError, match="load_hf"):
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
    for cls in (transformers.BertForMaskedLM, transformers.BertModel, transformers.BertForSequenceClassification):
        with pytest.raises(Exception, match="load_hf"):
            cls.from_pretrained(tmp_path / "m")
    again = load_hf(tmp_path / "m").eval()
    assert again.cfg == m.cfg
    ids = torch.randint(5, 101, (1, 8))
    ling = _ling([2, 1, 3], tags=["n", "v", "n"])
    with torch.no_grad():
        assert torch.equal(again(ids, ling=ling).logits, m(ids, ling=ling).logits)
    task = TaskModel(m.cfg, "sequence", 3)
    save_hf(task, tmp_path / "t")
    with pytest.raises(Exception, match="load_hf"):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["architectures"] == ["ClueforgeBertForMaskedLM"]
    t2 = load_hf_task(tmp_path / "t", "sequence", 3).eval()
    with torch.no_grad():
        assert torch.equal(t2(ids, ling=ling), task.eval()(ids, ling=ling))


def test_option_weights_never_dropped(tmp_path):
    """A checkpoint with option weights whose config says the option is off is refused."""
    from clueforge.model.hf import from_hf_state_dict, read_hf_weights

    m = BertForMLM(ModelConfig(**TINY, pos_embeddings=True))
    save_hf(m, tmp_path / "m")
    with pytest.raises(KeyError, match="pos_tag_embeddings"):
        from_hf_state_dict(BertForMLM(ModelConfig(**TINY)), read_hf_weights(tmp_path / "m"))
    with pytest.raises(KeyError, match="distance_bias"):
        from_hf_state_dict(BertForMLM(ModelConfig(**TINY, pos_embeddings=True, syntax_heads=1,
                                                  syntax_constraint="distance")),
                           read_hf_weights(tmp_path / "m"))


# --- end to end: pretrain → save → reload → fine-tune → predict ------------------------------------------

E2E = {"residual": ["model.attn_residual_decay=0.5"], "pos": ["model.pos_embeddings=true"],
       "relative": ["model.relative_attention=4"],
       "syntax": ["model.syntax_heads=2", "model.syntax_constraint=chunk", "model.pos_embeddings=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_option_pretrains_saves_reloads_finetunes(name, tmp_path, sample_corpus):
    from clueforge.finetune.loop import FinetuneConfig, finetune, load_finetuned, predict
    from clueforge.pretrain.config import load_config
    from clueforge.pretrain.loop import pretrain, state_digest

    sets = ["train.max_steps=4", "train.save_every=4", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.warmup_steps=1", "train.batch_size=4", "train.seq_len=32",
            "model.hidden_size=32", "model.intermediate_size=64", "train.peak_tflops=1"]
    cfg = load_config("tiny", sets + E2E[name])
    summary = pretrain(cfg, sample_corpus, tmp_path / "run", show_progress=False)
    final = tmp_path / "run" / "final"
    model = load_hf(final).eval()
    assert model.cfg.arch_options and state_digest(model) == summary["state_sha"]
    assert np.isfinite(summary.get("final_loss", summary.get("loss", 0.0)))
    ft = finetune("afqmc", FIXTURES / "afqmc", final, tmp_path / "ft", FinetuneConfig(epochs=1, max_steps=2, batch_size=4, seed=0),
                  show_progress=False)
    assert ft["steps"] == 2
    task, fam, state, tm, tok = load_finetuned(tmp_path / "ft", "afqmc")
    assert tm.cfg == model.cfg
    ex = fam.load(task, FIXTURES / "afqmc" / "dev.json", state, True)[:4]
    feats = fam.encode(task, ex, tok, 64, state)
    assert ("ling" in feats[0]) == model.cfg.linguistic_inputs
    b = fam.collate(feats, 0)
    kw = {"ling": b["ling"]} if "ling" in b else {}
    again = load_hf_task(tmp_path / "ft" / "best", "sequence", len(state["labels"])).eval()
    with torch.no_grad():
        assert torch.equal(tm.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"], **kw),
                           again(b["input_ids"], b["attention_mask"], b["token_type_ids"], **kw))
    n = predict("afqmc", tmp_path / "ft", FIXTURES / "afqmc" / "test.json", tmp_path / "pred.json")
    assert n == sum(1 for line in open(FIXTURES / "afqmc" / "test.json", encoding="utf-8") if line.strip())


@pytest.mark.slow
def test_residual_and_linguistic_models_export_to_onnx(tmp_path, sample_vocab):
    """Both kinds of option model export: the residual one with the usual three graph inputs, a POS +
    syntax-chunk one with a fourth, ``ling``, which ``predict --runtime onnx`` computes as torch does."""
    pytest.importorskip("onnxruntime")
    import onnx

    from clueforge.cli import _predict_runtime
    from clueforge.deploy.export import INPUTS, export_onnx
    from clueforge.finetune.loop import FinetuneConfig, finetune

    base = {**TINY, "vocab_size": 2000, "max_position": 128}
    ling_opts = dict(pos_embeddings=True, syntax_heads=2, syntax_constraint="chunk")
    for name, opts in (("res", dict(attn_residual_decay=0.5)), ("ling", ling_opts)):
        torch.manual_seed(0)
        m = BertForMLM(ModelConfig(**base, **opts))
        _randomise(m)  # non-zero POS / boundary embeddings: the channel changes the logits
        with torch.no_grad():
            for layer in m.encoder.layers:
                layer.attn.qkv.weight.mul_(40)  # scores of order 1: residual and constraints change the logits
        save_hf(m, tmp_path / name, vocab=sample_vocab)
        finetune("afqmc", FIXTURES / "afqmc", tmp_path / name, tmp_path / f"ft-{name}",
                 FinetuneConfig(epochs=1, max_steps=1, batch_size=4), show_progress=False)
    tm = load_hf_task(tmp_path / "ft-res" / "best", "sequence", 2).eval()
    plain = TaskModel(replace(tm.cfg, attn_residual_decay=0.0), "sequence", 2).eval()
    plain.load_state_dict(tm.state_dict())
    ids = torch.randint(5, 2000, (3, 20))
    with torch.no_grad():
        assert (tm(ids) - plain(ids)).abs().max() > 1e-3  # 10× the export check tolerance below
    rep = export_onnx(tmp_path / "ft-res" / "best", tmp_path / "onnx-res")
    assert rep["onnxruntime"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    graph = onnx.load(str(tmp_path / "onnx-res" / "model.onnx")).graph
    assert [i.name for i in graph.input] == list(INPUTS)  # a model without linguistic inputs: as before

    # the linguistic model reads the channel: its logits depend on it
    tl = load_hf_task(tmp_path / "ft-ling" / "best", "sequence", 2).eval()
    ids, ling = torch.randint(5, 2000, (1, 8)), _ling([2, 1, 3], ["n", "p", "v"], T=8)
    with torch.no_grad():
        assert (tl(ids, ling=ling) - tl(ids, ling=_ling([1] * 6, ["a"] * 6, T=8))).abs().max() > 1e-3
    for data, kind in ((None, "fp32"), (FIXTURES / "afqmc", "int8")):  # random channel; the dev set's real one
        out = tmp_path / f"onnx-ling-{kind}"
        rep = export_onnx(tmp_path / "ft-ling" / "best", out, int8=kind == "int8", data=data)
        assert rep["inputs"] == [*INPUTS, "ling"]
        assert [i.name for i in onnx.load(str(out / "model.onnx")).graph.input] == [*INPUTS, "ling"]
        check = json.loads((out / "export_check.json").read_text(encoding="utf-8"))
        assert check["onnxruntime"]["fp32"]["max_abs_logit_diff"] < 1e-4
        assert check["onnxruntime"]["fp32"]["label_agreement"] == 1.0
        assert check["onnxruntime"][kind]["labels_compared"] > 0
    test = FIXTURES / "afqmc" / "test.json"
    _predict_runtime("afqmc", tmp_path / "ft-ling", str(test), tmp_path / "torch.json", "torch")
    _predict_runtime("afqmc", tmp_path / "onnx-ling-fp32", str(test), tmp_path / "onnx.json", "onnx")
    rows = lambda f: [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]  # noqa: E731
    assert rows(tmp_path / "onnx.json") == rows(tmp_path / "torch.json") and rows(tmp_path / "torch.json")
    from clueforge.deploy.runtime import load_any  # the logits behind those labels, and the channel they read
    from clueforge.finetune.loop import run_model

    logits = {}
    for rt, d in (("torch", tmp_path / "ft-ling"), ("onnx", tmp_path / "onnx-ling-fp32")):
        task, fam, state, model, tok = load_any(d, rt, "afqmc")
        feats = fam.encode(task, fam.load(task, test, state, False), tok, task.max_length, state)
        assert all(any(f["ling"]) for f in feats)
        pad = tok.token_to_id("[PAD]")
        logits[rt] = np.concatenate(run_model(model, fam, feats, 4, pad, torch.device("cpu")))
        if rt == "onnx":  # without the channel (all zero) the exported graph answers differently
            blank = [{**f, "ling": [0] * len(f["ling"])} for f in feats]
            other = np.concatenate(run_model(model, fam, blank, 4, pad, torch.device("cpu")))
            assert np.abs(other - logits[rt]).max() > 1e-3
    assert np.abs(logits["onnx"] - logits["torch"]).max() < 1e-4
    from clueforge.deploy.serve import Backend  # serve --runtime onnx: the same channel, the same answer

    body = json.dumps({"texts": ["花呗怎么还款", "花呗如何还钱，用银行卡可以吗"]}, ensure_ascii=False).encode()
    ans = {}
    for rt, d in (("torch", tmp_path / "ft-ling" / "best"), ("onnx", tmp_path / "onnx-ling-fp32")):
        backend = Backend.load(d, rt)
        ex, feat = backend.parse(body)
        assert feat["ling"] and any(feat["ling"])
        ans[rt] = backend.infer([ex], [feat])[0]
    assert ans["onnx"]["label"] == ans["torch"]["label"]
    assert ans["onnx"]["scores"] == pytest.approx(ans["torch"]["scores"], abs=1e-4)


@pytest.mark.slow
def test_relative_attention_model_exports_to_onnx_with_its_bias(tmp_path, sample_vocab):
    """A fine-tuned ``relative_attention`` model exports: the graph computes the bias (its logits
    differ from the same weights without it by far more than the export check's 1e-4), and ONNX
    Runtime gives PyTorch's logits at any length."""
    pytest.importorskip("onnxruntime")
    from clueforge.deploy.export import export_onnx
    from clueforge.finetune.loop import FinetuneConfig, finetune

    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(**{**TINY, "vocab_size": 2000, "max_position": 128}, relative_attention=4))
    _randomise(m)
    with torch.no_grad():
        for layer in m.encoder.layers:
            layer.attn.qkv.weight.mul_(40)
    save_hf(m, tmp_path / "rel", vocab=sample_vocab)
    finetune("afqmc", FIXTURES / "afqmc", tmp_path / "rel", tmp_path / "ft", FinetuneConfig(epochs=1, max_steps=1,
             batch_size=4), show_progress=False)
    tm = load_hf_task(tmp_path / "ft" / "best", "sequence", 2).eval()
    plain = TaskModel(replace(tm.cfg, relative_attention=0), "sequence", 2).eval()
    plain.load_state_dict({k: v for k, v in tm.state_dict().items() if "relative_bias" not in k})
    ids = torch.randint(5, 2000, (3, 20))
    with torch.no_grad():
        assert (tm.encoder(ids) - plain.encoder(ids)).abs().max() > 0.1  # hidden states of unit scale
        want = tm(ids).numpy()
    rep = export_onnx(tmp_path / "ft" / "best", tmp_path / "onnx")
    assert rep["onnxruntime"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "token_type_ids": np.zeros_like(ids.numpy())}
    got = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)  # logits ~1e-2: relative, not the 1e-4 absolute
