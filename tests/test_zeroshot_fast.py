"""Zero-shot fast path: the encoder's last layer only at the [MASK] rows (``Encoder.forward_at``,
``word_logprobs(at_masks=True)``) against the plain full forward, in fp32 and bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.model.inference import optimize_for_inference
from clueforge.prompts.score import PromptEncoder, calibrate, example_rows, score_examples
from clueforge.prompts.spec import Template
from clueforge.text.tokenizer import load_tokenizer

CHARS = "今天好坏不很满意的东西个人说是一二三四五六七八非常差"


def _tiny(tmp: Path, pre_ln: bool):
    v = tmp / "vocab.txt"
    v.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(CHARS))) + "\n", encoding="utf-8")
    tok = load_tokenizer(v)
    torch.manual_seed(0)
    model = BertForMLM(ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=3, num_heads=4,
                                   intermediate_size=64, max_position=64, pre_ln=pre_ln)).eval()
    return tok, model


@pytest.mark.parametrize("pre_ln", [False, True])
def test_forward_at_equals_the_full_forward_read_there(pre_ln, tmp_path):
    _, model = _tiny(tmp_path, pre_ln)
    ids = torch.randint(5, 30, (3, 11))
    att = torch.ones(3, 11, dtype=torch.long)
    att[1, 7:] = 0  # padding: the mask reaches the last layer's keys
    at = torch.tensor([[1, 2, 3], [0, 5, 6], [8, 9, 10]])
    with torch.inference_mode():
        full = model.encoder(ids, att)  # (B, T, D)
        got = model.encoder.forward_at(ids, att, at)  # (B, Q, D)
    torch.testing.assert_close(got, full.gather(1, at[:, :, None].expand(-1, -1, full.shape[-1])), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_word_scores_fast_path_equal_the_plain_path_and_skip_the_last_layer(pre_ln, tmp_path):
    """Words of 1 and 3 tokens (two rows per example, different mask counts in one batch), rows of
    different lengths (padding), PMI and contextual calibration: the fast path's scores equal the
    plain path's (fp32: 1e-5; bf16: the same predictions, scores within 0.05 nats of fp32); the last
    layer's MLP sees only the [MASK] rows (fails with the fast path switched off)."""
    tok, model = _tiny(tmp_path, pre_ln)
    t = Template("t", "{sentence}。[MASK]意", {"0": "不", "1": "非常差", "2": "好"}, "mean")
    enc = PromptEncoder(tok, t, 64)
    slots = [{"sentence": s} for s in ("今天好", "东西很不好的一二三四五六七八", "", "个人说是")]
    words = [["不", "非常差", "好"]] * len(slots)
    seen = []
    hook = model.encoder.layers[-1].mlp_in.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:-1].numel()))
    with torch.inference_mode():
        plain = score_examples(model, enc, slots, words, batch_size=3, at_masks=False)
        plain_rows = sum(seen)
        seen.clear()
        fast = score_examples(model, enc, slots, words, batch_size=3)
    hook.remove()
    rows, queries, _ = example_rows(enc, slots, words)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = [order[b:b + 3] for b in range(0, len(order), 3)]
    assert plain_rows == sum(len(b) * max(len(rows[i][0]) for i in b) for b in batches)  # (B, T) per batch
    assert sum(seen) == sum(len(b) * max(queries[i].shape[1] for i in b) for b in batches) < plain_rows / 3
    for p, f in zip(plain, fast):
        np.testing.assert_allclose(f, p, atol=1e-5)
    with torch.inference_mode():
        for method in ("pmi", "contextual"):
            a = calibrate(model, enc, plain, words, ["sentence"], method, at_masks=False)
            b = calibrate(model, enc, fast, words, ["sentence"], method)
            for x, y in zip(a, b):
                np.testing.assert_allclose(y, x, atol=1e-5)
        bf16 = score_examples(optimize_for_inference(model, "bf16"), enc, slots, words, batch_size=3)
    for p, b in zip(plain, bf16):
        np.testing.assert_allclose(b, p, atol=0.05)
        assert np.argmax(b) == np.argmax(p)
