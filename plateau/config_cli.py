"""Command-line options derived from a config dataclass: each field says its own flag, help and choices.

A field becomes an option when its metadata has "help" (see `option`):

    act_calibration: str = option("minmax", "activation clipping", choices=lambda: ACT_CALIBRATORS.names())
    act_signed: bool = option(True, "uint8 activations (default int8)", flag="--act-unsigned")   # sets False

    >>> add_config_arguments(parser, QuantConfig)              # --act-calibration, --act-unsigned, ...
    >>> cfg = config_from_args(QuantConfig, args, weight_bits=4)

Booleans are switches that flip the default. `choices` may be a callable (a registry's names, read when the
parser is built, so entries registered later are offered too).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["option", "add_config_arguments", "config_from_args", "config_fields"]


def option(default: Any, help: str, *, flag: str | None = None, aliases: Iterable[str] = (),
           choices: Iterable[str] | Callable[[], Iterable[str]] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line option (`flag` defaults to --field-name)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, type) else str(f.type)
    for name, real in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t is real or (isinstance(t, str) and t.split("|")[0].strip() == name):
            return real
    return str


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                         skip: Iterable[str] = (), defaults: dict | None = None) -> None:
    """Add one option per option-field of `cls` (except `skip`); `defaults` overrides a field's default."""
    skip, defaults = set(skip), defaults or {}
    for f in config_fields(cls):
        if f.name in skip:
            continue
        m = f.metadata
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        names = [_flag(f), *m["aliases"]]
        kind = _type(f)
        if kind is bool:
            # A switch flips the default: --keep-first-last-8bit sets True, --act-unsigned sets act_signed False.
            parser.add_argument(*names, dest=f.name, action="store_false" if default else "store_true",
                                default=default, help=m["help"])
            continue
        choices = m["choices"]() if callable(m["choices"]) else m["choices"]
        parser.add_argument(*names, dest=f.name, type=kind, default=default, choices=choices,
                            metavar=m["metavar"], help=m["help"] + (f" (default {default})" if default is not None
                                                                     and kind is not str else ""))


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from the parsed option-fields present in `args`, then `overrides`."""
    values = {f.name: getattr(args, f.name) for f in config_fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
