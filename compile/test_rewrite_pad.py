"""The importer's constant Pad (call_tir of topi.nn.pad) becomes relax.nn.pad and runs on integers:
ResNet-20's option-A shortcut (Slice + channel Pad between DQ and Q) leaves no float island."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from support import compile_models as fx

from plateau.compile import compile_onnx, lower_qdq, op_counts
from plateau.compile.compiler import import_onnx
from plateau.compile.rewrite_pad import PadSpec, onnx_constant_pads


def _shortcut_qdq(path) -> None:
    """Q -> DQ -> Slice(::2, ::2) -> Q -> DQ -> Pad(channels 2 + 2) -> Q -> DQ, as plateau export writes
    it."""
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("s", np.float32(0.04)), ("z", np.int8(-128)), ("starts", np.array([0, 0], np.int64)),
        ("ends", np.array([2**62, 2**62], np.int64)), ("axes", np.array([2, 3], np.int64)),
        ("steps", np.array([2, 2], np.int64)), ("pads", np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"]),
             helper.make_node("Slice", ["d0", "starts", "ends", "axes", "steps"], ["sl"], name="getitem"),
             helper.make_node("QuantizeLinear", ["sl", "s", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node("Pad", ["d1", "pads"], ["p"], name="pad", mode="constant"),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["output"])]
    fx.save_graph(path, nodes, inits, ["N", 4, 8, 8], "shortcut")


def test_pad_specs_from_onnx(tmp_path):
    _shortcut_qdq(tmp_path / "m.onnx")
    assert onnx_constant_pads(onnx.load(str(tmp_path / "m.onnx"))) == [PadSpec((0, 0, 2, 2, 0, 0, 0, 0), 0.0)]


def test_pad_structure(tmp_path):
    """After import: relax.nn.pad, no call_tir; after lowering: pad (value zp) and slice on int8, no float
    op."""
    _shortcut_qdq(tmp_path / "m.onnx")
    mod, _ = import_onnx(tmp_path / "m.onnx")
    ops = [b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings]
    assert "relax.call_tir" not in ops and "relax.nn.pad" in ops
    low = lower_qdq(mod)
    calls = {b.value.op.name: b.value for blk in low["main"].body.blocks for b in blk.bindings}
    pad = calls["relax.nn.pad"]
    assert str(pad.args[0].ty.dtype) == "int8" and float(pad.attrs.pad_value) == -128
    assert str(calls["relax.strided_slice"].args[0].ty.dtype) == "int8"
    assert not any(k.startswith("float_op") for k in op_counts(low))


def test_pad_matches_onnxruntime(tmp_path):
    import tvm
    from tvm import relax

    from plateau.export.validate import ort_session

    _shortcut_qdq(tmp_path / "m.onnx")
    m = compile_onnx(tmp_path / "m.onnx", "host", tmp_path / "out")
    assert m["float_islands"] == []
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    ref = ort_session(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), ref)

