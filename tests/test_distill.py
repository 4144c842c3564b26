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
