"""Run a compiled model batch by batch; also the RPC-server entry. Imports only numpy and tvm.

This file is both a module (the host imports it for device "local") and a script that the arm64 Python runs
under qemu-aarch64, where the plateau package is not importable. So: no plateau imports, no third-party
imports beyond numpy + tvm, and errors go out as one `ERROR <message>` line on stderr with exit status 3.

    python _worker.py run  --lib model.so --inputs in.npy --outputs out.npy --batch 100 [--fixed-batch]
                           [--timing timing.json --time-batches 1,100 --repeat 5]
    python _worker.py serve --host 127.0.0.1 --port 9090 [--key K] [--executable WRAPPER] [--emulated]

`run` prints `PROGRESS <done> <total>` lines on stdout so the host can show a progress bar.
`serve` prints `PLATEAU-RPC-LISTENING <host> <port>` once the server is bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

__all__ = ["load_vm", "run_batches", "time_batches", "summarize_ms", "register_device_info", "run_error"]


def load_vm(lib_path: str, dev=None):
    """Load model.so and create a Relax VM on `dev` (default: local CPU). Returns (vm, dev)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cpu(0) if dev is None else dev
    lib = tvm.runtime.load_module(lib_path)
    return VirtualMachine(lib, dev), dev


def _first_output(out) -> np.ndarray:
    # A model returning a tuple: the logits are its first field.
    if hasattr(out, "numpy"):
        return out.numpy()
    return _first_output(out[0])


def run_batches(vm, dev, x: np.ndarray, batch: int, fixed_batch: bool = False,
                progress: Callable[[int, int], None] | None = None,
                upload: Callable | None = None) -> np.ndarray:
    """Run vm["main"] on x in chunks of `batch` rows and concatenate the outputs.

    fixed_batch: the model only takes exactly `batch` rows, so the last chunk is zero-padded and trimmed.
    upload: how to turn a numpy chunk into a device tensor (default tvm.runtime.tensor(chunk, dev)).
    """
    import tvm

    upload = upload or (lambda a: tvm.runtime.tensor(a, dev))
    main = vm["main"]
    n = x.shape[0]
    outs = []
    for start in range(0, n, batch):
        chunk = x[start:start + batch]
        rows = chunk.shape[0]
        if fixed_batch and rows < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - rows, *chunk.shape[1:]), chunk.dtype)])
        y = _first_output(main(upload(np.ascontiguousarray(chunk))))
        outs.append(np.asarray(y[:rows], dtype=np.float32))
        if progress is not None:
            progress(start + rows, n)
    return np.concatenate(outs)


def summarize_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": round(float(np.median(ms)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "min_ms": round(float(ms.min()), 4),
        "repeat": int(ms.size),
    }


def time_batches(vm, dev, x: np.ndarray, sizes: list[int], repeat: int,
                 upload: Callable | None = None) -> dict:
    """Per-call latency of vm["main"] at each batch size, with TVM's time_evaluator (C++ timer, one warm-up
    call).

    number=1 so every repeat is one call and the spread (p90) is real, not averaged away.
    """
    import tvm

    upload = upload or (lambda a: tvm.runtime.tensor(a, dev))
    result = {}
    for b in sizes:
        reps = -(-b // x.shape[0])  # tile the inputs when the batch is larger than what was given
        chunk = np.ascontiguousarray(np.concatenate([x] * reps)[:b] if reps > 1 else x[:b])
        try:
            timer = vm.time_evaluator("main", dev, number=1, repeat=repeat)
            res = timer(upload(chunk))
        except Exception as e:  # noqa: BLE001 - e.g. a static-batch model without a manifest to say so
            # The outputs are already computed: report this size as failed rather than losing the run.
            result[f"batch_{b}"] = {"batch": b, "error": _oneline(e)}
            continue
        result[f"batch_{b}"] = {"batch": b, **summarize_ms(list(res.results))}
    return result


def register_device_info(emulated: bool) -> None:
    """Expose `plateau.device.info` on an RPC server so clients can tell an emulated board from a real one."""
    import tvm_ffi

    info = json.dumps({"machine": platform.machine(), "emulated": bool(emulated),
                       "python": platform.python_version()})

    @tvm_ffi.register_global_func("plateau.device.info", override=True)
    def _info() -> str:
        return info


def _cmd_run(args: argparse.Namespace) -> None:
    x = np.load(args.inputs)
    try:
        vm, dev = load_vm(args.lib)
    except Exception as e:  # noqa: BLE001 - any load failure means a bad artifact
        raise _Fail(f"{args.lib}: cannot be loaded as a TVM module ({_oneline(e)})") from None
    total = x.shape[0]
    print(f"PROGRESS 0 {total}", flush=True)

    def progress(done: int, n: int) -> None:
        print(f"PROGRESS {done} {n}", flush=True)

    t0 = time.perf_counter()
    try:
        y = run_batches(vm, dev, x, args.batch, args.fixed_batch, progress)
    except Exception as e:  # noqa: BLE001
        raise _Fail(run_error(args.lib, e)) from None
    elapsed = time.perf_counter() - t0
    np.save(args.outputs, y)
    if args.timing:
        sizes = [int(s) for s in args.time_batches.split(",") if s]
        timing = time_batches(vm, dev, x, sizes, args.repeat)
        timing["run_seconds"] = round(elapsed, 3)
        with open(args.timing, "w") as f:
            json.dump(timing, f)
    print(f"DONE {total} {elapsed:.3f}", flush=True)


def _cmd_serve(args: argparse.Namespace) -> None:
    from tvm import rpc

    if args.executable:
        # The server starts its worker processes with sys.executable: under qemu that is the bare arm64
        # binary, which the host kernel cannot exec (no binfmt_misc). Point it at the qemu wrapper.
        sys.executable = args.executable
    emulated = args.emulated

    def init() -> None:
        register_device_info(emulated)

    server = rpc.Server(args.host, args.port, args.port + 1, key=args.key or "", silent=args.silent,
                        server_init_callback=init)
    print(f"PLATEAU-RPC-LISTENING {args.host} {server.port}", flush=True)
    # The server runs in its own (popen worker) process; wait for it, or for our termination by a signal.
    server.proc.join()


class _Fail(Exception):
    pass


def run_error(lib: str, e: BaseException) -> str:
    """One-line message for a failed run; a shape mismatch usually means a static batch the caller did not
    know."""
    msg = _oneline(e)
    hint = ""
    if "mismatch" in msg or "shape" in msg:
        hint = ("; the model may take a fixed batch or input shape: keep its compile manifest.json beside "
                "model.so")
    return f"running {lib} failed ({msg}){hint}"


def _oneline(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # TVM errors carry a traceback; the last line holds the message.
    msg = lines[-1] if lines else type(e).__name__
    return msg[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="_worker.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--lib", required=True)
    r.add_argument("--inputs", required=True)
    r.add_argument("--outputs", required=True)
    r.add_argument("--batch", type=int, default=100)
    r.add_argument("--fixed-batch", action="store_true")
    r.add_argument("--timing", default="")
    r.add_argument("--time-batches", default="1")
    r.add_argument("--repeat", type=int, default=5)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--key", default="")
    s.add_argument("--executable", default="")
    s.add_argument("--emulated", action="store_true")
    s.add_argument("--silent", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            _cmd_run(args)
        else:
            _cmd_serve(args)
    except _Fail as e:
        print(f"ERROR {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
