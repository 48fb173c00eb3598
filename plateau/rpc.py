"""TVM RPC sessions with a board running `plateau device serve` (compile's tuner and the runtime share them)."""

from __future__ import annotations

import json
import socket

from .errors import PlateauError

__all__ = ["parse_addr", "rpc_connect"]


def _oneline(e: BaseException) -> str:
    """The message of a TVM error (its last non-empty line: TVM errors carry a traceback), at most 300 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PlateauError(f"rpc address {addr!r} must be host:port, e.g. 127.0.0.1:9090")
    return host.strip("[]"), int(port)


def rpc_connect(addr: str, key: str = ""):
    """(TVM RPC session, what a `plateau device serve` server says about itself) for HOST:PORT; one-line errors."""
    from tvm import rpc as tvm_rpc

    host, port = parse_addr(addr)
    # A plain TCP probe first: TVM's connect retries for a long time on a dead address before failing.
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        raise PlateauError(f"cannot reach RPC server {host}:{port} ({e.strerror or e}): is `plateau device serve` "
                           "running there?") from None
    try:
        remote = tvm_rpc.connect(host, port, key=key)
    except Exception as e:  # noqa: BLE001
        why = _oneline(e)
        hint = "; check rpc_key (the server's --key)" if "key" in why else "; is it a TVM RPC server?"
        raise PlateauError(f"RPC session with {host}:{port} failed ({why}){hint}") from None
    return remote, _remote_info(remote)


def _remote_info(remote) -> dict:
    """What a `plateau device serve` server says about itself; {} for a plain TVM RPC server."""
    try:
        f = remote.get_function("plateau.device.info")
    except Exception:  # noqa: BLE001 - not ours: nothing known
        return {}
    try:
        return json.loads(str(f()))
    except Exception:  # noqa: BLE001
        return {}
