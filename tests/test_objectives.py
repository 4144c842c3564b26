"""Structure objectives: exact labels on the sample corpus, and their place in the loop."""

import itertools
import json

import numpy as np
import pytest

from clueforge.corpus.shards import Corpus
from clueforge.pretrain.config import load_config
from clueforge.pretrain.objectives import StructureData, label_to_permutation, n_reorder_classes, permutation_label
from clueforge.text.tokenizer import load_tokenizer, special_ids


def test_permutation_labels_are_a_bijection():
    labels = [permutation_label(p) for k in (1, 2, 3) for p in itertools.permutations(range(k))]
    assert sorted(labels) == list(range(n_reorder_classes(3))) == list(range(9))
    for k in (1, 2, 3, 4):
        for p in itertools.permutations(range(k)):
            assert label_to_permutation(permutation_label(p)) == p


@pytest.fixture(scope="module")
def data(sample_corpus):
    tok = load_tokenizer(sample_corpus / "vocab.txt")
    return StructureData(Corpus(sample_corpus), special_ids(tok), seq_len=64, max_segments=3), special_ids(tok)


def test_reordering_label_restores_the_passage(data):
    sd, sp = data
    seen = set()
    for seed in range(200):
        ids, label, segments = sd.reorder(np.random.default_rng(seed))
        perm = label_to_permutation(label)
        seen.add(len(perm))
        assert ids[0] == sp["cls"] and ids[-1] == sp["sep"] and ids.size <= 64
        shuffled, pos = [], 1
        for p in perm:  # cut the input back into its segments, in the order they appear
            shuffled.append(ids[pos:pos + segments[p].size])
            pos += segments[p].size
        restored = [None] * len(perm)
        for slot, p in enumerate(perm):
            restored[p] = shuffled[slot]
        assert np.array_equal(np.concatenate(restored), np.concatenate(segments))
    assert seen == {1, 2, 3}


def test_distance_labels_are_exact(data):
    sd, sp = data
    counts = [0, 0, 0]
    for seed in range(300):
        ids, types, label, (i, j) = sd.distance(np.random.default_rng(seed))
        counts[label] += 1
        same_doc = sd.s_doc[i] == sd.s_doc[j]
        if label == 0:
            assert same_doc and j == i + 1
        elif label == 1:
            assert same_doc and abs(j - i) > 1
        else:
            assert not same_doc
        a = ids.tolist().index(sp["sep"])
        assert (types[: a + 1] == 0).all() and (types[a + 1:] == 1).all() and ids[-1] == sp["sep"]
    assert min(counts) > 60


@pytest.mark.slow
def test_structure_objectives_in_the_loop_logged_and_resumable(sample_corpus, tmp_path):
    from clueforge.pretrain.loop import pretrain

    base = ["train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.save_every=2"]
    on = base + ["train.structure_weights={reorder: 1.0, distance: 1.0}"]
    pretrain(load_config("tiny", base + ["train.max_steps=2"]), sample_corpus, tmp_path / "plain", show_progress=False)
    pretrain(load_config("tiny", on + ["train.max_steps=2"]), sample_corpus, tmp_path / "s", show_progress=False)
    plain = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    s = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reorder_loss", "reorder_acc", "distance_loss", "distance_acc", "mlm_loss"):
        assert key in s[-1]
    assert s[0]["reorder_loss"] > 1.0 and s[0]["distance_loss"] > 0.5 and "reorder_loss" not in plain[0]
    assert (tmp_path / "s" / "checkpoints" / "step-2" / "aux.safetensors").is_file()
    # the heads are not part of the Hugging Face export
    from safetensors import safe_open

    with safe_open(tmp_path / "s" / "final" / "model.safetensors", "pt") as f:
        assert not any("aux" in k for k in f.keys())
    # and a resumed run loads them back
    pretrain(load_config("tiny", on + ["train.max_steps=4"]), sample_corpus, tmp_path / "s", show_progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
