"""ONNX export: fp32 logits equal PyTorch's (dynamic batch and length), int8 is reported, the
ONNX runtime writes the same prediction files as PyTorch, unsupported families are refused."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from clueforge.cli import app
from clueforge.deploy.runtime import OnnxModel
from clueforge.finetune.loop import load_finetuned
from deploy_models import FIXTURES, exported, tiny_finetuned  # noqa: F401 (a fixture)

pytest.importorskip("onnxruntime")
runner = CliRunner()


def test_export_directory_and_check(exported):
    ft, onnx_dir = exported["afqmc"]
    for f in ("model.onnx", "model.int8.onnx", "vocab.txt", "tokenizer_config.json", "config.json", "export_check.json"):
        assert (onnx_dir / f).is_file(), f
    assert not (onnx_dir / "model.safetensors").exists()
    cfg = json.loads((onnx_dir / "config.json").read_text())
    assert cfg["clueforge_task"] == json.loads((ft / "config.json").read_text())["clueforge_task"]
    assert cfg["clueforge_onnx"]["model"] == "model.int8.onnx"
    rep = json.loads((onnx_dir / "export_check.json").read_text())
    assert rep["checked_on"].startswith("dev set") and "(4 examples)" in rep["checked_on"]  # --max-check 4
    fp32, int8 = rep["onnxruntime"]["fp32"], rep["onnxruntime"]["int8"]
    assert fp32["max_abs_logit_diff"] <= 1e-4 and fp32["label_agreement"] == 1.0 and fp32["labels_compared"] == 4
    assert 0.0 < int8["max_abs_logit_diff"] and 0.0 <= int8["label_agreement"] <= 1.0
    assert int8["bytes"] < fp32["bytes"]
    assert fp32["dev_score"] == rep["pytorch_dev_score"]
    ner = json.loads((exported["cluener"][1] / "export_check.json").read_text())
    assert ner["checked_on"].startswith("random sample") and ner["onnxruntime"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert ner["onnxruntime"]["fp32"]["labels_compared"] > 1000  # one label per real token


@pytest.mark.parametrize("task", ["afqmc", "cluener"])
def test_onnx_fp32_equals_pytorch_any_batch_and_length(exported, task):
    ft, onnx_dir = exported[task]
    model = load_finetuned(ft, task)[3].eval()
    ort = OnnxModel(onnx_dir / "model.onnx")
    gen = torch.Generator().manual_seed(1)
    for B, T in ((1, 3), (5, 37), (16, 128)):
        ids = torch.randint(5, model.cfg.vocab_size, (B, T), generator=gen)
        mask = torch.ones_like(ids)
        mask[B // 2:, T // 2:] = 0  # padding in half of the rows (none when B = 1)
        types = torch.zeros_like(ids)
        types[:, T // 3:] = 1
        with torch.inference_mode():
            ref = model(ids, mask, types)
        got = ort(ids, mask, types)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_mean_pooling_classifier_exports_equal(tmp_path, sample_vocab):
    """A ``pooling=mean`` checkpoint exports its own head: ONNX = PyTorch with padding in the batch
    (a graph reading [CLS] would miss by far more than 1e-4: checked on the same inputs)."""
    from clueforge.deploy.export import export_onnx
    from deploy_models import tiny_finetuned

    ft = tiny_finetuned(tmp_path / "ft", "afqmc", FIXTURES / "afqmc", sample_vocab, pooling="mean")
    rep = export_onnx(ft, tmp_path / "onnx")
    assert rep["onnxruntime"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    model = load_finetuned(ft, "afqmc")[3].eval()
    ids = torch.randint(5, model.cfg.vocab_size, (4, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2:, 9:] = 0
    with torch.inference_mode():
        ref = model(ids, mask, torch.zeros_like(ids))
        model.pooling = "cls"
        cls = model(ids, mask, torch.zeros_like(ids))
    got = OnnxModel(tmp_path / "onnx" / "model.onnx")(ids, mask, torch.zeros_like(ids))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (cls - ref).abs().max() > 1e-2


def test_graph_avoids_the_slow_cpu_operators(exported, tmp_path):
    """What ``benchmarks/ort_ops.py`` measured: the session runs Add + LayerNormalization, not
    SkipLayerNormalization (several times slower on CPU in onnxruntime 1.32), and the padding mask
    is added once per layer, not a boolean mask's Where + SDPA's NaN guard (IsNaN) in every layer."""
    import onnx

    from clueforge.deploy.runtime import ort_session

    onnx_dir = exported["afqmc"][1]
    for name in ("model.onnx", "model.int8.onnx"):
        ort_session(onnx_dir / name, 1, optimized_path=tmp_path / name)  # the graph the session runs
        ops = [n.op_type for n in onnx.load(str(tmp_path / name)).graph.node]
        assert "SkipLayerNormalization" not in ops and "IsNaN" not in ops, name
        assert ops.count("LayerNormalization") >= 2 * 2, name  # tiny fixture: 2 layers, 2 each, unfused
    stored = [n.op_type for n in onnx.load(str(onnx_dir / "model.onnx")).graph.node]
    assert "SkipLayerNormalization" not in stored and "Where" not in stored and "IsNaN" not in stored


@pytest.mark.parametrize("task", ["afqmc", "cluener"])
def test_predict_runtime_onnx_writes_the_torch_file(exported, task, tmp_path):
    ft, onnx_dir = exported[task]
    fp32_dir = tmp_path / "fp32"
    shutil.copytree(onnx_dir, fp32_dir)
    cfg = json.loads((fp32_dir / "config.json").read_text())
    cfg["clueforge_onnx"]["model"] = "model.onnx"  # the int8 file is the default of an --int8 export
    (fp32_dir / "config.json").write_text(json.dumps(cfg))
    test = FIXTURES / task / "test.json"
    r1 = runner.invoke(app, ["predict", task, "--model", str(ft), "--input", str(test), "--out", str(tmp_path / "t.json")])
    r2 = runner.invoke(app, ["predict", task, "--model", str(fp32_dir), "--runtime", "onnx", "--input", str(test),
                             "--out", str(tmp_path / "o.json")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    torch_rows = (tmp_path / "t.json").read_text()
    assert (tmp_path / "o.json").read_text() == torch_rows
    assert len(torch_rows.splitlines()) == len(test.read_text().splitlines())


def test_runtime_mismatches_are_user_errors(exported, tmp_path):
    ft, onnx_dir = exported["afqmc"]
    test = str(FIXTURES / "afqmc" / "test.json")
    cases = [(["--model", str(ft), "--runtime", "onnx"], "clueforge export"),
             (["--model", str(onnx_dir), "--runtime", "torch"], "--runtime onnx"),
             (["--model", str(onnx_dir), "--runtime", "tensorrt"], "expected one of torch, onnx")]
    for args, msg in cases:
        r = runner.invoke(app, ["predict", "afqmc", *args, "--input", test, "--out", str(tmp_path / "p.json")])
        assert r.exit_code == 2 and msg in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output


@pytest.mark.parametrize("task", ["c3", "cmrc2018"])
def test_export_refuses_other_families(task, tmp_path, sample_vocab):
    ft = tiny_finetuned(tmp_path / task, task, FIXTURES / task, sample_vocab)
    r = runner.invoke(app, ["export", str(ft), "--format", "onnx", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "classify family" in text and "ner family" in text and task in text
    assert not (tmp_path / "out").exists()
