"""Count an instruction per kernel in a library's assembly (`inspect_source("asm")`), for checks like "sdot in
every conv kernel".

TVM emits a parallel loop body as a local function (`.L__tvm_parallel_lambda.N`) that its kernel launches
through the thread pool; its instructions are counted for the kernel that references it.
"""

from __future__ import annotations

import re

__all__ = ["instructions_per_function", "fused_multiply_adds"]

_FUNC = re.compile(r"^\s*\.type\s+([^,\s]+),\s*@function")
_LABEL = re.compile(r"^([^\s:]+):")
# x86 vfmadd / vfmsub / vfnmadd / vfnmsub (any form and width), AArch64 fmla / fmls / fmadd / fmsub / fnm*
_FMA = re.compile(r"vfn?m(add|sub)\w*|\bfn?m(la|ls|add|sub)\b")


def instructions_per_function(asm: str, mnemonic: str) -> dict[str, int]:
    """{global function: how many `mnemonic` instructions it and the parallel bodies it launches hold}."""
    functions: set[str] = {m.group(1) for line in asm.splitlines() if (m := _FUNC.match(line))}
    insn = re.compile(rf"^\s+{re.escape(mnemonic)}\b")
    own: dict[str, int] = {}
    refs: dict[str, set[str]] = {}
    current = None
    for line in asm.splitlines():
        m = _LABEL.match(line)
        if m and m.group(1) in functions:
            current = m.group(1)
            continue
        if current is None:
            continue
        if insn.match(line):
            own[current] = own.get(current, 0) + 1
        for lam in re.findall(r"\.L__tvm_parallel_lambda[\w.]*", line):
            if lam != current and lam in functions:
                refs.setdefault(current, set()).add(lam)
    out = {}
    for f in functions:
        if f.startswith(".L"):
            continue
        n = own.get(f, 0) + sum(own.get(lam, 0) for lam in refs.get(f, ()))
        if n:
            out[f] = n
    return out


def fused_multiply_adds(asm: str) -> list[str]:
    """Every fused multiply-add instruction in x86-64 or AArch64 assembly (one rounding where a multiply and an add
    have two: what the reference numerics never do)."""
    return [m.group(0) for m in _FMA.finditer(asm)]
