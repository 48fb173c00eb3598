"""User mistakes give a PlateauError that names the file, the node or the valid choices."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support import compile_models as fx
from tvm import relax

from plateau.compile import compile_onnx
from plateau.errors import PlateauError


def test_missing_file(tmp_path):
    with pytest.raises(PlateauError, match="no such ONNX file"):
        compile_onnx(tmp_path / "nope.onnx", "host", tmp_path / "out")


def test_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a protobuf" * 10)
    with pytest.raises(PlateauError, match="model.onnx: not"):
        compile_onnx(bad, "host", tmp_path / "out")
    assert not (tmp_path / "out" / "model.so").exists()


def test_bad_requant_mode(qdq_models, tmp_path):
    with pytest.raises(PlateauError, match="unknown requant mode 'round'.*float"):
        compile_onnx(qdq_models["ort_s8s8"], "host", tmp_path, requant="round")


def test_op_the_importer_cannot_convert(tmp_path):
    path = fx.single_conv_qdq(tmp_path / "qlinear.onnx", op="QLinearConv", name="my_qlinear_conv")
    with pytest.raises(PlateauError, match=r"node 'my_qlinear_conv' has op type 'QLinearConv'"):
        compile_onnx(path, "host", tmp_path / "out")


def test_unlowerable_conv_names_the_node(tmp_path):
    """uint8 weights with zero point 128 (asymmetric) cannot be folded: an error unless allow_float."""
    path = fx.single_conv_qdq(tmp_path / "asym.onnx", w_zp=128, name="asym_conv")
    with pytest.raises(PlateauError, match=r"'asym_conv' \(Conv\).*allow_float=True"):
        compile_onnx(path, "host", tmp_path / "out")
    assert not (tmp_path / "out" / "model.so").exists()


def test_allow_float_keeps_and_reports_the_island(tmp_path):
    path = fx.single_conv_qdq(tmp_path / "asym.onnx", w_zp=128, name="asym_conv")
    m = compile_onnx(path, "host", tmp_path / "out", allow_float=True)
    assert m["float_islands"] == [{"node": "asym_conv", "op_type": "Conv", "relax_op": "conv2d",
                                   "kind": "compute"}]
    assert m["ops"]["float_conv2d"] == 1 and m["ops"]["int_conv2d"] == 0
    assert m["batch"] == "dynamic"
    from plateau.export.validate import ort_session

    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_session(str(path)).run(None, {"input": x})[0]
    assert np.abs(ours - ref).max() <= 0.05 + 1e-6  # within one output step (scale 0.05)


def test_multi_input_graph_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4])  # noqa: E731
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"], name="add")], "two", [vi("a"), vi("b")],
                          [vi("c")])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(PlateauError, match="expected one graph input"):
        compile_onnx(path, "host", tmp_path / "out")


def test_missing_cross_compiler_says_what_to_install(qdq_models, tmp_path, monkeypatch):
    import plateau.compile.targets as targets

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(PlateauError, match="aarch64-linux-gnu-gcc.*apt-get install gcc-aarch64-linux-gnu"):
        compile_onnx(qdq_models["ort_s8s8"], "arm64", tmp_path)
