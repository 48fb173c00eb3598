"""Compile targets, filed by name in a registry.

    >>> list_targets()
    ['arm64', 'arm64-dotprod', 'arm64-i8mm', 'arm64-neon', 'cuda', 'host', 'opencl', 'rpi4', 'rpi5',
     'x86-avx2', 'x86-vnni']
    >>> get_target("arm64").tvm_target      # {"kind": "llvm", "mtriple": "aarch64-linux-gnu", ...}
    >>> get_target("arm64").kernel.name     # 'sdot'

A target is a TVM target dict (TVM 0.27 refuses target strings), how to link the shared library (host targets
use the system compiler, arm64 targets cross-compile with aarch64-linux-gnu-gcc) and the dot-product kernel
its integer convs and matmuls run on (dot_instructions.py): fixed for the named targets, probed once for
`host` (cpu_features.py). Adding a target is one `register_target` entry here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from plateau.errors import PlateauError

from .cpu_features import kernel_for_target
from .dot_instructions import AVX2, SDOT, SMMLA, VNNI, DotKernel

__all__ = ["CompileTarget", "register_target", "get_target", "list_targets"]

_AARCH64 = "aarch64-linux-gnu"


@dataclass(frozen=True)
class CompileTarget:
    """A named build target: `tvm_target` is passed to tvm.target.Target; `cross_cc` links the library."""

    name: str
    tvm_target: dict
    cross_cc: str | None = None
    description: str = ""
    # Tried in order when the main target dict fails to build (e.g. a host CPU name LLVM rejects); they build
    # without a dot kernel (generic code for an unknown CPU).
    fallbacks: tuple[dict, ...] = field(default_factory=tuple)
    # Layout of the integer conv2d. LLVM turns an NHWC/OHWI int8 conv (reduction over contiguous channels)
    # into sdot on +dotprod; NCHW reduces over the 3-wide kernel row and gets smull/smlal only. Where a dot
    # kernel runs, the graph is NHWC whatever this says (compiler.graph_layout).
    conv_layout: str = "NCHW"
    # The dot-product kernel of `tvm_target` (dot_instructions.KERNELS); None: LLVM's code for TVM's loops.
    kernel: DotKernel | None = None

    @property
    def device(self) -> str:
        """"cpu" for llvm targets, else the GPU API: "cuda" or "opencl"."""
        kind = self.tvm_target.get("kind", "llvm")
        return "cpu" if kind == "llvm" else kind

    @property
    def arch(self) -> str:
        if self.device != "cpu":
            return self.device
        return "aarch64" if self.tvm_target.get("mtriple", "").startswith("aarch64") else "host"

    def export_library(self, lib: tvm.runtime.Executable, path: str | Path) -> None:
        """Link a built module into the shared library at `path`, with the cross compiler if there is one."""
        if self.cross_cc:
            lib.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(self.cross_cc))
        else:
            lib.export_library(str(path))

    def check_toolchain(self) -> None:
        """A missing cross compiler is the user's to fix: say which package provides it."""
        if self.cross_cc and shutil.which(self.cross_cc) is None:
            raise PlateauError(
                f"target {self.name!r} needs the cross compiler {self.cross_cc!r} on PATH "
                "(apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)"
            )


_REGISTRY: dict[str, Callable[[], CompileTarget]] = {}


def register_target(name: str) -> Callable[[Callable[[], CompileTarget]], Callable[[], CompileTarget]]:
    """Decorator filing a zero-argument factory under `name` (factories run lazily: the host CPU is probed
    only when the host target is asked for)."""

    def deco(fn: Callable[[], CompileTarget]) -> Callable[[], CompileTarget]:
        if name in _REGISTRY:
            raise ValueError(f"target {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_targets() -> list[str]:
    """Names of every registered target, sorted."""
    return sorted(_REGISTRY)


def get_target(name: str) -> CompileTarget:
    """The target called `name`; an unknown name is a PlateauError listing the valid ones."""
    if name not in _REGISTRY:
        raise PlateauError(f"unknown target {name!r}; valid targets: {', '.join(list_targets())}")
    return _REGISTRY[name]()


@register_target("host")
def _host() -> CompileTarget:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    # "generic" / empty means LLVM does not know this CPU; mcpu "native" is refused by 0.27 and falls back
    # anyway.
    main = {"kind": "llvm", "mcpu": cpu} if cpu and cpu != "generic" else {"kind": "llvm"}
    return CompileTarget("host", main, None, f"this machine's CPU ({cpu or 'generic'})", ({"kind": "llvm"},),
                         kernel=kernel_for_target(main))


# x86-64 machines other than this one: AVX2 only (vpmaddwd kernel), AVX-512 VNNI (vpdpbusd kernel).
register_target("x86-avx2")(lambda: CompileTarget(
    "x86-avx2", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, None,
    "x86-64 with AVX2, no AVX-512 (Haswell and later, Zen 1-3): int8 convs on vpmaddwd", kernel=AVX2))
register_target("x86-vnni")(lambda: CompileTarget(
    "x86-vnni", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}, None,
    "x86-64 with AVX-512 VNNI (Cascade Lake, Ice Lake and later, Zen 4): int8 convs on vpdpbusd",
    kernel=VNNI))


def _arm(name: str, mattr: list[str], mcpu: str | None, description: str,
         kernel: DotKernel | None) -> CompileTarget:
    t: dict = {"kind": "llvm", "mtriple": _AARCH64, "mattr": mattr}
    if mcpu:
        t["mcpu"] = mcpu
    return CompileTarget(name, t, f"{_AARCH64}-gcc", description, conv_layout="NHWC", kernel=kernel)


# int8 x int8 dot products need +dotprod (sdot kernel), the 2x2x8 matrix product +i8mm (smmla kernel).
register_target("arm64")(lambda: _arm("arm64", ["+neon", "+dotprod"], None, "generic ARMv8.2-A with dotprod",
                                      SDOT))
register_target("arm64-neon")(lambda: _arm("arm64-neon", ["+neon"], None, "ARMv8-A NEON, no dot products",
                                           None))
register_target("arm64-dotprod")(lambda: _arm("arm64-dotprod", ["+neon", "+dotprod"], None,
                                              "ARMv8.2-A + dotprod", SDOT))
register_target("arm64-i8mm")(lambda: _arm("arm64-i8mm", ["+neon", "+dotprod", "+i8mm"], None,
                                           "ARMv8.6-A: dotprod + i8mm (usdot, smmla)", SMMLA))
# GPU targets: kernels scheduled by dlight (see gpu.py); the library embeds the device code. They build here;
# running them needs the GPU API at run time (a CUDA GPU; an OpenCL device and a TVM runtime built with
# OpenCL). CUDA 13's nvcc accepts sm_75 and newer; sm_61+ has dp4a.
register_target("cuda")(lambda: CompileTarget(
    "cuda",
    {"kind": "cuda", "arch": "sm_75", "max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
             "thread_warp_size": 32},
    description="NVIDIA GPU, sm_75+ (int8 dp4a from sm_61)"))
register_target("opencl")(lambda: CompileTarget(
    "opencl", {"kind": "opencl", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768,
               "thread_warp_size": 1},
    description="OpenCL GPU (ARM Mali, Qualcomm Adreno, ...): OpenCL C kernels"))
register_target("rpi4")(lambda: _arm("rpi4", ["+neon"], "cortex-a72",
                                     "Raspberry Pi 4 (Cortex-A72, no dotprod)", None))
register_target("rpi5")(lambda: _arm("rpi5", ["+neon", "+dotprod"], "cortex-a76",
                                     "Raspberry Pi 5 (Cortex-A76, dotprod)", SDOT))
