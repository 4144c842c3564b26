"""Self-distillation computes what it claims: the instance KL pairs the two passes of the same
rows; layer taps are read by the MLM head as the final layer is (pre-LN: through the final LN)."""

import types

import pytest
import torch
from torch.testing import assert_close

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.pretrain.model import PretrainingModel, mlm_objective


def _model(pre_ln=False, dropout=0.0, layers=3):
    torch.manual_seed(0)
    return PretrainingModel(BertForMLM(ModelConfig(vocab_size=101, hidden_size=32, num_layers=layers, num_heads=4,
                                                   intermediate_size=64, max_position=32, dropout=dropout,
                                                   attention_dropout=dropout, pre_ln=pre_ln)))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 101, (4, 20), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1::4] = ids[:, 1::4]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train_cfg(**kw):
    base = dict(self_distill_instance=0.0, self_distill_layers=None, self_distill_layer_weight=1.0,
                structure_weights=None, knowledge_weights=None)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("pre_ln", [False, True])
def test_tapping_the_last_layer_reproduces_the_final_logits(pre_ln):
    """A tap is read by the head exactly as the final output is: tapping layer L gives the final
    logits (pre-LN without the final LayerNorm it did not)."""
    m = _model(pre_ln=pre_ln).eval()
    b = _batch()
    with torch.no_grad():
        o = m(**b, distill_layers=(3,))
    assert_close(o.layer_logits[0], o.logits)


def test_instance_kl_pairs_the_two_passes_of_the_same_rows():
    b = _batch()
    t = _train_cfg(self_distill_instance=1.0)
    _, o, parts = mlm_objective(_model(dropout=0.0).train(), b, t)
    assert o.logits.shape[0] == 2 * int((b["labels"] != -100).sum())  # the batch ran twice
    assert parts["sd_instance_kl"].item() < 1e-6  # same rows, no dropout: identical predictions
    # rows paired with other rows would not agree, dropout off or not
    m = o.logits.shape[0] // 2
    from clueforge.model.losses import symmetric_kl
    assert symmetric_kl(o.logits[:m], o.logits[m:].roll(5, 0)).item() > 1e-3
    _, _, parts = mlm_objective(_model(dropout=0.3).train(), b, t)
    assert parts["sd_instance_kl"].item() > 1e-4  # two dropout masks: the passes differ
