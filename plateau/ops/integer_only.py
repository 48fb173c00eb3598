"""Integer-only forms of a transformer's float islands (`plateau export --integer-only`): GELU (and any other
elementwise float op) as a lookup table, Softmax and LayerNorm in integer arithmetic. Defined here once, exactly:
onnxruntime runs the integer ONNX ops written for them, and TVM lowers the same ops, so every engine computes the
same integers.

    lut            an elementwise op on an integer input has at most 2^b input values: q_y = T[q_x - qmin],
                   T[i] = Q_y(f(DQ_x(i))) with the float island's own float32 arithmetic, once (the table is in the
                   ONNX file). Exact: it is the float island evaluated on each possible input (I-ViT's ShiftGELU
                   approximates; a table need not). Used by default for elementwise islands in either mode
                   (QuantConfig.exact_islands): the same integers, and every engine computes them alike.
    int_softmax    d_j = q_j - max_k q_k (<= 0); e_j = E[d_j] with E[d] = round(2^F exp(s_x d)) (a table, F = 22);
                   S = sum_j e_j; q_out_j = floor((2^(b+1) e_j + S) / (2 S)), clamped to [0, 2^b - 1]: round(p_j / 2^-b)
                   on the probabilities' fixed grid (scale 2^-b, zero point 0). int64 throughout.
    int_layernorm  over the last axis of C channels: xc_i = C x_i - sum_j x_j;
                   V = sum_i xc_i^2 + round(C^3 eps / s_x^2); R = floor(sqrt(V)) (the float64 sqrt of an integer below
                   2^52 is exactly rounded, so its floor is the integer square root on every engine), at least 1;
                   with G_i = round(2^K gamma_i sqrt(C) / s_y), B_i = round(2^K beta_i / s_y), K = 16:
                       t_i = floor((2 G_i xc_i + R) / (2 R)),  q_i = floor((t_i + B_i + 2^(K-1)) / 2^K) + z_y, clamped.
                   (x_i - mean) / std = xc_i sqrt(C) / R, as in I-BERT's integer LayerNorm.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from plateau.qgraph import ActQ, QNode
from plateau.quant import dequantize_np, quantize_np

from .base import OnnxBuilder, Op, register_op
from .float_island import FLOAT_KINDS, run_float_kind

__all__ = ["Lut", "IntSoftmax", "IntLayerNorm", "lut_table", "softmax_table", "layer_norm_constants",
           "softmax_exp_sums", "write_softmax_exp_sums",
           "INTEGER_KINDS"]

SOFTMAX_F = 22  # fraction bits of the exp table: sum over up to 2^9 tokens stays below 2^31, exact in int64 anyway
LAYER_NORM_K = 16  # fraction bits of LayerNorm's per-channel multipliers


def _levels(a: ActQ) -> np.ndarray:
    return np.arange(a.qtype.qmin, a.qtype.qmax + 1, dtype=np.int64)


def lut_table(kind: str, params: dict, ain: ActQ, a: ActQ) -> np.ndarray:
    """T[i] for every input integer qmin + i: the float island itself (DQ in float32, the op in float32, Q) on each
    possible input, so a table and the island it replaces give the same integers."""
    x = dequantize_np(_levels(ain), ain.scale, ain.zero_point)
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    y = run_float_kind(kind, cpu, torch.from_numpy(x)).numpy()
    return quantize_np(y.astype(np.float32), a.scale, a.zero_point, a.qtype).astype(np.int64)


def softmax_table(ain: ActQ, frac_bits: int = SOFTMAX_F) -> np.ndarray:
    """E[j] = round(2^F exp(s_x * (j - (L - 1)))) for j = 0..L-1: the exp of every difference to the row maximum."""
    n = ain.qtype.qmax - ain.qtype.qmin + 1
    d = np.arange(-(n - 1), 1, dtype=np.float64) * np.float64(np.float32(ain.scale))
    return np.rint(np.exp(d) * 2.0**frac_bits).astype(np.int64)


def softmax_exp_sums(x: torch.Tensor, axis: int, table: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, S) of the table-driven Softmaxes: e_j = table[q_j - max_k q_k + L - 1] and S = sum_j e_j along
    `axis` (int64, exact in any order)."""
    q = x.long()
    t = torch.from_numpy(table).to(q.device)
    e = t[q - q.amax(dim=axis, keepdim=True) + len(t) - 1]
    return e, e.sum(dim=axis, keepdim=True)


def write_softmax_exp_sums(b: OnnxBuilder, p: str, x: str, axis: int, table: np.ndarray) -> None:
    """softmax_exp_sums as ONNX integer ops on the integer tensor `x`: writes `p`e and `p`s (int64)."""
    from onnx import numpy_helper

    i64 = (lambda name, v: b.init(numpy_helper.from_array(np.asarray(v, np.int64), p + name)))  # noqa: E731
    b.node("Cast", [x], [p + "x"], p + "cast", to=7)  # INT64
    b.node("ReduceMax", [p + "x", i64("axes", [axis])], [p + "max"], p + "max", keepdims=1)
    b.node("Sub", [p + "x", p + "max"], [p + "d"], p + "d")
    b.node("Add", [p + "d", i64("last", len(table) - 1)], [p + "idx"], p + "idx")
    b.node("Gather", [b.init(numpy_helper.from_array(table, p + "exp_table")), p + "idx"], [p + "e"], p + "e",
           axis=0)
    b.node("ReduceSum", [p + "e", i64("axes2", [axis])], [p + "s"], p + "s", keepdims=1)


def layer_norm_constants(params: dict, ain: ActQ, a: ActQ) -> tuple[np.ndarray, np.ndarray, int]:
    """(G, B, eps term) of the integer LayerNorm (module doc), int64."""
    gamma = params["weight"].double().cpu().numpy().ravel()
    beta = params["bias"].double().cpu().numpy().ravel()
    c = gamma.size
    s_y, s_x = float(np.float32(a.scale)), float(np.float32(ain.scale))
    g = np.rint(gamma * math.sqrt(c) / s_y * 2.0**LAYER_NORM_K).astype(np.int64)
    b = np.rint(beta / s_y * 2.0**LAYER_NORM_K).astype(np.int64)
    eps = int(round(c**3 * params["eps"] / (s_x * s_x)))
    return g, b, eps


def _floor_div(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


class _IntegerIO(Op):
    """An op computed on its input's integers, writing integers: no DequantizeLinear before it, no QuantizeLinear
    after it in the QDQ file."""

    integer_io = True

    def run_float(self, n, ins, w, b):
        return run_float_kind(n.attrs["kind"], n.attrs["params"], ins[0])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        self.to_onnx_float(b, n, ins, out)

    def to_onnx_float(self, b: OnnxBuilder, n: QNode, ins: list[str], out: str) -> None:
        """The float graph (model_fp32.onnx) has the float op."""
        FLOAT_KINDS.get(n.attrs["kind"]).write(b, n.name, n.attrs["params"], ins[0], out)


@register_op
class Lut(_IntegerIO):
    name = "lut"

    def run_int(self, n, ins, ain, a, w):
        t = torch.from_numpy(lut_table(n.attrs["kind"], n.attrs["params"], ain[0], a)).double()
        return t.to(ins[0].device)[(ins[0] - ain[0].qtype.qmin).long()]

    def to_onnx_int(self, b: OnnxBuilder, n: QNode, x: str, ain: ActQ, a: ActQ, out_type: int, out: str) -> None:
        from onnx import numpy_helper

        from plateau.quant import QType

        table = lut_table(n.attrs["kind"], n.attrs["params"], ain, a)
        box = QType(8, a.qtype.signed)
        t = b.init(numpy_helper.from_array(table.astype(box.np_dtype), f"{n.name}.table"))
        b.node("Cast", [x], [f"{n.name}.i32"], f"{n.name}_cast", to=6)  # INT32
        b.node("Sub", [f"{n.name}.i32", b.init(numpy_helper.from_array(np.int32(ain.qtype.qmin), f"{n.name}.qmin"))],
               [f"{n.name}.idx"], f"{n.name}_index")
        b.node("Gather", [t, f"{n.name}.idx"], [out], n.name, axis=0)


@register_op
class IntSoftmax(_IntegerIO):
    name = "int_softmax"

    def run_int(self, n, ins, ain, a, w):
        e, s = softmax_exp_sums(ins[0], n.attrs["params"]["axis"], softmax_table(ain[0]))
        y = _floor_div(e * 2 ** (a.qtype.bits + 1) + s, 2 * s)
        return torch.clamp(y, a.qtype.qmin, a.qtype.qmax).double()

    def to_onnx_int(self, b: OnnxBuilder, n: QNode, x: str, ain: ActQ, a: ActQ, out_type: int, out: str) -> None:
        from onnx import numpy_helper

        p, axis = f"{n.name}.int.", n.attrs["params"]["axis"]
        table = softmax_table(ain)
        i64 = (lambda name, v: b.init(numpy_helper.from_array(np.asarray(v, np.int64), p + name)))  # noqa: E731
        write_softmax_exp_sums(b, p, x, axis, table)
        b.node("Mul", [p + "e", i64("two_b", 2 ** (a.qtype.bits + 1))], [p + "e2"], p + "e2")
        b.node("Add", [p + "e2", p + "s"], [p + "num"], p + "num")
        b.node("Add", [p + "s", p + "s"], [p + "den"], p + "den")
        b.node("Div", [p + "num", p + "den"], [p + "y"], p + "div")  # non-negative: truncation is the floor
        b.node("Clip", [p + "y", i64("lo", a.qtype.qmin), i64("hi", a.qtype.qmax)], [p + "yc"], p + "clip")
        b.node("Cast", [p + "yc"], [out], n.name, to=out_type)


@register_op
class IntLayerNorm(_IntegerIO):
    name = "int_layernorm"

    def run_int(self, n, ins, ain, a, w):
        x = ins[0].long()
        g, bb, eps = (torch.from_numpy(v).to(x.device) if isinstance(v, np.ndarray) else v
                      for v in layer_norm_constants(n.attrs["params"], ain[0], a))
        c = x.shape[-1]
        xc = c * x - x.sum(dim=-1, keepdim=True)
        v = (xc * xc).sum(dim=-1, keepdim=True) + eps
        r = torch.clamp(torch.floor(torch.sqrt(v.double())).long(), min=1)
        t = _floor_div(2 * g * xc + r, 2 * r)
        y = _floor_div(t + bb + 2 ** (LAYER_NORM_K - 1), 2**LAYER_NORM_K) + a.zero_point
        return torch.clamp(y, a.qtype.qmin, a.qtype.qmax).double()

    def to_onnx_int(self, b: OnnxBuilder, n: QNode, x: str, ain: ActQ, a: ActQ, out_type: int, out: str) -> None:
        from onnx import numpy_helper

        p = f"{n.name}.int."
        g, bb, eps = layer_norm_constants(n.attrs["params"], ain, a)
        i64 = (lambda name, v: b.init(numpy_helper.from_array(np.asarray(v, np.int64), p + name)))  # noqa: E731

        def floor_div(num: str, den: str, res: str) -> None:  # ONNX Div truncates: subtract the remainder first
            b.node("Mod", [num, den], [res + "_mod"], res + "_mod")  # integer Mod takes the divisor's sign
            b.node("Sub", [num, res + "_mod"], [res + "_exact"], res + "_exact")
            b.node("Div", [res + "_exact", den], [res], res)

        b.node("Cast", [x], [p + "x"], p + "cast", to=7)  # INT64
        b.node("ReduceSum", [p + "x", i64("axes", [-1])], [p + "sum"], p + "sum", keepdims=1)
        b.node("Mul", [p + "x", i64("c", g.size)], [p + "cx"], p + "cx")
        b.node("Sub", [p + "cx", p + "sum"], [p + "xc"], p + "xc")
        b.node("Mul", [p + "xc", p + "xc"], [p + "sq"], p + "sq")
        b.node("ReduceSum", [p + "sq", i64("axes2", [-1])], [p + "v0"], p + "v0", keepdims=1)
        b.node("Add", [p + "v0", i64("eps", eps)], [p + "v"], p + "v")
        b.node("Cast", [p + "v"], [p + "vf"], p + "vf", to=11)  # DOUBLE: exact below 2^53
        b.node("Sqrt", [p + "vf"], [p + "sf"], p + "sqrt")
        b.node("Floor", [p + "sf"], [p + "rf"], p + "floor")
        b.node("Cast", [p + "rf"], [p + "r0"], p + "r0", to=7)
        b.node("Clip", [p + "r0", i64("one", 1)], [p + "r"], p + "r")  # at least 1 (Clip: no stack in TVM)
        b.node("Mul", [p + "xc", i64("g2", 2 * g)], [p + "gx"], p + "gx")
        b.node("Add", [p + "gx", p + "r"], [p + "num"], p + "num")
        b.node("Add", [p + "r", p + "r"], [p + "den"], p + "den")
        floor_div(p + "num", p + "den", p + "t")
        b.node("Add", [p + "t", i64("b", bb + 2 ** (LAYER_NORM_K - 1))], [p + "u"], p + "u")
        floor_div(p + "u", i64("k", 2**LAYER_NORM_K), p + "y0")
        b.node("Add", [p + "y0", i64("zp", a.zero_point)], [p + "y"], p + "y")
        b.node("Clip", [p + "y", i64("lo", a.qtype.qmin), i64("hi", a.qtype.qmax)], [p + "yc"], p + "clip")
        b.node("Cast", [p + "yc"], [out], n.name, to=out_type)


# float island kind -> its integer-only op
INTEGER_KINDS = {"softmax": "int_softmax", "layer_norm": "int_layernorm", **{
    k: "lut" for k in ("gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "clip")}}
