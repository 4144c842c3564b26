"""Shipped configs are portable: they load from any directory and fit any model depth; relative
paths resolve against the config file; settings a curriculum would override are refused."""

from pathlib import Path

import pytest

from clueforge.model.bert import BertForMLM
from clueforge.pretrain.config import CONFIG_DIR, load_config, resolve_layers

TINY_SHAPE = ["model.hidden_size=64", "model.num_heads=4", "model.intermediate_size=128", "model.num_layers=2",
              "model.max_position=128", "train.seq_len=64"]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
@pytest.mark.parametrize("layers", [1, 2, 6])
def test_every_shipped_config_builds_at_any_depth(name, layers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing depends on the working directory
    shape = [s for s in TINY_SHAPE if "num_layers" not in s] + [f"model.num_layers={layers}"]
    cfg = load_config(name, shape)
    BertForMLM(cfg.model)
    taps = resolve_layers(cfg.train.self_distill_layers, layers)  # 1 layer: none, with a warning
    assert all(1 <= x < layers for x in taps)
    if cfg.train.knowledge_triples:
        assert Path(cfg.train.knowledge_triples).is_absolute()


def test_knowledge_config_taps_the_middle_layer_of_any_depth():
    cfg = load_config("knowledge", TINY_SHAPE) if (CONFIG_DIR / "knowledge.yaml").is_file() else None
    if cfg is None or not Path(cfg.train.knowledge_triples).is_file():
        pytest.skip("needs ../shared/data/kg")
    assert [resolve_layers(cfg.train.self_distill_layers, n) for n in (2, 4, 6, 12)] == [(1,), (2,), (3,), (6,)]


def test_a_one_layer_model_skips_layer_taps_with_a_warning(caplog):
    """No intermediate layer: the layer-wise term is dropped (warned), not an error."""
    for spec in ([0.5], [1], [-2]):
        caplog.clear()
        assert resolve_layers(spec, 1) == ()
        assert "no intermediate layer" in caplog.text and "skipped" in caplog.text
    assert resolve_layers(None, 1) == () and resolve_layers([], 1) == ()
    with pytest.raises(ValueError, match="fraction of the depth"):
        resolve_layers(["x"], 1)  # a malformed entry is still an error


def test_layer_taps_relative_to_depth():
    assert resolve_layers([1, -2, 0.5], 4) == (1, 3, 2)
    assert resolve_layers(None, 2) == ()
    with pytest.raises(ValueError, match=r"self_distill_layers \[-1\]: intermediate layers are 1..3"):
        resolve_layers([-1], 4)  # the last layer is the teacher
    with pytest.raises(ValueError, match="fraction of the depth"):
        resolve_layers(["middle"], 4)


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "kg").mkdir()
    (tmp_path / "kg" / "t.tsv").write_text("北京\t首都\t中国\n", encoding="utf-8")
    (tmp_path / "cfg").mkdir()
    yml = tmp_path / "cfg" / "k.yaml"
    yml.write_text("train:\n  knowledge_triples: ../kg/t.tsv\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(yml).train.knowledge_triples == str(tmp_path / "kg" / "t.tsv")
    # a path given on the command line is relative to the working directory
    (elsewhere / "mine.tsv").write_text("a\tb\tc\n", encoding="utf-8")
    assert load_config(yml, ["train.knowledge_triples=mine.tsv"]).train.knowledge_triples == "mine.tsv"
    yml.write_text("train:\n  knowledge_triples: kg/t.tsv\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.knowledge_triples 'kg/t.tsv' not found.*its directory .*cfg"):
        load_config(yml)


def test_settings_a_curriculum_overrides_are_refused(tmp_path):
    stages = "[{at: 0.0, ratio: 0.1, weights: {token: 1.0}}, {at: 1.0, ratio: 0.2, weights: {wwm: 1.0}}]"
    with pytest.raises(ValueError, match=r"curriculum overrides mask_ratio .*masking_weights"):
        load_config("tiny", [f"train.curriculum={stages}", "train.mask_ratio=0.15",
                             "train.masking_weights={wwm: 1.0}"])
    # ``masking`` is the one-strategy form of masking_weights: ignored just the same
    with pytest.raises(ValueError, match=r"curriculum overrides masking \(every stage sets weights\)"):
        load_config("tiny", [f"train.curriculum={stages}", "train.masking=token"])
    with pytest.raises(ValueError, match=r"curriculum overrides masking \(every stage sets weights\)"):
        load_config("knowledge", ["train.masking=token", "train.knowledge_triples=/dev/null"])
    # span_p is not set by every stage: the setting is used, so it may be written
    cfg = load_config("tiny", [f"train.curriculum={stages}", "train.span_p=0.3"])
    assert cfg.train.span_p == 0.3


def test_a_set_path_replaces_a_config_path_that_does_not_exist(tmp_path, monkeypatch):
    """The shipped knowledge config names ../shared/...: a user without it passes --set instead."""
    yml = tmp_path / "k.yaml"
    yml.write_text("train:\n  knowledge_triples: nowhere/t.tsv\n", encoding="utf-8")
    (tmp_path / "mine.tsv").write_text("北京\t首都\t中国\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="train.knowledge_triples 'nowhere/t.tsv' not found"):
        load_config(yml)
    assert load_config(yml, ["train.knowledge_triples=mine.tsv"]).train.knowledge_triples == "mine.tsv"


def test_every_option_is_named_by_some_test():
    """``tests/untested_options.py``: no ``TrainConfig``/``FinetuneConfig``/``ModelConfig`` field
    that no test file names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("untested_options", Path(__file__).with_name("untested_options.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.untested() == {}
