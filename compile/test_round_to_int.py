"""The int32 requantize tail (_common.round_to_int_tail) and its CPU lowering (cpu_pipeline.round_to_int32:
llvm.lrint).

Where the accumulator's bound proves round(y) fits int32, requantize adds the zero point and clamps in int32;
the CPU pipeline then rounds and converts in one instruction. Both must give the integers of the float tail,
which is the reference's formula: saturate(round_half_even(float32(acc) * m) + zp)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from plateau.compile._common import Multiplier, dot_bound, fits_int32, requantize
from plateau.compile.compiler import build
from plateau.compile.cpu_pipeline import round_to_int32
from plateau.compile.targets import get_target
from plateau.quant import INT8, UINT8

M = np.float32(0.0370123)


def _accumulators() -> np.ndarray:
    """Every int32 from -70000 to 70000, the ones whose float32 product with M lies next to a tie (x.5), and
    values far out of the int8 range on both sides."""
    dense = np.arange(-70_000, 70_001, dtype=np.int64)
    ties = np.rint((np.arange(-3000, 3000) + 0.5) / np.float64(M)).astype(np.int64)
    near = (ties[:, None] + np.arange(-2, 3)).reshape(-1)
    far = np.array([-(2**27), -(2**24) - 3, 2**24 + 5, 2**27], np.int64)
    return np.concatenate([dense, near, far]).astype(np.int32)


def _reference(acc: np.ndarray, zp: int, lo: int, hi: int) -> np.ndarray:
    y = acc.astype(np.float32) * M
    return np.clip(np.rint(y) + zp, lo, hi)  # np.rint: half to even


def _requant_module(n: int, zp: int, out, lo: int, bound: float | None) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("acc", relax.TensorType((n,), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(requantize(x, Multiplier(np.float64(M), M), zp, out, lo, (), "float", bound))
        bb.emit_func_output(y)
    return bb.get()


def _run(mod: tvm.IRModule, schedule: str, acc: np.ndarray) -> np.ndarray:
    ex, _ = build(mod, get_target("host"), schedule)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(acc)).numpy()


@pytest.mark.parametrize("out, zp, relu", [(INT8, -3, False), (INT8, -128, True), (UINT8, 0, True),
                                           (UINT8, 131, False)])
def test_int_tail_equals_float_tail(out, zp, relu):
    """The same integers from the float tail, the int32 tail unscheduled (round, then convert) and the int32
    tail on the CPU pipeline (llvm.lrint), over dense accumulators, near-ties and saturating values."""
    acc = _accumulators()
    lo = max(out.qmin, zp) if relu else out.qmin
    want = _reference(acc, zp, lo, out.qmax)
    bound = float(np.max(np.abs(acc.astype(np.int64))))
    floats = _run(_requant_module(acc.size, zp, out, lo, None), "none", acc)
    ints_none = _run(_requant_module(acc.size, zp, out, lo, bound), "none", acc)
    ints_lrint = _run(_requant_module(acc.size, zp, out, lo, bound), "default", acc)
    for got in (floats, ints_none, ints_lrint):
        np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))


def test_int_tail_only_where_proven():
    """A bound that lets round(y) leave int32 keeps the float tail; the rewrite leaves such a module alone."""
    assert fits_int32(2.0**31 - 2**20) and not fits_int32(2.0**31) and not fits_int32(float("inf"))
    proven = _requant_module(8, 0, INT8, -128, 1000.0)
    unproven = _requant_module(8, 0, INT8, -128, 2.0**31 / float(M))

    def ops(mod):
        names = []
        relax.analysis.post_order_visit(mod["main"], lambda e: names.append(e.op.name) if isinstance(
            e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
        return names

    # astype to float, to int32, to int8
    assert "relax.round" in ops(proven) and ops(proven).count("relax.astype") == 3
    assert ops(unproven).count("relax.astype") == 2  # to float, to int8: the float tail
    lowered = round_to_int32(proven)
    assert "relax.round" not in ops(lowered)  # rounded and converted by the round_to_int32 kernel
    assert any("round_to_int32" in gv.name_hint for gv in lowered.get_global_vars())
    tvm.ir.assert_structural_equal(round_to_int32(unproven), unproven)


def test_dot_bound():
    """|sum_k w_k (x_k - zp) + b| at its worst: every x at the end of its range farther from zp."""
    w = np.array([[1, -2, 3], [0, 0, -1]], np.int8)  # two output channels (axis 0)
    assert dot_bound(w, INT8, -128, np.array([5, -700])) == max(6 * 255 + 5, 1 * 255 + 700)
    assert dot_bound(w.T, UINT8, 10, None, axis=1) == 6 * 245
