"""Run a compiled artifact (model.so) on this machine, on an emulated arm64 CPU, or on a board over TVM RPC.

    >>> res = run_artifact("runs/r1/compile/host/model.so", x)                    # in-process TVM
    >>> res = run_artifact("runs/r1/compile/arm64/model.so", x, device="qemu")     # arm64 Python under qemu
    >>> res = run_artifact("runs/r1/compile/arm64", x, device="rpc", rpc="10.0.0.7:9090", timing=True)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plateau.data import progress
from plateau.errors import PlateauError
from plateau.rpc import parse_addr, rpc_connect

from . import _worker

__all__ = ["RunResult", "run_artifact", "rpc_connect", "list_devices", "elf_machine", "artifact_device_api",
           "host_machine", "DEVICES"]

DEVICES = ["local", "qemu", "rpc"]
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv"}
_EMULATED_NOTE = "emulated (qemu-aarch64): these timings prove nothing about speed on real hardware"


@dataclass
class RunResult:
    outputs: np.ndarray  # float32, one row per input row
    device: str  # "local" | "qemu" | "rpc"
    emulated: bool
    latency: dict | None = None  # {"batch_1": {median_ms, p90_ms, min_ms, repeat}, "batch_<B>": ..., ...}
    info: dict = field(default_factory=dict)  # machine, artifact, batch, wall seconds


def list_devices() -> list[str]:
    """The device kinds run_artifact accepts."""
    return list(DEVICES)


def elf_machine(lib: str | Path) -> str:
    """The CPU a shared object was built for ("x86_64", "aarch64", ...), from its ELF header (e_machine)."""
    try:
        with open(lib, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise PlateauError(f"{lib}: cannot be read ({e.strerror})") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise PlateauError(f"{lib}: not an ELF shared object (corrupt or not a compiled model)")
    order = "little" if head[5] == 1 else "big"
    code = int.from_bytes(head[18:20], order)
    return _ELF_MACHINES.get(code, f"e_machine {code}")


def host_machine() -> str:
    """This machine's CPU as elf_machine names it ("x86_64", "aarch64", ...)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _resolve_artifact(lib_path: str | Path) -> tuple[Path, dict | None, str]:
    """model.so path (a compile folder is accepted too), the compile manifest's input spec if there is one,
    and where its kernels run: "cpu", or the GPU API ("cuda", "opencl") of a GPU target's build."""
    p = Path(lib_path)
    if p.is_dir():
        p = p / "model.so"
    if not p.is_file():
        raise PlateauError(f"{p}: no such compiled model (run `plateau compile` first)")
    spec, api = None, "cpu"
    if (p.parent / "manifest.json").is_file():
        from plateau.artifacts import read_manifest

        m = read_manifest(p.parent, "compile")
        spec = m.get("input")
        api = _GPU_APIS.get(str((m.get("tvm_target") or {}).get("kind")), "cpu")
        _check_recorded(p, m)
    _check_elf_extent(p)
    return p, spec, api


def artifact_device_api(lib_path: str | Path) -> str:
    """Where a compiled model's kernels run: "cpu", "cuda" or "opencl" (from its compile manifest)."""
    return _resolve_artifact(lib_path)[2]


# TVM target kind -> the device API its kernels need (the host code of such a library is still a CPU ELF).
_GPU_APIS = {"cuda": "cuda", "opencl": "opencl"}


def _tvm_device(api: str, remote=None):
    """The TVM device a library's kernels run on, locally or on an RPC session."""
    import tvm

    if remote is not None:
        return {"cpu": remote.cpu, "cuda": remote.cuda, "opencl": remote.cl}[api](0)
    return {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}[api](0)


def _check_gpu_here(lib: Path, api: str) -> str:
    """The local GPU's name, or a one-line error when TVM cannot run `api` kernels here."""
    from plateau.compile.gpu import runtime_available

    if not runtime_available(api):
        need = ("a CUDA driver and an NVIDIA GPU" if api == "cuda" else
                "an OpenCL device and a TVM runtime built with USE_OPENCL=ON")
        raise PlateauError(f"{lib} runs its kernels on a {api} GPU, and TVM finds none here (it needs "
                           f"{need}): run it on a machine with one, locally or with device 'rpc'")
    return str(_tvm_device(api).device_name)


def _check_recorded(lib: Path, manifest: dict) -> None:
    """Size and sha256 of model.so against what the compile manifest recorded (when it recorded them)."""
    from plateau.artifacts import sha256_file

    for entry in (manifest.get("outputs") or {}).values():
        if not isinstance(entry, dict) or entry.get("path") != lib.name:
            continue
        size = lib.stat().st_size
        if "bytes" in entry and entry["bytes"] != size:
            raise PlateauError(f"{lib}: {size} bytes, its manifest says {entry['bytes']} (corrupt or "
                               "replaced: recompile)")
        if "sha256" in entry and entry["sha256"] != sha256_file(lib):
            raise PlateauError(f"{lib}: sha256 differs from its manifest (corrupt or replaced: recompile)")


def _check_elf_extent(lib: Path) -> None:
    """Refuse a truncated ELF: dlopen of one maps pages past the end of the file and the process dies of
    SIGBUS."""
    import struct

    data_len = lib.stat().st_size
    with open(lib, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # only 64-bit ELF is checked further
            return
        end = "<" if head[5] == 1 else ">"
        phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 0x36)
        need = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
        if need <= data_len:
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum if len(table) == phentsize * phnum else 0):
                p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(end + "QQQQ", table,
                                                                        i * phentsize + 8)
                need = max(need, p_offset + p_filesz)
    if need > data_len:
        raise PlateauError(f"{lib}: truncated ({data_len} bytes, its ELF headers need {need}): recompile")


def _check_inputs(inputs: np.ndarray, spec: dict | None, batch_size: int) -> tuple[np.ndarray, int, bool]:
    """Validated float32 inputs, the batch to run with, and whether that batch size is fixed by the model."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PlateauError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        x = np.asarray(inputs)
    except Exception:  # noqa: BLE001 - ragged lists and the like
        raise PlateauError("inputs must be a numeric array (N, C, H, W)") from None
    if x.dtype.kind not in "fiub":
        raise PlateauError(f"inputs must be numeric, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise PlateauError(f"inputs must hold at least one row, got shape {tuple(x.shape)}")
    fixed = False
    if spec and isinstance(spec.get("shape"), list):
        shape = spec["shape"]
        want = ", ".join(str(d) for d in shape)
        if x.ndim != len(shape) or any(isinstance(d, int) and d > 0 and d != s
                                       for d, s in zip(shape[1:], x.shape[1:], strict=True)):
            raise PlateauError(f"inputs have shape {tuple(x.shape)}, the model takes ({want})")
        if isinstance(shape[0], int) and shape[0] > 0:
            fixed, batch_size = True, shape[0]  # static batch: run exactly that many rows per call
        dtype = spec.get("dtype", "float32")
    else:
        dtype = "float32"
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise PlateauError("inputs contain NaN or infinity")
    return np.ascontiguousarray(x, dtype=dtype), batch_size, fixed


def run_artifact(
    lib_path: str | Path,
    inputs: np.ndarray,
    device: str = "local",
    *,
    batch_size: int = 100,
    rpc: str | None = None,
    rpc_key: str | None = None,
    timing: bool = False,
) -> RunResult:
    """Run a compiled model on `inputs` (float32 NCHW, any number of rows) in batches; return all outputs.

    device "local": in-process TVM (artifact built for this CPU). "qemu": arm64 Python under qemu-aarch64
    (needs `make arm64-sysroot`). "rpc": a TVM RPC server at `rpc` = "host:port" (e.g.
    `plateau device serve`).
    timing=True adds per-call latency (median/p90/min ms) at batch 1 and at batch_size.
    """
    if device not in DEVICES:
        raise PlateauError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if rpc is not None and device != "rpc":
        raise PlateauError(f"rpc={rpc!r} is only used with device='rpc' (got device={device!r})")
    lib, spec, api = _resolve_artifact(lib_path)
    machine = elf_machine(lib)
    x, batch, fixed = _check_inputs(inputs, spec, batch_size)
    sizes = [batch] if fixed else sorted({1, batch})
    if device == "local":
        host = host_machine()
        if machine != host:
            raise PlateauError(
                f"{lib} is built for {machine}, this machine is {host}: run it with device 'qemu' (emulated) "
                "or 'rpc' (a board)"
            )
        return _run_local(lib, x, batch, fixed, sizes, timing, api)
    if device == "qemu":
        if machine != "aarch64":
            raise PlateauError(f"{lib} is built for {machine}, not aarch64: run it with device 'local'")
        if api != "cpu":
            raise PlateauError(f"{lib} runs its kernels on a {api} GPU, which qemu does not emulate: run it "
                               "with device 'local' or 'rpc' on a machine with that GPU")
        return _run_qemu(lib, x, batch, fixed, sizes, timing)
    if not rpc:
        raise PlateauError("device 'rpc' needs rpc='host:port' (a TVM RPC server, e.g. "
                           "`plateau device serve`)")
    return _run_rpc(lib, x, batch, fixed, sizes, timing, rpc, rpc_key or "", machine, api)


# --- local --------------------------------------------------------------------------------------------------
def _run_local(lib: Path, x: np.ndarray, batch: int, fixed: bool, sizes: list[int], timing: bool,
               api: str = "cpu") -> RunResult:
    machine = host_machine()
    if api != "cpu":
        machine = f"{machine} + {_check_gpu_here(lib, api)}"
    try:
        vm, dev = _worker.load_vm(str(lib), _tvm_device(api))
    except Exception as e:  # noqa: BLE001 - any load failure means a bad artifact
        raise PlateauError(f"{lib}: cannot be loaded as a TVM module ({_worker._oneline(e)})") from None
    with progress(len(x), f"run local {api}") as bar:
        try:
            y = _worker.run_batches(vm, dev, x, batch, fixed, lambda done, n: bar.update(done - bar.n))
        except Exception as e:  # noqa: BLE001
            raise PlateauError(_worker.run_error(str(lib), e)) from None
    latency = _worker.time_batches(vm, dev, x, sizes, repeat=20) if timing else None
    return RunResult(y, "local", False, _label(latency, False), {"machine": machine, "artifact": str(lib),
                                                                  "batch": batch, "device_api": api})


def _label(latency: dict | None, emulated: bool) -> dict | None:
    if latency is None:
        return None
    latency = {k: v for k, v in latency.items() if k.startswith("batch_")}
    latency["emulated"] = emulated
    latency["representative"] = not emulated
    if emulated:
        latency["note"] = _EMULATED_NOTE
    return latency


# --- qemu ---------------------------------------------------------------------------------------------------
def _run_qemu(lib: Path, x: np.ndarray, batch: int, fixed: bool, sizes: list[int], timing: bool) -> RunResult:
    from .sysroot import arm64_python

    python = arm64_python()  # PlateauError "run `make arm64-sysroot`" when not set up
    with tempfile.TemporaryDirectory(prefix="plateau-qemu-") as tmp:
        t = Path(tmp)
        np.save(t / "in.npy", x)
        cmd = [*python, str(Path(_worker.__file__).resolve()), "run", "--lib", str(lib.resolve()),
               "--inputs", str(t / "in.npy"), "--outputs", str(t / "out.npy"), "--batch", str(batch)]
        if fixed:
            cmd.append("--fixed-batch")
        if timing:
            # Few repeats: under emulation each call is slow and the numbers only show it runs.
            cmd += ["--timing", str(t / "timing.json"), "--time-batches", ",".join(map(str, sizes)),
                    "--repeat", "3"]
        with open(t / "stderr.txt", "w+") as err, progress(len(x), "run qemu-aarch64") as bar:
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            except OSError as e:
                raise PlateauError(f"cannot start the arm64 Python ({e.strerror}): "
                                   "run `make arm64-sysroot`") from None
            seconds = None
            assert proc.stdout is not None
            for line in proc.stdout:
                parts = line.split()
                if parts[:1] == ["PROGRESS"] and len(parts) == 3:
                    bar.update(int(parts[1]) - bar.n)
                elif parts[:1] == ["DONE"] and len(parts) == 3:
                    seconds = float(parts[2])
            rc = proc.wait()
            if rc != 0:
                err.seek(0)
                lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
                msg = next((ln[6:] for ln in lines if ln.startswith("ERROR ")), None)
                last_line = lines[-1] if lines else ""
                raise PlateauError(msg or f"arm64 worker under qemu failed (exit {rc}): {last_line}"[:400])
        y = np.load(t / "out.npy")
        latency = json.loads((t / "timing.json").read_text()) if timing else None
    return RunResult(y, "qemu", True, _label(latency, True),
                     {"machine": "aarch64 (qemu)", "artifact": str(lib), "batch": batch,
                      "run_seconds": seconds})


# --- rpc ----------------------------------------------------------------------------------------------------
def _run_rpc(lib: Path, x: np.ndarray, batch: int, fixed: bool, sizes: list[int], timing: bool, addr: str,
             key: str, machine: str, api: str = "cpu") -> RunResult:
    import tvm

    host, port = parse_addr(addr)
    remote, info = rpc_connect(addr, key)
    if info.get("machine") and info["machine"] != machine:
        raise PlateauError(f"{lib} is built for {machine}, the RPC server {host}:{port} is {info['machine']}")
    emulated = bool(info.get("emulated", False))
    # Unique per upload: sessions may share a folder.
    name = f"plateau-{os.getpid()}-{lib.stat().st_mtime_ns}.so"
    try:
        remote.upload(str(lib), target=name)
        rlib = remote.load_module(name)
        dev = _tvm_device(api, remote)
        vm = tvm.runtime.vm.VirtualMachine(rlib, dev)
    except Exception as e:  # noqa: BLE001
        why = _worker._oneline(e)
        raise PlateauError(f"{lib}: the RPC server {host}:{port} cannot load it ({why})") from None

    def upload(a: np.ndarray):
        return tvm.runtime.tensor(a, dev)

    with progress(len(x), f"run rpc {host}:{port}") as bar:
        try:
            y = _worker.run_batches(vm, dev, x, batch, fixed, lambda done, n: bar.update(done - bar.n),
                                    upload)
            repeat = 3 if emulated else 20
            latency = _worker.time_batches(vm, dev, x, sizes, repeat, upload) if timing else None
        except Exception as e:  # noqa: BLE001
            raise PlateauError(f"running {lib} on {host}:{port} failed ({_worker._oneline(e)})") from None
    with contextlib.suppress(Exception):
        remote.remove(name)
    return RunResult(y, "rpc", emulated, _label(latency, emulated),
                     {"machine": info.get("machine", "unknown"), "artifact": str(lib), "batch": batch,
                      "rpc": f"{host}:{port}", "device_api": api})
