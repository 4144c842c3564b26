"""Knowledge sources, entity marking at corpus build, and the knowledge-aware masking in use."""

import json

import numpy as np
import pytest

from clueforge.corpus.build import ENT_START, BuildConfig, build_corpus
from clueforge.corpus.shards import Corpus
from clueforge.knowledge.matcher import EntityMatcher
from clueforge.knowledge.sources import EntityTable, entity_name, load_entities, load_triples
from clueforge.pretrain.config import load_config
from clueforge.pretrain.data import Collator
from clueforge.pretrain.masking import MaskingConfig
from clueforge.text.tokenizer import load_tokenizer, special_ids
from conftest import SAMPLE, shared

ENTITIES = {"图书馆": "ORG", "火车站": "LOC", "人工智能": "MISC", "马拉松": "MISC", "博物馆": "ORG", "丝绸之路": "LOC"}


def test_sources_and_errors(tmp_path):
    assert entity_name("守望星光（韩玉玲、刘东考演唱歌曲）") == "守望星光" and entity_name("A(歌曲)") == "A"
    t = tmp_path / "t.tsv"
    t.write_text("北京\t人口\t2000万\n上海\t简称\n")
    with pytest.raises(ValueError, match="t.tsv:2: expected head<TAB>relation<TAB>tail"):
        load_triples(t)
    d = tmp_path / "med"
    d.mkdir()
    (d / "drug.txt").write_text("阿司匹林\n布洛芬\n")
    (d / "disease.txt").write_text("感冒\n")
    assert sorted(load_entities(d)) == [("布洛芬", "drug"), ("感冒", "disease"), ("阿司匹林", "drug")]
    e = tmp_path / "e.tsv"
    e.write_text("张三\tPER\n李四\n")
    with pytest.raises(ValueError, match="e.tsv:2: expected entity<TAB>type"):
        load_entities(e)


def test_matcher_longest_dictionary_match_then_pos_names():
    table = EntityTable()
    for name, kind in [("北京", "LOC"), ("北京大学", "ORG"), ("大学", "MISC")]:
        table.add(name, kind)
    m = EntityMatcher(table)
    text = "他在北京大学读书，后来去了上海。"
    tagged = [("他", "r"), ("在", "p"), ("北京大学", "nt"), ("读书", "v"), ("，", "x"), ("后来", "t"), ("去", "v"),
              ("了", "ul"), ("上海", "ns"), ("。", "x")]
    spans = m.find(text, tagged)
    assert [(text[s:e], table.type_names[t]) for s, e, _, t in spans] == [("北京大学", "ORG"), ("上海", "LOC")]
    assert spans[0][2] == table.id("北京大学") and spans[1][2] == 0  # a POS name outside the dictionary


@pytest.fixture(scope="module")
def entity_corpus(tmp_path_factory, sample_vocab):
    d = tmp_path_factory.mktemp("ent")
    f = d / "entities.tsv"
    f.write_text("".join(f"{k}\t{v}\n" for k, v in ENTITIES.items()), encoding="utf-8")
    out = d / "corpus"
    build_corpus([SAMPLE], out, BuildConfig(vocab=str(sample_vocab), doc_sep="blank", entities=(str(f),)))
    return out


def test_entity_channel_marks_whole_mentions(entity_corpus):
    c = Corpus(entity_corpus)
    m = c.manifest
    assert m["mentions"] > 10 and "ent" in m["channels"] and m["entity_types"][0] == "<none>"
    tok = load_tokenizer(entity_corpus / "vocab.txt")
    names = (entity_corpus / "entities.tsv").read_text(encoding="utf-8").split("\n")
    found = set()
    for sh in c.shards:
        starts = np.flatnonzero(sh.flags & ENT_START)
        for s in starts:
            e = s + 1
            while e < sh.ids.size and sh.etype[e] == sh.etype[s] and not sh.flags[e] & ENT_START and sh.ent[e] == sh.ent[s]:
                e += 1
            text = tok.decode(sh.ids[s:e].tolist()).replace(" ", "")
            if sh.ent[s]:
                assert names[sh.ent[s] - 1].split("\t")[0] == text
                found.add(text)
    assert {"图书馆", "火车站", "人工智能"} <= found


def test_entity_masking_on_a_built_corpus_never_splits_a_mention(entity_corpus):
    c = Corpus(entity_corpus)
    tok = load_tokenizer(entity_corpus / "vocab.txt")
    col = Collator(c, special_ids(tok), tok.get_vocab_size(), MaskingConfig(ratio=0.3, weights={"entity": 1.0}))
    sh = c.shards[0]
    row, _ = col._row(0, 0, min(120, sh.ids.size))
    assert row.mention.max() > 0
    for seed in range(30):
        chosen = col.masker.choose("entity", row, np.random.default_rng(seed))
        for k in range(1, row.mention.max() + 1):
            part = chosen[row.mention == k]
            assert part.all() or not part.any()


def test_corrective_masking_writes_same_pos_same_length_words(entity_corpus):
    c = Corpus(entity_corpus)
    tok = load_tokenizer(entity_corpus / "vocab.txt")
    mask_id = tok.token_to_id("[MASK]")
    col = Collator(c, special_ids(tok), tok.get_vocab_size(),
                   MaskingConfig(ratio=0.3, weights={"corrective": 1.0}, mask_prob=1.0, random_prob=0.0))
    replaced = 0
    for seed in range(20):
        b = col([(0, 0, 60)], np.random.default_rng(seed))
        row, _ = col._row(0, 0, 60)
        inp, lab = b["input_ids"][0], b["labels"][0]
        sel = lab != -100
        changed = sel & (inp != mask_id) & (inp != lab)
        for w in np.unique(row.word[changed]):
            idx = np.flatnonzero(row.word == w)
            word = tuple(inp[idx].tolist())
            assert word in {tuple(x) for x in col.inventory[(int(row.pos[idx[0]]), idx.size)]}
            replaced += 1
    assert replaced > 5


@pytest.mark.slow
def test_curriculum_is_logged_each_step(sample_corpus, tmp_path):
    from clueforge.pretrain.loop import pretrain

    cfg = load_config("tiny", ["train.max_steps=4", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
                               "train.curriculum=[{at: 0.0, ratio: 0.1, weights: {token: 1.0}}, "
                               "{at: 1.0, ratio: 0.3, weights: {wwm: 1.0}}]"])
    pretrain(cfg, sample_corpus, tmp_path / "cur", show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "cur" / "metrics.jsonl").read_text().splitlines()]
    ratios = [r["mask_ratio"] for r in lines]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1] and "mask_w_token" in lines[0]


def test_real_kg_sources_load():
    triples = load_triples(shared("kg", "kgclue_triples.tsv"))
    assert len(triples) > 10000
    table = EntityTable.build([shared("kg", "msra_entities.tsv"), shared("kg", "medical_entities")],
                              [shared("kg", "kgclue_triples.tsv")])
    assert len(table.names) > 50000 and {"PER", "LOC", "ORG", "drug", "KG"} <= set(table.type_names)


@pytest.mark.slow
@pytest.mark.parametrize("setting,key", [("train.self_distill_instance=1.0", "sd_instance_kl"),
                                         ("train.self_distill_layers=[1]", "sd_layer_kl")])
def test_self_distillation_adds_its_logged_loss(sample_corpus, tmp_path, setting, key):
    from clueforge.pretrain.loop import pretrain

    base = ["train.max_steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1"]
    pretrain(load_config("tiny", base), sample_corpus, tmp_path / "plain", show_progress=False)
    pretrain(load_config("tiny", base + [setting]), sample_corpus, tmp_path / "sd", show_progress=False)
    plain = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])
    sd = json.loads((tmp_path / "sd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sd[key] > 0 and "mlm_loss" in sd and key not in plain
    assert sd["loss"] != plain["loss"]


TRIPLES = "图书馆\t开放时间\t晚上九点\n火车站\t用途\t旅客进站\n人工智能\t应用领域\t医疗\n"


@pytest.fixture(scope="module")
def knowledge(entity_corpus, tmp_path_factory):
    from clueforge.pretrain.objectives import KnowledgeData

    f = tmp_path_factory.mktemp("kg") / "triples.tsv"
    f.write_text(TRIPLES, encoding="utf-8")
    c = Corpus(entity_corpus)
    tok = load_tokenizer(entity_corpus / "vocab.txt")
    return KnowledgeData(c, tok, special_ids(tok), 64, triples=load_triples(f)), tok, f


# replacement (type kept, labels exactly on the swapped tokens), relation negatives and the
# sentences of triple-text prediction: tests/test_knowledge_objectives.py (a synthetic KG corpus)


def test_triple_text_masking(knowledge):
    kd, tok, _ = knowledge
    mask_id = tok.token_to_id("[MASK]")
    for seed in range(20):
        ids, types, labels = kd.triple_mlm(np.random.default_rng(seed))
        sep = ids.tolist().index(tok.token_to_id("[SEP]"))
        assert (types[: sep + 1] == 0).all() and (types[sep + 1:] == 1).all()
        assert (ids[labels != -100] == mask_id).all() and (labels[1:sep] != -100).any()
        assert ((labels == -100) | (ids == mask_id)).all()
        restored = np.where(labels != -100, labels, ids)
        head = tok.decode(restored[1:sep].tolist()).replace(" ", "")
        assert any(head.startswith(t.split("\t")[0]) for t in TRIPLES.splitlines())


@pytest.mark.slow
def test_knowledge_objectives_in_the_loop(entity_corpus, knowledge, tmp_path):
    from clueforge.pretrain.loop import pretrain

    _, _, triples = knowledge
    cfg = load_config("tiny", ["train.max_steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
                               "train.knowledge_weights={replace: 1.0, triple_mlm: 1.0, relation: 1.0}",
                               f"train.knowledge_triples={triples}"])
    pretrain(cfg, entity_corpus, tmp_path / "k", show_progress=False)
    last = json.loads((tmp_path / "k" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("replace_loss", "replace_acc", "triple_mlm_loss", "triple_mlm_acc", "relation_loss", "mlm_loss"):
        assert key in last
    assert last["replace_loss"] > 0 and last["triple_mlm_loss"] > 1.0


@pytest.mark.slow
def test_knowledge_recipe_runs_on_real_data_and_logs_every_loss(tmp_path, bert_vocab):
    """`clueforge pretrain --config knowledge` on a slice of ../shared/data, every objective on."""
    import subprocess
    import sys

    from conftest import ROOT

    corpus, kg = shared("corpus", "corpus.jsonl"), shared("kg")
    with open(corpus, "rb") as fh:
        (tmp_path / "head.jsonl").write_bytes(b"".join(next(fh) for _ in range(1500)))
    run = [sys.executable, "-m", "clueforge"]
    subprocess.run(run + ["corpus", "build", str(tmp_path / "head.jsonl"), "--out", str(tmp_path / "c"), "--vocab",
                          str(bert_vocab), "--entities", str(kg / "msra_entities.tsv"), "--entities",
                          str(kg / "medical_entities"), "--triples", str(kg / "kgclue_triples.tsv"), "--no-progress",
                          "--docs-per-shard", "500"], check=True, capture_output=True, cwd=ROOT)
    small = ["model.hidden_size=64", "model.num_heads=4", "model.intermediate_size=128", "model.num_layers=4",
             "train.batch_size=4", "train.structure_batch_size=2", "train.knowledge_batch_size=2", "train.log_every=1",
             "train.eval_batches=1", "train.warmup_steps=1"]
    res = subprocess.run(run + ["pretrain", "--config", "knowledge", "--data", str(tmp_path / "c"), "--out",
                                str(tmp_path / "r"), "--max-steps", "2", "--no-progress"] + sum((["--set", s] for s in small), []),
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "mlm_loss", "mlm_acc", "reorder_loss", "distance_loss", "replace_loss", "triple_mlm_loss",
                "relation_loss", "sd_instance_kl", "sd_layer_kl", "mask_ratio", "mask_w_entity", "eval_loss"):
        assert key in last, key


def test_self_distill_layers_must_be_intermediate(sample_corpus, tmp_path):
    from clueforge.pretrain.loop import pretrain

    with pytest.raises(ValueError, match=r"self_distill_layers \[2\]: intermediate layers are 1..1"):
        pretrain(load_config("tiny", ["train.self_distill_layers=[2]"]), sample_corpus, tmp_path / "x", show_progress=False)
