"""The table of Relax rewrites that lower a QDQ graph to integer arithmetic: one entry per rewrite file.

    @register_rewrite("conv2d", phase="compute", order=10)
    class ConvRewrite: ...          # a `pattern` and a `__call__(expr, matches)` returning the new expression

Phase "pre" rewrites run first, all of them repeatedly until nothing changes (moving dequantizes below
pass-through ops, cancelling quantize(dequantize()) pairs); phase "compute" rewrites then run once each, in
`order`. Adding a lowered op is one rewrite file with this decorator, imported by lower.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from plateau.registry import Registry

__all__ = ["RewriteEntry", "REWRITES", "register_rewrite", "rewrites"]

PHASES = ("pre", "compute")


@dataclass(frozen=True)
class RewriteEntry:
    cls: type  # constructed with the requantize mode: cls(requant) -> an object with .pattern and __call__
    phase: str
    order: int


REWRITES: Registry[RewriteEntry] = Registry("rewrite")


def register_rewrite(name: str, phase: str = "compute", order: int = 50) -> Callable[[type], type]:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")

    def deco(cls: type) -> type:
        REWRITES.add(name, RewriteEntry(cls, phase, order))
        return cls

    return deco


def rewrites(phase: str) -> list[type]:
    """The rewrite classes of `phase`, in their order."""
    entries = sorted(((e.order, name, e) for name, e in REWRITES.items() if e.phase == phase))
    return [e.cls for _, _, e in entries]
