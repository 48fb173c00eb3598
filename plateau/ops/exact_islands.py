"""Exact forms of a transformer's Softmax and LayerNorm islands (the default; `--no-exact-islands` keeps float32
ops): the float op computed from exact integer sums, in float64, so that every engine produces the same integers.

Why: a float32 Softmax or LayerNorm sums in an order each engine chooses (onnxruntime's vectorized kernels, torch's
cascade sums, TVM's loops), so the outputs differ in the last bits and a quantized output near a rounding tie lands
on either side; over a 12-block ViT that moves ~10% of the logits by a step. Here every sum is over integers
(exact in int64, any order), and what follows is a short chain of correctly rounded float64 operations, the
same on every engine. The result is the float op to float64 precision (closer than float32), not an approximation.

    exact_softmax    d_j = q_j - max_k q_k; e_j = E[d_j] with E[d] = round(2^30 exp(s_x d)) (a table: the input
                     has at most 2^b values); S = sum_j e_j (int64);
                     q_out_j = clamp(round_half_even((float64(e_j) / float64(S)) / s_y) + z_y)
    exact_layernorm  over the last C channels, with d_i = q_i - z_x: S1 = sum d_i, S2 = sum d_i^2 (int64),
                     xc_i = C d_i - S1, V = C S2 - S1^2 (exact; sum_i xc_i^2 = C V, so that
                     (x_i - mean) / sqrt(var + eps) = xc_i / sqrt(V + C^2 eps / s_x^2));
                     u_i = (float64(xc_i) / sqrt(float64(V) + E)) * G_i + B_i, G_i = gamma_i / s_y, B_i = beta_i / s_y,
                     E = C^2 eps / s_x^2 (float64 constants);  q_out_i = clamp(round_half_even(u_i) + z_y)

Both are integers in, integers out (no DequantizeLinear before, no QuantizeLinear after): ONNX integer ops, then
double Div / Sqrt / Mul / Add / Round, all exactly rounded, so onnxruntime and TVM compute them as the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from plateau.qgraph import ActQ, QNode

from .base import OnnxBuilder, register_op
from .integer_only import _IntegerIO, softmax_exp_sums, softmax_table, write_softmax_exp_sums

__all__ = ["ExactSoftmax", "ExactLayerNorm", "EXACT_KINDS", "EXACT_SOFTMAX_F", "exact_layer_norm_constants"]

EXACT_SOFTMAX_F = 30  # fraction bits of the exp table: relative error 2^-31 at the largest terms; sums stay < 2^42


def _scale64(a: ActQ) -> float:
    return float(np.float32(a.scale))


def exact_layer_norm_constants(params: dict, ain: ActQ, a: ActQ) -> tuple[np.ndarray, np.ndarray, float]:
    """(G, B, E) of exact_layernorm (module doc), float64."""
    gamma = params["weight"].double().cpu().numpy().ravel()
    beta = params["bias"].double().cpu().numpy().ravel()
    c, s_x, s_y = gamma.size, _scale64(ain), _scale64(a)
    return gamma / s_y, beta / s_y, float(c * c) * float(params["eps"]) / (s_x * s_x)


def _finish(u: torch.Tensor, a: ActQ) -> torch.Tensor:
    return torch.clamp(torch.round(u) + a.zero_point, a.qtype.qmin, a.qtype.qmax)


@register_op
class ExactSoftmax(_IntegerIO):
    name = "exact_softmax"

    def run_int(self, n, ins, ain, a, w):
        e, s = softmax_exp_sums(ins[0], n.attrs["params"]["axis"], softmax_table(ain[0], EXACT_SOFTMAX_F))
        return _finish(e.double() / s.double() / _scale64(a), a)

    def to_onnx_int(self, b: OnnxBuilder, n: QNode, x: str, ain: ActQ, a: ActQ, out_type: int, out: str) -> None:
        from onnx import numpy_helper

        p, axis = f"{n.name}.exact.", n.attrs["params"]["axis"]
        f64 = (lambda name, v: b.init(numpy_helper.from_array(np.asarray(v, np.float64), p + name)))  # noqa: E731
        write_softmax_exp_sums(b, p, x, axis, softmax_table(ain, EXACT_SOFTMAX_F))
        b.node("Cast", [p + "e"], [p + "ef"], p + "ef", to=11)  # DOUBLE: exact below 2^53
        b.node("Cast", [p + "s"], [p + "sf"], p + "sf", to=11)
        b.node("Div", [p + "ef", p + "sf"], [p + "prob"], p + "prob")
        b.node("Div", [p + "prob", f64("scale", _scale64(a))], [p + "u"], p + "u")
        _write_finish(b, p, p + "u", a, out_type, out, n.name)


@register_op
class ExactLayerNorm(_IntegerIO):
    name = "exact_layernorm"

    def run_int(self, n, ins, ain, a, w):
        d = ins[0].long() - ain[0].zero_point
        g, bb, e = exact_layer_norm_constants(n.attrs["params"], ain[0], a)
        c = d.shape[-1]
        s1 = d.sum(dim=-1, keepdim=True)
        xc = c * d - s1
        v = c * (d * d).sum(dim=-1, keepdim=True) - s1 * s1
        den = torch.sqrt(v.double() + e)
        gt, bt = (torch.from_numpy(t).to(d.device) for t in (g, bb))
        return _finish(xc.double() / den * gt + bt, a)

    def to_onnx_int(self, b: OnnxBuilder, n: QNode, x: str, ain: ActQ, a: ActQ, out_type: int, out: str) -> None:
        from onnx import numpy_helper

        p = f"{n.name}.exact."
        g, bb, e = exact_layer_norm_constants(n.attrs["params"], ain, a)
        i64 = (lambda name, v: b.init(numpy_helper.from_array(np.asarray(v, np.int64), p + name)))  # noqa: E731
        f64 = (lambda name, v: b.init(numpy_helper.from_array(np.asarray(v, np.float64), p + name)))  # noqa: E731
        # d, S1, xc and S2 in int32 where they fit (|d| <= 255: S2 <= C * 255^2 < 2^31 up to C = 33025), so the
        # per-channel steps run on 8 lanes, not 4, and xc converts to float64 with one packed instruction (AVX2
        # has none from int64); C S2 - S1^2 in int64. The same integers either way.
        narrow = g.size * 255 * 255 < 2**31
        ity = 6 if narrow else 7  # INT32 / INT64
        iconst = (lambda name, v: b.init(numpy_helper.from_array(  # noqa: E731
            np.asarray(v, np.int32 if narrow else np.int64), p + name)))
        b.node("Cast", [x], [p + "x"], p + "cast", to=ity)
        b.node("Sub", [p + "x", iconst("zx", ain.zero_point)], [p + "d"], p + "d")
        b.node("ReduceSum", [p + "d", i64("axes", [-1])], [p + "s1n"], p + "s1", keepdims=1)
        b.node("Mul", [p + "d", iconst("c", g.size)], [p + "cd"], p + "cd")
        b.node("Sub", [p + "cd", p + "s1n"], [p + "xc"], p + "xc")
        b.node("Mul", [p + "d", p + "d"], [p + "dd"], p + "dd")
        b.node("ReduceSum", [p + "dd", i64("axes2", [-1])], [p + "s2n"], p + "s2", keepdims=1)
        for s in ("s1", "s2"):  # the row sums to int64 for V (C S2 alone passes 2^31)
            b.node("Cast", [p + s + "n"], [p + s], p + s + "64", to=7)
        b.node("Mul", [p + "s2", i64("c2", g.size)], [p + "cs2"], p + "cs2")
        b.node("Mul", [p + "s1", p + "s1"], [p + "s11"], p + "s11")
        b.node("Sub", [p + "cs2", p + "s11"], [p + "v"], p + "v")
        b.node("Cast", [p + "v"], [p + "vf"], p + "vf", to=11)  # DOUBLE: exact below 2^53
        b.node("Add", [p + "vf", f64("eps", e)], [p + "ve"], p + "ve")
        b.node("Sqrt", [p + "ve"], [p + "den"], p + "sqrt")
        b.node("Cast", [p + "xc"], [p + "xcf"], p + "xcf", to=11)
        b.node("Div", [p + "xcf", p + "den"], [p + "norm"], p + "norm")
        b.node("Mul", [p + "norm", f64("g", g)], [p + "gn"], p + "gn")
        b.node("Add", [p + "gn", f64("b", bb)], [p + "u"], p + "u")
        _write_finish(b, p, p + "u", a, out_type, out, n.name)


def _write_finish(b: OnnxBuilder, p: str, u: str, a: ActQ, out_type: int, out: str, name: str) -> None:
    """round half to even, + zero point, saturate, to the output's integer type (all in float64: exact)."""
    from onnx import numpy_helper

    f64 = (lambda nm, v: b.init(numpy_helper.from_array(np.asarray(v, np.float64), p + nm)))  # noqa: E731
    b.node("Round", [u], [p + "r"], p + "round")
    b.node("Add", [p + "r", f64("zy", a.zero_point)], [p + "rz"], p + "rz")
    # Clip, not Max / Min: TVM's importer turns a variadic Max into a stack and a reduction
    b.node("Clip", [p + "rz", f64("lo", a.qtype.qmin), f64("hi", a.qtype.qmax)], [p + "clamped"], p + "clip")
    b.node("Cast", [p + "clamped"], [out], name, to=out_type)


# float island kind -> its exact form
EXACT_KINDS = {"softmax": "exact_softmax", "layer_norm": "exact_layernorm"}
