"""What a float island becomes when its integers are at hand: a QuantConfig's choice between the float32 op, the
exact forms (exact_islands.py, the default) and the integer-only forms (integer_only.py). Applied to a captured
graph before calibration, and again when a reference file is read."""

from __future__ import annotations

from plateau.errors import PlateauError

from .exact_islands import EXACT_KINDS
from .integer_only import INTEGER_KINDS

__all__ = ["integerize", "integer_forms", "ISLAND_FORMS", "SOFTMAX_FORMS"]

# every op an island can become, and a Softmax island's ops (its float op included), read off the two tables
ISLAND_FORMS = tuple(dict.fromkeys([*INTEGER_KINDS.values(), *EXACT_KINDS.values()]))
SOFTMAX_FORMS = ("float", INTEGER_KINDS["softmax"], EXACT_KINDS["softmax"])


def integerize(graph, integer_only: bool = True, exact_islands: bool = True) -> None:
    """Turn float islands of `graph` into ops on integers, in place: every one into its integer-only form
    (INTEGER_KINDS) with `integer_only`, else with `exact_islands` elementwise ones (GELU, ...) into the lookup
    table of the island itself and Softmax / LayerNorm into their exact forms (plateau/ops/exact_islands.py)."""
    for n in graph.nodes:
        if n.op != "float":
            continue
        kind = INTEGER_KINDS.get(n.attrs["kind"])
        if integer_only and kind is None:
            raise PlateauError(f"node {n.name!r}: no integer-only form for a {n.attrs['kind']} island")
        if integer_only:
            n.op = kind
        elif exact_islands and (kind == "lut" or n.attrs["kind"] in EXACT_KINDS):
            n.op = EXACT_KINDS.get(n.attrs["kind"], kind)


def integer_forms(graph, cfg) -> None:
    """integerize as a QuantConfig asks (its integer_only and exact_islands)."""
    if cfg.integer_only or cfg.exact_islands:
        integerize(graph, cfg.integer_only, cfg.exact_islands)
