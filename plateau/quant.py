"""Quantization numerics, defined once.

Every stage imports this module: training draws its noise from the rounding step defined here, export builds the
fake-quant reference and the ONNX initializers with it, compile folds constants with it and runtime checks against
it. The rules follow ONNX QuantizeLinear / DequantizeLinear exactly:

    q = saturate(round_half_to_even(x / scale) + zero_point)      # x / scale in float32
    x' = (q - zero_point) * scale

Functions come in two flavours with the same argument shapes: torch (differentiable where it matters) and numpy
(the oracle that reads like the ONNX spec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "mean_multiplier",
    "QType",
    "INT8",
    "UINT8",
    "INT32",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_ste",
    "quantize_np",
    "dequantize_np",
    "quantize_bias",
    "quantize_bias_np",
    "rounding_noise_std",
    "requant_multiplier",
    "parse_bits",
    "conv_multiplier",
    "requantize",
    "pack_int4",
    "unpack_int4",
]


# --- integer types -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QType:
    """An integer type: bit width, signedness and whether the range is narrow (symmetric, -127..127 for int8).

    Narrow ranges are used for symmetric weights so that -max and +max are both representable and the sum of
    products never needs the asymmetric -128 (as ARM and x86 int8 kernels prefer).
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bits must be in 2..32, got {self.bits}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin

    @property
    def storage(self) -> str:
        """The ONNX/numpy container type: 4 bits and below are stored as (u)int4 in ONNX, in int8 in numpy."""
        if self.bits <= 4:
            return "int4" if self.signed else "uint4"
        if self.bits <= 8:
            return "int8" if self.signed else "uint8"
        return "int32"

    @property
    def np_dtype(self) -> np.dtype:
        if self.bits <= 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.int32)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "narrow": self.narrow}


INT8 = QType(8, True)
UINT8 = QType(8, False)
INT32 = QType(32, True)


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8). Raises ValueError naming the valid form."""
    t = text.strip().upper()
    if len(t) >= 4 and t[0] == "W" and "A" in t:
        w, a = t[1:].split("A", 1)
        if w.isdigit() and a.isdigit():
            wb, ab = int(w), int(a)
            if 2 <= wb <= 8 and 2 <= ab <= 8:
                return wb, ab
    raise ValueError(f"bad BITS {text!r}: expected W<bits>A<bits> with 2..8 bits each, e.g. W8A8, W4A8, W4A4")


# --- choosing parameters -----------------------------------------------------------------------------------------
_EPS = float(np.finfo(np.float32).eps)


def choose_qparams(
    min_val: np.ndarray | float,
    max_val: np.ndarray | float,
    qtype: QType,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int32) that cover [min_val, max_val] (widened to include 0).

    Symmetric: zero point 0 for signed types (mid-range for unsigned), scale = max|x| / ((qmax - qmin) / 2).
    Asymmetric: scale = (max - min) / (qmax - qmin), zero point = qmin - round(min / scale), saturated.
    Shapes follow min_val / max_val (scalars for per-tensor, vectors for per-axis).
    """
    lo = np.minimum(np.asarray(min_val, dtype=np.float32), 0.0)
    hi = np.maximum(np.asarray(max_val, dtype=np.float32), 0.0)
    qmin, qmax = qtype.qmin, qtype.qmax
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = (amax / np.float32((qmax - qmin) / 2.0)).astype(np.float32)
        scale = np.maximum(scale, np.float32(_EPS))
        zp = np.zeros_like(scale, dtype=np.int32)
        if not qtype.signed:
            zp = zp + (qmax + qmin + 1) // 2
        return scale, zp
    scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    scale = np.maximum(scale, np.float32(_EPS))
    zp = np.clip(qmin - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    return scale, zp


# --- torch: quantize / dequantize / fake-quantize ------------------------------------------------------------------
def _bcast(p: torch.Tensor | np.ndarray | float, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    t = torch.as_tensor(p, device=x.device)
    if axis is None or t.ndim == 0:
        return t
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | np.ndarray | float,
    zero_point: torch.Tensor | np.ndarray | int,
    qtype: QType,
    axis: int | None = None,
) -> torch.Tensor:
    """ONNX QuantizeLinear in torch, returning integers held in a float tensor (exact up to 2^24)."""
    s = _bcast(scale, x, axis).to(torch.float32)
    z = _bcast(zero_point, x, axis).to(torch.float32)
    # torch.round rounds half to even, as ONNX does.
    return torch.clamp(torch.round(x / s) + z, qtype.qmin, qtype.qmax)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | np.ndarray | float,
    zero_point: torch.Tensor | np.ndarray | int,
    axis: int | None = None,
) -> torch.Tensor:
    s = _bcast(scale, q, axis).to(torch.float32)
    z = _bcast(zero_point, q, axis).to(torch.float32)
    return (q.to(torch.float32) - z) * s


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | np.ndarray | float,
    zero_point: torch.Tensor | np.ndarray | int,
    qtype: QType,
    axis: int | None = None,
) -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through gradient inside the range and zero outside.

    The forward value is exactly dequantize(quantize(x)) (x / scale in float32, round half to even, + zero point,
    saturate, - zero point, * scale); scale may be a learnable tensor: its gradient is LSQ's, round(x/s) - x/s
    inside the range and the saturated level (q - zp) outside. One fused autograd function: the unfused form kept
    ten full-size temporaries per point alive for the backward pass, and quantization-aware training was
    memory-bound on them.
    """
    s = _bcast(scale, x, axis)
    s = s.to(x.dtype) if not isinstance(scale, torch.Tensor) else s
    z = _bcast(zero_point, x, axis).to(x.dtype)
    # round(v) + z saturated to [qmin, qmax], minus z, is round(v) saturated to [qmin - z, qmax - z]: integers in
    # float below 2^24 add exactly, and a value large enough to round off there saturates either way. One zero
    # point on the CPU goes in as a number: torch's CPU clamp with tensor bounds is several times slower than with
    # scalars (on a GPU, reading the number back would stall every call).
    lo, hi = qtype.qmin - z, qtype.qmax - z
    if z.numel() == 1 and z.device.type == "cpu":
        lo, hi = float(lo), float(hi)
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
        return torch.round(x / s).clamp_(lo, hi).mul_(s)
    return _FakeQuantize.apply(x, s, lo, hi)


class _FakeQuantize(torch.autograd.Function):
    """fake_quantize's forward and its straight-through / LSQ backward in one node of the autograd graph.

    QAT on a CPU is bound by these full-size elementwise passes, and torch's CPU kernels that make or read bool
    masks (comparisons, where) run 5-25x slower than float arithmetic here, so everything is float: the in-range
    mask m is 1 - min(|round(v) - level|, 1) (the two differ by a whole step or more outside), the scale's
    per-element derivative is level - m * v (round(v) - v in range, the saturated level outside), and the
    backward is one multiply and one dot product. Only m and that derivative are kept for it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor
                ) -> torch.Tensor:
        v = x / s
        r = torch.round(v)
        level = torch.clamp(r, lo, hi)
        m = r.sub_(level).abs_().clamp_(max=1.0).neg_().add_(1.0)  # 1 in range, 0 saturated
        d = torch.sub(level, v.mul_(m)) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(m, d, s)
        return level.mul_(s)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN205 - autograd's signature
        m, d, s = ctx.saved_tensors
        gx = g * m if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            if s.numel() == 1:  # one scale (an activation point): a dot product, no full-size temporary
                gs = torch.dot(g.reshape(-1), d.reshape(-1)).reshape(s.shape)
            else:
                gs = (g * d).sum_to_size(s.shape)
        return gx, gs, None, None


# --- numpy: the oracle ---------------------------------------------------------------------------------------------
def _np_bcast(p: np.ndarray | float, ndim: int, axis: int | None) -> np.ndarray:
    a = np.asarray(p)
    if axis is None or a.ndim == 0:
        return a
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


def quantize_np(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qtype: QType, axis: int | None = None
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point), computed in float32."""
    x = np.asarray(x, dtype=np.float32)
    s = _np_bcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _np_bcast(np.asarray(zero_point, dtype=np.int64), x.ndim, axis)
    q = np.rint(x / s).astype(np.int64) + z
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.np_dtype)


def dequantize_np(
    q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, axis: int | None = None
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale in float32."""
    q = np.asarray(q)
    s = _np_bcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _np_bcast(np.asarray(zero_point, dtype=np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def quantize_bias(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 bias of a conv/linear layer: (values as int64, scale) with scale = float32(s_x * s_w) per output
    channel and zero point 0; round half to even of bias / scale, divided in float64, saturated to int32."""
    s_b = (torch.tensor(input_scale, dtype=torch.float32) * weight_scale).to(torch.float32)
    q = torch.clamp(torch.round(bias.double() / s_b.double()), -(2**31), 2**31 - 1).to(torch.int64)
    return q, s_b


def quantize_bias_np(bias: np.ndarray, input_scale: float | np.ndarray, weight_scale: np.ndarray) -> tuple:
    """quantize_bias in numpy: (int32 values, float32 scale)."""
    s = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    q = np.rint(np.asarray(bias, dtype=np.float32).astype(np.float64) / s.astype(np.float64))
    return np.clip(q, -(2**31), 2**31 - 1).astype(np.int32), s


# --- derived quantities ----------------------------------------------------------------------------------------------
def rounding_noise_std(step: torch.Tensor | float) -> torch.Tensor | float:
    """Standard deviation of uniform rounding error with step `step`: step / sqrt(12)."""
    return step / math.sqrt(12.0)


def requant_multiplier(m: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a positive real multiplier into a Q31 integer multiplier and a right shift: m ~= mult * 2^-(31+shift).

    This is how device kernels (gemmlowp, TFLite, CMSIS-NN) requantize without floating point.
    """
    m = np.asarray(m, dtype=np.float64)
    if np.any(m <= 0):
        raise ValueError("requantization multiplier must be positive")
    mant, exp = np.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1)
    mult = np.rint(mant * (1 << 31)).astype(np.int64)
    carry = mult == (1 << 31)
    mult = np.where(carry, mult // 2, mult)
    exp = np.where(carry, exp + 1, exp)
    return mult.astype(np.int32), (-exp).astype(np.int32)


# --- integer-kernel numerics (what the reference, onnxruntime's QLinearConv and TVM's lowering compute) ---------------
def conv_multiplier(s_x: float | np.ndarray, s_w: np.ndarray, s_y: float) -> np.ndarray:
    """Requantization multiplier of a conv/matmul: float32(float32(s_x * s_w) / s_y), per output channel.

    The evaluation order is fixed (as onnxruntime's QLinearConv does it) so every backend gets the same float32.
    """
    sxw = (np.float32(s_x) * np.asarray(s_w, dtype=np.float32)).astype(np.float32)
    return (sxw / np.float32(s_y)).astype(np.float32)


def mean_multiplier(s_x: float, s_y: float, count: int | np.ndarray) -> np.ndarray:
    """Requantization multiplier of an average over `count` elements: float32(s_x) / (float32(s_y) * float32(K)),
    in float32 operations (onnxruntime's QLinearGlobalAveragePool order); `count` may be an array (per position)."""
    return np.asarray(np.float32(s_x) / (np.float32(s_y) * np.asarray(count, dtype=np.float32)), dtype=np.float32)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int, qtype: QType,
               relu: bool = False, axis: int | None = 1) -> torch.Tensor:
    """int32 accumulator -> output integers: saturate(round_half_even(float32(acc) * M) + zp).

    acc holds exact integers (any float dtype or int); float32(acc) rounds like a cvtdq2ps when |acc| > 2^24.
    A fused ReLU raises the lower bound to the zero point (round(max(y, 0)) == max(round(y), 0)).
    """
    m = _bcast(multiplier, acc, axis if torch.as_tensor(multiplier).ndim else None).to(torch.float32)
    y = torch.round(acc.to(torch.float32) * m) + zero_point
    lo = max(qtype.qmin, zero_point) if relu else qtype.qmin
    return torch.clamp(y, lo, qtype.qmax)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit integers two per byte, first element in the low nibble (ONNX INT4/UINT4 layout).

    An odd count is padded with a zero nibble. Returns uint8 of length ceil(n / 2).
    """
    v = np.asarray(values).astype(np.int64).ravel()
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.int64)])
    lo, hi = v[0::2] & 0xF, v[1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of pack_int4: `count` values as int8 (sign-extended when signed)."""
    p = np.asarray(packed, dtype=np.uint8).ravel()
    v = np.empty(p.size * 2, np.int16)
    v[0::2], v[1::2] = p & 0xF, p >> 4
    v = v[:count]
    if signed:
        v = np.where(v >= 8, v - 16, v)
    return v.astype(np.int8 if signed else np.uint8)
