"""Tiny Relax models compiled to `model.so` + a compile-style manifest, for the runtime tests.

They follow the compile stage's artifact contract (float32 NCHW in, float32 logits out) so the runtime can be
tested before, and independently of, the real compile stage. Kept tiny: the arm64 build runs under emulation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plateau.artifacts import sha256_file, write_manifest

__all__ = ["TARGETS", "build_tiny", "tiny_module"]

TARGETS: dict[str, dict] = {
    "host": {"kind": "llvm"},
    "arm64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    "arm64-dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
}


def tiny_module(kind: str = "int8", *, channels: int = 3, size: int = 8, classes: int = 10, seed: int = 0,
                batch: int | None = None):
    """A conv2d -> relu -> flatten -> matmul classifier as an IRModule with one function `main`.

    kind "int8": quantize the input to int8, int8 x int8 -> int32 conv and matmul, dequantize at the end:
    every step is exact, so any correct build on any CPU gives bit-identical logits.
    kind "float": the same graph in float32 (results agree to rounding, not bit for bit, across CPUs).
    batch None makes the batch dimension symbolic, so any batch size runs.
    """
    import tvm
    from tvm import relax
    from tvm import tirx as tir

    rng = np.random.default_rng(seed)
    n = tir.Var("n", "int64") if batch is None else batch
    filters = 4
    w1 = rng.integers(-127, 128, (filters, channels, 3, 3)).astype(np.int8)
    w2 = rng.integers(-127, 128, (filters * size * size, classes)).astype(np.int8)
    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType((n, channels, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "int8":
                q = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(
                    relax.op.multiply(x, relax.const(64.0, "float32"))), -128, 127), "int8"))
                c = bb.emit(relax.op.nn.conv2d(q, relax.const(w1), padding=1, out_dtype="int32"))
                c = bb.emit(relax.op.nn.relu(c))
                # requantize to int8 with an exact power-of-two shift (right_shift on int32)
                c = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(c, relax.const(8, "int32")),
                                                          -128, 127), "int8"))
                f = bb.emit(relax.op.reshape(c, (n, filters * size * size)))
                y = bb.emit(relax.op.matmul(f, relax.const(w2), out_dtype="int32"))
                out = bb.emit_output(relax.op.multiply(relax.op.astype(y, "float32"),
                                                       relax.const(1.0 / 4096, "float32")))
            elif kind == "float":
                c = bb.emit(relax.op.nn.conv2d(x, relax.const(w1.astype(np.float32) / 64), padding=1))
                c = bb.emit(relax.op.nn.relu(c))
                f = bb.emit(relax.op.reshape(c, (n, filters * size * size)))
                out = bb.emit_output(relax.op.matmul(f, relax.const(w2.astype(np.float32) / 64)))
            else:
                raise ValueError(f"kind must be 'int8' or 'float', got {kind!r}")
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


def build_tiny(folder: str | Path, target: str = "host", kind: str = "int8", *, channels: int = 3,
               size: int = 8, classes: int = 10, batch: int | None = None) -> Path:
    """Compile `tiny_module` for `target` ("host" | "arm64" | "arm64-dotprod") into folder/model.so +
    manifest.json."""
    import tvm
    from tvm.support import cc

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mod = tiny_module(kind, channels=channels, size=size, classes=classes, batch=batch)
    tvm_target = TARGETS[target]
    ex = tvm.compile(mod, target=tvm.target.Target(tvm_target))
    lib = folder / "model.so"
    if target == "host":
        ex.export_library(str(lib))
    else:
        ex.export_library(str(lib), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    shape = ["N" if batch is None else batch, channels, size, size]
    write_manifest(
        folder, "compile", config={"kind": kind, "testmodel": True},
        outputs={"library": {"path": lib.name, "sha256": sha256_file(lib), "bytes": lib.stat().st_size}},
        target=target, tvm_target=tvm_target,
        batch="dynamic" if batch is None else batch,
        input={"name": "input", "shape": shape, "dtype": "float32"},
        output={"name": "logits", "shape": [shape[0], classes], "dtype": "float32"},
    )
    return lib
