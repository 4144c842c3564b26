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


# --- each strategy masks in its defining way (random packed rows from test_pretrain_data) ---

def _batches(weights, ratio=0.3, progress=0.0, curriculum=None, reps=2, **kw):
    """``(collator, [(row, input ids, labels)])`` over the random packed rows."""
    from test_pretrain_data import _random_collator

    col, rows = _random_collator(weights, ratio=ratio, curriculum=curriculum, **kw)
    rng = np.random.default_rng(11)
    out = []
    for _ in range(reps):
        for k in range(0, len(rows), 16):
            b = col(rows[k:k + 16], rng, progress=progress)
            for i, r in enumerate(rows[k:k + 16]):
                row, _ = col._row(*r)
                n = row.ids.size
                out.append((row, b["input_ids"][i][:n], b["labels"][i][:n]))
    return col, out


def _split_words(row, lab):
    """Labelled tokens outside fully labelled words, and multi-token words hit but not whole."""
    chosen = lab != -100
    outside, partial = 0, 0
    for s, n in _groups(row.word + 1):
        k = int(chosen[s:s + n].sum())
        if 0 < k < n:
            outside += k
            partial += n > 1
    return outside, partial


def test_wwm_masks_whole_words_and_token_does_not():
    _, wwm = _batches({"wwm": 1.0})
    _, tok = _batches({"token": 1.0})
    # wwm: only the exact-budget remainder (less than the longest word, 4 tokens) splits a word
    assert all(_split_words(row, lab)[0] < 4 for row, _, lab in wwm)
    assert sum(_split_words(row, lab)[1] for row, _, lab in tok) > 0.3 * sum(
        len([1 for s, n in _groups(row.word + 1) if n > 1 and (lab[s:s + n] != -100).any()]) for row, _, lab in tok)


def test_entity_masks_whole_mentions_first():
    def mention_share(batches):
        hit = total = 0
        for row, _, lab in batches:
            chosen = lab != -100
            for s, n in _groups(row.mention * (row.word >= 0)):
                hit += int(chosen[s:s + n].sum())
            total += int(chosen.sum())
        return hit / total

    _, ent = _batches({"entity": 1.0})
    _, wwm = _batches({"wwm": 1.0})
    assert mention_share(ent) > 2 * mention_share(wwm)


def test_span_lengths_follow_the_truncated_geometric_law():
    """Candidate spans of a one-document row of 300 one-token words: length min(G, span_max,
    words left), G ~ Geometric(p); the mean within 4.5 standard errors of its exact value."""
    p, span_max, n = 0.2, 10, 300
    m = Masker(MaskingConfig(weights={"span": 1.0}, span_p=p, span_max=span_max))
    word = np.concatenate([[-1], np.arange(n), [-1]])
    z = np.zeros(n + 2, dtype=np.int64)
    row = Row(ids=z + 10, word=word, sent_start=z.astype(bool), mention=z, pos=z)
    lengths = np.concatenate([[n for _, n in m.units("span", row, np.random.default_rng(s))[0]] for s in range(20)])
    caps = np.minimum(span_max, n - np.arange(n))  # words left from each start
    q = 1 - p
    mean = np.mean([(1 - q ** c) / p for c in caps])  # E[min(G, c)] = Σ_{j<c} q^j
    second = np.mean([sum((2 * j + 1) * q ** j for j in range(c)) for c in caps])  # E[min(G, c)²]
    se = np.sqrt((second - mean ** 2) / lengths.size)
    assert abs(lengths.mean() - mean) < 4.5 * se, (lengths.mean(), mean, se)
    # and the chosen masks: longer labelled runs for a smaller p
    runs = {}
    for sp in (0.6, 0.1):
        _, out = _batches({"span": 1.0}, ratio=0.4, span_p=sp)
        runs[sp] = np.mean([n for row, _, lab in out if row.ids.size > 50
                            for _, n in _groups((lab != -100).astype(np.int64))])
    assert runs[0.1] > 1.5 * runs[0.6], runs


def test_discourse_masks_connectives():
    def connective_hit(batches, col):
        hit = total = 0
        for row, _, lab in batches:
            for s, n in _groups(row.word + 1):
                if tuple(row.ids[s:s + n].tolist()) in col.masker.connectives:
                    total += n
                    hit += int((lab[s:s + n] != -100).sum())
        return hit / total

    col, disc = _batches({"discourse": 1.0})
    _, wwm = _batches({"wwm": 1.0})
    assert connective_hit(disc, col) > 0.95 and connective_hit(wwm, col) < 0.5


def test_corrective_replaces_with_same_pos_same_length_words():
    col, out = _batches({"corrective": 1.0}, mask_prob=0.8, random_prob=0.1)
    corrected = masked = 0
    for row, inp, lab in out:
        for s, n in _groups(row.word + 1):
            if not (lab[s:s + n] != -100).all():
                continue
            got = inp[s:s + n]
            if (got == 4).all():
                masked += 1
            elif (got != row.ids[s:s + n]).any() and (col.inventory[(int(row.pos[s]), n)] == got).all(1).any():
                corrected += 1
    assert corrected > 10 * max(1, masked)  # [MASK] only where no same-POS same-length word exists


def test_curriculum_changes_the_masks_the_batches_use():
    """Measured from the batches: the share of predicted tokens and the labelled run lengths follow
    the stages (token 10 % → span 40 % with p 0.9 → span 40 % with p 0.05)."""
    cur = Curriculum([{"at": 0.0, "ratio": 0.1, "weights": {"token": 1.0}},
                      {"at": 0.5, "ratio": 0.4, "span_p": 0.9, "weights": {"span": 1.0}},
                      {"at": 1.0, "ratio": 0.4, "span_p": 0.05, "weights": {"span": 1.0}}])
    measured = {}
    for progress in (0.0, 0.25, 0.5, 1.0):
        _, out = _batches({"wwm": 1.0}, curriculum=cur, progress=progress, reps=1)
        real = sum(int((row.word >= 0).sum()) for row, _, _ in out)
        labelled = sum(int((lab != -100).sum()) for _, _, lab in out)
        run = np.mean([n for row, _, lab in out if row.ids.size > 50
                       for _, n in _groups((lab != -100).astype(np.int64))])
        measured[progress] = (labelled / real, run)
    for progress, ratio in ((0.0, 0.1), (0.25, 0.25), (0.5, 0.4), (1.0, 0.4)):
        assert abs(measured[progress][0] - ratio) < 0.02, measured  # per-row budgets are round(ratio·n)
    runs = [measured[p][1] for p in (0.0, 0.5, 1.0)]
    assert runs[0] < 1.3 and 1.5 * runs[0] < runs[1] and 1.5 * runs[1] < runs[2], measured
