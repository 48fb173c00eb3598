"""`plateau device serve`: a TVM RPC server for run_artifact(device="rpc"), natively or as an emulated arm64
board.

    plateau device serve                          # this machine, 127.0.0.1:9090
    plateau device serve --emulate --port 9091    # an arm64 "board": TVM's RPC server under qemu-aarch64

TVM's RPC server runs whatever code a client uploads: it binds to loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from plateau.errors import PlateauError

from . import _worker

__all__ = ["DeviceServer", "serve", "add_device_arguments", "device_main"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class DeviceServer:
    """A running RPC server subprocess (its own process group). Use as a context manager or call stop()."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int, key: str, emulated: bool,
                 log: Path | None) -> None:
        self.proc, self.host, self.port, self.key = proc, host, port, key
        self.emulated, self.log = emulated, log

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> None:
        """Stop the server and the worker processes it started (they share its process group)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            # The leader is gone but a worker it forked may linger in the group.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> DeviceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_bindable(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TVM's server does
        try:
            s.bind((host, port))
        except OSError as e:
            msg = f"cannot bind the RPC server to {host}:{port} ({e.strerror}): pick another --port"
            raise PlateauError(msg) from None


def serve(
    host: str = "127.0.0.1",
    port: int = 9090,
    key: str | None = None,
    *,
    emulate: bool = False,
    block: bool = True,
    silent: bool = False,
    startup_timeout: float = 180.0,
) -> DeviceServer:
    """Start TVM's RPC server bound to host:port (port 0: any free port); emulate=True runs it under
    qemu-aarch64.

    block=True (the CLI) serves until interrupted, then stops it; block=False returns the running
    DeviceServer.
    """
    if not 0 <= int(port) < 65536:
        raise PlateauError(f"port must be 0..65535, got {port}")
    if port == 0:
        port = _free_port(host)
    else:
        _check_bindable(host, port)  # fail in milliseconds, not after the server's slow start-up
    worker = str(Path(_worker.__file__).resolve())
    if emulate:
        from .sysroot import arm64_python

        python = arm64_python()  # PlateauError "run `make arm64-sysroot`" when not set up
        # The wrapper becomes sys.executable inside, so the server's own subprocesses run under qemu too.
        cmd = [*python, worker, "serve", "--executable", python[0], "--emulated"]
    else:
        cmd = [sys.executable, worker, "serve"]
    cmd += ["--host", host, "--port", str(port), "--key", key or ""]
    if silent:
        cmd.append("--silent")
    if host not in _LOOPBACK:
        print(f"warning: the RPC server on {host}:{port} runs any code a client sends; expose it only on a "
              "trusted network", file=sys.stderr)
    log = Path(tempfile.mkstemp(prefix="plateau-rpc-", suffix=".log")[1]) if silent else None
    err = open(log, "w") if log else None  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    except OSError as e:
        raise PlateauError(f"cannot start the RPC server ({e.strerror})") from None
    finally:
        if err:
            err.close()
    server = DeviceServer(proc, host, port, key or "", emulate, log)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keep reading stdout so the child never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    # The server has its own session, so a Ctrl-C or SIGTERM reaches only us: in the CLI, turn SIGTERM/SIGHUP
    # into KeyboardInterrupt too, and stop the server on any way out, start-up included.
    old = {}
    if block:
        old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _wait_listening(server, lines, startup_timeout, log)
        if not block:
            return server
        kind = "emulated arm64 (qemu-aarch64)" if emulate else "this machine"
        print(f"serving TVM RPC on {server.address} ({kind}); Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
        server.stop()
        return server
    except BaseException:
        server.stop()
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_listening(server: DeviceServer, lines: queue.Queue, startup_timeout: float,
                    log: Path | None) -> None:
    """Wait for the worker's PLATEAU-RPC-LISTENING line; PlateauError if it dies or takes too long."""
    where = server.address
    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            waited = f"{startup_timeout:.0f} s"
            raise PlateauError(f"RPC server on {where} did not start within {waited}") from None
        if line is None:
            why = _last_line(log) if log else "see the log above"
            raise PlateauError(f"RPC server on {where} failed to start: {why}")
        parts = line.split()
        if parts[:1] == ["PLATEAU-RPC-LISTENING"]:
            server.port = int(parts[2])
            return


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text().splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Fill the `plateau device` parser: `plateau device serve --host --port --key [--emulate]`,
    `plateau device list`."""
    sub = parser.add_subparsers(dest="device_cmd", required=True)
    s = sub.add_parser("serve", help="start a TVM RPC server for run_artifact(device='rpc')")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback: RPC runs any code)")
    s.add_argument("--port", type=int, default=9090, help="port to bind (0: any free port)")
    s.add_argument("--key", default=None, help="session key clients must give (rpc_key)")
    s.add_argument("--emulate", action="store_true", help="serve as an arm64 board under qemu-aarch64")
    s.add_argument("--quiet", action="store_true", help="no server log")
    sub.add_parser("list", help="print the device kinds run_artifact accepts")


def device_main(args: argparse.Namespace) -> int:
    """Run `plateau device ...` from the namespace add_device_arguments parsed."""
    if args.device_cmd == "list":
        from .run import list_devices

        print("\n".join(list_devices()))
        return 0
    serve(args.host, args.port, args.key, emulate=args.emulate, block=True, silent=args.quiet)
    return 0
