"""The masking options of ``TrainConfig`` reach the batches the loop trains on: each assertion
fails if its option does nothing (masks are read from the batches the collator made)."""

import numpy as np
import pytest
import torch

from clueforge.pretrain.config import load_config
from clueforge.pretrain.data import Collator
from clueforge.pretrain.loop import pretrain
from clueforge.pretrain.masking import _groups

pytestmark = pytest.mark.slow


def _training_batches(tmp_path, corpus, overrides, monkeypatch):
    """``[(collator, rows, batch)]`` of the training steps of a short run."""
    seen = []
    call = Collator.__call__

    def record(self, rows, rng, progress=0.0):
        batch = call(self, rows, rng, progress=progress)
        seen.append((progress, self, rows, batch))
        return batch

    monkeypatch.setattr(Collator, "__call__", record)
    cfg = load_config("tiny", ["train.max_steps=4", "train.log_every=4", "train.eval_every=0", "train.eval_batches=1",
                               "train.peak_tflops=1.0", "train.prefetch=1", *overrides])
    pretrain(cfg, corpus, tmp_path / "run", show_progress=False)
    monkeypatch.undo()
    return [(col, rows, b) for p, col, rows, b in seen if p < 1.0]  # not evaluation, not prefetched past the end


def test_masking_weights_and_replacement_probs_reach_the_batches(tmp_path, sample_corpus, monkeypatch, one_thread):
    batches = _training_batches(tmp_path, sample_corpus, [
        "train.masking=wwm", "train.masking_weights={token: 1.0}", "train.mask_token_prob=0.5",
        "train.random_token_prob=0.3"], monkeypatch)
    assert len(batches) >= 4
    mask_id = batches[0][0].mask
    counts = np.zeros(3)
    hit, split = 0, 0
    for col, rows, b in batches:
        for i, r in enumerate(rows):
            row, _ = col._row(*r)
            n = row.ids.size
            inp, lab = b["input_ids"][i][:n], b["labels"][i][:n]
            sel = lab != -100
            counts += [np.sum(inp[sel] == mask_id), np.sum((inp[sel] != mask_id) & (inp[sel] != lab[sel])),
                       np.sum(inp[sel] == lab[sel])]
            for s, k in _groups(row.word + 1):
                part = int(sel[s:s + k].sum())
                hit += k > 1 and part > 0
                split += 0 < part < k
    # masking_weights (token) over masking (wwm): words are split (wwm splits none beyond a
    # remainder of < 4 tokens a row)
    assert split > 0.3 * hit, (split, hit)
    # mask_token_prob / random_token_prob: token units, so binomial; 4.5 standard deviations
    share, total = counts / counts.sum(), counts.sum()
    for got, p in zip(share, (0.5, 0.3, 0.2)):
        assert abs(got - p) < 4.5 * np.sqrt(p * (1 - p) / total) + 0.003, (share, total)
