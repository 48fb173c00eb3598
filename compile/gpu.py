"""GPU targets (CUDA, OpenCL): the build pipeline with dlight schedules, and the generated device source.

    >>> ex = build(mod, get_target("cuda"))           # via compiler.build, which picks gpu_pipeline
    >>> src = device_source(ex)                       # the CUDA C / OpenCL C kernels as text

Every GPU kernel needs a thread binding: `gpu_pipeline` is TVM's generic GPU pipeline (legalize, fuse, dlight
schedules: Matmul, GEMV, Reduction, GeneralReduction, then Fallback for everything else) without FoldConstant,
which would undo the 4-bit weight packing (see pack_int4). dlight's Matmul rule takes the integer conv2d as an
implicit GEMM (int8 x int8 -> int32 in shared memory); its int8 tensor-core path needs every GEMM extent > 64.

Whether a library can be built and run here:
- CUDA: TVM 0.27's wheel has CUDA codegen; the kernels are compiled by `nvcc` where it is installed (CUDA 13:
  sm_75 is the oldest arch it accepts; dp4a exists from sm_61), else by NVRTC; running needs a CUDA driver and
  GPU. int8 conv2d / matmul reductions are tensorized with `__dp4a` by gpu_dp4a.Dp4aMatmul (tried before
  dlight's rules). nvcc is preferred because TVM's CUDA preamble declares the mixed-sign `__dp4a(unsigned,
  int, int)` that uint8 activations use but defines it only for nvcc: under NVRTC such a build fails (seen on
  an H200 machine).
- OpenCL: the wheel is built with USE_OPENCL=OFF: it generates OpenCL C and packs it into the library, but has
  no OpenCL runtime to load it, so it cannot run here even with PoCL; a TVM runtime built with USE_OPENCL=ON
  can.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator

import tvm
from tvm import relax
from tvm.relax.backend.gpu_generic import pipeline as gpu
from tvm.s_tir import dlight as dl

from ._common import backend_pipeline
from .gpu_dp4a import Dp4aMatmul

__all__ = ["gpu_pipeline", "device_compiler", "device_source", "runtime_available", "dp4a_count",
           "SOURCE_SUFFIX"]

SOURCE_SUFFIX = {"cuda": ".cu", "opencl": ".cl"}


def gpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's generic GPU pipeline minus FoldConstant, with dlight's default rules (and dp4a first on CUDA)."""
    legalize = [p for p in gpu.legalize_passes(target)
                if not any(n in str(p.info.name) for n in ("FoldConstant", "ApplyDefaultSchedule"))]
    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    # CUDA: int8 GEMM-like reductions first try the dp4a rule (gpu_dp4a.py); what it declines goes to
    # dlight's.
    legalize.append(dl.ApplyDefaultSchedule(*([Dp4aMatmul()] if target.kind.name == "cuda" else []), *rules))
    return backend_pipeline(gpu, target, legalize)


@contextlib.contextmanager
def device_compiler(kind: str) -> Iterator[None]:
    """Within: TVM compiles CUDA kernels with nvcc when it is on PATH (see the module docstring), else
    NVRTC."""
    if kind != "cuda" or shutil.which("nvcc") is None or "TVM_CUDA_COMPILE_MODE" in os.environ:
        yield  # a user's own TVM_CUDA_COMPILE_MODE is left alone
        return
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        os.environ.pop("TVM_CUDA_COMPILE_MODE", None)


def device_source(ex: relax.VMExecutable) -> str:
    """The device kernels of a GPU build as source text (CUDA C or OpenCL C)."""
    for host in ex.mod.imports:
        for dev in host.imports:
            if dev.kind in SOURCE_SUFFIX:
                return dev.inspect_source("cuda" if dev.kind == "cuda" else "cl")
    raise ValueError("no CUDA / OpenCL device module in this executable")


def runtime_available(kind: str) -> bool:
    """Whether this TVM can run `kind` ("cuda" / "opencl") kernels on a device present now."""
    if tvm.get_global_func(f"device_api.{kind}", allow_missing=True) is None:
        return False
    dev = tvm.cuda(0) if kind == "cuda" else tvm.opencl(0)
    return bool(dev.exist)


def dp4a_count(source: str) -> dict[str, int]:
    """__dp4a calls per kernel in CUDA source (int8 4-way dot products, sm_61+); kernels without any are left
    out. The declarations of the intrinsic in the source's header are not counted."""
    counts: dict[str, int] = {}
    kernel = None
    for line in source.splitlines():
        m = re.search(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(.*\{\s*$", line)
        if m:
            kernel = m.group(1)
        elif kernel and "__SM_61_INTRINSICS_DECL__" not in line:
            n = len(re.findall(r"__dp4a\s*\(", line))
            if n:
                counts[kernel] = counts.get(kernel, 0) + n
    return counts
