import numpy as np
import pytest

from clueforge.corpus.build import DOC_START, SENT_START, WORD_START
from clueforge.corpus.shards import Corpus
from clueforge.pretrain.config import CONFIG_DIR, load_config
from clueforge.pretrain.data import Collator, Sampler, build_row_index, pack_rows, split_heldout
from clueforge.pretrain.masking import MaskingConfig
from clueforge.pretrain.loop import lr_lambda
from clueforge.text.tokenizer import load_tokenizer, special_ids
from clueforge.utils import UserError

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


class FakeShard:
    def __init__(self, ids, flags):
        self.ids, self.flags = np.asarray(ids, np.uint16), np.asarray(flags, np.uint8)
        self.pos = np.zeros_like(self.flags)
        self.ent = self.etype = None


class FakeCorpus:
    def __init__(self, shards):
        self.shards = shards

    def __len__(self):
        return len(self.shards)


def _flags(words_per_sentence, doc_starts=(0,)):
    """Flags for sentences made of words given by their token lengths."""
    flags = []
    for s, words in enumerate(words_per_sentence):
        for w, n in enumerate(words):
            for k in range(n):
                f = WORD_START if k == 0 else 0
                if w == 0 and k == 0:
                    f |= SENT_START
                flags.append(f)
    flags = np.array(flags, np.uint8)
    sent = np.flatnonzero(flags & SENT_START)
    for d in doc_starts:
        flags[sent[d]] |= DOC_START
    return flags


def _row_cost(flags, a, b):
    """Slots a row [a, b) takes: its tokens, [CLS], the final [SEP], one [SEP] per inner document."""
    return (b - a) + 2 + int(np.count_nonzero(flags[a + 1:b] & DOC_START))


def test_pack_rows_respects_length_documents_and_covers_everything():
    flags = _flags([[2, 3], [4], [1, 1, 1], [6, 6, 6], [2]], doc_starts=(0, 2, 4))
    for pack_docs in (True, False):
        rows = pack_rows(flags, seq_len=10, pack_docs=pack_docs)
        assert rows[0, 0] == 0 and rows[-1, 1] == flags.size and (rows[1:, 0] == rows[:-1, 1]).all()
        for a, b in rows:
            assert _row_cost(flags, a, b) <= 10
            if not pack_docs:
                assert not np.count_nonzero(flags[a + 1:b] & DOC_START)
    # budget 8 tokens: sentences 0-5 | 5-9 (doc 1), 9-12 | 12-30 (doc 2, cut at 8), 30-32 (doc 3)
    as_list = lambda rows: [tuple(map(int, r)) for r in rows]  # noqa: E731
    assert as_list(pack_rows(flags, 10, pack_docs=False)) == [(0, 5), (5, 9), (9, 12), (12, 20), (20, 28), (28, 30), (30, 32)]
    # one token stream: full rows ([SEP] before the document at 9 counts), the last one short; the
    # row (23, 30) stops because the next document's [SEP] and first token do not both fit
    assert as_list(pack_rows(flags, 10, pack_docs=True)) == [(0, 8), (8, 15), (15, 23), (23, 30), (30, 32)]
    # with slack, cuts move back to a word start: 8 → 5, 20 → 18 (words 12-18-24-30)
    assert as_list(pack_rows(flags, 10, True, slack=4)) == [(0, 5), (5, 12), (12, 18), (18, 24), (24, 30), (30, 32)]


def test_packed_rows_are_full_cut_at_word_starts_and_keep_flags_meaningful():
    """Token-stream packing on random shards: every row but a shard's last fills seq_len (or stops
    at most ``slack`` tokens early, at a word start outside a mention); rows tile the shard; a row
    that starts mid-sentence has no sentence start on its first token, and discourse masking does
    not take its first word as sentence-initial."""
    rng = np.random.default_rng(3)
    col, _ = _random_collator({"discourse": 1.0})
    for sh in col.shards:
        for seq_len in (16, 64, 128):
            budget, slack = seq_len - 2, (seq_len - 2) // 16
            rows = pack_rows(sh.flags, seq_len, True, sh.etype)
            assert rows[0, 0] == 0 and rows[-1, 1] == sh.flags.size and (rows[1:, 0] == rows[:-1, 1]).all()
            costs = np.array([_row_cost(sh.flags, a, b) for a, b in rows])
            assert (costs <= seq_len).all()
            for (a, b), c in zip(rows[:-1], costs[:-1]):
                if c < seq_len:
                    assert c >= seq_len - slack - 1, (seq_len, a, b, c)  # -1: a [SEP] + token that did not fit
                    inside_mention = sh.etype[b] > 0 and not sh.flags[b] & ENT_START
                    assert sh.flags[b] & WORD_START and not inside_mention or c == budget + 1
            mid = [(a, b) for a, b in rows if not sh.flags[a] & SENT_START]
            assert mid, "some sentence must have been split"
            for a, b in mid:
                row, _ = col._row(0 if sh is col.shards[0] else col.shards.index(sh), int(a), int(b))
                assert not row.sent_start[1] and (row.ids[1:-1][row.word[1:-1] >= 0] == sh.ids[a:b]).all()
                first, _, _ = col.masker.units("discourse", row, rng)
                if tuple(row.ids[1:3].tolist()) not in col.masker.connectives:
                    assert all(s != 1 for s, _ in first)


def _padding_share(corpus, seq_len, batch_size):
    """``padding_share`` as the loop logs it, over one epoch of training batches."""
    idx = build_row_index(corpus, seq_len, True)
    flags = [np.asarray(sh.flags) for sh in corpus.shards]
    lens = np.array([_row_cost(flags[s], a, b) for s, (a, b) in zip(idx.shard.tolist(), idx.span.tolist())])
    assert lens.max() <= seq_len
    sampler = Sampler(len(idx), batch_size, 1, 1, 0)
    real = slots = 0
    for step in range(max(1, len(idx) // batch_size)):
        rows = lens[sampler.rows(step, 0, 0)]
        real, slots = real + rows.sum(), slots + rows.max() * batch_size
    return 1 - real / slots


def test_padding_share_on_the_sample(sample_corpus):
    """The sample is 3 shards and ~60 rows of 64 tokens: the 3 shard-final rows (only they may be
    short) set the floor here; 0.14 before token-stream packing."""
    share = _padding_share(Corpus(sample_corpus), 64, 16)
    assert share < 0.03, share


def test_padding_share_under_2_percent_on_a_real_corpus_slice(tmp_path, bert_vocab):
    from conftest import shared

    from clueforge.corpus.build import BuildConfig, build_corpus

    lines = shared("corpus", "corpus.jsonl").read_text(encoding="utf-8").split("\n")
    (tmp_path / "slice.jsonl").write_text("\n".join(x for x in lines[::400] if x.strip()) + "\n", encoding="utf-8")
    build_corpus([tmp_path / "slice.jsonl"], tmp_path / "c", BuildConfig(vocab=str(bert_vocab)))
    share = _padding_share(Corpus(tmp_path / "c"), 128, 32)
    assert share < 0.02, share  # 0.16 before token-stream packing


def _collator(ratio=0.15, strategy="wwm", vocab=100):
    ids = np.arange(10, 10 + 60) % vocab
    flags = _flags([[1, 2, 3, 1], [2, 2, 2], [1, 1, 4, 2], [3, 3, 1]] * 2, doc_starts=(0, 4))
    corpus = FakeCorpus([FakeShard(ids[: flags.size], flags)])
    return Collator(corpus, SPECIALS, vocab, MaskingConfig(ratio=ratio, weights={strategy: 1.0})), flags


@pytest.mark.parametrize("strategy", ["token", "wwm"])
@pytest.mark.parametrize("ratio", [0.15, 0.4])
def test_mask_budget_exact_and_specials_untouched(strategy, ratio):
    col, flags = _collator(ratio, strategy)
    n = flags.size
    for seed in range(20):
        batch = col([(0, 0, n)], np.random.default_rng(seed))
        labels, ids = batch["labels"][0], batch["input_ids"][0]
        assert np.count_nonzero(labels != -100) == round(ratio * n)  # budget over the n real tokens
        assert labels[0] == -100 and labels[-1] == -100  # [CLS], final [SEP]
        sep_pos = np.flatnonzero(ids == SPECIALS["sep"])
        assert len(sep_pos) == 2 and (labels[sep_pos] == -100).all()  # [SEP] between the two documents too


def test_whole_word_masking_never_splits_a_word():
    col, flags = _collator(0.3, "wwm")
    n = flags.size
    word = col._row(0, 0, n)[0].word
    for seed in range(50):
        chosen = col.choose(word, np.random.default_rng(seed))
        for w in np.unique(word[word >= 0]):
            members = chosen[word == w]
            assert members.all() or not members.any()


def test_80_10_10_replacement():
    col, flags = _collator(0.5, "token", vocab=1000)
    n = flags.size
    counts = np.zeros(3)
    for seed in range(400):
        b = col([(0, 0, n)], np.random.default_rng(seed))
        sel = b["labels"][0] != -100
        inp, lab = b["input_ids"][0][sel], b["labels"][0][sel]
        counts += [np.sum(inp == SPECIALS["mask"]), np.sum((inp != SPECIALS["mask"]) & (inp != lab)), np.sum(inp == lab)]
    share = counts / counts.sum()
    assert abs(share[0] - 0.8) < 0.02 and abs(share[1] - 0.1) < 0.02 and abs(share[2] - 0.1) < 0.02


def test_doc_ids_follow_documents():
    col, flags = _collator()
    col.doc_attention = True
    b = col([(0, 0, flags.size)], np.random.default_rng(0))
    docs, ids = b["doc_ids"][0], b["input_ids"][0]
    sep = np.flatnonzero(ids == SPECIALS["sep"])[0]
    assert (docs[: sep + 1] == docs[0]).all() and (docs[sep + 1:] == docs[-1]).all() and docs[0] != docs[-1]


def test_sampler_ranks_disjoint_and_epochs_cover():
    s = Sampler(n_rows=50, batch_size=4, grad_accum=2, world=2, seed=3)
    seen = [s.rows(step, m, r) for step in range(3) for m in range(2) for r in range(2)]
    flat = np.concatenate(seen)
    assert len(set(flat[:48].tolist())) == 48  # inside one epoch nothing repeats, across ranks too
    assert (s.rows(1, 1, 0) == Sampler(50, 4, 2, 2, 3).rows(1, 1, 0)).all()  # a pure function of the step
    epoch = np.concatenate([s.rows(st, m, r) for st in range(7) for m in range(2) for r in range(2)])[:50]
    assert sorted(epoch.tolist()) == list(range(50))


def test_row_index_on_sample_corpus(sample_corpus):
    corpus = Corpus(sample_corpus)
    idx = build_row_index(corpus, 64, True)
    train, held = split_heldout(idx, corpus)
    assert len(train) + len(held) == len(idx) and set(held.shard.tolist()) == {len(corpus) - 1}
    tok = load_tokenizer(sample_corpus / "vocab.txt")
    col = Collator(corpus, special_ids(tok), tok.get_vocab_size(), MaskingConfig(ratio=0.15))
    b = col([(int(train.shard[i]), *map(int, train.span[i])) for i in range(8)], np.random.default_rng(0))
    assert b["input_ids"].shape[1] <= 64 and (b["input_ids"][:, 0] == tok.token_to_id("[CLS]")).all()
    # unmasked tokens decode back to the corpus text
    text = tok.decode(b["input_ids"][0][b["labels"][0] == -100].tolist())
    assert text and "[MASK]" not in text


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds(path):
    from clueforge.model.bert import BertForMLM

    cfg = load_config(path)
    assert cfg.train.seq_len <= cfg.model.max_position
    if cfg.model.num_layers * cfg.model.hidden_size <= 6 * 384:
        BertForMLM(cfg.model)  # tiny and mini are built; base only checked for consistency
    expected = {"tiny": (2, 64), "mini": (6, 384), "base": (12, 768)}.get(path.stem)
    if expected:
        assert (cfg.model.num_layers, cfg.model.hidden_size) == expected


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("tiny", ["train.lr=3e-4", "model.pre_ln=true", "train.masking=token"])
    assert cfg.train.lr == 3e-4 and cfg.model.pre_ln and cfg.train.masking == "token"
    with pytest.raises(ValueError, match="--set 'train.learning_rate=1': train has no setting"):
        load_config("tiny", ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="not a valid"):
        load_config("tiny", ["train.max_steps=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden: 3}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(UserError, match="tiny"):  # a user error (one line), not a FileNotFoundError traceback
        load_config("no-such-config")


def test_lr_schedules():
    cfg = load_config("tiny", ["train.warmup_steps=10", "train.max_steps=110", "train.min_lr_ratio=0.1"])
    assert lr_lambda(cfg, 0) == pytest.approx(0.1) and lr_lambda(cfg, 9) == pytest.approx(1.0)
    assert lr_lambda(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(cfg, 110) == pytest.approx(0.1)
    cfg.train.schedule = "cosine"
    assert lr_lambda(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(cfg, 35) > 0.1 + 0.9 * 0.75


# --- random packed rows with every side channel: specials, documents, units, replacement shares ---

from clueforge.corpus.build import ENT_START  # noqa: E402
from clueforge.pretrain.masking import STRATEGIES, Curriculum, _groups  # noqa: E402

CONNECTIVES = ("因为", "所以", "但是")


class FakeTok:
    """Spells the connectives with ids 60..65 (the random text below uses 10..59)."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Enc([60 + 2 * CONNECTIVES.index(text) + k for k in range(len(text))] if text in CONNECTIVES else [5])


class EntShard(FakeShard):
    def __init__(self, ids, flags, pos, etype):
        super().__init__(ids, flags)
        self.pos = np.asarray(pos, np.uint8)
        self.etype = np.asarray(etype, np.uint8)
        self.ent = self.etype.astype(np.uint32)


def _random_shard(rng, n_docs=12):
    """Documents of 1-5 sentences of 1-8 words (1-4 tokens; some are connectives), a POS per word,
    entity mentions of 1-2 whole words inside a sentence."""
    ids, flags, pos, etype = [], [], [], []
    for _ in range(n_docs):
        for s in range(int(rng.integers(1, 6))):
            n_words = int(rng.integers(1, 9))
            w = 0
            while w < n_words:
                mention = rng.random() < 0.15
                span = min(n_words - w, int(rng.integers(1, 3))) if mention else 1
                kind = 1 + int(rng.integers(3))
                for k in range(span):
                    if rng.random() < 0.1 and not mention:
                        c = int(rng.integers(len(CONNECTIVES)))
                        word = [60 + 2 * c, 61 + 2 * c]
                    else:
                        word = rng.integers(10, 60, int(min(4, rng.geometric(0.5)))).tolist()
                    for j, t in enumerate(word):
                        f = WORD_START if j == 0 else 0
                        if w == 0 and j == 0:
                            f |= SENT_START | (DOC_START if s == 0 else 0)
                        if mention and k == 0 and j == 0:
                            f |= ENT_START
                        ids.append(t)
                        flags.append(f)
                        etype.append(kind if mention else 0)
                    pos.extend([int(rng.integers(1, 4))] * len(word))
                    w += 1
    return EntShard(ids, flags, pos, etype)


def _random_collator(weights, seed=0, vocab=5000, curriculum=None, **kw):
    rng = np.random.default_rng(seed)
    corpus = FakeCorpus([_random_shard(rng) for _ in range(3)])
    col = Collator(corpus, SPECIALS, vocab, MaskingConfig(weights=weights, connectives=CONNECTIVES, **kw),
                   tokenizer=FakeTok(), curriculum=curriculum)
    rows = [(i, int(a), int(b)) for i, sh in enumerate(corpus.shards)
            for seq_len in (16, 40, 64) for a, b in pack_rows(sh.flags, seq_len, True)]
    return col, rows


ALL = {k: 1.0 for k in STRATEGIES}
CURRICULUM = Curriculum([{"at": 0.0, "ratio": 0.1, "span_p": 0.5, "weights": {"token": 1.0, "wwm": 1.0}},
                         {"at": 0.5, "ratio": 0.3, "span_p": 0.2, "weights": {"span": 1.0, "entity": 1.0}},
                         {"at": 1.0, "ratio": 0.5, "span_p": 0.05, "weights": ALL}])


@pytest.mark.parametrize("strategy", [*STRATEGIES, "curriculum"])
def test_specials_never_labelled_or_replaced_and_units_stay_in_one_document(strategy):
    """Property over random packed rows: [CLS]/[SEP]/[PAD] are never labelled or replaced, no
    real token becomes one, and no unit holds a special or runs over a document end (over a
    sentence end: only ``span`` may)."""
    col, rows = _random_collator({strategy: 1.0} if strategy != "curriculum" else ALL, ratio=0.4, span_p=0.1,
                                 curriculum=CURRICULUM if strategy == "curriculum" else None)
    special = {SPECIALS[k] for k in ("cls", "sep", "pad", "unk")}
    rng = np.random.default_rng(1)
    labelled_special = 0
    for k in range(0, len(rows), 8):
        batch_rows = rows[k:k + 8]
        for progress in ((0.0, 0.5, 1.0) if strategy == "curriculum" else (0.0,)):
            b = col(batch_rows, rng, progress=progress)
            for i, r in enumerate(batch_rows):
                row, _ = col._row(*r)
                n, inp, lab = row.ids.size, b["input_ids"][i], b["labels"][i]
                spec = np.flatnonzero(row.word < 0)
                labelled_special += int((lab[spec] != -100).sum() + (inp[spec] != row.ids[spec]).sum())
                assert (lab[n:] == -100).all() and (inp[n:] == SPECIALS["pad"]).all()
                assert not set(inp[:n][row.word >= 0].tolist()) & special
    assert labelled_special == 0
    for r in rows:
        row, _ = col._row(*r)
        for name in [strategy] if strategy != "curriculum" else STRATEGIES:
            first, rest, _ = col.masker.units(name, row, rng)  # span_p 0.1: long spans
            for s, n in first + rest:
                assert (row.word[s:s + n] >= 0).all(), (name, r, s, n)  # no [CLS]/[SEP] inside
                if name != "span":
                    assert not row.sent_start[s + 1:s + n].any(), (name, r, s, n)


def _units_seen(strategy, row, lab):
    """The masked units as the output shows them: ``(fate units, size units)``. Fate units lie
    inside one masked unit: labelled whole mentions (entity), labelled whole words, single tokens
    elsewhere. Size units hold whole masked units: the same, except for ``span`` maximal labelled
    runs of whole words (a run may hold several spans: an upper bound, so the variance bound below
    stays valid)."""
    chosen = lab != -100
    taken = np.zeros(chosen.size, dtype=bool)
    units = []
    groups = _groups(row.mention * (row.word >= 0)) if strategy == "entity" else []
    if strategy != "token":
        groups += _groups(row.word + 1)
    for s, n in groups:
        if chosen[s:s + n].all() and not taken[s:s + n].any():
            units.append((s, n))
            taken[s:s + n] = True
    singles = [(int(i), 1) for i in np.flatnonzero(chosen & ~taken)]
    if strategy != "span":
        return units + singles, units + singles
    return units + singles, _groups(taken.astype(np.int64)) + singles


def _fate(col, strategy, row, inp, s, n):
    orig, got = row.ids[s:s + n], inp[s:s + n]
    is_mask = got == SPECIALS["mask"]
    if is_mask.all():
        return "mask"
    if (got == orig).all():
        return "kept"
    if strategy == "corrective":
        options = col.inventory.get((int(row.pos[s]), n))
        if options is not None and (options == got).all(1).any():
            return "mask"  # corrected: a same-POS, same-length word stands for [MASK]
    if not is_mask.any():
        return "random"  # (a random draw may hit the original token)
    return "mixed"


@pytest.mark.parametrize("probs", [(0.8, 0.1), (0.5, 0.3)], ids=["80-10-10", "50-30-20"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replacement_shares_per_unit_for_every_strategy(strategy, probs):
    """Each masked unit (word, mention, span, token) gets one fate, and over many rows the shares of
    predicted tokens that are [MASK] (or, for corrective, a same-POS same-length word) / random /
    kept match ``mask_prob`` / ``random_prob`` / the rest. Fates are drawn per unit, so the share's
    standard deviation is sqrt(p(1-p)·Σ n_u²)/Σ n_u over the units' token counts n_u (not the
    token-level binomial one); the tolerance is 4.5 of them (+0.003 for random draws that hit the
    original or an inventory word)."""
    mp, rp = probs
    col, rows = _random_collator({strategy: 1.0}, ratio=0.3, span_p=0.3, mask_prob=mp, random_prob=rp)
    tokens = {"mask": 0, "random": 0, "kept": 0}
    sizes, mixed = [], []
    rng = np.random.default_rng(7)
    for rep in range(3):
        for k in range(0, len(rows), 16):
            b = col(rows[k:k + 16], rng)
            for i, r in enumerate(rows[k:k + 16]):
                row, _ = col._row(*r)
                inp, lab = b["input_ids"][i][:row.ids.size], b["labels"][i][:row.ids.size]
                fate_units, size_units = _units_seen(strategy, row, lab)
                for s, n in fate_units:
                    fate = _fate(col, strategy, row, inp, s, n)
                    if fate == "mixed":
                        mixed.append((r, s, n, row.ids[s:s + n], inp[s:s + n]))
                        fate = "random"
                    tokens[fate] += n
                sizes += [n for _, n in size_units]
    total = sum(tokens.values())
    sizes = np.asarray(sizes, dtype=float)
    for name, p in (("mask", mp), ("random", rp), ("kept", 1 - mp - rp)):
        sd = np.sqrt(p * (1 - p) * (sizes ** 2).sum()) / total
        assert abs(tokens[name] / total - p) < 4.5 * sd + 0.003, (name, tokens, 4.5 * sd)
    assert not mixed, mixed[:3]  # one fate per unit


def test_collator_calls_from_two_threads_match_sequential_calls():
    """The prefetch thread (training, early curriculum) and evaluate() (main thread, progress 1)
    share one collator: a batch must depend only on its own rows, generator and progress."""
    import sys
    import threading

    cur = Curriculum([{"at": 0.0, "ratio": 0.3, "span_p": 0.9, "weights": {"span": 1.0}},
                      {"at": 1.0, "ratio": 0.3, "span_p": 0.05, "weights": {"span": 1.0}}])
    col, rows = _random_collator({"span": 1.0}, curriculum=cur)
    rows = rows[:24]

    def run(progress, seeds):
        return [col(rows, np.random.default_rng(s), progress=progress)["labels"] for s in seeds]

    seeds = range(15)
    expected = {p: run(p, seeds) for p in (0.0, 1.0)}
    got = {}
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often
    try:
        threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, run(p, seeds))) for p in (0.0, 1.0)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    for p in (0.0, 1.0):
        assert all((a == b).all() for a, b in zip(got[p], expected[p])), p
