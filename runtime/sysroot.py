"""An arm64 Python with the aarch64 TVM runtime, run under qemu-aarch64: `python -m plateau.runtime.sysroot`.

Layout under `cache_dir()/arm64/` (or the `root` given):

    debs/       downloaded python3.11:arm64 .deb files (kept: a rebuild does not download again)
    wheels/     downloaded aarch64 wheels (apache-tvm, apache-tvm-ffi, numpy, ...; kept likewise)
    rootfs/     the .debs unpacked with dpkg-deb -x: `qemu-aarch64 -L rootfs rootfs/usr/bin/python3.11`
    site/       `pip install --target` of the wheels (PYTHONPATH for the arm64 Python)
    bin/python3-arm64   wrapper script: execs qemu-aarch64 with the right prefix, PYTHONPATH and env
    COMPLETE    stamp, written last; without it (or with another recipe in it) the set-up is redone

Nothing is installed on the host beyond `dpkg --add-architecture arm64` + `apt-get update` (and qemu-user when
it is missing); the arm64 packages are only downloaded and unpacked.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from plateau.errors import PlateauError

__all__ = [
    "ensure_arm64_sysroot",
    "arm64_python",
    "sysroot_status",
    "ARM64_DEBS",
    "ARM64_WHEELS",
    "main",
]

# python3.11:arm64 and the shared libraries it and its extension modules load (measured, see shared notes).
ARM64_DEBS = [
    "libc6", "libgcc-s1", "libstdc++6", "libgomp1",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11", "libpython3.11",
    "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0",
    "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libcrypt1", "libnsl2", "libtirpc3", "libdb5.3",
    "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1",
    "libselinux1", "libpcre2-8-0", "libacl1", "libmd0", "libzstd1",
]

# Pinned to what the host venv runs, so host and emulated runs use the same TVM runtime. --no-deps: the
# full dependency set is listed here (tornado is not needed: we never run the RPC proxy on the board).
ARM64_WHEELS = [
    "apache-tvm==0.27.0.post1",
    # 0.1.15.x segfaults in save_json/tensorize (shared notes); the runtime must match the compiler side.
    "apache-tvm-ffi==0.1.14.post1",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
    "psutil==7.2.2",  # the RPC server uses psutil + cloudpickle (tvm[rpc])
    "cloudpickle==3.1.2",
]

PY_VERSION = "3.11"
_RECIPE = hashlib.sha256(json.dumps([ARM64_DEBS, ARM64_WHEELS, PY_VERSION, 1]).encode()).hexdigest()[:16]


def _default_root() -> Path:
    from plateau.data import cache_dir  # imported late: plateau.data pulls in torch (~2 s)

    return cache_dir() / "arm64"


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[arm64-sysroot] {msg}", file=sys.stderr, flush=True)


def _run(step: str, cmd: list[str], *, cwd: Path | None = None, quiet: bool = False,
         env: dict[str, str] | None = None) -> str:
    """Run one set-up command; a failure becomes a one-line PlateauError naming the step."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise PlateauError(f"arm64 sysroot: step '{step}' failed: {cmd[0]} not found") from None
    if p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr + "\n" + p.stdout).splitlines() if ln.strip()]
        # apt prints notices and warnings after the real error: prefer an "E:" / "ERROR" line.
        err = ([ln for ln in lines if ln.startswith(("E:", "ERROR", "error"))] or lines
               or [f"exit {p.returncode}"])
        raise PlateauError(f"arm64 sysroot: step '{step}' failed: {err[0][:300]}")
    return p.stdout


def sysroot_status(root: Path | None = None) -> dict | None:
    """The stamp of a complete set-up under `root`, or None when it is missing, half-done or stale."""
    root = Path(root) if root is not None else _default_root()
    stamp = root / "COMPLETE"
    try:
        info = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("recipe") != _RECIPE:
        return None
    python = root / "rootfs" / "usr" / "bin" / f"python{PY_VERSION}"
    if not python.is_file() or not (root / "site" / "tvm").is_dir():
        return None
    return info


def arm64_python(root: Path | None = None) -> list[str]:
    """The command (wrapper script) that starts the arm64 Python under qemu; PlateauError when not set up."""
    root = Path(root) if root is not None else _default_root()
    if shutil.which("qemu-aarch64") is None:
        raise PlateauError("qemu-aarch64 not found: run `make arm64-sysroot` (needs qemu-user)")
    if sysroot_status(root) is None:
        raise PlateauError(f"arm64 sysroot not set up in {root}: run `make arm64-sysroot`")
    return [str(root / "bin" / "python3-arm64")]


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    # Two test processes (or make + pytest) must not build the same folder at once.
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Host tools: qemu-aarch64 runs the arm64 Python; the cross gcc links arm64 model.so files (compile stage,
# tests).
_HOST_TOOLS = {"qemu-aarch64": "qemu-user", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}


def _ensure_host_tools(quiet: bool) -> None:
    missing = [pkg for tool, pkg in _HOST_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        if shutil.which("qemu-aarch64") is None:
            raise PlateauError("arm64 sysroot: qemu-aarch64 not found (`apt-get install qemu-user` as root)")
        _log(quiet, f"warning: {', '.join(missing)} not installed (needed to cross-compile arm64 models)")
        return
    _log(quiet, f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get update", ["apt-get", "update", "-q"], env=env)
    _run(f"apt-get install {' '.join(missing)}", ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                                  *missing], env=env)


def _ensure_arm64_apt(quiet: bool) -> None:
    """Make `apt-get download pkg:arm64` possible: add the foreign architecture and refresh the index if
    needed."""
    archs = _run("dpkg --print-foreign-architectures", ["dpkg", "--print-foreign-architectures"]).split()
    has_index = False
    if "arm64" in archs:
        pol = _run("apt-cache policy", ["apt-cache", "policy", f"python{PY_VERSION}:arm64"])
        cand = [ln.split(":", 1)[1].strip() for ln in pol.splitlines() if ln.strip().startswith("Candidate:")]
        has_index = bool(cand) and cand[0] != "(none)"
    if has_index:
        return
    if os.geteuid() != 0:
        raise PlateauError(
            "arm64 sysroot: apt has no arm64 index; run as root or first "
            "`sudo dpkg --add-architecture arm64 && sudo apt-get update`"
        )
    if "arm64" not in archs:
        _log(quiet, "dpkg --add-architecture arm64")
        _run("dpkg --add-architecture arm64", ["dpkg", "--add-architecture", "arm64"])
    _log(quiet, "apt-get update (arm64 index)")
    _run("apt-get update", ["apt-get", "update", "-q"],
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _download_debs(debs: Path, quiet: bool) -> list[Path]:
    debs.mkdir(parents=True, exist_ok=True)

    def have(pkg: str) -> bool:
        return any(debs.glob(f"{pkg}_*_arm64.deb"))

    missing = [p for p in ARM64_DEBS if not have(p)]
    if missing:
        _log(quiet, f"apt-get download {len(missing)} arm64 packages")
        # Downloads land in cwd; a partial file is named *.deb only once complete (apt renames from
        # partial/).
        _run("apt-get download (arm64 python)",
             ["apt-get", "download", "-q", *[f"{p}:arm64" for p in missing]], cwd=debs)
    files = []
    for p in ARM64_DEBS:
        found = sorted(debs.glob(f"{p}_*_arm64.deb"))
        if not found:
            raise PlateauError(f"arm64 sysroot: step 'apt-get download' failed: {p}:arm64 was not downloaded")
        files.append(found[-1])
    return files


def _download_wheels(wheels: Path, quiet: bool) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    stamp = wheels / "DOWNLOADED"
    if stamp.is_file() and stamp.read_text().split() == ARM64_WHEELS:
        return
    _log(quiet, "pip download aarch64 wheels (apache-tvm, numpy, ...)")
    _run("pip download (aarch64 wheels)", [
        sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
        "--dest", str(wheels), *_PLATFORM_ARGS, *ARM64_WHEELS,
    ])
    stamp.write_text("\n".join(ARM64_WHEELS) + "\n")


_PLATFORM_ARGS = [
    "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
    "--only-binary=:all:", "--python-version", PY_VERSION, "--implementation", "cp",
]


def _write_wrapper(root: Path, build: Path) -> None:
    # Paths baked in are the final ones (build/ is renamed to root/ at the end).
    wrapper = build / "bin" / "python3-arm64"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    rootfs, site = root / "rootfs", root / "site"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# arm64 Python under qemu-aarch64 (made by plateau.runtime.sysroot). It is also sys.executable for\n"
        "# the emulated TVM RPC server, which starts its workers with sys.executable.\n"
        f'export PYTHONPATH="{site}"\n'
        "export PYTHONNOUSERSITE=1\n"
        "export TVM_USE_RUNTIME_LIB=1  # load libtvm_runtime.so only: no LLVM to start under emulation\n"
        f'exec qemu-aarch64 -L "{rootfs}" "{rootfs}/usr/bin/python{PY_VERSION}" "$@"\n'
    )
    wrapper.chmod(0o755)


def ensure_arm64_sysroot(root: Path | None = None, *, quiet: bool = False) -> Path:
    """Build (once) the arm64 Python + aarch64 TVM runtime under `root` (default cache_dir()/arm64); return
    root.

    Idempotent: a complete set-up (stamp file present, same recipe) returns at once. Anything else is rebuilt
    in a fresh folder and swapped in, reusing downloaded .debs and wheels. Raises PlateauError naming the
    failing step.
    """
    root = Path(root) if root is not None else _default_root()
    root = root.resolve()
    if sysroot_status(root) is not None and shutil.which("qemu-aarch64"):
        return root
    with _lock(root):
        if sysroot_status(root) is not None and shutil.which("qemu-aarch64"):
            return root
        t0 = time.monotonic()
        _ensure_host_tools(quiet)
        _ensure_arm64_apt(quiet)
        deb_files = _download_debs(root / "debs", quiet)
        _download_wheels(root / "wheels", quiet)

        (root / "COMPLETE").unlink(missing_ok=True)
        build = root / "build.tmp"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        _log(quiet, f"unpacking {len(deb_files)} packages")
        for f in deb_files:
            _run(f"dpkg-deb -x {f.name}", ["dpkg-deb", "-x", str(f), str(build / "rootfs")])
        _log(quiet, "pip install --target site (aarch64 wheels)")
        _run("pip install --target (aarch64 wheels)", [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
            "--no-index", "--find-links", str(root / "wheels"), "--target", str(build / "site"),
            *_PLATFORM_ARGS, *ARM64_WHEELS,
        ])
        # Precompile the stdlib with the host Python 3.11 (same bytecode magic): the .debs ship no .pyc, and
        # compiling under emulation on every cold start costs seconds.
        _run("compileall (arm64 stdlib)", [
            sys.executable, "-m", "compileall", "-q", "-j", "0",
            str(build / "rootfs" / "usr" / "lib" / f"python{PY_VERSION}"),
        ])
        _write_wrapper(root, build)

        for sub in ("rootfs", "site", "bin"):
            shutil.rmtree(root / sub, ignore_errors=True)
            os.replace(build / sub, root / sub)
        shutil.rmtree(build, ignore_errors=True)

        _log(quiet, "smoke test: import tvm under qemu-aarch64")
        out = _run("smoke test (qemu-aarch64 python imports tvm)", [
            str(root / "bin" / "python3-arm64"), "-c",
            "import platform, numpy, tvm; print(platform.machine(), tvm.__version__, numpy.__version__)",
        ]).split()
        if not out or out[0] != "aarch64":
            raise PlateauError("arm64 sysroot: step 'smoke test' failed: "
                               f"unexpected output {' '.join(out)!r}")
        info = {
            "recipe": _RECIPE, "machine": out[0], "tvm": out[1], "numpy": out[2],
            "debs": [f.name for f in deb_files], "wheels": ARM64_WHEELS,
            "seconds": round(time.monotonic() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = root / "COMPLETE.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, root / "COMPLETE")
        _log(quiet, f"ready in {info['seconds']} s: {root}")
        return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plateau.runtime.sysroot",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="folder to build in (default: cache_dir()/arm64)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--force", action="store_true", help="rebuild even if complete (downloads are reused)")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else _default_root()
    if args.force:
        (root / "COMPLETE").unlink(missing_ok=True)
    try:
        path = ensure_arm64_sysroot(root, quiet=args.quiet)
    except PlateauError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
