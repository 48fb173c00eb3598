"""lower_qdq on hand-built Relax modules: structure (what the rewrite emits), golden requantize vectors, and
exact agreement with a numpy integer oracle."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from plateau.compile import lower_qdq, op_counts
from plateau.compile._common import Multiplier, dot_bound, folded_bias, requantize
from plateau.compile.lower import float_compute_calls
from plateau.quant import INT8, dequantize_np

RNG = np.random.default_rng(7)
S_X, ZP_X, S_Y, ZP_Y = np.float32(0.05), -3, np.float32(0.11), -20
W = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
S_W = np.array([0.010, 0.020, 0.005, 0.013], np.float32)
B = RNG.integers(-300, 300, 4).astype(np.int32)


def _c(a, dtype=None):
    a = np.asarray(a)
    return relax.const(a, dtype or str(a.dtype))


def qdq_conv_module(w_zp: int = 0, relu: bool = True) -> tvm.IRModule:
    """dequantize -> conv2d(pad 1) -> + reshape(dequantize(bias)) -> [relu] -> quantize, as from_onnx emits
    it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 6, 6), "int8"))
    op = relax.op
    with bb.function("main", [x]):
        with bb.dataflow():
            xf = bb.emit(op.dequantize(x, _c(S_X), _c(ZP_X, "int8"), axis=1))
            wf = bb.emit(op.dequantize(_c(W), _c(S_W), _c(np.full(4, w_zp, np.int8)), axis=0))
            y = bb.emit(op.nn.conv2d(xf, wf, padding=(1, 1)))
            bf = bb.emit(op.dequantize(_c(B), _c(S_X * S_W), _c(np.zeros(4, np.int32)), axis=0))
            y = bb.emit(op.add(y, bb.emit(op.reshape(bf, (1, 4, 1, 1)))))
            if relu:
                y = bb.emit(op.nn.relu(y))
            out = bb.emit_output(op.quantize(y, _c(S_Y), _c(ZP_Y, "int8"), axis=1, out_dtype="int8"))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod: tvm.IRModule) -> list[str]:
    return [b.value.op.name.removeprefix("relax.") for blk in mod["main"].body.blocks for b in blk.bindings]


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _requant_ref(acc: np.ndarray, s_w: np.ndarray, mode: str, chan: tuple) -> np.ndarray:
    """float: float32(acc) * ((s_x * s_w) / s_y) in float32 (onnxruntime's order); float64: the exact
    product."""
    if mode == "float64":
        return acc * (np.float64(S_X) * s_w.astype(np.float64) / np.float64(S_Y)).reshape(chan)
    m32 = ((S_X * s_w).astype(np.float32) / S_Y).astype(np.float32).reshape(chan)
    return (acc.astype(np.float32) * m32).astype(np.float32)


def oracle(x_q: np.ndarray, relu: bool = True, mode: str = "float") -> np.ndarray:
    """Integer conv in int64 (zero-point padded), exact bias, then requantize as `mode` says."""
    xp = np.pad(x_q.astype(np.int64) - ZP_X, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n, c, h, w, kh, kw
    acc = np.einsum("nchwij,ocij->nohw", win, W.astype(np.int64)) + B.reshape(1, -1, 1, 1)
    lo = max(INT8.qmin, ZP_Y) if relu else INT8.qmin
    return np.clip(np.rint(_requant_ref(acc, S_W, mode, (1, -1, 1, 1))) + ZP_Y, lo, INT8.qmax).astype(np.int8)


def test_conv_is_integer_after_lowering():
    before = qdq_conv_module()
    assert op_counts(before)["float_conv2d"] == 1
    after = lower_qdq(before)
    ops = _ops(after)
    # the accumulator's bound (from W) proves round(y) fits int32: zero point and clamp in int32
    # (round_to_int_tail)
    assert ops == ["nn.pad", "nn.conv2d", "add", "astype", "multiply", "round", "astype", "add", "maximum",
                   "minimum", "astype"], ops
    assert float_compute_calls(after) == []
    calls = [b.value for blk in after["main"].body.blocks for b in blk.bindings]
    pad, conv, bias, maxi = calls[0], calls[1], calls[2], calls[8]
    assert str(calls[6].attrs.dtype) == "int32" and str(maxi.ty.dtype) == "int32"
    assert float(pad.attrs.pad_value) == ZP_X  # padded taps contribute (zp - zp) * w = 0
    assert [int(p) for p in conv.attrs.padding] == [0, 0, 0, 0]
    assert str(conv.args[0].ty.dtype) == "int8" and str(conv.args[1].ty.dtype) == "int8"
    assert str(conv.ty.dtype) == "int32"
    np.testing.assert_array_equal(conv.args[1].value.numpy(), W)
    # zero point folded into the bias: B - zp_x * sum(W) per output channel
    expect_bias = B.astype(np.int64) - ZP_X * W.astype(np.int64).reshape(4, -1).sum(1)
    np.testing.assert_array_equal(bias.args[1].value.numpy().reshape(-1), expect_bias)
    assert float(maxi.args[1].value.numpy()) == max(INT8.qmin, ZP_Y)  # the ReLU, folded into the clamp


@pytest.mark.parametrize("mode", ["float", "float64"])
def test_conv_matches_integer_oracle_and_float_graph(mode):
    x_q = RNG.integers(-128, 128, (2, 3, 6, 6)).astype(np.int8)
    # the oracle's float64 path agrees with plateau.quant's dequantize on the input
    np.testing.assert_allclose(dequantize_np(x_q, S_X, ZP_X),
                               (x_q.astype(np.float64) - ZP_X) * S_X, rtol=1e-6)
    for relu in (True, False):
        before = qdq_conv_module(relu=relu)
        ours = _run(lower_qdq(before, requant=mode), x_q)
        np.testing.assert_array_equal(ours, oracle(x_q, relu, mode))
        # the float QDQ graph, as TVM computes it without the rewrite: at most one step away (float rounding)
        assert np.abs(ours.astype(int) - _run(before, x_q).astype(int)).max() <= 1


def test_unlowerable_conv_is_left_float():
    """A weight zero point != 0 breaks the zero-point folding: the rewrite must leave the conv untouched."""
    after = lower_qdq(qdq_conv_module(w_zp=1))
    assert [k for k, _ in float_compute_calls(after)] == ["conv2d"]
    assert op_counts(after)["int_conv2d"] == 0


def qdq_gemm_module(transposed: bool, bias_first: bool) -> tuple[tvm.IRModule, tuple]:
    """Gemm transB=1 (permute_dims of a [out, in] weight, axis 0) or MatMul ([in, out] weight, axis 1)."""
    w = RNG.integers(-127, 128, (5, 8)).astype(np.int8)  # [out, in]
    s_w = np.linspace(0.01, 0.02, 5).astype(np.float32)
    b = RNG.integers(-100, 100, 5).astype(np.int32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 8), "uint8"))
    op = relax.op
    with bb.function("main", [x]):
        with bb.dataflow():
            xf = bb.emit(op.dequantize(x, _c(S_X), _c(130, "uint8"), axis=1))
            if transposed:
                wf = bb.emit(op.permute_dims(bb.emit(op.dequantize(_c(w), _c(s_w),
                                                                   _c(np.zeros(5, np.int8)), axis=0))))
            else:
                wf = bb.emit(op.dequantize(_c(w.T.copy()), _c(s_w), _c(np.zeros(5, np.int8)), axis=1))
            y = bb.emit(op.matmul(xf, wf))
            bf = bb.emit(op.dequantize(_c(b), _c(S_X * s_w), _c(np.zeros(5, np.int32)), axis=0))
            y = bb.emit(op.add(bf, y) if bias_first else op.add(y, bf))
            out = bb.emit_output(op.quantize(y, _c(S_Y), _c(ZP_Y, "int8"), axis=1, out_dtype="int8"))
        bb.emit_func_output(out)
    return bb.get(), (w, s_w, b)


@pytest.mark.parametrize("transposed,bias_first", [(True, False), (False, True)])
def test_matmul_lowering(transposed, bias_first):
    before, (w, s_w, b) = qdq_gemm_module(transposed, bias_first)
    after = lower_qdq(before)
    assert op_counts(after)["int_matmul"] == 1 and float_compute_calls(after) == [], after
    assert "permute_dims" not in _ops(after)  # the weight is transposed at compile time
    x_q = RNG.integers(0, 256, (3, 8)).astype(np.uint8)
    ours = _run(after, x_q)
    acc = (x_q.astype(np.int64) - 130) @ w.T.astype(np.int64) + b
    ref = np.clip(np.rint(_requant_ref(acc, s_w, "float", (-1,))) + ZP_Y, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours.astype(int) - _run(before, x_q).astype(int)).max() <= 1  # vs the float QDQ graph


def _requant_module(mult: float, zp: int, lo: int, mode: str) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType((8,), "int32"))
    with bb.function("main", [acc]):
        with bb.dataflow():
            m = Multiplier(np.array([mult]), np.array([mult], np.float32))
            out = bb.emit_output(requantize(acc, m, zp, INT8, lo, (), mode))
        bb.emit_func_output(out)
    return bb.get()


ACC = np.array([1, 3, 5, -1, -3, 1000, -1000, 0], np.int32)  # x 0.5: ties at +-0.5, 1.5, 2.5; saturation


@pytest.mark.parametrize("mode,lo,expected", [
    ("float", -128, [-1, 1, 1, -1, -3, 127, -128, -1]),      # half to even: 0.5->0, 1.5->2, 2.5->2, -1.5->-2
    ("float64", -128, [-1, 1, 1, -1, -3, 127, -128, -1]),
    ("float", -1, [-1, 1, 1, -1, -1, 127, -1, -1]),          # ReLU folded: clamp at zp
    ("fixed", -128, [0, 1, 2, -1, -2, 127, -128, -1]),       # integer-only: ties round up
])
def test_requantize_golden(mode, lo, expected):
    out = _run(_requant_module(0.5, -1, lo, mode), ACC)
    np.testing.assert_array_equal(out, np.array(expected, np.int8))


def test_folded_bias_conv_and_matmul_alike():
    """B - zp_x * sum W per output channel, whichever axis holds the channels; None when it leaves int32."""
    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8)  # conv OIHW: channels on axis 0
    b = rng.integers(-1000, 1000, 4).astype(np.int32)
    s_x, s_w = np.float32(0.02), np.full(4, 0.01, np.float32)
    s_b = (s_x * s_w).astype(np.float32)
    bias, bound = folded_bias(w, 0, INT8, 3, s_x, s_w, (b, s_b, np.zeros(4, np.int32)))
    np.testing.assert_array_equal(bias, b - 3 * w.astype(np.int64).reshape(4, -1).sum(axis=1))
    assert bound == dot_bound(w, INT8, 3, b.astype(np.int64))
    wm = np.ascontiguousarray(w.reshape(4, -1).T)  # matmul [in, out]: channels on axis 1
    assert np.array_equal(folded_bias(wm, 1, INT8, 3, s_x, s_w, (b, s_b, np.zeros(4, np.int32)))[0], bias)
    assert folded_bias(w, 0, INT8, 3, s_x, s_w, (b, s_b, np.ones(4, np.int32))) is None  # bias zero point
    assert folded_bias(w, 0, INT8, 3, s_x, s_w) is not None  # no bias
    w_pos, big = np.abs(w.astype(np.int16)).clip(1, 127).astype(np.int8), np.full(4, 2**31 - 1, np.int64)
    assert folded_bias(w_pos, 0, INT8, -128, s_x, s_w, (big, s_b, np.zeros(4, np.int32))) is None  # overflow
