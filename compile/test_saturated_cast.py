"""saturated_cast.drop_cast_wraps: Clip -> Cast(float -> 8-bit) imported by TVM's ONNX frontend becomes one astype, with
the same integers as onnxruntime; a Cast whose input is not clamped into the type keeps the importer's wrap."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from plateau.compile import lower_qdq
from plateau.compile.compiler import lower_for_target
from plateau.compile.targets import get_target

RNG = np.random.default_rng(5)


def _clip_cast(lo: float, hi: float, to: int, src: int = TensorProto.DOUBLE) -> onnx.ModelProto:
    """y = Cast(Clip(Round(x) + 0.5 * 0, lo, hi), to) on a float input."""
    np_src = {TensorProto.DOUBLE: np.float64, TensorProto.FLOAT: np.float32}[src]
    inits = [numpy_helper.from_array(np.asarray(v, np_src), n) for n, v in (("lo", lo), ("hi", hi))]
    nodes = [helper.make_node("Round", ["x"], ["r"]),
             helper.make_node("Clip", ["r", "lo", "hi"], ["c"]),
             helper.make_node("Cast", ["c"], ["y"], to=to)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", src, [4, 96])],
                          [helper.make_tensor_value_info("y", to, [4, 96])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ops(mod: tvm.IRModule) -> set[str]:
    names = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and names.add(e.op.name))
    return names


def _lower(mod: tvm.IRModule) -> tvm.IRModule:
    return lower_for_target(lower_qdq(mod), get_target("host"))


def _tvm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize(("lo", "hi", "to", "src"), [
    (-128, 127, TensorProto.INT8, TensorProto.DOUBLE),
    (0, 255, TensorProto.UINT8, TensorProto.DOUBLE),
    (-100, 27, TensorProto.INT8, TensorProto.FLOAT),
])
def test_clamped_cast_is_one_astype_with_the_same_integers(lo, hi, to, src):
    model = _clip_cast(lo, hi, to, src)
    imported = from_onnx(model, keep_params_in_input=False)
    assert "relax.isfinite" in _ops(imported)  # the importer's wrap is there to remove
    lowered = _lower(imported)
    ops = _ops(lowered)
    assert not ops & {"relax.isfinite", "relax.bitwise_and", "relax.where"}, ops
    np_src = np.float64 if src == TensorProto.DOUBLE else np.float32
    # far outside the range, on it, and every half-integer tie between
    x = np.concatenate([RNG.uniform(-1e4, 1e4, 128), np.arange(-300, 300, 0.5)[:256]]).astype(np_src)
    x = x.reshape(4, 96)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = _tvm(lowered, x)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_cast_not_clamped_into_the_type_keeps_the_wrap():
    # hi = 300 does not fit int8: the importer's wrap decides the bytes, so it must stay
    lowered = _lower(from_onnx(_clip_cast(-128, 300, TensorProto.INT8), keep_params_in_input=False))
    assert "relax.bitwise_and" in _ops(lowered)
