"""Plateau runtime stage: run compiled artifacts locally, on an emulated arm64 CPU (qemu), or on a board (TVM RPC)."""

from __future__ import annotations

from .run import RunResult, elf_machine, list_devices, run_artifact
from .serve import DeviceServer, add_device_arguments, device_main, serve
from .sysroot import arm64_python, ensure_arm64_sysroot, sysroot_status

__all__ = [
    "RunResult",
    "run_artifact",
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
