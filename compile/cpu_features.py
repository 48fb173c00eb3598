"""Which dot-product kernel an LLVM CPU target can run, from its CPU name (mcpu) and features (mattr).

Used once per target, when the target is created (targets.py: `host` is probed here; the named targets state
their kernel and test_schedule checks that this module agrees). All later code reads `CompileTarget.kernel`.

    >>> kernel_for_target({"kind": "llvm", "mcpu": "znver4"}).name
    'vnni'
"""

from __future__ import annotations

import tvm

from .dot_instructions import AVX2, SDOT, SMMLA, VNNI, DotKernel

__all__ = ["kernel_for_target", "has_vnni", "has_avx2", "has_sdot", "has_i8mm"]

# CPUs LLVM knows with AVX-512 VNNI (mcpu names); "+avx512vnni" in mattr also counts.
_VNNI_CPUS = {"znver4", "znver5", "cascadelake", "cooperlake", "icelake-client", "icelake-server",
              "tigerlake", "sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d",
              "rocketlake", "alderlake-avx512"}

# x86-64 CPUs LLVM knows with AVX2 (those with AVX-512 VNNI take VNNI first); "+avx2" in mattr also counts.
_AVX2_CPUS = {"haswell", "broadwell", "skylake", "skylake-avx512", "cannonlake", "kabylake", "coffeelake",
              "cometlake", "alderlake", "raptorlake", "meteorlake", "arrowlake", "arrowlake-s", "lunarlake",
              "gracemont", "sierraforest", "grandridge", "clearwaterforest", "znver1", "znver2", "znver3",
              "x86-64-v3", "x86-64-v4", *_VNNI_CPUS}

# aarch64 CPUs LLVM knows with the dot-product extension; "+dotprod" (or "+i8mm", ARMv8.6) in mattr also
# counts.
_SDOT_CPUS = {"cortex-a55", "cortex-a65", "cortex-a75", "cortex-a76", "cortex-a77", "cortex-a78",
              "cortex-a710", "cortex-a715", "cortex-x1", "cortex-x2", "neoverse-n1", "neoverse-n2",
              "neoverse-v1", "apple-m1"}

_I8MM_CPUS = {"cortex-a710", "cortex-a715", "cortex-x2", "cortex-x3", "neoverse-n2", "neoverse-v1",
              "neoverse-v2"}


def _mcpu_mattr(target: tvm.target.Target) -> tuple[str, list[str]]:
    attrs = target.attrs
    return str(attrs.get("mcpu", "") or ""), [str(a) for a in (attrs.get("mattr") or [])]


def _x86_has(target: tvm.target.Target, cpus: set[str], feature: str) -> bool:
    """Whether `target` is x86 LLVM with `feature`: its mcpu among `cpus`, or `feature` in its mattr."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686")):
        return False
    mcpu, mattr = _mcpu_mattr(target)
    return mcpu in cpus or feature in mattr


def _aarch64(target: tvm.target.Target) -> bool:
    return target.kind.name == "llvm" and str(target.attrs.get("mtriple", "") or "").startswith("aarch64")


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether `target` is x86-64 with AVX-512 VNNI (by mcpu name or +avx512vnni in mattr)."""
    return _x86_has(target, _VNNI_CPUS, "+avx512vnni")


def has_avx2(target: tvm.target.Target) -> bool:
    """Whether `target` is x86-64 with AVX2 (by mcpu name or +avx2 in mattr)."""
    return _x86_has(target, _AVX2_CPUS, "+avx2")


def has_sdot(target: tvm.target.Target) -> bool:
    """Whether `target` is aarch64 with the dot-product extension (sdot)."""
    if not _aarch64(target):
        return False
    mcpu, mattr = _mcpu_mattr(target)
    return mcpu in _SDOT_CPUS or "+dotprod" in mattr or "+i8mm" in mattr


def has_i8mm(target: tvm.target.Target) -> bool:
    """Whether `target` is aarch64 with the int8 matrix-multiply extension (smmla)."""
    if not _aarch64(target):
        return False
    mcpu, mattr = _mcpu_mattr(target)
    return mcpu in _I8MM_CPUS or "+i8mm" in mattr


def kernel_for_target(target: dict | tvm.target.Target) -> DotKernel | None:
    """The dot-product conv kernel for the TVM target (a dict or a Target): VNNI on x86 with AVX-512 VNNI,
    else vpmaddwd with AVX2; smmla on aarch64 with i8mm, sdot on aarch64 with dotprod; None otherwise (GPUs
    too)."""
    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if has_vnni(t):
        return VNNI
    if has_avx2(t):
        return AVX2
    if has_i8mm(t):
        return SMMLA
    if has_sdot(t):
        return SDOT
    return None
