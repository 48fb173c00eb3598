"""validate / layers / report: artifact checks, device-failure messages, per-layer comparison, reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from plateau.artifacts import write_manifest
from plateau.errors import PlateauError
from plateau.runtime import layers, report, validate


def _manifest(folder, target, tvm_target=None, onnx_sha=None):
    write_manifest(folder, "compile", config={"target": target}, outputs={"library": {"path": "model.so"}},
                   inputs={"onnx": {"path": "m.onnx", "sha256": onnx_sha}} if onnx_sha else {},
                   target=target, tvm_target=tvm_target or {"kind": "llvm"})


def test_check_artifact_accepts_matching(artifacts):
    comp = validate.check_artifact(artifacts("host", "int8"), "host", None)
    assert comp["target"] == "host"


def test_check_artifact_other_target(artifacts, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(artifacts("host", "int8"), d)
    _manifest(d, "arm64")
    with pytest.raises(PlateauError, match="compiled for target 'arm64', not 'host'") as e:
        validate.check_artifact(d, "host", None)
    assert "\n" not in str(e.value)


def test_check_artifact_wrong_cpu(artifacts, tmp_path):
    # A manifest that says arm64 over an x86-64 library: the library was replaced.
    d = tmp_path / "c"
    shutil.copytree(artifacts("host", "int8"), d)
    _manifest(d, "arm64")
    with pytest.raises(PlateauError, match="x86_64 code but target 'arm64' is aarch64"):
        validate.check_artifact(d, "arm64", None)


def test_check_artifact_stale(artifacts, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(artifacts("host", "int8"), d)
    _manifest(d, "host", onnx_sha="a" * 64)
    with pytest.raises(PlateauError, match="stale"):
        validate.check_artifact(d, "host", {"qdq_sha256": "b" * 64})
    assert validate.check_artifact(d, "host", {"qdq_sha256": "b" * 64}, strict_onnx=False)["target"] == "host"


def test_check_artifact_missing(tmp_path):
    with pytest.raises(PlateauError, match="no compile manifest"):
        validate.check_artifact(tmp_path, "host", None)


def test_emulated_cpu_without_dotprod(monkeypatch, artifacts, inputs):
    monkeypatch.setenv("QEMU_CPU", "cortex-a53")
    comp = {"tvm_target": {"mattr": ["+neon", "+dotprod"]}}
    with pytest.raises(PlateauError, match="QEMU_CPU=cortex-a53 lacks dotprod"):
        validate.run_on_device(artifacts("host", "int8") / "model.so", inputs, "qemu", comp, "arm64")


def test_sigill_is_explained(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise PlateauError("arm64 worker under qemu failed (exit -4): qemu: uncaught target signal 4")

    monkeypatch.setattr(validate, "run_artifact", boom)
    comp = {"tvm_target": {"mattr": ["+neon", "+dotprod", "+i8mm"]}}
    with pytest.raises(PlateauError, match="illegal instruction.*dotprod, i8mm.*arm64-neon") as e:
        validate.run_on_device(tmp_path / "model.so", np.zeros((1, 3)), "qemu", comp, "arm64-i8mm")
    assert "\n" not in str(e.value)


def test_unreachable_board(artifacts, inputs):
    with pytest.raises(PlateauError, match="cannot reach RPC server 127.0.0.1:1"):
        validate.run_on_device(artifacts("host", "int8"), inputs, "rpc", {}, "host", rpc="127.0.0.1:1")


def test_compare_layers_finds_first():
    rng = np.random.default_rng(0)
    ref = {"a": rng.integers(-128, 127, (2, 4, 3)), "b": rng.integers(-128, 127, (2, 5)),
           "c": rng.integers(-128, 127, (2, 2))}
    dev = np.concatenate([ref[k].reshape(2, -1) for k in "abc"], axis=1).astype(np.float32)
    dev[0, 12] += 1  # b: one step, tolerated
    dev[1, 18] -= 3  # c: three steps
    rows = layers.compare_layers(ref, dev, list("abc"))
    assert [r["max_steps"] for r in rows] == [0, 1, 3]
    assert layers.first_divergent(rows) == "c" and layers.first_divergent(rows, tolerance=3) is None
    assert rows[1]["bit_exact"] == pytest.approx(0.9) and rows[2]["over_tolerance"] == pytest.approx(0.25)
    with pytest.raises(PlateauError, match="does not match the reference"):
        layers.compare_layers(ref, dev[:, :-1], list("abc"))


def test_divergent_images_order():
    ref = np.zeros((5, 3), np.float32)
    ref[:, 0] = 10
    out = ref.copy()
    out[1, 2] = 3  # 3 steps, same top-1
    out[3, 1] = 20  # top-1 flips
    out[4, 1] = 1  # 1 step: tolerated
    assert validate._divergent_images(out, ref, 1.0, 1, 8) == [3, 1]


def test_document_md_and_self_contained_html(tmp_path):
    doc = report.Document("T").text("a `b` **c**").table(["x", "y"], [["1", "2"]])
    doc.figure("acc", report.accuracy_plot({"fp32": {"e": 0.9}, "W8A8": {"e": 0.89, "f": 0.88}}))
    lat = {"batch_1": {"median_ms": 1.0, "min_ms": 0.9, "p90_ms": 1.2}}
    doc.figure("lat", report.latency_plot([{"engine": "e", "latency": lat}], [1], "t"))
    files = doc.write(tmp_path, data={"k": 1})
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert "| x | y |" in md and "![acc](acc.png)" in md
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    assert html.count("data:image/png;base64,") == 2
    assert "src='acc.png'" not in html and "<code>b</code>" in html
    assert json.loads((tmp_path / "report.json").read_text()) == {"k": 1} and files["html"] == "report.html"
    assert not list(tmp_path.glob(".*tmp"))


def test_planted_scale_error_below_8_bits(tmp_path):
    """With 4-bit activations `<layer>.q` is the clamp after the QuantizeLinear: the planted scale still lands
    on that layer's QuantizeLinear, and the debug copy reads the clamped integers."""
    import onnx
    import torch

    from plateau.export import QuantConfig, quantize_model, to_qdq_onnx
    from plateau.models import create_model

    torch.manual_seed(0)
    ref = quantize_model(create_model("small_cnn", width=8).eval(), [torch.randn(8, 3, 32, 32)],
                         QuantConfig.from_bits("W4A4"))
    onnx.save(to_qdq_onnx(ref), tmp_path / "q.onnx")
    layers.plant_scale_error(tmp_path / "q.onnx", tmp_path / "planted.onnx", "res_a_0", 1.25)
    g = onnx.load(tmp_path / "planted.onnx").graph
    planted = [n for n in g.node if n.op_type == "QuantizeLinear" and "res_a_0.s_planted" in n.input]
    assert len(planted) == 1
    clip = next(n for n in g.node if n.output[0] == "res_a_0.q")
    assert clip.op_type == "Clip" and clip.input[0] == planted[0].output[0]
    layers.debug_onnx(tmp_path / "q.onnx", layers.quant_points(ref), tmp_path / "debug.onnx")
    with pytest.raises(PlateauError, match="no QuantizeLinear writes nope.q"):
        layers.plant_scale_error(tmp_path / "q.onnx", tmp_path / "x.onnx", "nope")
