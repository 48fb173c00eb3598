"""Ops with no integer form that may stay in float with `allow_float` (`plateau export --allow-float`).

Such an op becomes a float island: DequantizeLinear -> the float op -> QuantizeLinear. Its output gets its own
calibrated quantization (like an add), so everything downstream stays integer. The reference runs the op in float32
on the dequantized input, which is what the QDQ graph means; onnxruntime and TVM run the same float op, so they agree
with the reference up to float rounding near a tie. The compile stage lists every island in its report.

A float op is a QNode with op "float" and attrs {"kind": ..., "params": {...}}; this module knows, for each kind,
the torch computation, the ONNX node(s) that express it, and how to recognise it in a torch.fx graph or an ONNX file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FLOAT_KINDS", "run_float_op", "float_op_of_module", "float_op_of_function", "float_op_of_onnx"]

# kind -> the ONNX op type(s) written for it
FLOAT_KINDS: dict[str, str] = {
    "gelu": "Gelu", "silu": "Sigmoid, Mul", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish",
    "hardsigmoid": "HardSigmoid", "softmax": "Softmax", "layer_norm": "LayerNormalization",
    "leaky_relu": "LeakyRelu", "elu": "Elu", "clip": "Clip",
}


def run_float_op(kind: str, p: dict, x: torch.Tensor) -> torch.Tensor:
    """The float32 computation of one island."""
    if kind == "gelu":
        return F.gelu(x, approximate=p["approximate"])
    if kind == "silu":
        return x * torch.sigmoid(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "hardswish":
        return F.hardswish(x)
    if kind == "hardsigmoid":
        return torch.clamp(p["alpha"] * x + p["beta"], 0.0, 1.0)
    if kind == "softmax":
        return torch.softmax(x, dim=p["axis"])
    if kind == "layer_norm":
        k = len(p["weight"].shape)
        return F.layer_norm(x, tuple(x.shape[-k:]), p["weight"], p["bias"], p["eps"])
    if kind == "leaky_relu":
        return F.leaky_relu(x, p["alpha"])
    if kind == "elu":
        return F.elu(x, p["alpha"])
    if kind == "clip":
        return torch.clamp(x, p["min"], p["max"])
    raise AssertionError(kind)


def float_op_of_module(m: nn.Module) -> tuple[str, dict] | None:
    """(kind, params) for a torch module that can be a float island, else None."""
    if isinstance(m, nn.GELU):
        return "gelu", {"approximate": m.approximate}
    if isinstance(m, nn.SiLU):
        return "silu", {}
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", {}
    if isinstance(m, nn.Tanh):
        return "tanh", {}
    if isinstance(m, nn.Hardswish):
        return "hardswish", {}
    if isinstance(m, nn.Hardsigmoid):
        return "hardsigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}
    if isinstance(m, nn.Softmax):
        return "softmax", {"axis": -1 if m.dim is None else int(m.dim)}
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        w = m.weight.detach().float().clone() if m.weight is not None else torch.ones(shape)
        b = m.bias.detach().float().clone() if m.bias is not None else torch.zeros(shape)
        return "layer_norm", {"weight": w, "bias": b, "eps": float(m.eps)}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"alpha": float(m.negative_slope)}
    if isinstance(m, nn.ELU):
        return "elu", {"alpha": float(m.alpha)}
    if isinstance(m, nn.Hardtanh):  # also ReLU6
        return "clip", {"min": float(m.min_val), "max": float(m.max_val)}
    return None


def float_op_of_function(f: object, args: list, kwargs: dict) -> tuple[str, dict] | None:
    """(kind, params) for a torch function call (torch.fx call_function) that can be a float island."""
    if f is F.gelu:
        return "gelu", {"approximate": kwargs.get("approximate", "none")}
    if f is F.silu:
        return "silu", {}
    if f in (torch.sigmoid, F.sigmoid):
        return "sigmoid", {}
    if f in (torch.tanh, F.tanh):
        return "tanh", {}
    if f is F.hardswish:
        return "hardswish", {}
    if f in (F.softmax, torch.softmax):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return ("softmax", {"axis": int(dim)}) if isinstance(dim, int) else None
    if f is F.relu6:
        return "clip", {"min": 0.0, "max": 6.0}
    return None


def float_op_of_onnx(op: str, a: dict, consts: dict, inputs: list[str]) -> tuple[str, dict] | None:
    """(kind, params) for an ONNX node (attributes `a`, constant inputs in `consts`) that can be a float island."""
    if op == "Gelu":
        approx = a.get("approximate", b"none")
        return "gelu", {"approximate": approx.decode() if isinstance(approx, bytes) else approx}
    if op in ("Sigmoid", "Tanh", "HardSwish"):
        return op.lower(), {}
    if op == "HardSigmoid":
        return "hardsigmoid", {"alpha": float(a.get("alpha", 0.2)), "beta": float(a.get("beta", 0.5))}
    if op == "Softmax":
        return "softmax", {"axis": int(a.get("axis", -1))}
    if op == "LeakyRelu":
        return "leaky_relu", {"alpha": float(a.get("alpha", 0.01))}
    if op == "Elu":
        return "elu", {"alpha": float(a.get("alpha", 1.0))}
    if op == "LayerNormalization" and len(inputs) >= 2 and inputs[1] in consts:
        w = torch.from_numpy(consts[inputs[1]].astype("float32").copy())
        b = (torch.from_numpy(consts[inputs[2]].astype("float32").copy()) if len(inputs) > 2 and inputs[2]
             else torch.zeros_like(w))
        axis = int(a.get("axis", -1))
        if axis != -w.dim():
            return None  # normalizing over more axes than the scale covers
        return "layer_norm", {"weight": w, "bias": b, "eps": float(a.get("epsilon", 1e-5))}
    if op == "Clip" and all(i in consts for i in inputs[1:3] if i):
        lo = float(consts[inputs[1]]) if len(inputs) > 1 and inputs[1] else float("-inf")
        hi = float(consts[inputs[2]]) if len(inputs) > 2 and inputs[2] else float("inf")
        return "clip", {"min": lo, "max": hi}
    return None
