"""Helpers shared by the integer-lowering rewrites: reading constants and emitting the requantize tail.

Requantize maps the exact int32 accumulator to the output type: round_half_even(acc * s_x * s_w / s_y) + zp_y,
saturated. Three ways to take the product:

- "float" (default): float32(acc) * float32 multiplier, computed in onnxruntime's order ((s_x * s_w) / s_y),
  as its fused MLAS kernels (QLinearConv, QGemm, QLinearGlobalAveragePool) do. Bit-exact against onnxruntime
  wherever it fuses the layer: 100% of logits on ResNet-20 U8S8 over 400 CIFAR images.
- "float64": the real product rounded once, the meaning of the QDQ graph. Closer where onnxruntime runs a
  float conv on dequantized values instead (4-bit weights; S8S8 on x86 unless int8 QDQ is allowed), but misses
  onnxruntime's fused kernels on ties.
- "fixed": int32 multiplier and right shift in int64 for integer-only devices (ties round up).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import tvm
from tvm import relax

from plateau.quant import QType, conv_multiplier, mean_multiplier, requant_multiplier

__all__ = [
    "backend_pipeline",
    "const_np", "scalar", "qtype_of", "Multiplier", "requantize", "REQUANT_MODES", "REQUANT_DOC",
    "per_tensor", "f32",
    "dequantize_f32", "quantize_f32", "requantize_elementwise", "exact_reciprocal", "dequantized_values",
    "dot_bound", "folded_bias", "fits_int32", "round_to_int_tail",
]

REQUANT_MODES = ("float", "float64", "fixed")  # see the module docstring

# What each mode computes, recorded in the compile manifest ("requantize").
REQUANT_DOC = {
    "float": {
        "conv_matmul": "round_half_even(float32(acc) * float32(float32(s_x * s_w) / s_y)) + zp_y, saturated",
        "mean": "round_half_even(float32(sum - zp_x * K) * float32(s_x / (s_y * K))) + zp_y, saturated",
        "add_mul": "round_half_even((float32(a - zp_a) * s_a (+|*) float32(b - zp_b) * s_b) / s_y) + zp_y",
        "rounding": "half to even",
        "matches": "Plateau's reference (export run_graph_int) and onnxruntime's fused QLinear kernels",
    },
    "float64": {
        "conv_matmul": "round_half_even(acc * (s_x * s_w / s_y) in float64) + zp_y, saturated",
        "mean": "round_half_even(float64(sum - zp_x * K) * s_x / (s_y * K)) + zp_y, saturated",
        "add_mul": "as 'float' (the reference's float32 order)",
        "rounding": "half to even",
        "matches": "the real-valued QDQ graph, up to float64 rounding",
    },
    "fixed": {
        "conv_matmul": "((int64(acc) * M + 2^(30 + n)) >> (31 + n)) + zp_y, saturated; "
                       "M int32 (Q31) and n from plateau.quant.requant_multiplier(s_x * s_w / s_y), "
                       "per output channel",
        "mean": "as conv_matmul with the multiplier s_x / (s_y * K)",
        "add_mul": "add: ((int64(a - zp_a) * M_a + int64(b - zp_b) * M_b + 2^(k-1)) >> k) + zp_y, "
                   "M = round(s / s_y * 2^k) < 2^31; mul: int32 (a - zp_a) * (b - zp_b), then as conv_matmul",
        "rounding": "half up (ties differ from the reference by one step)",
        "matches": "integer-only devices (gemmlowp / TFLite style, single rounding)",
    },
}


def mutate_relax_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function of `mod` through `mutator` (a PyExprMutator made on `mod`): the rewritten module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def const_np(expr: relax.Expr) -> np.ndarray | None:
    """The numpy value of a relax constant, or None when `expr` is not a constant."""
    value = getattr(expr, "value", None)
    if value is None or not hasattr(value, "numpy"):
        return None
    return value.numpy()


def scalar(expr: relax.Expr) -> np.generic | None:
    """The value of a constant holding exactly one element (scalar or shape [1]), else None."""
    a = const_np(expr)
    if a is None or a.size != 1:
        return None
    return a.reshape(())[()]


def qtype_of(dtype: str) -> QType | None:
    """The integer type of a quantized tensor dtype; None for types we do not lower (int16, float8, ...)."""
    return {"int8": QType(8, True), "uint8": QType(8, False)}.get(str(dtype))


class Multiplier:
    """A per-channel requantize multiplier held two ways: float64 (exact up to 2^-53) and the float32 value
    onnxruntime computes, in its order of float32 operations: (s_x * s_w) / s_y, or s_x / (s_y * K) for
    pools."""

    def __init__(self, m64: np.ndarray, m32: np.ndarray) -> None:
        self.m64 = np.asarray(m64, np.float64).reshape(-1)
        self.m32 = np.asarray(m32, np.float32).reshape(-1)
        assert np.all(self.m64 > 0), "requantize multipliers must be positive"

    @classmethod
    def for_product(cls, s_x: np.floating, s_w: np.ndarray, s_y: np.floating) -> Multiplier:
        s_w = np.asarray(s_w).reshape(-1)
        m32 = conv_multiplier(s_x, s_w, s_y)
        return cls(np.float64(s_x) * s_w.astype(np.float64) / np.float64(s_y), m32)

    @classmethod
    def for_mean(cls, s_x: np.floating, s_y: np.floating, k: int | np.ndarray) -> Multiplier:
        return cls(np.float64(s_x) / (np.float64(s_y) * np.asarray(k, np.float64)),
                   mean_multiplier(s_x, s_y, k))


def requantize(
    acc: relax.Expr,
    mult: Multiplier,
    zp_y: int,
    out: QType,
    lo: int,
    chan_shape: tuple[int, ...],
    mode: str = "float",
    acc_bound: float | None = None,
) -> relax.Expr:
    """int32 accumulator -> quantized output of type `out`, saturated to [lo, out.qmax].

    `chan_shape` broadcasts the per-channel multiplier against the accumulator ((1, C, 1, 1) for NCHW conv,
    (C,) for matmul, () per-tensor). `lo` is out.qmin, or max(out.qmin, zp_y) when a ReLU was folded in.
    Rounding is half to even (TVM's round lowers to llvm.nearbyint); clamping after rounding gives the same
    integers as clamping before. maximum/minimum with scalar constants (not clip) let ConvertLayout carry
    NHWC through the tail. `acc_bound` (a bound on |acc|, from the constant weights) lets the tail add the
    zero point and saturate in int32 (round_to_int_tail).
    """
    op = relax.op
    n = int(np.prod(chan_shape))
    if mode == "fixed":
        return _requantize_fixed(acc, np.broadcast_to(mult.m64, (n,)).reshape(chan_shape), zp_y, out, lo)
    dt = {"float": "float32", "float64": "float64"}[mode]
    m = np.broadcast_to(mult.m64 if dt == "float64" else mult.m32, (n,)).reshape(chan_shape).astype(dt)
    c = lambda v: relax.const(np.asarray(v, dt), dt)  # noqa: E731  (explicit dtype: relax.const narrows)
    y = op.multiply(op.astype(acc, dt), c(m))
    if acc_bound is not None and fits_int32(float(acc_bound) * float(np.max(m))):
        return round_to_int_tail(y, zp_y, lo, out)
    r = op.add(op.round(y), c(zp_y))
    return op.astype(op.minimum(op.maximum(r, c(lo)), c(out.qmax)), out.np_dtype.name)


def dot_bound(w: np.ndarray, x_t: QType, zp_x: int, bias: np.ndarray | None = None, axis: int = 0) -> float:
    """The largest |sum_k w[k] * (x_k - zp_x) + bias| over inputs of type `x_t`: the bound on a conv's or a
    matmul's int32 accumulator (one output channel per index of `axis` of w)."""
    dx = max(int(zp_x) - x_t.qmin, x_t.qmax - int(zp_x))
    w = np.moveaxis(np.abs(w.astype(np.int64)), axis, 0).reshape(w.shape[axis], -1).sum(axis=1)
    b = np.zeros_like(w) if bias is None else np.abs(np.asarray(bias, np.int64)).reshape(-1)
    return float(np.max(w * dx + b))


def folded_bias(w: np.ndarray, out_axis: int, x_t: QType, zp_x: int, s_x: np.floating, s_w: np.ndarray,
                bias_q: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, float] | None:
    """(the int32 bias of an integer conv / matmul on the raw input integers, the bound on its accumulator),
    or None where the bias cannot be folded (a bias zero point, a bias of another size, an int32 overflow).

    sum_k W[k] * (x_k - zp_x) + B = sum_k W[k] * x_k + (B - zp_x * sum_k W[k]): the input zero point folds
    into the bias exactly. `w` holds one output channel per index of `out_axis`; `bias_q` is the (B_q, s_b,
    zp_b) constants of the graph's bias (None: no bias). Exporters make s_b == s_x * s_w; otherwise B is
    rescaled (rounding, so not bit-exact)."""
    cout = w.shape[out_axis]
    bias = np.zeros(cout, np.int64)
    if bias_q is not None:
        b_q, s_b, zp_b = bias_q
        b = b_q.astype(np.int64).reshape(-1)
        s_b = np.broadcast_to(s_b.astype(np.float32).reshape(-1), (cout,))
        if np.any(zp_b != 0) or b.size != cout:
            return None
        s_xw = (np.float32(s_x) * s_w).astype(np.float32)
        bias = b if np.allclose(s_b, s_xw, rtol=1e-6, atol=0) else np.rint(b * (s_b / s_xw)).astype(np.int64)
    bound = dot_bound(w, x_t, int(zp_x), bias, axis=out_axis)
    w_sum = np.moveaxis(w.astype(np.int64), out_axis, 0).reshape(cout, -1).sum(axis=1)
    bias = bias - int(zp_x) * w_sum
    if np.any(np.abs(bias) >= 2**31):
        return None
    return bias, bound


def fits_int32(y_bound: float) -> bool:
    """Whether every round(y) + zp with |y| <= y_bound fits int32, with room for the float rounding of y."""
    return np.isfinite(y_bound) and y_bound * (1 + 1e-5) + 1024 < 2**31


def round_to_int_tail(y: relax.Expr, zp: int, lo: int, out: QType) -> relax.Expr:
    """saturate(round_half_even(y) + zp) to [lo, out.qmax] with the zero point added and the clamp done in
    int32, for a float y whose rounding is known to fit int32 (fits_int32).

    The same integers as the float tail (round, + zp, clamp in float): round(y) + zp is exact in float32 below
    2^24, and above it both saturate. The form lets a CPU round and convert in one instruction
    (`astype(round(y), int32)` becomes llvm.lrint: cpu_pipeline.round_to_int32) and saturate while narrowing
    (vpmovsdb / sqxtn).
    """
    op = relax.op
    i32 = lambda v: relax.const(np.asarray(v, np.int32), "int32")  # noqa: E731
    r = op.add(op.astype(op.round(y), "int32"), i32(zp))
    return op.astype(op.minimum(op.maximum(r, i32(lo)), i32(out.qmax)), out.np_dtype.name)


def _requantize_fixed(acc: relax.Expr, m: np.ndarray, zp_y: int, out: QType, lo: int) -> relax.Expr:
    """Integer-only requantize: (acc * mult + round) >> (31 + shift), in int64, ties rounded up.

    This is what integer-only devices do (gemmlowp style, with a single rounding); it can differ from the
    float path by one step on exact ties, so it is an option, not the default.
    """
    op = relax.op
    mult, shift = requant_multiplier(m.astype(np.float64))
    total = (31 + shift.astype(np.int64)).reshape(m.shape)
    assert np.all(total >= 1) and np.all(total <= 62), "requantize multiplier out of the fixed-point range"
    i64 = lambda a: relax.const(np.asarray(a, np.int64), "int64")  # noqa: E731  (relax.const narrows 0-d ints)
    prod = op.multiply(op.astype(acc, "int64"), i64(mult.astype(np.int64).reshape(m.shape)))
    rounded = op.add(prod, i64(np.left_shift(np.int64(1), total - 1)))
    shifted = op.right_shift(rounded, i64(total))
    q = op.add(shifted, i64(zp_y))
    c = op.minimum(op.maximum(q, i64(lo)), i64(out.qmax))
    return op.astype(c, out.np_dtype.name)


def per_tensor(s: relax.Expr, z: relax.Expr) -> tuple[np.float32, int] | None:
    """(scale, zero point) of a per-tensor quantization (one-element constants), else None."""
    sv, zv = scalar(s), scalar(z)
    if sv is None or zv is None or not np.isfinite(sv) or float(sv) <= 0:
        return None
    return np.float32(sv), int(zv)


def f32(v: float | np.ndarray) -> relax.Expr:
    """A float32 relax constant (explicit dtype: relax.const narrows python floats otherwise)."""
    return relax.const(np.asarray(v, np.float32), "float32")


def dequantize_f32(q: relax.Expr, s: np.float32, zp: int, summed: bool = False) -> relax.Expr:
    """ONNX DequantizeLinear on integers, in the reference's order: float32(int32(q) - zp) * s.

    summed=True, for a product that is added next: the same float32 values computed as
    float32(float64(q - zp) * float64(s)). The float64 product of a 10-bit integer and a float32 scale is
    exact, so rounding it to float32 gives the float32 product; but LLVM (TVM compiles with fp-contract=fast)
    cannot contract a multiply it must round to float32 first into the add after it, so the product can stay
    inlined in its consumer's loop instead of going through memory (tir_helpers.inline_safe)."""
    op = relax.op
    centered = op.subtract(op.astype(q, "int32"), relax.const(np.int32(zp), "int32"))
    if summed:
        wide = op.multiply(op.astype(centered, "float64"), relax.const(np.float64(np.float32(s)), "float64"))
        return op.astype(wide, "float32")
    return op.multiply(op.astype(centered, "float32"), f32(s))


def _saturated(y: np.ndarray, zp: int, lo: int, hi: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.clip(np.rint(y) + np.float32(zp), lo, hi)


def exact_reciprocal(domain: np.ndarray, s: np.float32, zp: int, lo: int, hi: int) -> np.float32 | None:
    """A float32 r with saturate(round(y * r) + zp) == saturate(round(y / s) + zp) for every y in `domain`
    (the float32 values the tensor can hold), or None. A division costs several multiplies in a vector unit;
    over a finite domain, checked value by value, the multiply is the same function, so the numerics are
    unchanged."""
    y = np.asarray(domain, np.float32).reshape(-1)
    want = _saturated(y / np.float32(s), zp, lo, hi)
    r0 = np.float32(1.0) / np.float32(s)
    for r in (r0, np.nextafter(r0, np.float32(np.inf)), np.nextafter(r0, np.float32(0))):
        if np.array_equal(_saturated(y * r, zp, lo, hi), want):
            return np.float32(r)
    return None


def dequantized_values(qtype: QType, s: np.float32, zp: int) -> np.ndarray:
    """Every float32 value dequantize_f32 can produce from a tensor of `qtype`."""
    q = np.arange(qtype.qmin, qtype.qmax + 1, dtype=np.int32)
    return (q - np.int32(zp)).astype(np.float32) * np.float32(s)


def quantize_f32(y: relax.Expr, s: np.float32, zp: int, out: QType, lo: int | None = None,
                 domain: np.ndarray | None = None) -> relax.Expr:
    """ONNX QuantizeLinear of a float32 tensor: saturate(round_half_even(y / s) + zp), clamped below at `lo`
    (out.qmin, or zp when a ReLU is folded in: round is monotone and round(0) = 0). With `domain`, every
    float32 value y can take, the division becomes a multiply where exact_reciprocal proves it the same
    function."""
    op = relax.op
    lo = out.qmin if lo is None else lo
    r = None if domain is None else exact_reciprocal(domain, s, zp, lo, out.qmax)
    scaled = op.divide(y, f32(s)) if r is None else op.multiply(y, f32(r))
    if domain is not None and fits_int32(float(np.max(np.abs(domain))) / float(s)):
        return round_to_int_tail(scaled, zp, lo, out)
    q = op.add(op.round(scaled), f32(zp))
    return op.astype(op.minimum(op.maximum(q, f32(lo)), f32(out.qmax)), out.np_dtype.name)


def requantize_elementwise(q: relax.Expr, src: tuple[np.float32, int], dst: tuple[np.float32, int],
                           out: QType) -> relax.Expr:
    """quantize(dequantize(q, *src), *dst) on integers, exactly as the QDQ pair computes it (float32, same
    order). Returns `q` itself when the parameters and the type agree (then the pair is the identity)."""
    if src[0] == dst[0] and src[1] == dst[1] and str(q.ty.dtype) == out.np_dtype.name:
        return q
    q_t = qtype_of(q.ty.dtype)
    domain = None if q_t is None else dequantized_values(q_t, *src)
    return quantize_f32(dequantize_f32(q, *src), *dst, out, domain=domain)


def backend_pipeline(backend: ModuleType, target: tvm.target.Target, legalize: list) -> tvm.transform.Pass:
    """TVM's pipeline for `backend` (tvm.relax.backend.cpu_generic / gpu_generic's `pipeline` module) with the
    legalize passes replaced by `legalize`: library dispatch, legalize, dataflow lowering, finalize."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(backend.library_dispatch_passes(target) + legalize
                                           + backend.dataflow_lower_passes(target)
                                           + backend.finalize_passes(target))
            return seq(mod)

    return _pipeline
