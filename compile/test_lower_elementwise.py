"""The rewrites around the conv / matmul layers: pass-through ops, quantize(dequantize) pairs, Add / Mul and
Concat. Each has a structural test (Before -> Expected, assert_structural_equal) and a numeric test against
the reference formula (plateau.quant's numpy oracle: DQ in float32, the float32 op, Q with round half to
even)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from plateau.compile import lower_qdq, op_counts
from plateau.compile._common import dequantize_f32, dequantized_values, exact_reciprocal, quantize_f32
from plateau.compile.rewrite_binary import fixed_add_multipliers
from plateau.quant import INT8, UINT8, dequantize_np, quantize_np

RNG = np.random.default_rng(11)
op = relax.op


def _c(a, dtype=None):
    a = np.asarray(a)
    return relax.const(a, dtype or str(a.dtype))


def _deq(bb, x, s, zp, dtype="int8"):
    return bb.emit(op.dequantize(x, _c(np.float32(s)), _c(zp, dtype), axis=1))


def _q(y, s, zp, dtype="int8"):
    return op.quantize(y, _c(np.float32(s)), _c(zp, dtype), axis=1, out_dtype=dtype)


def _build(params: list[tuple[str, tuple, str]], body) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    xs = [relax.Var(n, relax.TensorType(shape, dt)) for n, shape, dt in params]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *xs))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _int8(shape, lo=-128, hi=128, dtype=np.int8):
    return RNG.integers(lo, hi, shape).astype(dtype)


# --- pass-through ops and quantize(dequantize) pairs --------------------------------------------------------
S, ZP = 0.03, -7


def _passthrough_before(bb, x):
    y = bb.emit(op.nn.max_pool2d(_deq(bb, x, S, ZP), (2, 2), strides=(2, 2)))
    y = bb.emit(op.reshape(y, (2, 48)))
    return _q(y, S, ZP)


def _passthrough_expected(bb, x):
    y = bb.emit(op.nn.max_pool2d(x, (2, 2), strides=(2, 2)))
    return op.reshape(y, (2, 48))


def test_passthrough_structure():
    """maxpool and reshape run on the integers; the dequantize meets the quantize and cancels."""
    before = _build([("x", (2, 3, 8, 8), "int8")], _passthrough_before)
    expected = _build([("x", (2, 3, 8, 8), "int8")], _passthrough_expected)
    tvm.ir.assert_structural_equal(lower_qdq(before), expected)


def test_passthrough_numeric_ops():
    """pad (zero -> zero point), slice, transpose, relu and maxpool with padding, each against the float
    graph."""
    def body(bb, x):
        y = _deq(bb, x, S, ZP)
        y = bb.emit(op.nn.pad(y, [0, 0, 0, 0, 1, 0, 0, 2]))                 # zeros become zp
        y = bb.emit(op.strided_slice(y, axes=[2], begin=[0], end=[9], strides=[2]))
        y = bb.emit(op.permute_dims(y, [0, 2, 3, 1]))
        y = bb.emit(op.nn.relu(y))
        y = bb.emit(op.nn.max_pool2d(y, (3, 3), padding=(1, 1, 1, 1), layout="NHWC"))
        return _q(y, 0.05, 3)

    before = _build([("x", (2, 3, 8, 8), "int8")], body)
    after = lower_qdq(before)
    assert not any(k.startswith("float_op") for k in op_counts(after)), op_counts(after)
    x = _int8((2, 3, 8, 8))
    xf = dequantize_np(x, S, ZP)
    xf = np.pad(xf, ((0, 0), (0, 0), (1, 0), (0, 2)))[:, :, 0:9:2].transpose(0, 2, 3, 1)
    xf = np.maximum(xf, 0)
    p = np.pad(xf, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2)).max(axis=(-1, -2))
    np.testing.assert_array_equal(_run(after, x), quantize_np(win, 0.05, 3, INT8))
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


def test_per_axis_dequantize_is_not_moved():
    def body(bb, x):
        y = bb.emit(op.dequantize(x, _c(np.array([0.1, 0.2, 0.3], np.float32)),
                                  _c(np.zeros(3, np.int8)), axis=1))
        return _q(bb.emit(op.reshape(y, (2, 48))), S, ZP)

    before = _build([("x", (2, 3, 4, 4), "int8")], body)
    after = lower_qdq(before)
    ops = [bd.value.op.name for blk in after["main"].body.blocks for bd in blk.bindings]
    # the per-axis dequantize stays on its own axis, in front of the move; the per-tensor quantize moves up
    assert ops == ["relax.dequantize", "relax.quantize", "relax.reshape"]
    x = _int8((2, 3, 4, 4))
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


def test_requant_pair_with_different_parameters():
    """quantize(dequantize()) with other parameters and type: an elementwise integer requantize, exact."""
    before = _build([("x", (2, 128), "int8")], lambda bb, x: _q(_deq(bb, x, 0.02, 5), 0.03, 128, "uint8"))
    after = lower_qdq(before)
    ops = [bd.value.op.name for blk in after["main"].body.blocks for bd in blk.bindings]
    assert ops[-1] == "relax.astype"
    x = np.arange(-128, 128).astype(np.int8).reshape(2, 128)
    np.testing.assert_array_equal(_run(after, x), quantize_np(dequantize_np(x, 0.02, 5), 0.03, 128, UINT8))


# --- Add / Mul ----------------------------------------------------------------------------------------------
SA, ZA, SB, ZB, SY, ZY = 0.5, 3, 0.25, -2, 1.0, -1  # sums land on .5 ties: round half to even is exercised


def _binary(kind: str, relu: bool, dtype="int8"):
    def body(bb, a, b):
        y = bb.emit(getattr(op, kind)(_deq(bb, a, SA, ZA, dtype), _deq(bb, b, SB, ZB, dtype)))
        if relu:
            y = bb.emit(op.nn.relu(y))
        return _q(y, SY, ZY)

    return _build([("a", (4, 8), dtype), ("b", (4, 8), dtype)], body)


def _binary_oracle(kind: str, relu: bool, a, b) -> np.ndarray:
    y = getattr(np, kind)(dequantize_np(a, SA, ZA), dequantize_np(b, SB, ZB)).astype(np.float32)
    return quantize_np(np.maximum(y, 0) if relu else y, SY, ZY, INT8)


def test_add_structure():
    """Add + ReLU -> one integer-in, integer-out expression: DQ both, add, scale by 1/s_y (the divide where
    the reciprocal is not proven exact), round, clamp at zp_y."""
    sums = (dequantized_values(INT8, np.float32(SA), ZA)[:, None]
            + dequantized_values(INT8, np.float32(SB), ZB))

    def expected_body(bb, a, b):
        return quantize_f32(op.add(dequantize_f32(a, np.float32(SA), ZA, summed=True),
                                   dequantize_f32(b, np.float32(SB), ZB, summed=True)),
                            np.float32(SY), ZY, INT8, lo=ZY, domain=sums)

    expected = relax.transform.Normalize()(_build([("a", (4, 8), "int8"), ("b", (4, 8), "int8")],
                                                  expected_body))
    tvm.ir.assert_structural_equal(lower_qdq(_binary("add", relu=True)), expected)


@pytest.mark.parametrize("kind,relu", [("add", True), ("add", False), ("multiply", False)])
def test_binary_matches_reference_formula(kind, relu):
    a, b = _int8((4, 8)), _int8((4, 8))
    a[0, :4], b[0, :4] = [3, 4, 5, 6], [-2, 0, 2, 4]  # exact ties: 0.5 * k + 0.25 * m on .5
    after = lower_qdq(_binary(kind, relu))
    assert not any(k.startswith("float_op") for k in op_counts(after)), op_counts(after)
    np.testing.assert_array_equal(_run(after, a, b), _binary_oracle(kind, relu, a, b))


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("s_a,s_b,s_y",
                         [(0.5, 0.25, 1.0), (0.031, 0.047, 0.06732655), (0.0191, 0.0233, 0.0437)])
def test_add_over_every_input_pair_matches_the_reference(s_a, s_b, s_y, scheduled):
    """All 256 x 256 int8 pairs: the lowered add (multiply by 1/s_y where exact_reciprocal proves it, else
    divide) equals the reference's float32 formula on every one; also built by the host's scheduled CPU
    pipeline, where the dequantized products are inlined into the add (no FMA may form: see dequantize_f32)."""
    a, b = (v.astype(np.int8) for v in np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij"))

    def body(bb, x, y):
        return _q(bb.emit(op.add(_deq(bb, x, s_a, 3), _deq(bb, y, s_b, -5))), s_y, 2)

    lowered = lower_qdq(_build([("a", a.shape, "int8"), ("b", b.shape, "int8")], body))
    if scheduled:
        from plateau.compile.compiler import build, lower_for_target
        from plateau.compile.targets import get_target

        host = get_target("host")
        vm = relax.VirtualMachine(build(lower_for_target(lowered, host), host)[0], tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    else:
        out = _run(lowered, a, b)
    ref = quantize_np(dequantize_np(a, s_a, 3) + dequantize_np(b, s_b, -5), s_y, 2, INT8)
    np.testing.assert_array_equal(out, ref)


def test_exact_reciprocal_checks_every_value():
    """y * (1/s) rounds differently from y / s on some near-ties: then the division stays."""
    s = np.float32(0.06732655)
    y = ((np.arange(-2000, 2000, dtype=np.float32) + np.float32(0.5)) * s).astype(np.float32)
    r0 = np.float32(1) / s
    assert not np.array_equal(np.rint(y * r0), np.rint(y / s))  # the plain reciprocal is wrong here
    assert exact_reciprocal(y, s, 0, -(2**20), 2**20) is None  # nor do its two float32 neighbours fit
    assert exact_reciprocal(y, np.float32(0.5), 0, -(2**20), 2**20) == np.float32(2)


def test_add_golden_ties():
    """(a - 3) * 0.5 + (b + 2) * 0.25 = 0.5, 1.5, 2.5, -0.5 -> 0, 2, 2, -0 (+ zp_y = -1), half to even."""
    a = np.array([[4, 5, 8, 2] * 2] * 4, np.int8)
    b = np.array([[-2, 0, -2, -2] * 2] * 4, np.int8)
    out = _run(lower_qdq(_binary("add", relu=False)), a, b)
    np.testing.assert_array_equal(out[0, :4], np.array([0, 2, 2, 0], np.int8) + ZY)


@pytest.mark.parametrize("kind", ["add", "multiply"])
def test_binary_fixed_point(kind):
    """requant="fixed": integer-only arithmetic, within one step of the reference, different only near
    ties."""
    a, b = _int8((4, 8)), _int8((4, 8))
    after = lower_qdq(_binary(kind, relu=False), requant="fixed")
    ours = _run(after, a, b).astype(int)
    ref = _binary_oracle(kind, False, a, b).astype(int)
    real = getattr(np, kind)((a.astype(np.float64) - ZA) * SA, (b.astype(np.float64) - ZB) * SB) / SY
    assert np.abs(ours - ref).max() <= 1
    differ = ours != ref
    assert np.all(np.abs(np.abs(real[differ] - np.floor(real[differ])) - 0.5) < 1e-6)  # only on ties
    # ties round up in fixed point: real x.5 -> x + 1
    ties = np.isclose(real - np.floor(real), 0.5) & (np.clip(np.floor(real) + 1 + ZY, -128, 127) == ours)
    assert ties.sum() == np.isclose(real - np.floor(real), 0.5).sum()


def test_fixed_add_multipliers():
    ma, mb, k = fixed_add_multipliers(0.75, 0.1)
    assert ma < 2**31 and mb < 2**31 and ma >= 2**30 and abs(ma / 2**k - 0.75) < 2**-30
    with pytest.raises(ValueError, match="fixed-point range"):
        fixed_add_multipliers(2.0**40, 1.0)


# --- Concat -------------------------------------------------------------------------------------------------
def _concat(s_b: float):
    def body(bb, a, b):
        y = bb.emit(op.concat([_deq(bb, a, S, ZP), _deq(bb, b, s_b, 4)], axis=1))
        return _q(y, S, ZP)

    return _build([("a", (2, 3, 4), "int8"), ("b", (2, 5, 4), "int8")], body)


def test_concat_requantizes_only_the_input_with_other_parameters():
    after = lower_qdq(_concat(0.041))
    calls = [bd.value for blk in after["main"].body.blocks for bd in blk.bindings]
    ops = [c.op.name for c in calls]
    assert ops.count("relax.concat") == 1 and "relax.dequantize" not in ops and "relax.quantize" not in ops
    cat = calls[ops.index("relax.concat")]
    assert cat.args[0].fields[0].same_as(after["main"].params[0])  # a: shared parameters, untouched
    assert not cat.args[0].fields[1].same_as(after["main"].params[1])  # b: requantized first


def test_concat_shared_parameters_structure():
    def body(bb, a, b):
        return _q(bb.emit(op.concat([_deq(bb, a, S, ZP), _deq(bb, b, S, ZP)], axis=1)), S, ZP)

    before = _build([("a", (2, 3, 4), "int8"), ("b", (2, 5, 4), "int8")], body)
    expected = _build([("a", (2, 3, 4), "int8"), ("b", (2, 5, 4), "int8")],
                      lambda bb, a, b: op.concat([a, b], axis=1))
    tvm.ir.assert_structural_equal(lower_qdq(before), expected)


def test_concat_matches_reference_formula():
    a, b = _int8((2, 3, 4)), _int8((2, 5, 4))
    out = _run(lower_qdq(_concat(0.041)), a, b)
    ref = quantize_np(np.concatenate([dequantize_np(a, S, ZP), dequantize_np(b, 0.041, 4)], axis=1),
                      S, ZP, INT8)
    np.testing.assert_array_equal(out, ref)


def test_quantize_moves_above_reshape_and_transpose():
    """quantize(permute(reshape(y))) => permute(reshape(quantize(y))): the float op under the moves meets its
    quantize (a transformer's Linear on token rows), and the integers are the same."""
    def body(bb, x):
        y = bb.emit(op.multiply(_deq(bb, x, S, ZP), _deq(bb, x, S, ZP)))
        y = bb.emit(op.permute_dims(bb.emit(op.reshape(y, (2, 3, 16))), [0, 2, 1]))
        return _q(y, 0.05, 3)

    before = _build([("x", (2, 3, 4, 4), "int8")], body)
    after = lower_qdq(before)
    ops = [bd.value.op.name for blk in after["main"].body.blocks for bd in blk.bindings]
    assert ops[-2:] == ["relax.reshape", "relax.permute_dims"]
    assert "relax.quantize" not in ops[-2:]
    x = _int8((2, 3, 4, 4))
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


@pytest.mark.parametrize("target", ["host", "arm64"])
def test_scheduled_add_has_no_fused_multiply_add(target):
    """TVM compiles with fp-contract=fast: a float32 dequantize product inlined into the add would become an FMA
    (one rounding instead of the reference's two). The scheduled residual add must hold none."""
    from plateau.compile.asm import fused_multiply_adds
    from plateau.compile.compiler import build, lower_for_target
    from plateau.compile.targets import get_target

    def body(bb, x, y):
        return _q(bb.emit(op.add(_deq(bb, x, 0.031, 3), _deq(bb, y, 0.047, -5))), 0.0673, 2)

    t = get_target(target)
    lowered = lower_qdq(_build([("a", (64, 192), "int8"), ("b", (64, 192), "int8")], body))
    asm = build(lower_for_target(lowered, t), t)[0].mod.imports[0].inspect_source("asm")
    assert "\n" in asm and not fused_multiply_adds(asm)
