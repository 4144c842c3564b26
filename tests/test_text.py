import pytest

from clueforge.text.normalize import is_probably_binary, normalize, split_sentences
from clueforge.text.segment import POS_ID, Segmenter
from clueforge.text.tokenizer import load_tokenizer
from conftest import hf_tokenizer_dir

MIXED = [
    "我在ＡＢＣ公司买了iPhone 15 Pro，花了７９９９元！",
    "Hello, 世界。Transformers库很好用😀，GPU加速×3。",
    "他说：“明天见。”然后离开了……Ｗｉｆｉ密码是ＡＢ12cd。",
    "Naïve café résumé 2024年12月31日 23:59。",
    "表情🙂👍🏻与符号©®™，网址https://example.com/a_b?x=1。",
    "数学：３．１４＋２＝５．１４；E=mc²，温度-5℃。",
    "混合　全角空格　和\t制表符\n换行。",
]


def test_normalize_full_width_and_whitespace():
    assert normalize("ＡＢＣ　１２３＃＋") == "ABC 123#+"
    assert normalize("你好！（真的），是吗？") == "你好！（真的），是吗？"
    assert normalize("a\u200bb\x07c\ufeff") == "abc"
    assert normalize("  多个   空格\t和\n换行  ") == "多个 空格 和 换行"
    assert normalize("第一段\n\n\n第二段", keep_newlines=True) == "第一段\n第二段"
    assert normalize("，。、《》“”") == "，。、《》“”"  # Chinese punctuation has no ASCII twin: kept


def test_traditional_to_simplified():
    pytest.importorskip("opencc")
    assert normalize("臺灣的資訊產業發展迅速", t2s=True) == "台湾的资讯产业发展迅速"


def test_sentence_split_chinese_and_western():
    text = "今天下雨了。我们还去吗？当然去！他说：“好的。”Pi is 3.14. Done\n新的一行"
    assert split_sentences(text) == ["今天下雨了。", "我们还去吗？", "当然去！", "他说：“好的。”", "Pi is 3.14.", "Done", "新的一行"]


def test_binary_detection():
    assert is_probably_binary("abc\x00def")
    assert is_probably_binary("\x01\x02\x03\x04abc")
    assert not is_probably_binary("正常的中文句子，含有\ue420私用区字符。")


def test_segmenter_pos_and_user_dict(tmp_path):
    seg = Segmenter()
    words = seg.tag("我爱北京天安门")
    assert [w for w, _ in words] == ["我", "爱", "北京", "天安门"]
    assert dict(words)["北京"] == "ns" and "ns" in POS_ID
    d = tmp_path / "user.txt"
    d.write_text("蓝鲸大模型 100000 nz\n", encoding="utf-8")
    assert "蓝鲸大模型" not in Segmenter().cut("我们发布了蓝鲸大模型")
    seg2 = Segmenter(d)
    assert ("蓝鲸大模型", "nz") in seg2.tag("我们发布了蓝鲸大模型")
    bad = tmp_path / "bad.txt"
    bad.write_text("词 不是数字 n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        Segmenter(bad)


def test_tokenizer_matches_bert_tokenizer_fast(bert_vocab, tmp_path):
    hf = hf_tokenizer_dir(bert_vocab, tmp_path)
    assert hf.vocab_size == 21128 and hf.cls_token_id == 101
    ours = load_tokenizer(bert_vocab)
    for text in MIXED:
        expected = hf(text)["input_ids"]
        got = ours.encode(text).ids
        assert got == expected, text
    assert ours.encode(MIXED[1], add_special_tokens=False).ids == hf(MIXED[1], add_special_tokens=False)["input_ids"]


def test_vocab_build_keeps_chinese_chars_whole(sample_vocab, tmp_path):
    tokens = sample_vocab.read_text(encoding="utf-8").split("\n")[:-1]
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    cjk = [t for t in tokens if any("\u4e00" <= c <= "\u9fff" for c in t)]
    assert cjk and all(len(t.removeprefix("##")) == 1 for t in cjk)
    # and transformers reads it, id for id
    hf = hf_tokenizer_dir(sample_vocab, tmp_path)
    ours = load_tokenizer(sample_vocab)
    assert ours.encode("老李退休以后种了很多花草。").ids == hf("老李退休以后种了很多花草。")["input_ids"]
