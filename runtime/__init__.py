"""Plateau runtime stage: run compiled artifacts locally, on an emulated arm64 CPU (qemu), or on a board
(TVM RPC)."""

from __future__ import annotations

from .run import RunResult, elf_machine, list_devices, rpc_connect, run_artifact
from .serve import DeviceServer, add_device_arguments, device_main, serve

__all__ = [
    "RunResult",
    "run_artifact",
    "rpc_connect",
    "list_devices",
    "elf_machine",
    "ensure_arm64_sysroot",
    "sysroot_status",
    "arm64_python",
    "serve",
    "DeviceServer",
    "add_device_arguments",
    "device_main",
]

_SYSROOT_NAMES = {"ensure_arm64_sysroot", "sysroot_status", "arm64_python"}


def __getattr__(name: str):
    # sysroot is loaded on first use, so `python -m plateau.runtime.sysroot` does not find it half-imported.
    if name in _SYSROOT_NAMES:
        from . import sysroot

        return getattr(sysroot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
