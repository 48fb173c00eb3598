"""`plateau validate` (this module is its entry point) and `plateau validate --onnx FILE`: a QDQ file Plateau did
not export (onnxruntime's quantize_static output, another tool's), compiled with `plateau compile --onnx FILE`,
checked against onnxruntime on the same file.

There is no Plateau reference for such a file: the file itself defines the numerics, and onnxruntime's CPU provider
is the engine everybody runs it on. Differences are counted in output steps as for Plateau's own exports: the scale
of the DequantizeLinear that makes the output, or, where the last layer (Gemm / MatMul + Add) leaves its output in
float as quantize_static does, one unit of that layer's int32 accumulator (s_x * s_w, per output channel).

    plateau compile --onnx vit_qdq.onnx --run runs/ext
    plateau validate --onnx vit_qdq.onnx --run runs/ext --data ../shared/data/cifar10 --mean 0.5 0.5 0.5 \\
        --std 0.5 0.5 0.5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from plateau.artifacts import sha256_file
from plateau.data import batches, load_split
from plateau.errors import PlateauError
from plateau.export.onnx_reader import graph_constants
from plateau.export.validate import compare_logits, ort_kernels, ort_session
from plateau.models import IMAGENET_MEAN, IMAGENET_STD
from plateau.staging import staged_output

from . import validate
from .run import elf_machine

__all__ = ["output_step", "input_size", "add_arguments", "main", "validate_foreign"]

_PASS = ("Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze")


def output_step(model: onnx.ModelProto) -> tuple[np.ndarray | float, str]:
    """(the step logits are counted in, what it is); a PlateauError when the output is made otherwise."""
    g = model.graph
    made_by = {o: n for n in g.node for o in n.output}
    consts = graph_constants(g)
    n = made_by.get(g.output[0].name)
    while n is not None and n.op_type in _PASS:
        n = made_by.get(n.input[0])
    if n is None:
        raise PlateauError(f"{g.output[0].name}: the graph output is no node's output")
    if n.op_type == "DequantizeLinear" and n.input[1] in consts:
        return float(np.asarray(consts[n.input[1]]).reshape(-1)[0]), "the output DequantizeLinear's scale"
    if n.op_type == "Add":  # MatMul + Add (bias) as quantize_static writes a Linear
        n = next((made_by[i] for i in n.input if i in made_by and made_by[i].op_type in ("MatMul", "Gemm")), n)
    if n.op_type in ("MatMul", "Gemm"):
        scales = []
        for i in n.input[:2]:
            d = made_by.get(i)
            while d is not None and d.op_type in ("Transpose", *_PASS):
                d = made_by.get(d.input[0])
            if d is None or d.op_type != "DequantizeLinear" or d.input[1] not in consts:
                break
            scales.append(np.asarray(consts[d.input[1]], dtype=np.float32))
        if len(scales) == 2:
            s = (scales[0].reshape(-1)[0] * scales[1].reshape(-1)).astype(np.float32)
            return (float(s[0]) if s.size == 1 else s), f"one int32 accumulator unit of {n.name or n.op_type}"
    raise PlateauError(f"cannot tell the output step of this file: its output comes from {n.op_type} "
                       f"{n.name!r}, not a DequantizeLinear or a quantized MatMul/Gemm")


def input_size(model: onnx.ModelProto, path: Path) -> list[int]:
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is None or d < 1 for d in dims[1:]):
        raise PlateauError(f"{path}: input {model.graph.input[0].name!r} has shape {dims}; an image model's "
                           "N x C x H x W with fixed C, H, W is needed")
    return [int(d) for d in dims[1:]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`plateau validate`'s options, and --onnx with what it needs."""
    validate.add_arguments(p)
    onnx_options(p, "validate the library compiled from this QDQ file (`plateau compile --onnx FILE`), one Plateau "
                    "did not export, against onnxruntime on the same file; needs --data")


def onnx_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--onnx", help=what)
    p.add_argument("--data", help="with --onnx: the ImageFolder tree (or 'synthetic') whose test images to run")
    p.add_argument("--mean", type=float, nargs=3, help="with --onnx: input normalization mean (default ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="with --onnx: input normalization std (default ImageNet's)")


def main(args: argparse.Namespace) -> dict:
    """`plateau validate`: a run's export (validate.py), or with --onnx a file Plateau did not export."""
    return validate_foreign(args) if getattr(args, "onnx", None) else validate.main(args)


def validate_foreign(args: argparse.Namespace) -> dict:
    from .validate import check_artifact, onnx_record, pick_device, render_document, render_report, run_on_device

    path, run = Path(args.onnx), Path(args.run)
    if not path.is_file():
        raise PlateauError(f"--onnx {path}: no such file")
    if not args.data:
        raise PlateauError("--onnx needs --data: the ImageFolder tree (or 'synthetic') whose test images to run")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # a damaged or non-ONNX file
        raise PlateauError(f"--onnx {path}: not a readable ONNX model ({type(e).__name__})") from None
    comp_dir = Path(args.compiled) if args.compiled else run / "compile" / args.target
    comp = check_artifact(comp_dir, args.target, None)
    if onnx_record(comp).get("sha256") != sha256_file(path):
        raise PlateauError(f"{comp_dir / 'model.so'} was not compiled from {path}: run `plateau compile --onnx "
                           f"{path} --run {run} --target {args.target}` first")
    step, step_source = output_step(model)
    size = input_size(model, path)
    test = load_split(args.data, "test", size[-1])
    mean, std = list(args.mean or IMAGENET_MEAN), list(args.std or IMAGENET_STD)
    n = len(test) if args.limit is None else min(args.limit, len(test))
    xs, ys = zip(*((xb.numpy(), yb.numpy()) for xb, yb in batches(test, 250, mean, std, limit=n)), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    ort = np.concatenate([sess.run(None, {name: x[i:i + 250]})[0] for i in range(0, len(x), 250)])
    lib = comp_dir / "model.so"
    device = pick_device(args.device, args.rpc, lib)
    t0 = time.time()
    res = run_on_device(lib, x, device, comp, args.target, batch_size=args.batch_size, rpc=args.rpc,
                        rpc_key=args.rpc_key)
    out = res.outputs
    report: dict = {
        "run": str(run), "target": args.target, "device": res.device, "emulated": res.emulated,
        "machine": res.info.get("machine"),
        "artifact": {"path": str(lib), "sha256": sha256_file(lib), "machine": elf_machine(lib),
                     "bytes": lib.stat().st_size, "onnx": str(path)},
        "model": path.stem, "bits": "QDQ", "data": str(args.data), "test_images": int(n),
        "reference": f"onnxruntime on {path} (a file Plateau did not export: no fake-quant reference)",
        "top1": {"device": float((out.argmax(1) == y).mean()), "onnxruntime": float((ort.argmax(1) == y).mean())},
        "device_vs_onnxruntime": compare_logits(out, ort, step),
        "output_step": step.tolist() if isinstance(step, np.ndarray) else step,
        "output_step_source": step_source,
        "float_islands": comp.get("float_islands"),
        "compiled_ops": comp.get("ops"),
        "onnxruntime_kernels": ort_kernels(path),
        "per_layer": {"skipped": "a file Plateau did not export has no per-layer reference"},
        "seconds": round(time.time() - t0, 1),
        "note": ("emulated with qemu-aarch64: correctness only, timings are not representative"
                 if res.emulated else f"run on {res.info.get('machine') or 'this machine'}"),
    }
    out_dir = run / "validate" / args.target
    with staged_output(out_dir) as stage:
        render_document(report, None).write(stage, data=report)
    print(render_report(report))
    print(f"validate: {path} compiled for {args.target} against onnxruntime on the same file; steps are "
          f"{step_source}; report in {out_dir}/report.md")
    return report

