"""Float islands: ops with no integer form (GELU, Softmax, LayerNorm, ...) kept in float32 between a
DequantizeLinear and a QuantizeLinear, with their own calibrated output quantization, so everything downstream
stays integer. A transformer's LayerNorm, Softmax and GELU are islands by default; any other kind only with
`plateau export --allow-float`. The reference computes the op in float32 on the dequantized input,
which is what the QDQ graph means; the compile stage lists every island in its report.

An island is a QNode of op "float" with attrs {"kind": ..., "params": {...}}. Each kind is one entry of
FLOAT_KINDS: how torch.fx and ONNX spell it, its float32 computation and the ONNX node(s) written for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plateau.qgraph import QNode
from plateau.registry import Registry

from .base import OnnxBuilder, OnnxNode, Op, register_op

__all__ = ["FLOAT_KINDS", "FloatKind", "FloatIsland", "float_kind_of_module", "float_kind_of_call", "run_float_kind"]

Params = dict
Spelled = tuple[str, Params] | None


@dataclass(frozen=True)
class FloatKind:
    """One float op: `onnx` is the ONNX op type written for it (several for a composite)."""

    name: str
    onnx: str
    run: Callable[[Params, torch.Tensor], torch.Tensor]
    write: Callable[[OnnxBuilder, str, Params, str, str], None]
    of_module: Callable[[nn.Module], Params | None] = lambda m: None
    of_call: Callable[[object, list, dict], Params | None] = lambda f, args, kw: None
    of_onnx: Callable[[OnnxNode], Params | None] = lambda r: None
    of_method: Callable[[str, list, dict], Params | None] = lambda name, args, kw: None
    default: bool = False  # an island without --allow-float: a transformer's LayerNorm, Softmax and GELU


FLOAT_KINDS: Registry[FloatKind] = Registry("float op")


def _unary(name: str, onnx: str, fn, module: type | None = None, functions: tuple = (),
           methods: tuple[str, ...] = ()) -> FloatKind:
    """A parameterless op: one ONNX node of type `onnx` computing `fn`."""
    return FLOAT_KINDS.add(name, FloatKind(
        name, onnx, lambda p, x: fn(x), lambda b, n, p, x, out: b.node(onnx, [x], [out], n),
        of_module=(lambda m: {} if isinstance(m, module) else None) if module else (lambda m: None),
        of_call=lambda f, args, kw: {} if f in functions else None,
        of_onnx=lambda r: {} if r.node.op_type == onnx else None,
        of_method=lambda m, args, kw: {} if m in methods else None))


def _attr_str(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


FLOAT_KINDS.add("gelu", FloatKind(
    "gelu", "Gelu", lambda p, x: F.gelu(x, approximate=p["approximate"]),
    lambda b, n, p, x, out: b.node("Gelu", [x], [out], n, approximate=p["approximate"]),
    of_module=lambda m: {"approximate": m.approximate} if isinstance(m, nn.GELU) else None,
    of_call=lambda f, args, kw: {"approximate": kw.get("approximate", "none")} if f is F.gelu else None,
    of_onnx=lambda r: {"approximate": _attr_str(r.attrs.get("approximate", b"none"))}
    if r.node.op_type == "Gelu" else None, default=True))


def _write_silu(b: OnnxBuilder, name: str, p: Params, x: str, out: str) -> None:
    b.node("Sigmoid", [x], [f"{name}.sigmoid"], f"{name}_sigmoid")
    b.node("Mul", [x, f"{name}.sigmoid"], [out], name)


FLOAT_KINDS.add("silu", FloatKind(
    "silu", "Sigmoid, Mul", lambda p, x: x * torch.sigmoid(x), _write_silu,
    of_module=lambda m: {} if isinstance(m, nn.SiLU) else None,
    of_call=lambda f, args, kw: {} if f is F.silu else None))
_unary("sigmoid", "Sigmoid", torch.sigmoid, nn.Sigmoid, (torch.sigmoid, F.sigmoid), ("sigmoid",))
_unary("tanh", "Tanh", torch.tanh, nn.Tanh, (torch.tanh, F.tanh), ("tanh",))
_unary("hardswish", "HardSwish", F.hardswish, nn.Hardswish, (F.hardswish,))
FLOAT_KINDS.add("hardsigmoid", FloatKind(
    "hardsigmoid", "HardSigmoid", lambda p, x: torch.clamp(p["alpha"] * x + p["beta"], 0.0, 1.0),
    lambda b, n, p, x, out: b.node("HardSigmoid", [x], [out], n, alpha=float(p["alpha"]), beta=float(p["beta"])),
    of_module=lambda m: {"alpha": 1.0 / 6.0, "beta": 0.5} if isinstance(m, nn.Hardsigmoid) else None,
    of_onnx=lambda r: {"alpha": float(r.attrs.get("alpha", 0.2)), "beta": float(r.attrs.get("beta", 0.5))}
    if r.node.op_type == "HardSigmoid" else None))


def _softmax_dim(args: list, kw: dict) -> Params | None:
    dim = args[1] if len(args) > 1 else kw.get("dim")
    return {"axis": int(dim)} if isinstance(dim, int) and kw.get("dtype") is None else None


def _softmax_call(f: object, args: list, kw: dict) -> Params | None:
    return _softmax_dim(args, kw) if f in (F.softmax, torch.softmax) else None


FLOAT_KINDS.add("softmax", FloatKind(
    "softmax", "Softmax", lambda p, x: torch.softmax(x, dim=p["axis"]),
    lambda b, n, p, x, out: b.node("Softmax", [x], [out], n, axis=p["axis"]),
    of_module=lambda m: {"axis": -1 if m.dim is None else int(m.dim)} if isinstance(m, nn.Softmax) else None,
    of_call=_softmax_call, of_method=lambda m, args, kw: _softmax_dim(args, kw) if m == "softmax" else None,
    of_onnx=lambda r: {"axis": int(r.attrs.get("axis", -1))} if r.node.op_type == "Softmax" else None,
    default=True))


def _layer_norm_module(m: nn.Module) -> Params | None:
    if not isinstance(m, nn.LayerNorm):
        return None
    shape = tuple(m.normalized_shape)
    w = m.weight.detach().float().clone() if m.weight is not None else torch.ones(shape)
    b = m.bias.detach().float().clone() if m.bias is not None else torch.zeros(shape)
    return {"weight": w, "bias": b, "eps": float(m.eps)}


def _layer_norm_call(f: object, args: list, kw: dict) -> Params | None:
    """F.layer_norm(x, normalized_shape, weight, bias, eps) with constant weight and bias (a traced norm layer)."""
    if f is not F.layer_norm:
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = {**dict(zip(names, args, strict=False)), **kw}
    shape = tuple(a["normalized_shape"])
    w, b = a.get("weight"), a.get("bias")
    if not all(v is None or isinstance(v, torch.Tensor) for v in (w, b)):
        return None
    return {"weight": w.detach().float().clone() if w is not None else torch.ones(shape),
            "bias": b.detach().float().clone() if b is not None else torch.zeros(shape),
            "eps": float(a.get("eps", 1e-5))}


def _layer_norm_onnx(r: OnnxNode) -> Params | None:
    scale = r.const_input(1)
    if r.node.op_type != "LayerNormalization" or scale not in r.consts:
        return None
    w = r.tensor(scale)
    bias = r.const_input(2)
    b = r.tensor(bias) if bias else torch.zeros_like(w)
    if int(r.attrs.get("axis", -1)) != -w.dim():
        return None  # normalizing over more axes than the scale covers
    return {"weight": w, "bias": b, "eps": float(r.attrs.get("epsilon", 1e-5))}


def _write_layer_norm(b: OnnxBuilder, name: str, p: Params, x: str, out: str) -> None:
    w = b.const_f32(f"{name}.ln_scale", p["weight"].numpy())
    bias = b.const_f32(f"{name}.ln_bias", p["bias"].numpy())
    b.node("LayerNormalization", [x, w, bias], [out], name, axis=-p["weight"].dim(), epsilon=p["eps"])


FLOAT_KINDS.add("layer_norm", FloatKind(
    "layer_norm", "LayerNormalization",
    lambda p, x: F.layer_norm(x, tuple(x.shape[-p["weight"].dim():]), p["weight"], p["bias"], p["eps"]),
    _write_layer_norm, of_module=_layer_norm_module, of_call=_layer_norm_call, of_onnx=_layer_norm_onnx,
    default=True))
FLOAT_KINDS.add("leaky_relu", FloatKind(
    "leaky_relu", "LeakyRelu", lambda p, x: F.leaky_relu(x, p["alpha"]),
    lambda b, n, p, x, out: b.node("LeakyRelu", [x], [out], n, alpha=p["alpha"]),
    of_module=lambda m: {"alpha": float(m.negative_slope)} if isinstance(m, nn.LeakyReLU) else None,
    of_onnx=lambda r: {"alpha": float(r.attrs.get("alpha", 0.01))} if r.node.op_type == "LeakyRelu" else None))
FLOAT_KINDS.add("elu", FloatKind(
    "elu", "Elu", lambda p, x: F.elu(x, p["alpha"]),
    lambda b, n, p, x, out: b.node("Elu", [x], [out], n, alpha=p["alpha"]),
    of_module=lambda m: {"alpha": float(m.alpha)} if isinstance(m, nn.ELU) else None,
    of_onnx=lambda r: {"alpha": float(r.attrs.get("alpha", 1.0))} if r.node.op_type == "Elu" else None))


def _clip_onnx(r: OnnxNode) -> Params | None:
    if r.node.op_type != "Clip" or not all(i in r.consts for i in r.node.input[1:3] if i):
        return None
    lo, hi = r.const_input(1), r.const_input(2)
    return {"min": float(r.consts[lo]) if lo else float("-inf"), "max": float(r.consts[hi]) if hi else float("inf")}


def _write_clip(b: OnnxBuilder, name: str, p: Params, x: str, out: str) -> None:
    b.node("Clip", [x, b.const_f32(f"{name}.min", p["min"]), b.const_f32(f"{name}.max", p["max"])], [out], name)


FLOAT_KINDS.add("clip", FloatKind(  # ReLU6 / Hardtanh: fused into the op before it where it can be (capture)
    "clip", "Clip", lambda p, x: torch.clamp(x, p["min"], p["max"]), _write_clip,
    of_module=lambda m: {"min": float(m.min_val), "max": float(m.max_val)} if isinstance(m, nn.Hardtanh) else None,
    of_call=lambda f, args, kw: {"min": 0.0, "max": 6.0} if f is F.relu6 else None, of_onnx=_clip_onnx))


def float_kind_of_module(m: nn.Module) -> Spelled:
    """(kind, params) for a torch module that can be a float island, else None."""
    return next(((k, p) for k, fk in FLOAT_KINDS.items() if (p := fk.of_module(m)) is not None), None)


def float_kind_of_call(f: object, args: list, kwargs: dict) -> Spelled:
    """(kind, params) for a torch function call (torch.fx call_function) that can be a float island."""
    return next(((k, p) for k, fk in FLOAT_KINDS.items() if (p := fk.of_call(f, args, kwargs)) is not None), None)


def run_float_kind(kind: str, params: Params, x: torch.Tensor) -> torch.Tensor:
    """The float32 computation of one island."""
    return FLOAT_KINDS.get(kind).run(params, x)


@register_op
class FloatIsland(Op):
    """The op of every island; capture accepts it only with allow_float (see plateau.capture)."""

    name = "float"
    float_island = True
    onnx_types = tuple(dict.fromkeys(fk.onnx for _, fk in FLOAT_KINDS.items() if "," not in fk.onnx))

    def claims_module(self, m):
        return float_kind_of_module(m) is not None

    def claims_call(self, f, args, kwargs):
        return float_kind_of_call(f, args, kwargs) is not None

    def claims_method(self, method):
        return True  # decided with the arguments, in from_method

    def from_module(self, m, args):
        kind, params = float_kind_of_module(m)
        return {"kind": kind, "params": params}, args[:1]

    def from_call(self, f, args, kwargs):
        kind, params = float_kind_of_call(f, args, kwargs)
        return {"kind": kind, "params": params}, args[:1]

    def from_method(self, method, args, kwargs):
        for k, fk in FLOAT_KINDS.items():
            if (p := fk.of_method(method, args, kwargs)) is not None:
                return {"kind": k, "params": p}, args[:1]
        return None

    def needs_flag(self, attrs: dict) -> bool:
        """Whether this island needs allow_float: every kind but a transformer's LayerNorm, Softmax, GELU."""
        return not FLOAT_KINDS.get(attrs["kind"]).default

    def run_float(self, n, ins, w, b):
        return run_float_kind(n.attrs["kind"], n.attrs["params"], ins[0])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        FLOAT_KINDS.get(n.attrs["kind"]).write(b, n.name, n.attrs["params"], ins[0], out)

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        if len(r.inputs) != 1:
            return None
        for k, fk in FLOAT_KINDS.items():
            if (p := fk.of_onnx(r)) is not None:
                return QNode(r.name, self.name, r.inputs[:1], attrs={"kind": k, "params": p})
        return None
