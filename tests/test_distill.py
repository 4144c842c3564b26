"""Distillation (issue 12): each loss against a direct computation on hand-made tensors; students
built from a teacher reproduce it where the shapes allow; task-agnostic distillation runs through
the pretraining loop and resumes exactly; online students leave the teacher's updates unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from clueforge.distill.losses import hidden_mse, minilm_relation_kl, soft_kl
from clueforge.distill.student import (STUDENT_DIR, build_student, drop_aux_layer, init_from_teacher, teacher_layers,
                                       with_aux_layer)
from clueforge.model.bert import BertForMLM, ModelConfig


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, max_position=32,
                dropout=0.0, attention_dropout=0.0)
    return ModelConfig(**{**base, **kw})


def _teacher(**kw) -> BertForMLM:
    torch.manual_seed(0)
    return BertForMLM(_cfg(**kw)).eval()


def _ids(B=3, T=12, seed=1):
    return torch.randint(5, 97, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Losses against explicit loops


def _relation_loop(x: torch.Tensor, heads: int, mask: torch.Tensor) -> list:
    """Per (b, head, query) the softmax over allowed keys of q·k/√d, written out element by element."""
    B, T, D = x.shape
    d = D // heads
    out = {}
    for b in range(B):
        for h in range(heads):
            xs = x[b, :, h * d:(h + 1) * d]
            for i in range(T):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(T) if mask[b, j]]
                s = torch.tensor([float(xs[i] @ xs[j]) / math.sqrt(d) for j in keys])
                out[b, h, i] = (keys, torch.softmax(s, 0))
    return out


def test_relation_kl_equals_an_explicit_loop_across_widths_and_heads():
    g = torch.Generator().manual_seed(0)
    B, T, Ds, Dt, R = 2, 5, 8, 12, 2  # the student is narrower; relations re-split into 2 heads on both sides
    s, t = torch.randn(B, T, 3 * Ds, generator=g), torch.randn(B, T, 3 * Dt, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    expected = 0.0
    for part in range(3):
        rs = _relation_loop(s[..., part * Ds:(part + 1) * Ds], R, mask)
        rt = _relation_loop(t[..., part * Dt:(part + 1) * Dt], R, mask)
        kls = [float((pt * (pt.log() - rs[key][1].log())).sum()) for key, (_, pt) in rt.items()]
        expected += sum(kls) / len(kls)
    got = minilm_relation_kl(s, t, R, mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert minilm_relation_kl(t, t, R, mask).item() == pytest.approx(0.0, abs=1e-6)
    # pairs: a (B, T, T) mask of allowed pairs equal to the padding mask gives the same value
    pairs = mask[:, None, :] & mask[:, :, None]
    assert minilm_relation_kl(s, t, R, pairs).item() == pytest.approx(expected, rel=1e-5)


def test_hidden_mse_through_the_projection_counts_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 5, generator=g)
    proj = torch.nn.Linear(3, 5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    ps = proj(s).detach()
    terms = [float(((ps[b, i] - t[b, i]) ** 2).mean()) for b in range(2) for i in range(4) if mask[b, i]]
    assert hidden_mse(s, t, proj, mask).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert hidden_mse(t, t).item() == 0.0
    with pytest.raises(ValueError):
        hidden_mse(s, t)  # different widths need a projection


def test_soft_kl_is_the_tempered_kl_times_t_squared_and_zero_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    T = 2.0
    expected = sum(float((F.softmax(t[i] / T, 0) * (F.log_softmax(t[i] / T, 0) - F.log_softmax(s[i] / T, 0))).sum())
                   for i in range(6)) / 6 * T * T
    assert soft_kl(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert soft_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Students from the teacher


def test_a_teacher_shaped_student_from_the_teacher_gives_the_teachers_outputs(tmp_path):
    teacher = _teacher()
    yml = tmp_path / "same.yaml"
    yml.write_text("model: {hidden_size: 32, num_layers: 4, num_heads: 4, intermediate_size: 64, max_position: 32, "
                   "dropout: 0.0, attention_dropout: 0.0}\n")
    torch.manual_seed(5)
    student = build_student(yml, teacher, init="teacher").eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    for narrow in ("slice", "magnitude"):  # at the teacher's shape slicing keeps everything: the same model
        sliced = build_student(yml, teacher, init="teacher", narrow=narrow).eval()
        with torch.no_grad():
            assert torch.equal(sliced(ids).logits, teacher(ids).logits)
    torch.manual_seed(5)
    random = build_student(yml, teacher, init="random").eval()
    with torch.no_grad():
        assert not torch.allclose(random(ids).logits, teacher(ids).logits)


def test_every_other_layer_student_equals_a_model_built_by_hand_from_those_layers(tmp_path):
    teacher = _teacher()
    yml = tmp_path / "half.yaml"
    yml.write_text("model: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position: 32, "
                   "dropout: 0.0, attention_dropout: 0.0}\n")
    assert teacher_layers("teacher", 4, 2) == [2, 4]  # every 2nd, the top one included
    assert teacher_layers("teacher", 12, 4) == [3, 6, 9, 12]
    student = build_student(yml, teacher).eval()
    hand = BertForMLM(_cfg(num_layers=2)).eval()
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("encoder.layers.")}
    for i, j in enumerate([2, 4]):
        sd.update({k.replace(f"encoder.layers.{j - 1}.", f"encoder.layers.{i}."): v
                   for k, v in teacher.state_dict().items() if k.startswith(f"encoder.layers.{j - 1}.")})
    hand.load_state_dict(sd)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, hand(ids).logits)
    explicit = build_student(yml, teacher, init=[1, 3]).eval()
    assert torch.equal(explicit.encoder.layers[1].mlp_in.weight, teacher.encoder.layers[2].mlp_in.weight)


def test_relative_attention_students_copy_the_teachers_bias_or_are_refused():
    """A teacher with relative positions: a student with the same ``relative_attention`` copies its
    biases with the blocks and computes the teacher's outputs; a student without it (or with another
    K, or narrower) is refused in one line instead of crashing in load_state_dict."""
    teacher = _teacher(relative_attention=4)
    with torch.no_grad():
        for layer in teacher.encoder.layers:
            layer.attn.relative_bias.normal_(0, 1.0)
    same = BertForMLM(_cfg(relative_attention=4)).eval()
    init_from_teacher(same, teacher, "teacher", "slice")
    ids = _ids()
    with torch.no_grad():
        assert_close(same(ids).logits, teacher(ids).logits)
    for other in (_cfg(), _cfg(relative_attention=2)):
        with pytest.raises(UserError, match="relative_attention"):
            init_from_teacher(BertForMLM(other), teacher, "teacher", "slice")
    with pytest.raises(UserError, match="relative-position biases"):  # narrower blocks cut from the teacher's
        init_from_teacher(BertForMLM(_cfg(hidden_size=16, num_heads=2, relative_attention=4)), teacher, "teacher",
                          "slice", narrow="slice")


def test_narrower_students_slice_or_project_the_embeddings(tmp_path):
    teacher = _teacher()
    narrow = BertForMLM(_cfg(hidden_size=16, num_heads=2, intermediate_size=32))
    init_from_teacher(narrow, teacher, "teacher", "slice")
    assert torch.equal(narrow.encoder.embeddings.word.weight, teacher.encoder.embeddings.word.weight[:, :16])
    assert torch.equal(narrow.head.bias, teacher.head.bias)
    proj = BertForMLM(_cfg(hidden_size=16, num_heads=2, intermediate_size=32))
    init_from_teacher(proj, teacher, "teacher", "project")
    w = teacher.encoder.embeddings.word.weight
    _, _, vh = torch.linalg.svd(w - w.mean(0), full_matrices=False)
    assert_close(proj.encoder.embeddings.word.weight, w @ vh[:16].T)
    # the projection keeps more of the embeddings' variance than the slice (what it is for)
    assert (proj.encoder.embeddings.word.weight.var(0).sum() > narrow.encoder.embeddings.word.weight.var(0).sum())


def test_layers_that_cannot_be_copied_are_refused_when_asked_for_and_warned_about_by_default(caplog):
    teacher = _teacher()
    narrow = BertForMLM(_cfg(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2))
    with pytest.raises(UserError, match="blocks have the teacher's shape.*init=random"):
        init_from_teacher(narrow, teacher, [1, 3], "slice")
    with caplog.at_level("WARNING", logger="clueforge.distill"):
        init_from_teacher(narrow, teacher, "teacher", "slice")
    assert any(r.levelname == "WARNING" and "layers start random" in r.getMessage() for r in caplog.records)
    # the task path takes no layer list, so its message does not suggest one
    deep = BertForMLM(_cfg(num_layers=6))
    with pytest.raises(UserError, match="init=random") as exc:
        init_from_teacher(deep, teacher, "teacher", "slice", lists=False)
    assert "list" not in str(exc.value)


def _qkv_rows(W: torch.Tensor, Dt: int, dh_t: int, heads, dh_s: int, q_scale: float = 1.0) -> torch.Tensor:
    """The fused QKV rows of ``heads`` (each cut to its first ``dh_s`` dims), Q rows scaled, by hand."""
    rows = []
    for part in range(3):
        for h in heads:
            start = part * Dt + h * dh_t
            rows.append(W[start:start + dh_s] * (q_scale if part == 0 else 1.0))
    return torch.cat(rows)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_sliced_blocks_are_the_teachers_sub_blocks_by_hand(pre_ln):
    teacher = _teacher(pre_ln=pre_ln)  # 4 layers, 32 wide, 4 heads of 8, ffn 64
    student = BertForMLM(_cfg(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, pre_ln=pre_ln))
    record = init_from_teacher(student, teacher, "teacher", "slice", narrow="slice")
    assert record == {"teacher_layers": [2, 4], "blocks": "slice", "embeddings": "slice", "heads": [[0, 1], [0, 1]]}
    d = 16
    for i, j in enumerate([2, 4]):
        s, t = student.encoder.layers[i], teacher.encoder.layers[j - 1]
        # residual dims 0..15 (the sliced embeddings'), heads 0 and 1 (all 8 dims each), ffn units 0..31
        assert torch.equal(s.attn.qkv.weight, _qkv_rows(t.attn.qkv.weight, 32, 8, [0, 1], 8)[:, :d])
        assert torch.equal(s.attn.qkv.bias, _qkv_rows(t.attn.qkv.bias, 32, 8, [0, 1], 8))
        assert torch.equal(s.attn.out.weight, t.attn.out.weight[:d, :16])
        assert torch.equal(s.attn.out.bias, t.attn.out.bias[:d])
        assert torch.equal(s.mlp_in.weight, t.mlp_in.weight[:32, :d])
        assert torch.equal(s.mlp_in.bias, t.mlp_in.bias[:32])
        assert torch.equal(s.mlp_out.weight, t.mlp_out.weight[:d, :32])
        assert torch.equal(s.mlp_out.bias, t.mlp_out.bias[:d])
        for ln in ("ln1", "ln2"):
            assert torch.equal(getattr(s, ln).weight, getattr(t, ln).weight[:d])
            assert torch.equal(getattr(s, ln).bias, getattr(t, ln).bias[:d])
    assert torch.equal(student.head.dense.weight, teacher.head.dense.weight[:d, :d])
    assert torch.equal(student.head.dense.bias, teacher.head.dense.bias[:d])
    assert torch.equal(student.head.ln.weight, teacher.head.ln.weight[:d])
    if pre_ln:
        assert torch.equal(student.encoder.final_ln.weight, teacher.encoder.final_ln.weight[:d])
    assert torch.equal(student.encoder.embeddings.position.weight, teacher.encoder.embeddings.position.weight[:, :d])


def test_narrower_heads_keep_their_first_dims_and_the_teachers_score_scale():
    teacher = _teacher()  # heads of 8
    student = BertForMLM(_cfg(hidden_size=16, num_layers=1, num_heads=4, intermediate_size=64))  # 4 heads of 4
    init_from_teacher(student, teacher, [3], "slice", narrow="slice")
    t = teacher.encoder.layers[2]
    W = _qkv_rows(t.attn.qkv.weight, 32, 8, [0, 1, 2, 3], 4, q_scale=math.sqrt(4 / 8))
    assert_close(student.encoder.layers[0].attn.qkv.weight, W[:, :16], rtol=0, atol=0)
    cols = [h * 8 + k for h in range(4) for k in range(4)]
    assert torch.equal(student.encoder.layers[0].attn.out.weight, t.attn.out.weight[:16][:, cols])
    assert torch.equal(student.encoder.layers[0].mlp_in.weight, t.mlp_in.weight[:, :16])  # ffn at full width


def test_magnitude_keeps_the_heads_and_units_of_largest_weight_norm():
    teacher = _teacher()
    with torch.no_grad():
        for layer in teacher.encoder.layers:
            qkv = layer.attn.qkv.weight.view(3, 4, 8, 32)
            qkv[:, 1].mul_(3)
            qkv[:, 3].mul_(3)  # heads 1 and 3 dominate
            layer.mlp_in.weight[32:].mul_(3)  # units 32..63 dominate
    student = BertForMLM(_cfg(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32))
    record = init_from_teacher(student, teacher, "teacher", "slice", narrow="magnitude")
    assert record["heads"] == [[1, 3], [1, 3]]
    s, t = student.encoder.layers[1], teacher.encoder.layers[3]
    assert torch.equal(s.attn.qkv.weight, _qkv_rows(t.attn.qkv.weight, 32, 8, [1, 3], 8)[:, :16])
    assert torch.equal(s.attn.out.weight, t.attn.out.weight[:16][:, list(range(8, 16)) + list(range(24, 32))])
    assert torch.equal(s.mlp_in.weight, t.mlp_in.weight[32:, :16])
    assert torch.equal(s.mlp_out.weight, t.mlp_out.weight[:16, 32:])


def _mlm_kl(student: BertForMLM, teacher: BertForMLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(soft_kl(student(ids).logits.flatten(0, 1), teacher(ids).logits.flatten(0, 1)))


def _mostly_narrow_teacher(pre_ln: bool) -> BertForMLM:
    """A random teacher (std 0.2) whose weights beyond a 16-wide, 2-head, 32-unit sub-model are
    scaled by 0.1: its function lives mostly where a first-dimensions slice looks (a random
    teacher has no such structure, and halving it is then no better than random layers)."""
    teacher = _teacher(pre_ln=pre_ln, initializer_range=0.2)
    with torch.no_grad():
        emb = teacher.encoder.embeddings
        for table in (emb.word, emb.position, emb.token_type):
            table.weight[:, 16:].mul_(0.1)
        for layer in teacher.encoder.layers:
            qkv = layer.attn.qkv.weight.view(3, 4, 8, 32)
            qkv[:, 2:].mul_(0.1)
            qkv[..., 16:].mul_(0.1)
            layer.attn.out.weight[16:].mul_(0.1)
            layer.attn.out.weight[:, 16:].mul_(0.1)
            layer.mlp_in.weight[32:].mul_(0.1)
            layer.mlp_in.weight[:, 16:].mul_(0.1)
            layer.mlp_out.weight[16:].mul_(0.1)
    return teacher


@pytest.mark.parametrize("pre_ln", [False, True])
def test_a_sliced_narrow_student_is_closer_to_its_teacher_than_a_random_one(pre_ln):
    """On a fixed batch, KL(teacher ‖ student) of the MLM predictions at every position: the
    sliced student beats, for every seed, (a) the same student with only its blocks re-drawn at
    random (everything else sliced alike) and (b) a ``narrow_layers=random`` student."""
    from clueforge.model.bert import init_weights

    teacher = _mostly_narrow_teacher(pre_ln)
    ids = _ids(B=4, T=16)
    for seed in range(3):
        kl = {}
        for narrow in ("slice", "random"):
            torch.manual_seed(seed)
            student = BertForMLM(_cfg(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                      pre_ln=pre_ln)).eval()
            init_from_teacher(student, teacher, "teacher", "slice", narrow=narrow)
            kl[narrow] = _mlm_kl(student, teacher, ids)
            if narrow == "slice":
                torch.manual_seed(seed)
                init_weights(student.encoder.layers, student.cfg.initializer_range)
                kl["blocks_redrawn"] = _mlm_kl(student, teacher, ids)
        assert kl["slice"] < 0.7 * kl["random"] and kl["slice"] < 0.7 * kl["blocks_redrawn"], kl


def test_a_slicing_that_cannot_apply_is_refused_in_one_line():
    teacher = _teacher()  # 32 wide, 4 heads of 8, ffn 64, post-LN
    cases = [(dict(hidden_size=16, num_heads=1), "1 heads of 16 do not fit in the teacher's 4 heads of 8"),
             (dict(hidden_size=48, num_heads=6), "hidden size 48 exceeds"),
             (dict(hidden_size=16, num_heads=2, intermediate_size=128), "feed-forward width 128 exceeds"),
             (dict(hidden_size=16, num_heads=2, pre_ln=True), "pre-LN, the teacher post-LN")]
    for kw, msg in cases:
        student = BertForMLM(_cfg(num_layers=2, intermediate_size=kw.pop("intermediate_size", 32), **kw))
        with pytest.raises(UserError, match=msg) as exc:
            init_from_teacher(student, teacher, "teacher", "slice", narrow="slice")
        assert "\n" not in str(exc.value) and "narrow_layers=random" in str(exc.value)
    student = BertForMLM(_cfg(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2))
    with pytest.raises(UserError, match="embeddings=project rotates"):
        init_from_teacher(student, teacher, "teacher", "project", narrow="magnitude")


@pytest.mark.parametrize("name", ["mini", "micro", "nano", "pico"])
def test_shipped_students_have_the_ernie_tiny_shapes(name):
    from clueforge.pretrain.config import load_config

    shapes = {"mini": (6, 384, 12), "micro": (4, 384, 12), "nano": (4, 312, 12), "pico": (3, 128, 2)}
    cfg = load_config(STUDENT_DIR / f"{name}.yaml").model
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == shapes[name]
    assert cfg.intermediate_size == 4 * cfg.hidden_size
    assert load_config(f"students/{name}").model == cfg  # `pretrain --config students/NAME` (the baseline)


def test_the_aux_layer_is_dropped_exactly():
    base = _teacher(num_layers=2)
    aux = with_aux_layer(base).eval()
    assert aux.cfg.num_layers == 3
    assert torch.equal(aux.encoder.layers[2].attn.qkv.weight, base.encoder.layers[1].attn.qkv.weight)
    back = drop_aux_layer(aux).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, base(ids).logits)


# ---------------------------------------------------------------------------------------------
# Task-agnostic distillation through the pretraining loop (tiny teacher, sample corpus)

import json  # noqa: E402
import shutil  # noqa: E402

from clueforge.utils import UserError  # noqa: E402

LOOP = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=1", "train.prefetch=1",
        "train.peak_tflops=1.0", "train.seq_len=64", "train.batch_size=8", "train.lr=1.0e-3"]
STUDENT = ("model: {hidden_size: 16, num_layers: 2, num_heads: 2, intermediate_size: 32, max_position: 64}\n"
           "train: {max_steps: 6, save_every: 3}\n")


@pytest.fixture(scope="module")
def kd_setup(tmp_path_factory, sample_corpus):
    """A random 4-layer teacher on the sample vocabulary and a 2-layer student YAML."""
    from clueforge.model.hf import save_hf

    root = tmp_path_factory.mktemp("kd")
    vocab = sample_corpus / "vocab.txt"
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    teacher = BertForMLM(ModelConfig(vocab_size=n, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                                     max_position=64))
    save_hf(teacher, root / "teacher", vocab=vocab)
    (root / "student.yaml").write_text(STUDENT)
    return root / "teacher", root / "student.yaml"


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _distill(kd_setup, corpus, out, *overrides, allow=False):
    from clueforge.distill.agnostic import distill, load_distill_config

    teacher, student = kd_setup
    cfg = load_distill_config(teacher, student, LOOP + list(overrides))
    return distill(cfg, corpus, out, show_progress=False, allow_config_change=allow)


@pytest.mark.slow
def test_every_loss_is_logged_and_the_total_is_their_weighted_sum(kd_setup, sample_corpus, tmp_path):
    _distill(kd_setup, sample_corpus, tmp_path / "r", "train.max_steps=2", "distill.relation_weight=0.5",
             "distill.hidden_weight=2.0", "distill.soft_weight=0.25", "distill.temperature=2.0",
             "distill.mlm_weight=0.75", "distill.relation_layer=0.75", "distill.relation_heads=4",
             "distill.embeddings=project")
    for r in _metrics(tmp_path / "r"):
        total = 0.75 * r["mlm_loss"] + 0.25 * r["soft_kl"] + 0.5 * r["relation_kl"] + 2.0 * r["hidden_mse"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert r["hidden_mse"] > 0.1 and r["relation_kl"] > 1e-4 and r["soft_kl"] > 1e-4
    state = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert state["distill"]["relation_layer"] == 0.75 and state["teacher"].endswith("teacher")
    ck = tmp_path / "r" / "checkpoints" / "step-2"
    assert (ck / "aux.safetensors").is_file()  # the hidden projection (16 → 32) is checkpointed, not exported


@pytest.mark.slow
def test_model_overrides_reach_a_config_student(kd_setup, sample_corpus, tmp_path):
    """``--set model.K=V`` changes the student built from a YAML (and what final/config.json says)."""
    _distill(kd_setup, sample_corpus, tmp_path / "r", "train.max_steps=1", "model.num_layers=1", "model.dropout=0.0")
    written = json.loads((tmp_path / "r" / "final" / "config.json").read_text())
    assert written["num_hidden_layers"] == 1 and written["hidden_dropout_prob"] == 0.0


@pytest.mark.slow
def test_with_every_teacher_term_off_distillation_is_pretraining_the_student_alone(kd_setup, sample_corpus, tmp_path):
    """The off switch: relation, hidden and soft weights 0 and a random student is plain MLM
    pretraining of that shape: the same weights, bit for bit (the teacher's forward touches nothing)."""
    from clueforge.pretrain.config import load_config
    from clueforge.pretrain.loop import pretrain

    off = ["distill.relation_weight=0", "distill.soft_weight=0", "distill.hidden_weight=0", "distill.init=random"]
    kd = _distill(kd_setup, sample_corpus, tmp_path / "kd", "train.max_steps=3", *off)
    cfg = load_config(kd_setup[1], LOOP + ["train.max_steps=3"])
    plain = pretrain(cfg, sample_corpus, tmp_path / "plain", show_progress=False)
    assert kd["state_sha"] == plain["state_sha"]
    assert [r["loss"] for r in _metrics(tmp_path / "kd")] == [r["loss"] for r in _metrics(tmp_path / "plain")]
    on = _distill(kd_setup, sample_corpus, tmp_path / "on", "train.max_steps=3", "distill.init=random")
    assert on["state_sha"] != plain["state_sha"]  # the teacher terms do change the student


@pytest.mark.slow
def test_distillation_resumes_exactly_and_refuses_a_changed_setting(kd_setup, sample_corpus, tmp_path):
    from clueforge.model.hf import load_hf, load_hf_task
    from clueforge.pretrain.loop import state_digest

    ref = _distill(kd_setup, sample_corpus, tmp_path / "ref", "distill.hidden_weight=1.0")
    cut = tmp_path / "cut"
    _distill(kd_setup, sample_corpus, cut, "distill.hidden_weight=1.0")
    # as if killed after the step-3 checkpoint: later state gone, a half-written checkpoint left
    shutil.rmtree(cut / "checkpoints" / "step-6")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "step-6.tmp").mkdir()
    with pytest.raises(UserError, match="distill"):
        _distill(kd_setup, sample_corpus, cut, "distill.hidden_weight=1.0", "distill.temperature=3.0")
    res = _distill(kd_setup, sample_corpus, cut, "distill.hidden_weight=1.0")
    assert res["state_sha"] == ref["state_sha"]
    assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in _metrics(tmp_path / "ref")]
    student = load_hf(cut / "final")  # the HF layout `finetune` takes: 2 layers, width 16
    assert (student.cfg.num_layers, student.cfg.hidden_size) == (2, 16) and state_digest(student) == ref["state_sha"]
    load_hf_task(cut / "final", "sequence", 3)
    # an allowed change is applied and recorded
    _distill(kd_setup, sample_corpus, cut, "distill.hidden_weight=1.0", "distill.temperature=3.0",
             "train.max_steps=7", allow=True)
    history = json.loads((cut / "config.json").read_text())["history"]
    assert any("distill" in h["changes"] for h in history)


def test_narrow_layers_reach_the_student_through_the_distill_config(kd_setup):
    from clueforge.distill.agnostic import build_distill_model, load_distill_config
    from clueforge.model.hf import load_hf

    teacher_dir, student = kd_setup
    teacher = load_hf(teacher_dir)
    for narrow, blocks in (("slice", "slice"), ("random", "random")):
        cfg = load_distill_config(teacher_dir, student, LOOP + [f"distill.narrow_layers={narrow}"])
        model, _ = build_distill_model(cfg, teacher, teacher.cfg.vocab_size)
        assert model.student_init["blocks"] == blocks
        first = teacher.encoder.layers[1].mlp_in.weight[:32, :16]  # student layer 1 = teacher layer 2, cut
        sliced = torch.equal(model.mlm.encoder.layers[0].mlp_in.weight, first)
        assert sliced == (narrow == "slice")


def test_distill_settings_are_validated(kd_setup, tmp_path):
    from clueforge.distill.agnostic import load_distill_config
    from clueforge.pretrain.config import load_config

    teacher, student = kd_setup
    for bad, msg in ((["distill.temperature=0"], "temperature"), (["distill.init=[9, 1]"], "init"),
                     (["distill.embeddings=pad"], "embeddings"),
                     (["distill.narrow_layers=first"], "narrow_layers"),
                     (["distill.relation_layer=0"], "relation_layer"),
                     (["distill.mlm_weight=0", "distill.soft_weight=0", "distill.relation_weight=0"], "mlm_weight"),
                     (["distill.aux_layer=true"], "aux_layer"), (["train.self_distill_instance=0.5"], "self_distill")):
        with pytest.raises(UserError, match=msg):
            cfg = load_distill_config(teacher, student, bad)
            from clueforge.distill.student import teacher_layers
            teacher_layers(cfg.distill.init, 4, 2)  # the layer list is checked against the teacher when built
    with pytest.raises(UserError, match="relation_heads"):
        from clueforge.distill.agnostic import relation_heads
        cfg = load_distill_config(teacher, student, ["distill.relation_heads=3"])
        relation_heads(cfg.distill, cfg.model, ModelConfig(hidden_size=32, num_heads=4))
    for bad in ("{a: {student: pico, temperature: -1}}", "{a: {studnet: pico}}", "[pico]", "{a: 3}"):
        with pytest.raises(UserError, match="students"):
            load_config("tiny", [f"train.students={bad}"])
    with pytest.raises(UserError, match="self_distill_instance"):
        load_config("tiny", ["train.students={a: {student: pico}}", "train.self_distill_instance=0.5"])
    with pytest.raises(UserError, match="ar_mlm_groups"):
        load_distill_config(teacher, student, ["train.ar_mlm_groups=2"])
    with pytest.raises(UserError, match="ar_mlm_groups"):
        load_config("tiny", ["train.students={a: {student: pico}}", "train.ar_mlm_groups=2"])
    load_config("tiny", ["train.ar_mlm_groups=2"])  # without students it stays allowed


# ---------------------------------------------------------------------------------------------
# Online distillation: students follow a pretraining teacher

ONLINE_STUDENT = "model: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32, max_position: 64}\n"


def _online(sample_corpus, out, students, *overrides):
    from clueforge.pretrain.config import load_config
    from clueforge.pretrain.loop import pretrain

    extra = [f"train.students={students}"] if students else []
    cfg = load_config("tiny", LOOP + ["train.max_steps=4", "train.save_every=2", "train.eval_every=4"] + extra
                      + list(overrides))
    return pretrain(cfg, sample_corpus, out, show_progress=False)


@pytest.mark.slow
def test_online_students_leave_the_teachers_updates_unchanged(sample_corpus, tmp_path):
    """Dropout on everywhere (tiny: 0.1): the teacher's weights after 4 steps are bit-identical with
    and without two students, one with the auxiliary layer, one with the hidden projection."""
    yml = tmp_path / "s.yaml"
    yml.write_text(ONLINE_STUDENT)
    students = (f"{{a: {{student: {yml}, relation_layer: 1, temperature: 2.0}}, "
                f"b: {{student: {yml}, aux_layer: false, hidden_weight: 1.0, init: random}}}}")
    alone = _online(sample_corpus, tmp_path / "alone", None)
    with_students = _online(sample_corpus, tmp_path / "with", students)
    assert with_students["state_sha"] == alone["state_sha"]
    last = _metrics(tmp_path / "with")[-1]
    assert last["loss"] == _metrics(tmp_path / "alone")[-1]["loss"]
    for k in ("student_a_relation_kl", "student_a_soft_kl", "student_b_hidden_mse", "student_a_eval_fixed_loss",
              "student_a_aux_eval_fixed_loss"):
        assert k in last
    assert "student_b_aux_eval_fixed_loss" not in last  # b has no auxiliary layer
    # the students learn: their weights move between the checkpoints at steps 2 and 4
    from safetensors.torch import load_file
    for name in ("a", "b"):
        w2, w4 = (load_file(tmp_path / "with" / "checkpoints" / f"step-{s}" / "students" / name / "model.safetensors")
                  for s in (2, 4))
        assert w2.keys() == w4.keys()
        assert any(not torch.equal(w2[k], w4[k]) for k in w2), f"student {name} did not change"


@pytest.mark.slow
def test_online_student_export_drops_the_aux_layer_and_resumes_exactly(sample_corpus, tmp_path):
    from clueforge.distill.student import drop_aux_layer
    from clueforge.model.hf import from_hf_state_dict, load_hf
    from safetensors.torch import load_file

    yml = tmp_path / "s.yaml"
    yml.write_text(ONLINE_STUDENT)
    students = f"{{a: {{student: {yml}, hidden_weight: 1.0}}}}"
    ref = _online(sample_corpus, tmp_path / "ref", students)
    exported = load_hf(ref["students"]["a"])
    assert exported.cfg.num_layers == 1  # the auxiliary layer was dropped
    ck = tmp_path / "ref" / "checkpoints" / "step-4" / "students" / "a"
    learning = BertForMLM(ModelConfig(**{**exported.cfg.__dict__, "num_layers": 2}))
    from_hf_state_dict(learning, load_file(ck / "model.safetensors"), strict_head=True)  # it learnt with 2 blocks
    ids = _ids(T=10)
    with torch.no_grad():
        assert torch.equal(drop_aux_layer(learning).eval()(ids).logits, exported.eval()(ids).logits)
    cut = tmp_path / "cut"
    _online(sample_corpus, cut, students)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "students")
    res = _online(sample_corpus, cut, students)
    assert res["state_sha"] == ref["state_sha"]
    from clueforge.pretrain.loop import state_digest
    assert state_digest(load_hf(res["students"]["a"])) == state_digest(exported)
    assert [r["student_a_loss"] for r in _metrics(cut)] == [r["student_a_loss"] for r in _metrics(tmp_path / "ref")]
    with pytest.raises(UserError, match="students"):  # a changed student on resume is refused
        _online(sample_corpus, cut, f"{{a: {{student: {yml}, hidden_weight: 2.0}}}}", "train.max_steps=6")


@pytest.mark.slow
def test_distill_command_writes_a_student_and_reports_user_errors_in_one_line(kd_setup, sample_corpus, tmp_path):
    from typer.testing import CliRunner

    from clueforge.cli import app

    teacher, student = kd_setup
    args = ["distill", "--teacher", str(teacher), "--data", str(sample_corpus), "--out", str(tmp_path / "kd"),
            "--no-progress", "--max-steps", "2"] + sum((["--set", s] for s in LOOP), [])
    r = CliRunner().invoke(app, args + ["--student", str(student), "--set", "distill.narrow_layers=slice"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"].endswith("final")
    assert summary["student_init"] == {"teacher_layers": [2, 4], "blocks": "slice", "embeddings": "slice",
                                       "heads": [[0, 1], [0, 1]]}
    cfg = json.loads((tmp_path / "kd" / "config.json").read_text())["config"]
    assert cfg["distill"]["narrow_layers"] == "slice"
    r = CliRunner().invoke(app, args + ["--student", "femto"])
    assert r.exit_code == 2 and "femto" in r.output and "pico" in r.output and "Traceback" not in r.output
    fresh = [str(tmp_path / "ar") if a == str(tmp_path / "kd") else a for a in args]  # not a resume of kd
    r = CliRunner().invoke(app, fresh + ["--student", str(student), "--set", "train.ar_mlm_groups=2"])
    assert r.exit_code == 2 and "ar_mlm_groups" in r.output and "Traceback" not in r.output, r.output
