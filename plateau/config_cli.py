"""Command-line options derived from a config dataclass: each field says its own help, choices and flags.

    lr: float = setting(0.1, "peak learning rate", cli_default=None)
    act_signed: bool = setting(True, "uint8 activations (default int8)", flags=("--act-unsigned",))

    >>> config_options(parser, TrainConfig)          # --lr, --method/--noise, --no-augment, ...
    >>> cfg = config_from_args(QuantConfig, args, weight_bits=4)

A field without `setting` metadata is no option. `--field-name` with the field's type; a bool is a switch that
flips its default (`--field-name` when it defaults to False, `--no-field-name` when True, or the given flags);
the destination is always the field's name. `choices` may be a callable (a registry's names, read when the
parser is built, so entries registered later are offered too).

A field's `minimum` / `maximum` (with `above`: strictly greater than the minimum) are checked by `check_ranges`
from the dataclass's __post_init__, so a bad value is refused with its option named whether it came from the CLI
or the API. A float must also be finite.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any

__all__ = ["setting", "field_choices", "config_options", "config_from_args", "check_ranges", "option_name",
           "int_at_least", "float_at_least"]


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    flags: tuple[str, ...] = (),
    cli_default: Any = MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
) -> Any:
    """A config field with what the CLI needs to offer it.

    `flags` replace the derived `--field-name` (the first is the name, the rest aliases); `cli_default` is the
    option's default where the CLI resolves the value itself (a learning rate that depends on fine-tuning).
    `minimum` / `maximum`: the valid range (`above`: the value must exceed the minimum); None (an unset
    optional setting) is always valid."""
    meta = {"help": help, "choices": choices, "flags": flags, "minimum": minimum, "maximum": maximum,
            "above": above}
    if cli_default is not MISSING:
        meta["cli_default"] = cli_default
    return field(default=default, metadata=meta)


def field_choices(f: Field) -> tuple[str, ...] | None:
    """The valid values of a config field, or None when it takes any value of its type."""
    c = f.metadata.get("choices")
    return tuple(c() if callable(c) else c) if c is not None else None


def option_name(f: Field) -> str:
    """How the CLI spells the field: its first flag, or --field-name."""
    flags = f.metadata.get("flags") or ()
    return flags[0] if flags else f"--{f.name.replace('_', '-')}"


def check_ranges(obj: Any) -> None:
    """Refuse a field value outside its `minimum` / `maximum` (or a NaN / infinite float), naming the option:
    a PlateauError, which is a ValueError too."""
    from plateau.errors import PlateauError

    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lo, hi, above = f.metadata.get("minimum"), f.metadata.get("maximum"), f.metadata.get("above")
        if isinstance(value, float) and not math.isfinite(value):
            raise PlateauError(f"{option_name(f)} must be a finite number, got {value}")
        if lo is not None and (value <= lo if above else value < lo):
            want = f"> {lo}" if above else f">= {lo}"
            raise PlateauError(f"{option_name(f)} must be {want}{_range_hint(lo, hi, above)}, got {value}")
        if hi is not None and value > hi:
            raise PlateauError(f"{option_name(f)} must be <= {hi}{_range_hint(lo, hi, above)}, got {value}")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= lo (argparse then names the option in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def float_at_least(lo: float, hi: float | None = None) -> Callable[[str], float]:
    """An argparse `type`: a finite number in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be a finite number {want}, got {text}")
        return value

    return parse


def _range_hint(lo: float | None, hi: float | None, above: bool) -> str:
    if lo is None or hi is None:
        return ""
    return f" (valid: {'(' if above else '['}{lo}, {hi}])"


def _options(cls: type) -> list[Field]:
    return [f for f in fields(cls) if "help" in f.metadata]


def _value_type(hint: Any) -> type:
    """int for `int` and `int | None`: the type an option's text converts to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _help(f: Field) -> str:
    default = f.metadata.get("cli_default", f.default)
    notes = [f"one of {', '.join(c)}"] if (c := field_choices(f)) else []
    if default is not None and "default" not in f.metadata.get("help", ""):
        notes.append(f"default {default}")
    return f.metadata.get("help", "") + (f" ({'; '.join(notes)})" if notes else "")


def config_options(group: argparse._ActionsContainer, cls: type, skip: Sequence[str] = ()) -> None:
    """One option per `setting` field of the dataclass `cls` (except `skip`)."""
    hints = typing.get_type_hints(cls)
    for f in _options(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        kind = _value_type(hints[f.name])
        if kind is bool:
            on = f.default is False
            flags = meta.get("flags") or (f"--{'' if on else 'no-'}{f.name.replace('_', '-')}",)
            group.add_argument(*flags, dest=f.name, action="store_true" if on else "store_false",
                               help=meta.get("help"))
            continue
        flags = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
        choices = field_choices(f)
        group.add_argument(*flags, dest=f.name, type=kind, default=meta.get("cli_default", f.default),
                           choices=choices, metavar=f.name.upper() if choices else None, help=_help(f))


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from the parsed option-fields present in `args`, then `overrides`."""
    values = {f.name: getattr(args, f.name) for f in _options(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
