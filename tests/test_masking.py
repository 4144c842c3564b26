"""Masking strategies on tiny hand-made rows: exact budgets and the units each one keeps whole."""

import numpy as np
import pytest

from clueforge.pretrain.masking import Curriculum, Masker, MaskingConfig, Row, _groups, pick_strategy

# [CLS] 因为 | 下 雨 | ， | 所以 | 北京 大学 | 的 | 学生 | 留 在 | 了 | 宿舍 | 。 [SEP]
#  0    1-2  3-4  5    6-7   8-11      12   13-14 15-16  17   18-19  20  21
WORD_LENS = [2, 2, 1, 2, 4, 1, 2, 2, 1, 2, 1]


def _row():
    n = sum(WORD_LENS) + 2
    word = np.full(n, -1)
    pos = 1
    for w, L in enumerate(WORD_LENS):
        word[pos:pos + L] = w
        pos += L
    ids = np.arange(100, 100 + n)
    ids[1:3] = [7, 8]  # 因为
    ids[6:8] = [9, 10]  # 所以
    mention = np.zeros(n, dtype=np.int64)
    mention[8:12] = 1  # 北京大学: one mention of 4 tokens
    mention[18:20] = 2  # 宿舍 as a second mention
    sent = np.zeros(n, dtype=bool)
    sent[1] = True
    posid = np.where(word >= 0, 23, 0)  # all nouns ("n")
    return Row(ids=ids, word=word, sent_start=sent, mention=mention, pos=posid)


def _masker(**kw):
    return Masker(MaskingConfig(**kw), connective_ids=[(7, 8), (9, 10)])


@pytest.mark.parametrize("strategy", ["token", "wwm", "entity", "span", "discourse", "corrective"])
@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
def test_budget_is_exact_and_specials_never_chosen(strategy, ratio):
    row = _row()
    m = _masker(ratio=ratio)
    for seed in range(30):
        chosen = m.choose(strategy, row, np.random.default_rng(seed))
        assert chosen.sum() == round(ratio * 20) and not chosen[row.word < 0].any()


@pytest.mark.parametrize("strategy", ["wwm", "span", "corrective", "discourse"])
def test_word_units_never_split_when_the_budget_allows(strategy):
    row = _row()
    m = _masker(ratio=0.3)  # 6 tokens: always reachable with whole words here
    for seed in range(50):
        chosen = m.choose(strategy, row, np.random.default_rng(seed))
        for w in range(len(WORD_LENS)):
            part = chosen[row.word == w]
            assert part.all() or not part.any(), (seed, w)


def test_entity_masking_takes_mentions_whole_and_first():
    row = _row()
    m = _masker(ratio=0.3)  # budget 6 = mention 1 (4) + mention 2 (2)
    for seed in range(30):
        chosen = m.choose("entity", row, np.random.default_rng(seed))
        assert chosen[8:12].all() and chosen[18:20].all() and chosen.sum() == 6
    m = _masker(ratio=0.15)  # budget 3: mention 1 (4) cannot fit, mention 2 (2) + one word token
    for seed in range(30):
        chosen = m.choose("entity", row, np.random.default_rng(seed))
        assert not chosen[8:12].any() and chosen[18:20].all() and chosen.sum() == 3


def test_discourse_masks_connectives_first():
    row = _row()
    m = _masker(ratio=0.2)  # budget 4 = 因为 + 所以
    for seed in range(20):
        chosen = m.choose("discourse", row, np.random.default_rng(seed))
        assert chosen[1:3].all() and chosen[6:8].all() and chosen.sum() == 4


def test_span_masking_makes_contiguous_multiword_runs():
    row = _row()
    m = _masker(ratio=0.5, span_p=0.2)
    runs = []
    for seed in range(50):
        chosen = m.choose("span", row, np.random.default_rng(seed))
        runs += [n for _, n in _groups(chosen.astype(int))]
    assert max(runs) >= 6  # several words in a row


def test_strategy_mixing_follows_weights():
    rng = np.random.default_rng(0)
    draws = [pick_strategy({"wwm": 0.7, "entity": 0.3, "span": 0.0}, rng) for _ in range(4000)]
    share = draws.count("entity") / len(draws)
    assert abs(share - 0.3) < 0.03 and "span" not in draws


def test_curriculum_interpolates_easy_to_hard():
    base = MaskingConfig()
    cur = Curriculum([{"at": 0.0, "ratio": 0.1, "weights": {"token": 1.0}},
                      {"at": 0.5, "ratio": 0.2, "weights": {"wwm": 1.0}},
                      {"at": 1.0, "ratio": 0.4, "span_p": 0.1, "weights": {"entity": 0.5, "span": 0.5}}])
    assert cur.at(0.0, base)["ratio"] == pytest.approx(0.1)
    mid = cur.at(0.25, base)
    assert mid["ratio"] == pytest.approx(0.15) and mid["weights"]["token"] == pytest.approx(0.5)
    assert mid["weights"]["wwm"] == pytest.approx(0.5)
    end = cur.at(1.0, base)
    assert end["ratio"] == pytest.approx(0.4) and end["span_p"] == pytest.approx(0.1)
    assert end["weights"] == {"entity": 0.5, "span": 0.5}
    with pytest.raises(ValueError, match="unknown strategies"):
        Curriculum([{"at": 0, "weights": {"nonsense": 1}}])
    with pytest.raises(ValueError, match="unknown masking strategies"):
        MaskingConfig(weights={"everything": 1.0})
