"""The runtime stage end to end on a small exported model: validate, a planted error located, bench, bad
inputs.

One export + compile (synthetic data, small_cnn, ~200 images) shared by the tests in this module.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from plateau.cli import main as cli
from plateau.runtime import layers, validate

pytestmark = pytest.mark.slow

PLANTED = "res_a_0"  # a conv in the middle of small_cnn: earlier layers must stay exact


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from plateau.models import create_model

    root = tmp_path_factory.mktemp("rt")
    torch.manual_seed(0)
    model = create_model("small_cnn")
    torch.save({"model": model.state_dict(), "model_name": "small_cnn"}, root / "ck.pt")
    r = root / "run"
    assert cli(["export", "--run", str(r), "--checkpoint", str(root / "ck.pt"), "--data", "synthetic",
                "--eval-limit", "200", "--calib-images", "64"]) == 0
    assert cli(["compile", "--run", str(r), "--target", "host"]) == 0
    return r


def test_validate_agrees_and_writes_reports(run):
    assert cli(["validate", "--run", str(run), "--target", "host"]) == 0
    out = run / "validate" / "host"
    rep = json.loads((out / "report.json").read_text())
    vs_ref = rep["device_vs_reference"]
    assert vs_ref["top1_agreement"] == 1.0 and vs_ref["max_steps"] <= 1
    assert "skipped" in rep["per_layer"] and rep["emulated"] is False
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "| fake-quant reference |" in (out / "report.md").read_text()


def test_planted_scale_error_is_located(run, tmp_path, capsys):
    from plateau.compile import compile_onnx

    layers.plant_scale_error(run / "export" / "model_qdq.onnx", tmp_path / "planted.onnx", PLANTED, 1.25)
    compile_onnx(tmp_path / "planted.onnx", "host", tmp_path / "planted")
    # The run's own validate refuses it as stale; --compiled validates it against the unmodified reference.
    shutil.copytree(run / "compile" / "host", tmp_path / "saved")
    with pytest.raises(Exception, match="stale"):
        validate.check_artifact(tmp_path / "planted", "host", json.loads((run / "export" / "manifest.json")
                                                                       .read_text()))
    assert cli(["validate", "--run", str(run), "--target", "host", "--compiled", str(tmp_path / "planted"),
                "--per-layer-images", "4"]) == 0
    rep = json.loads((run / "validate" / "host" / "report.json").read_text())
    pl = rep["per_layer"]
    assert pl["first_divergent"] == PLANTED, pl
    names = [r["layer"] for r in pl["layers"]]
    before = pl["layers"][: names.index(PLANTED)]
    assert before and all(r["max_steps"] == 0 for r in before)
    assert pl["layers"][names.index(PLANTED)]["max_steps"] > 1
    assert rep["artifact"]["from_run_export"] is False
    md = (run / "validate" / "host" / "report.md").read_text()
    assert f"First layer off by more than 1 step: {PLANTED}" in md


def test_bench_side_by_side(run):
    assert cli(["bench", "--run", str(run), "--target", "host", "--engines", "tvm-int8,ort-fp32,ort-qop",
                "--threads", "1", "--batch", "8", "--max-seconds", "0.3", "--min-repeats", "5",
                "--eval-limit", "64", "--calib-images", "16"]) == 0
    rep = json.loads((run / "bench" / "host" / "report.json").read_text())
    engines = [e["engine"] for e in rep["engines"]]
    assert engines[:2] == ["TVM W8A8", "ORT fp32"] and len(engines) == 4  # QOperator u8 and s8
    assert sum(e.get("shown", True) for e in rep["engines"]) == 3
    for e in rep["engines"]:
        assert set(e["latency"]) == {"batch_1", "batch_8"} and e["peak_rss_mb"] > 0 and e["bytes"] > 0
        assert 0 <= e["top1"] <= 1
    html = (run / "bench" / "host" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


def test_bad_inputs_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (run / "compile" / "arm64").mkdir(exist_ok=True)
    shutil.copytree(run / "compile" / "host", bad / "host")
    assert cli(["validate", "--run", str(run), "--target", "arm64", "--compiled", str(bad / "host")]) == 2
    err = capsys.readouterr().err.strip()
    assert "compiled for target 'host', not 'arm64'" in err and "\n" not in err
    assert cli(["validate", "--run", str(run), "--target", "host", "--rpc", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach RPC server" in err and "\n" not in err
