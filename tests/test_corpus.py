import gzip
import json
import shutil

import numpy as np
import pytest

from clueforge.corpus.build import DOC_START, SENT_START, WORD_START, BuildConfig, build_corpus, encode_documents
from clueforge.corpus.shards import Corpus
from clueforge.text.segment import POS_ID, Segmenter
from clueforge.text.tokenizer import load_tokenizer
from conftest import SAMPLE, shared


def _shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted((d / "shards").iterdir()) if not p.name.endswith(".json")}


def test_side_channels_align_with_words_sentences_docs(sample_vocab):
    tok, seg = load_tokenizer(sample_vocab), Segmenter()
    texts = ["我爱北京天安门。今天天气很好！", "小明买了iPhone手机。"]
    ids, flags, pos, ntok = encode_documents(texts, tok, seg)
    assert ntok.tolist() == [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    assert ids.tolist() == sum((tok.encode(t, add_special_tokens=False).ids for t in texts), [])
    doc0 = slice(0, ntok[0])
    # word starts: 我|爱|北京|天安门|。|今天|天气|很|好|！  → one flag per word, on its first character
    words = [w for w, _ in seg.tag(texts[0])]
    starts = np.flatnonzero(flags[doc0] & WORD_START)
    assert starts.size == len(words)
    assert np.diff(np.append(starts, ntok[0])).tolist() == [len(w) for w in words]
    assert np.flatnonzero(flags[doc0] & SENT_START).tolist() == [0, 8]
    assert np.flatnonzero(flags & DOC_START).tolist() == [0, ntok[0]]
    assert pos[2] == POS_ID["ns"] and pos[3] == POS_ID["ns"]  # 北, 京 carry their word's tag


def test_build_sample_and_stats(sample_corpus):
    c = Corpus(sample_corpus)
    m = c.manifest
    assert m["docs_read"] == 61 and m["docs_kept"] == 61 and m["docs_skipped"] == {}
    assert m["tokens"] == sum(s.ids.size for s in c.shards) > 3000
    assert len(m["config_hash"]) == 16 and len(m["vocab_sha256"]) == 64
    st = c.stats(vocab_unk_id=1)
    assert st["doc_tokens"]["count"] == 61 and st["sentence_tokens"]["count"] == m["sentences"]
    assert st["unk_rate"] == 0.0


def test_workers_do_not_change_bytes(tmp_path, sample_vocab):
    cfg = BuildConfig(vocab=str(sample_vocab), doc_sep="blank", docs_per_shard=7)
    build_corpus([SAMPLE], tmp_path / "w1", cfg, workers=1)
    build_corpus([SAMPLE], tmp_path / "w3", cfg, workers=3)
    a, b = _shard_bytes(tmp_path / "w1"), _shard_bytes(tmp_path / "w3")
    assert len(a) == 3 * 9 and a == b


def test_resume_finishes_only_missing_shards(tmp_path, sample_vocab):
    cfg = BuildConfig(vocab=str(sample_vocab), doc_sep="blank", docs_per_shard=10)
    out = tmp_path / "c"
    first = build_corpus([SAMPLE], out, cfg)
    before = _shard_bytes(out)
    # a crash mid-shard: data written, completion marker missing, a stray temporary file
    (out / "shards" / "shard-000003.json").unlink()
    (out / "shards" / "shard-000005.ids.u16").unlink()
    (out / "shards" / "shard-000004.ids.u16.tmp123").write_bytes(b"partial")
    again = build_corpus([SAMPLE], out, cfg)
    assert again["shards_resumed"] == len(first["shards"]) - 2
    assert _shard_bytes(out) | {} == before | {"shard-000004.ids.u16.tmp123": b"partial"}
    assert again["tokens"] == first["tokens"]
    other = BuildConfig(vocab=str(sample_vocab), doc_sep="blank", docs_per_shard=10, min_chars=5)
    with pytest.raises(FileExistsError, match="another config"):
        build_corpus([SAMPLE], out, other)


def test_bad_input_is_skipped_counted_and_located(tmp_path, sample_vocab):
    good = [json.dumps({"text": f"这是第{i}个好文档，内容完整。"}, ensure_ascii=False).encode() for i in range(6)]
    lines = [
        good[0],
        b'{"text": "\xff\xfe broken utf8"}',          # 2 invalid_utf8
        b'{"text": "unterminated',                     # 3 bad_json
        b'{"body": "no text field"}',                  # 4 missing_field
        b"",                                            # 5 empty
        b'{"text": "\\u0000\\u0001binary\\u0002"}',    # 6 binary
        b'{"text": "' + "长".encode() * (4 << 20) + b'"}',  # 7 a 12 MB line
        b'{"text": 42}',                               # 8 bad_field_type
        good[1],
        b'{"text": "\xe4\xb8\xad\xe6\x96\x87\xe2\x80\xa8\xe5\x90\x8e"}',  # U+2028 inside a string: fine
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    packed = gzip.compress(b"\n".join(good[2:6]) + b"\n")
    (tmp_path / "b.jsonl.gz").write_bytes(packed[: len(packed) - 12])  # truncated stream
    (tmp_path / "c.txt").write_bytes("纯文本的一行。\n\x00\x01\x02\x03二进制\n另一行文本。\n".encode())
    m = build_corpus([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.txt"], tmp_path / "out",
                     BuildConfig(vocab=str(sample_vocab)))
    sk = m["docs_skipped"]
    assert sk == {"bad_field_type": 1, "bad_json": 1, "binary": 2, "empty": 1, "invalid_utf8": 1, "line_too_long": 1,
                  "missing_field": 1, "truncated_file": 1}
    # every good document around the bad ones is kept: 3 in a.jsonl, the intact head of b, 2 in c.txt
    gz_kept = m["docs_kept"] - 3 - 2
    assert 1 <= gz_kept <= 4
    where = {(e["reason"], e["file"].rsplit("/", 1)[-1], e["line"]) for e in m["skipped_examples"]}
    assert ("invalid_utf8", "a.jsonl", 2) in where and ("line_too_long", "a.jsonl", 7) in where
    assert ("binary", "c.txt", 2) in where and ("bad_json", "a.jsonl", 3) in where


def test_blank_separated_and_zstd(tmp_path, sample_vocab):
    zstd = pytest.importorskip("zstandard")
    text = "第一篇第一段。\n第一篇第二段。\n\n第二篇。\n\n\n第三篇。\n"
    (tmp_path / "d.txt.zst").write_bytes(zstd.ZstdCompressor().compress(text.encode()))
    m = build_corpus([tmp_path / "d.txt.zst"], tmp_path / "o", BuildConfig(vocab=str(sample_vocab), doc_sep="blank"))
    assert m["docs_kept"] == 3 and m["sentences"] == 4


def test_real_corpus_slice(tmp_path, bert_vocab):
    src = shared("corpus", "corpus.jsonl")
    with open(src, "rb") as fh:
        head = b"".join(next(fh) for _ in range(3000))
    (tmp_path / "head.jsonl").write_bytes(head)
    m = build_corpus([tmp_path / "head.jsonl"], tmp_path / "o", BuildConfig(vocab=str(bert_vocab), docs_per_shard=1000))
    assert m["docs_read"] == 3000 and m["docs_kept"] + sum(m["docs_skipped"].values()) == 3000
    c = Corpus(tmp_path / "o")
    st = c.stats(vocab_unk_id=100)
    assert st["unk_rate"] < 0.01 and 1.2 < st["word_tokens"]["mean"] < 2.5
    shutil.rmtree(tmp_path / "o")


MIXED_DOCS = ["我在ＡＢＣ公司买了iPhone 15 Pro，花了7999元！", "Naïve café résumé 2024年12月31日。", "",
              "表情🙂👍🏻与符号©®™，网址https://example.com/a_b?x=1。\n第二行", "   ", "x", "……“引号”（括号）【方括号】"]


def _fast_equals_plain(texts, vocab):
    from clueforge.text.tokenizer import FastChineseEncoder

    tok, seg = load_tokenizer(vocab), Segmenter()
    plain = encode_documents(texts, tok, seg)
    fast = encode_documents(texts, tok, seg, FastChineseEncoder(tok))
    for a, b in zip(plain, fast):
        np.testing.assert_array_equal(a, b)
    return plain


def test_fast_tokenizer_path_equals_plain_on_mixed_text(bert_vocab, sample_vocab):
    for vocab in (bert_vocab, sample_vocab):
        ids, *_ = _fast_equals_plain(MIXED_DOCS, vocab)
        assert ids.size > 50


def test_fast_tokenizer_path_equals_plain_on_real_corpus(bert_vocab):
    from clueforge.text.normalize import normalize

    src = shared("corpus", "corpus.jsonl")
    with open(src, encoding="utf-8") as fh:
        texts = [normalize(json.loads(next(fh))["text"], keep_newlines=True) for _ in range(4000)]
    _fast_equals_plain(texts, bert_vocab)
