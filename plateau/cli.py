"""The `plateau` command: one subcommand per stage, each reading and writing a run folder.

    plateau train    --run runs/default --model small_cnn --data synthetic
    plateau export   --run runs/default --bits W8A8
    plateau compile  --run runs/default --target arm64
    plateau validate --run runs/default --target arm64
    plateau bench    --run runs/default --target host
    plateau device serve --host 127.0.0.1 --port 9090

A user's mistake (a missing file, a bad option, a checkpoint that does not fit) prints one line naming it and exits
with status 2; no traceback. So does a file system that refuses a write (read-only, full): the line names the path.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "OneLineParser", "one_line"]

# subcommand -> (module with add_arguments/main, help). Modules are imported only when needed: torch and TVM are
# slow to import, and `plateau compile --help` should not pay for torch.
_STAGES = {
    "train": ("plateau.train", "full-precision training with quantization-noise injection"),
    "export": ("plateau.export.stage", "post-training quantization to a QDQ ONNX graph, checked on onnxruntime"),
    "compile": ("plateau.compile.stage", "lower the QDQ graph to integer TVM kernels for a target"),
    "validate": ("plateau.runtime.validate_onnx",
                 "run the compiled artifact on a device and check it against the reference"),
    "bench": ("plateau.runtime.bench_onnx", "latency of the artifact beside onnxruntime, on one device"),
    "device": ("plateau.runtime.serve", "serve a board over TVM RPC (`plateau device serve`)"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (`plateau train: error: argument --epochs: ...`), like every other
    user error, instead of the usage text followed by the error."""

    def error(self, message: str):  # argparse's hook for every bad option
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def one_line(message: str) -> str:
    """A message as one line: libraries' multi-line errors (TVM, onnx) joined with ' | '."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return " | ".join(lines)


def _load(name: str):
    module = importlib.import_module(_STAGES[name][0])
    if name == "device":
        return module.add_device_arguments, module.device_main
    return module.add_arguments, module.main


def _parser(only: str | None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="plateau", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, help_text) in _STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != "device":
            p.add_argument("--run", default=os.environ.get("PLATEAU_RUN", "runs/default"),
                           help="run folder (default: runs/default)")
        if name == only:
            add, _ = _load(name)
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in _STAGES else None
    from plateau.errors import PlateauError
    from plateau.staging import check_run_folder

    try:
        parser = _parser(only)
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is not None:
            check_run_folder(args.run)
        _, run = _load(args.command)
        run(args)
    except PlateauError as e:
        print(f"plateau {command or ''}: error: {one_line(str(e))}".replace("  ", " "), file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused something no stage anticipated: still one line naming it
        where = f"{e.filename}: " if e.filename else ""
        print(f"plateau {command or ''}: error: {where}{e.strerror or e}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"plateau {command}: interrupted; finished artifacts are kept, none is half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
