"""The CPU pipeline's own lowerings (cpu_pipeline.CPU_LEGALIZE) of float-island ops: erf as topi.fast_erf and
a float island's QuantizeLinear with llvm.nearbyint, both vectorizable. The unscheduled build lowers them the
same way, so the two builds still agree on every value."""

from __future__ import annotations

import math

import numpy as np
import tvm
from onnx import helper, numpy_helper
from support import compile_models as fx
from tvm import relax

from plateau.compile import compile_onnx
from plateau.compile.compiler import build, import_onnx, lower_for_target
from plateau.compile.lower import lower_qdq
from plateau.compile.targets import get_target

S_X, S_Y, ZP_Y = 0.02, 1 / 127, 0


def _erf_island_qdq(path) -> None:
    """input -> Q -> DQ -> Erf -> Q -> DQ: an Erf (GELU's) left in float between two quantizations."""
    inits = [numpy_helper.from_array(v, n) for n, v in (("s", np.float32(S_X)), ("z", np.int8(0)),
                                                         ("ys", np.float32(S_Y)), ("yz", np.int8(ZP_Y)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
             helper.make_node("Erf", ["x"], ["e"], name="erf"),
             helper.make_node("QuantizeLinear", ["e", "ys", "yz"], ["eq"]),
             helper.make_node("DequantizeLinear", ["eq", "ys", "yz"], ["output"])]
    fx.save_graph(path, nodes, inits, ["N", 64, 48], "erf")


def test_erf_island_is_vectorized_and_accurate(tmp_path):
    """No libm erff call is left (one scalar call per element made the whole loop scalar); the scheduled and
    the unscheduled build agree; against erf in float64, every output is within one step and almost all
    exact."""
    path = tmp_path / "erf.onnx"
    _erf_island_qdq(path)
    mod, _ = import_onnx(path)
    tgt = get_target("host")
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert "erff" not in asm

    m = compile_onnx(path, "host", tmp_path / "sched", allow_float=True)
    compile_onnx(path, "host", tmp_path / "plain", allow_float=True, schedule="none")
    assert any(i["op_type"] == "Erf" for i in m["float_islands"])
    # every int8 input value, many times: the whole domain of the island
    x = (np.tile(np.arange(-128, 128, dtype=np.float32), 4 * 64 * 48 // 256).reshape(4, 64, 48) * S_X)
    outs = [relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / d / "model.so")), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy() for d in ("sched", "plain")]
    np.testing.assert_array_equal(outs[0], outs[1])
    q = np.clip(np.rint(x / np.float32(S_X)), -128, 127) * np.float64(np.float32(S_X))
    want = np.clip(np.rint(np.vectorize(math.erf)(q) / np.float64(np.float32(S_Y))) + ZP_Y, -128, 127)
    steps = np.abs(np.rint(outs[0] / np.float32(S_Y)) - want)
    assert steps.max() <= 1 and (steps == 0).mean() >= 0.999, (steps.max(), (steps == 0).mean())
