"""Per-layer localisation: which layer of a compiled artifact is the first to leave the fake-quant reference.

How: a debug copy of the artifact's QDQ ONNX whose single output is every quantization point's integer output
(the `<node>.q` tensor of QuantizeLinear), cast to float32 (exact for 8-bit and smaller integers), flattened
and concatenated along axis 1. One output keeps the compiled-artifact contract (float32 rows in, float32 rows
out), so the debug build runs through `run_artifact` on every device (local, qemu, rpc) unchanged. It is
compiled with the artifact's own compile settings for the artifact's own target, run on the device, split back
into layers and compared, layer by layer in graph order, with `FakeQuantModel.intermediates(x)`.

    >>> res = locate(ref, "runs/r1/export/model_qdq.onnx", "host", x[:8], "runs/r1/validate/host/debug")
    >>> res["first_divergent"], res["layers"][0]["max_steps"]
    ('layer2_0_conv1', 0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plateau.artifacts import atomic_path, sha256_file
from plateau.errors import PlateauError

__all__ = ["DEBUG_OUTPUT", "quant_points", "debug_onnx", "build_debug_artifact", "compare_layers",
           "first_divergent", "locate", "plant_scale_error"]

DEBUG_OUTPUT = "plateau_debug"


def quant_points(reference) -> list[str]:
    """Names of the reference's quantization points in graph order (the keys of `intermediates`)."""
    # a constant's integers are an initializer of the file, not computed: nothing to compare
    return [n.name for n in reference.graph.nodes if n.name in reference.acts and n.op != "const"]


def debug_onnx(src: str | Path, keys: list[str], dst: str | Path) -> None:
    """Write a copy of the QDQ ONNX at `src` whose one output concatenates the `<key>.q` tensors (float32,
    flat)."""
    import onnx
    from onnx import TensorProto, helper

    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise PlateauError(f"{src}: not a readable ONNX model ({type(e).__name__})") from None
    g = model.graph
    produced = {o for n in g.node for o in n.output}
    missing = [k for k in keys if f"{k}.q" not in produced]
    if missing:
        raise PlateauError(f"{src}: no tensor {missing[0]}.q (and {len(missing) - 1} more): per-layer "
                           "comparison needs the QDQ ONNX written by `plateau export`")
    flat = []
    for k in keys:
        g.node.append(helper.make_node("Cast", [f"{k}.q"], [f"{k}.dbg_f32"], name=f"{k}.dbg_cast",
                                       to=TensorProto.FLOAT))
        g.node.append(helper.make_node("Flatten", [f"{k}.dbg_f32"], [f"{k}.dbg_flat"], name=f"{k}.dbg_flat",
                                       axis=1))
        flat.append(f"{k}.dbg_flat")
    g.node.append(helper.make_node("Concat", flat, [DEBUG_OUTPUT], name="plateau_debug_concat", axis=1))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(DEBUG_OUTPUT, TensorProto.FLOAT, ["N", None]))
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))


def build_debug_artifact(src: str | Path, keys: list[str], target: str, out_dir: str | Path, *,
                         requant: str = "float", allow_float: bool = False) -> Path:
    """Compile the debug copy of `src` for `target` into out_dir (model.so); reused while nothing changed."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model_debug.onnx"
    debug_onnx(src, keys, onnx_path)
    sha = sha256_file(onnx_path)
    man_path = out_dir / "manifest.json"
    if man_path.is_file() and (out_dir / "model.so").is_file():
        try:
            m = json.loads(man_path.read_text())
        except (OSError, json.JSONDecodeError):
            m = {}
        cfg = m.get("config", {})
        if (m.get("inputs", {}).get("onnx", {}).get("sha256") == sha and cfg.get("target") == target
                and cfg.get("requant") == requant and cfg.get("allow_float") == allow_float):
            return out_dir
    from plateau.compile import compile_onnx

    compile_onnx(onnx_path, target, out_dir, requant=requant, allow_float=allow_float)
    return out_dir


def compare_layers(reference_int: dict, device_flat: np.ndarray, keys: list[str],
                   ops: dict[str, str] | None = None, tolerance: int = 1) -> list[dict]:
    """Split the device's concatenated debug output by layer and count differences in integer steps.

    reference_int: key -> integer tensor (N, ...) as `FakeQuantModel.intermediates` returns.
    """
    n = device_flat.shape[0]
    rows, off = [], 0
    for k in keys:
        ref = np.asarray(reference_int[k], dtype=np.float64).reshape(n, -1)
        dev = np.asarray(device_flat[:, off:off + ref.shape[1]], dtype=np.float64)
        if dev.shape != ref.shape:
            raise PlateauError(f"debug output is {device_flat.shape[1]} values per image, the reference's "
                               f"layers need more (at {k}): the debug build does not match the reference")
        off += ref.shape[1]
        d = np.abs(np.rint(dev) - ref)
        rows.append({
            "layer": k, "op": (ops or {}).get(k, "?"), "shape": list(np.asarray(reference_int[k]).shape[1:]),
            "values": int(d.size), "bit_exact": float((d == 0).mean()),
            "over_tolerance": float((d > tolerance).mean()), "max_steps": int(d.max()) if d.size else 0,
            "mean_abs_steps": float(d.mean()) if d.size else 0.0,
        })
    if off != device_flat.shape[1]:
        raise PlateauError(f"debug output has {device_flat.shape[1]} values per image, the reference's "
                           f"layers {off}: the debug build does not match the reference")
    return rows


def first_divergent(rows: list[dict], tolerance: int = 1) -> str | None:
    """The first layer (graph order) whose outputs differ by more than `tolerance` steps anywhere, else
    None."""
    return next((r["layer"] for r in rows if r["max_steps"] > tolerance), None)


def locate(reference, onnx_path: str | Path, target: str, x: np.ndarray, out_dir: str | Path, *,
           device: str = "local", rpc: str | None = None, rpc_key: str | None = None, tolerance: int = 1,
           requant: str = "float", allow_float: bool = False, images: list[int] | None = None) -> dict:
    """Run the debug build of `onnx_path` on `device` and the reference on `x`; the per-layer table and the
    first layer off by more than `tolerance` steps. `images` only labels which test images `x` holds."""
    import torch

    from .run import run_artifact

    keys = quant_points(reference)
    folder = build_debug_artifact(onnx_path, keys, target, out_dir, requant=requant, allow_float=allow_float)
    res = run_artifact(folder, x, device, batch_size=max(1, min(len(x), 16)), rpc=rpc, rpc_key=rpc_key)
    inter = reference.intermediates(torch.from_numpy(np.ascontiguousarray(x)))
    ref_int = {k: v.numpy() for k, v in inter.items()}
    ops = {n.name: n.op for n in reference.graph.nodes}
    rows = compare_layers(ref_int, res.outputs, keys, ops, tolerance)
    return {
        "tolerance_steps": tolerance, "images": images if images is not None else list(range(len(x))),
        "first_divergent": first_divergent(rows, tolerance), "layers": rows,
        "device": res.device, "emulated": res.emulated, "debug_artifact": str(Path(folder) / "model.so"),
        "onnx": str(onnx_path),
    }


def plant_scale_error(src: str | Path, dst: str | Path, layer: str, factor: float = 1.25) -> None:
    """A copy of the QDQ ONNX in which `layer`'s requantization (its QuantizeLinear scale) is off by `factor`.

    Only that QuantizeLinear gets the new scale; its consumers' DequantizeLinear keep the old one, as a wrong
    multiplier in a compiled kernel would. For testing that the per-layer report finds the layer.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get(f"{layer}.q")
    if node is not None and node.op_type == "Clip":  # an activation below 8 bits: QuantizeLinear -> clamp
        node = producer.get(node.input[0])
    if node is None or node.op_type != "QuantizeLinear":
        raise PlateauError(f"{src}: no QuantizeLinear writes {layer}.q")
    inits = {i.name: i for i in g.initializer}
    scale = numpy_helper.to_array(inits[node.input[1]])
    g.initializer.append(numpy_helper.from_array((scale * np.float32(factor)).astype(scale.dtype),
                                                 f"{layer}.s_planted"))
    node.input[1] = f"{layer}.s_planted"
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
