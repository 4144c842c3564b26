import json

import pytest
import torch
from torch.testing import assert_close

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.model.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")


def _tiny_hf(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, **kw)
    model = transformers.BertForMaskedLM(cfg).eval()
    # random non-trivial LayerNorm/bias values so the key map is really exercised
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 211, (3, 24), generator=g)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 17:] = 0
    types = torch.zeros(3, 24, dtype=torch.long)
    types[2, 12:] = 1
    return ids, mask, types


def test_hf_to_clueforge_logits_equal(tmp_path):
    hf, path = _tiny_hf(tmp_path)
    ours = load_hf(path).eval()
    ids, mask, types = _inputs()
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = ours(ids, mask, types).logits
    keep = mask.bool()
    assert_close(b[keep], a[keep], atol=1e-5, rtol=1e-5)


def test_clueforge_to_hf_logits_equal(tmp_path):
    torch.manual_seed(3)
    ours = BertForMLM(ModelConfig(vocab_size=211, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
                                  max_position=64)).eval()
    save_hf(ours, tmp_path / "ours")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask, types = _inputs()
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = ours(ids, mask, types).logits
    keep = mask.bool()
    assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


def test_bare_bert_model_and_legacy_names(tmp_path):
    """A ``BertModel`` directory (no MLM head, old gamma/beta names) loads; the head stays initialised."""
    from safetensors.torch import load_file, save_file

    hf, path = _tiny_hf(tmp_path)
    sd = load_file(path / "model.safetensors")
    bare = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in sd.items() if k.startswith("bert.")}
    save_file(bare, path / "model.safetensors")
    ours = load_hf(path).eval()
    ids, mask, _ = _inputs()
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.encoder(ids, mask)
    assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_sparse_mlm_loss_equals_dense():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position=32)).eval()
    ids = torch.randint(5, 101, (4, 20))
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    s = m(ids, labels=labels, sparse=True)
    d = m(ids, labels=labels, sparse=False)
    assert_close(s.loss, d.loss)
    assert_close(s.logits, d.logits)
    s.loss.backward()
    g_sparse = m.encoder.embeddings.word.weight.grad.clone()
    m.zero_grad()
    d.loss.backward()
    assert_close(g_sparse, m.encoder.embeddings.word.weight.grad)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=32,
                      dropout=0.0, attention_dropout=0.0)
    m = BertForMLM(cfg).train()
    ids = torch.randint(5, 101, (2, 16))
    labels = ids.clone()
    m(ids, labels=labels).loss.backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.encoder.gradient_checkpointing = True
    m(ids, labels=labels).loss.backward()
    for a, b in zip(ref, [p.grad for p in m.parameters()]):
        assert_close(a, b)


def test_doc_attention_keeps_documents_apart():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position=32)).eval()
    ids = torch.randint(5, 101, (1, 12))
    docs = torch.tensor([[0] * 6 + [1] * 6])
    other = ids.clone()
    other[0, 6:] = torch.randint(5, 101, (6,))
    with torch.no_grad():
        a = m.encoder(ids, doc_ids=docs)
        b = m.encoder(other, doc_ids=docs)
        c = m.encoder(other)
    assert_close(a[0, :6], b[0, :6])  # the first document cannot see the second
    assert not torch.allclose(a[0, :6], c[0, :6])  # without the mask it can


def test_pre_ln_saves_but_transformers_refuses(tmp_path):
    m = BertForMLM(ModelConfig(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                               max_position=32, pre_ln=True)).eval()
    save_hf(m, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["model_type"] != "bert"
    again = load_hf(tmp_path / "p").eval()
    ids = torch.randint(5, 101, (2, 8))
    with torch.no_grad():
        assert_close(again(ids).logits, m(ids).logits)


def test_missing_weights_named(tmp_path):
    _, path = _tiny_hf(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    sd.pop("bert.encoder.layer.1.output.dense.weight")
    save_file(sd, path / "model.safetensors")
    with pytest.raises(KeyError, match="layer.1.output.dense.weight"):
        load_hf(path)


def test_sequence_classifier_parity_both_ways(tmp_path):
    from clueforge.model.hf import load_hf_classifier

    torch.manual_seed(0)
    hc = transformers.BertConfig(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=64, num_labels=3)
    hf = transformers.BertForSequenceClassification(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_classifier(tmp_path / "hf", 3).eval()
    ids, mask, types = _inputs()
    with torch.no_grad():
        assert_close(ours(ids, mask, types)[1], hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                     atol=1e-5, rtol=1e-5)
    save_hf(ours, tmp_path / "back")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert_close(again(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, ours(ids, mask, types)[1],
                     atol=1e-5, rtol=1e-5)
    # a pretrained MLM directory gives the encoder; the classifier head starts fresh
    _, mlm_dir = _tiny_hf(tmp_path / "mlm")
    fresh = load_hf_classifier(mlm_dir, 5)
    assert fresh.classifier.weight.shape == (5, 48)


@pytest.mark.parametrize("head,cls_name,labels", [
    ("sequence", "BertForSequenceClassification", 3), ("choice", "BertForMultipleChoice", 1),
    ("token", "BertForTokenClassification", 7), ("span", "BertForQuestionAnswering", 2)])
def test_every_task_head_matches_transformers(tmp_path, head, cls_name, labels):
    from clueforge.model.hf import load_hf_task

    torch.manual_seed(0)
    hc = transformers.BertConfig(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=64, num_labels=labels)
    hf = getattr(transformers, cls_name)(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_task(tmp_path / "hf", head, labels).eval()
    ids, mask, types = _inputs()
    if head == "choice":
        ids, mask, types = ids.view(1, 3, -1), mask.view(1, 3, -1), types.view(1, 3, -1)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        ref = torch.stack([out.start_logits, out.end_logits], -1) if head == "span" else out.logits
        got = ours(ids, mask, types)
    keep = mask.bool() if head in ("token", "span") else slice(None)
    assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)
    save_hf(ours, tmp_path / "back")
    again = getattr(transformers, cls_name).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        out = again(input_ids=ids, attention_mask=mask, token_type_ids=types)
        ref = torch.stack([out.start_logits, out.end_logits], -1) if head == "span" else out.logits
    assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position=32,
                      dropout=0.0, attention_dropout=0.0)
    m = BertForMLM(cfg)
    compiled = torch.compile(m)
    ids = torch.randint(5, 300, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    got = compiled(ids, labels=labels)
    got.loss.backward()
    g = m.encoder.embeddings.word.weight.grad.clone()
    m.zero_grad()
    ref = m(ids, labels=labels)
    ref.loss.backward()
    assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert_close(g, m.encoder.embeddings.word.weight.grad, atol=1e-5, rtol=1e-4)


def test_fused_adamw_matches_plain():
    """The fused AdamW kernel (used on GPU) gives the plain optimizer's update."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True)
    b = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    m = BertForMLM(ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                               max_position=32)).eval()
    ids = torch.randint(5, 300, (2, 16))
    labels = ids.clone()
    with torch.no_grad():
        ref = m(ids, labels=labels).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(ids, labels=labels).loss
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 0.05 and got.item() != ref.item()


def test_embedding_and_norm_options_reach_the_model(tmp_path):
    """``type_vocab_size``, ``layer_norm_eps`` and ``pad_token_id``, set through the config, shape
    the model that is built and survive the HF round trip."""
    from clueforge.model.hf import load_hf, save_hf
    from clueforge.pretrain.config import load_config

    shape = ["model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.num_layers=1",
             "model.vocab_size=50", "model.max_position=16"]
    base = load_config("tiny", shape).model
    cfg = load_config("tiny", shape + ["model.type_vocab_size=3", "model.layer_norm_eps=0.5", "model.pad_token_id=7"]).model
    torch.manual_seed(0)
    ref = BertForMLM(base)
    torch.manual_seed(0)
    m = BertForMLM(cfg)
    assert m.encoder.embeddings.token_type.num_embeddings == 3
    ids = torch.tensor([[1, 2, 7, 3]])
    m(ids, torch.ones_like(ids), torch.tensor([[0, 1, 2, 2]]))  # a third segment type is accepted
    with pytest.raises(IndexError):
        ref(ids, torch.ones_like(ids), torch.tensor([[0, 1, 2, 2]]))
    lns = [x for x in m.modules() if isinstance(x, torch.nn.LayerNorm)]
    assert lns and {x.eps for x in lns} == {0.5}
    ref_word7 = ref.encoder.embeddings.word.weight[7].detach().clone()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "token_type" not in k}, strict=False)
    ref.encoder.embeddings.token_type.weight.data.copy_(m.encoder.embeddings.token_type.weight.data[:2])
    m.eval(), ref.eval()
    tt = torch.zeros_like(ids)
    assert not torch.allclose(m(ids, torch.ones_like(ids), tt).logits, ref(ids, torch.ones_like(ids), tt).logits)
    word = m.encoder.embeddings.word
    assert word.padding_idx == 7 and torch.count_nonzero(word.weight[7]) == 0
    assert torch.count_nonzero(ref_word7) > 0  # without it: an ordinary row
    save_hf(m, tmp_path / "hf")
    back = load_hf(tmp_path / "hf").cfg
    assert (back.type_vocab_size, back.layer_norm_eps, back.pad_token_id) == (3, 0.5, 7)


def _shift_residual(table: torch.Tensor, k: int) -> float:
    """Relative residual of the best linear map R with ``table[i + k] ≈ table[i] @ R`` for every i."""
    a, b = table[:-k].double(), table[k:].double()
    r = torch.linalg.lstsq(a, b).solution
    return float((a @ r - b).norm() / b.norm())


def test_sinusoidal_positions_are_one_linear_map_apart(tmp_path):
    """``position_init: sinusoidal``: the position table starts as the sin/cos table at the normal
    init's RMS, so that "the token k before" is one linear map of a position's embedding for every
    position (the reason for the option); the normal init has no such map. The model saves as a
    plain BERT and reloads to the same logits; a bad value is refused by the config."""
    from clueforge.model.bert import sinusoidal_table
    from clueforge.pretrain.config import load_config
    from clueforge.utils import UserError

    t = sinusoidal_table(64, 48, 0.02)
    assert abs(float(t.pow(2).mean().sqrt()) - 0.02) < 1e-6
    assert_close(t[3, :4], 0.02 * 2 ** 0.5 * torch.tensor([torch.sin(torch.tensor(3.0)), torch.cos(torch.tensor(3.0)),
                                                            torch.sin(torch.tensor(3 * 10000 ** (-2 / 48))),
                                                            torch.cos(torch.tensor(3 * 10000 ** (-2 / 48)))]),
                 atol=1e-3 * 0.02, rtol=1e-3)  # the table's RMS is √½ per unit, hence 0.02·√2
    shape = dict(vocab_size=211, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, max_position=64)
    torch.manual_seed(3)
    normal = BertForMLM(ModelConfig(**shape)).eval()
    torch.manual_seed(3)
    sin = BertForMLM(ModelConfig(**shape, position_init="sinusoidal")).eval()
    pos = sin.encoder.embeddings.position.weight.detach()
    assert_close(pos, t)
    for k in (1, 2, 5):
        assert _shift_residual(pos, k) < 1e-4
        assert _shift_residual(normal.encoder.embeddings.position.weight.detach(), k) > 0.3  # ≈ √(1 - 48/63)
    # everything else is the normal init, drawn from the same seed
    other = {k: v for k, v in sin.state_dict().items() if "position" not in k}
    assert all(torch.equal(v, normal.state_dict()[k]) for k, v in other.items())
    save_hf(sin, tmp_path / "sin")
    back = load_hf(tmp_path / "sin").eval()
    ids, mask, types = _inputs()
    with torch.no_grad():
        assert torch.equal(back(ids, mask, types).logits, sin(ids, mask, types).logits)
    with pytest.raises(UserError, match=r"--set model.position_init=\"sine\" is not allowed: must be one of normal"):
        load_config("tiny", ["model.position_init=sine"])


def test_attention_offsets_reads_the_weights_sdpa_uses(sample_corpus, monkeypatch):
    """``benchmarks/attention_offsets.py`` recomputes each layer's attention weights from its
    query/key projections (plus the relative-position bias of a ``relative_attention`` model): those
    weights times the values, through the output projection, give the attention output the model
    itself computed (padding/document mask included), and the offsets it reports are read off them
    (a head made to look only at the token before reports -1 ≈ 1)."""
    import importlib.util
    from pathlib import Path

    from clueforge.model.bert import SelfAttention

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("attention_offsets", root / "benchmarks" / "attention_offsets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    batch = mod.fixed_batch(sample_corpus, seq_len=32)
    seen = []  # (input, output) of every attention call the model makes
    fwd, opt = SelfAttention.forward, SelfAttention.forward_options

    def record_forward(self, x, mask):
        out = fwd(self, x, mask)
        seen.append((x, out))
        return out

    def record_options(self, x, mask, st, prev):
        out = opt(self, x, mask, st, prev)
        seen.append((x, out[0]))
        return out

    for extra in ({}, {"relative_attention": 3}):
        torch.manual_seed(0)
        model = BertForMLM(ModelConfig(vocab_size=int(batch["input_ids"].max()) + 1, hidden_size=32, num_layers=2,
                                       num_heads=2, intermediate_size=64, max_position=32, pre_ln=True,
                                       **extra)).eval()
        with torch.no_grad():  # large random weights: weights far from uniform, so a wrong mask, scale or bias shows
            for layer in model.encoder.layers:
                layer.attn.qkv.weight.normal_(0, 0.5)
                if extra:
                    layer.attn.relative_bias.normal_(0, 2.0)
        seen.clear()
        with monkeypatch.context() as mp:
            mp.setattr(SelfAttention, "forward", record_forward)
            mp.setattr(SelfAttention, "forward_options", record_options)
            with torch.no_grad():
                model(**{k: v for k, v in batch.items() if k != "labels"})
        probs = mod.attention_probs(model, batch)
        assert len(seen) == len(probs) == 2
        for layer, p, (x, o) in zip(model.encoder.layers, probs, seen):
            B, T, D = x.shape
            v = layer.attn.qkv(x).view(B, T, 3, 2, D // 2)[:, :, 2].transpose(1, 2)  # (B, H, T, Dh)
            y = layer.attn.out((p @ v).transpose(1, 2).reshape(B, T, D))
            assert_close(y, o, atol=1e-5, rtol=1e-4)
    at = batch["labels"] != -100
    prev = torch.zeros_like(probs[0])
    idx = torch.arange(1, prev.shape[-1])
    prev[:, :, idx, idx - 1] = 1.0
    row = mod.offsets([prev], at)[0]
    assert row["-1"] == pytest.approx(1.0, abs=0.05) and row["+0"] == 0.0 and row["+1"] == 0.0


@pytest.mark.parametrize("head", ["sequence", "choice"])
def test_mean_pooling_heads_read_only_the_real_tokens(head):
    """``pooling="mean"`` in both pooling heads: the logits equal a direct masked mean through the
    pooler (choice: each (example, option) row of the flattened (B, K, T) input with its own mask),
    and the padding's content changes nothing."""
    from clueforge.model.heads import TaskModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position=32,
                      dropout=0.0, attention_dropout=0.0, initializer_range=0.2)
    m = TaskModel(cfg, head, 3, pooling="mean").eval()
    shape = (2, 10) if head == "sequence" else (2, 3, 10)
    ids = torch.randint(5, 50, shape)
    mask = torch.ones_like(ids)
    if head == "sequence":
        mask[1, 6:] = 0  # the second sentence padded after 6 tokens
    else:
        mask[:, 1, 6:] = 0  # option 1 of each example padded after 6 tokens
    with torch.no_grad():
        got = m(ids, mask)
        other = m(torch.where(mask.bool(), ids, torch.full_like(ids, 7)), mask)  # different padding content
        flat_ids, flat_mask = ids.reshape(-1, 10), mask.reshape(-1, 10)
        h = m.encoder(flat_ids, flat_mask)
        rows = [m.classifier(torch.tanh(m.pooler(h[i][flat_mask[i].bool()].mean(0)))) for i in range(len(flat_ids))]
        want = torch.stack(rows).view(got.shape)
    assert_close(got, want, atol=1e-5, rtol=0)
    assert_close(got, other, atol=1e-5, rtol=0)
