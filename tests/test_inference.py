import warnings

import pytest
import torch

from clueforge.model.bert import ModelConfig
from clueforge.model.heads import SequenceClassifier
from clueforge.model.inference import optimize_for_inference


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=64)
    m = SequenceClassifier(cfg, 3).eval()
    with torch.no_grad():  # a classifier with real margins, so argmax agreement is meaningful
        m.classifier.weight.mul_(50)
    ids = torch.randint(5, 500, (64, 32))
    mask = torch.ones_like(ids)
    mask[::3, 20:] = 0
    return m, ids, mask


@pytest.mark.parametrize("mode,atol", [("fp32", 0.0), ("bf16", 0.15), ("int8", 0.15)])
def test_fast_inference_matches_fp32(model_and_inputs, mode, atol):
    m, ids, mask = model_and_inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = optimize_for_inference(m, mode)
    with torch.inference_mode():
        ref = m(ids, mask)[1]
        got = fast(ids, mask)[1].float()
    assert (got - ref).abs().max().item() <= atol
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95
    if mode != "fp32":
        assert not torch.equal(got, ref)  # it really is another computation
    assert next(m.parameters()).dtype == torch.float32  # the original is untouched


def test_unknown_mode():
    with pytest.raises(ValueError, match="int4"):
        optimize_for_inference(torch.nn.Linear(2, 2), "int4")
