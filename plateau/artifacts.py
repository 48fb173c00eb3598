"""Run folders, manifests and atomic writes: how stages talk to each other.

A run folder `runs/<name>/` holds one sub-folder per stage, each with a `manifest.json`:

    runs/<name>/train/      checkpoint-epochNNN.pt, last.pt, metrics.jsonl, manifest.json, report.md
    runs/<name>/export/     model_qdq.onnx, model_fp32.onnx, reference.pt, report.json/.md, manifest.json
    runs/<name>/compile/<target>/  model.so, manifest.json
    runs/<name>/validate/<target>/ report.json/.md/.html

Everything is written to a temporary file in the same folder and renamed into place, so a run killed half-way
never leaves a half-written artifact over a good one; a stage writes its whole folder through a staging folder
(plateau/staging.py), so its files land together or not at all. A manifest names the sha256 of every output
(`files`), and readers check the files they use against it (`verify_file`).

`PLATEAU_PAUSE_AFTER=<file name>` makes a process stop for a while right after it wrote that file (or after
`swap`, the first rename of a staging swap): the fault tests kill it there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PlateauError
from .staging import pause_point, refused_write, settle

__all__ = [
    "FORMAT_VERSION",
    "atomic_path",
    "write_json",
    "write_text",
    "read_manifest",
    "write_manifest",
    "sha256_file",
    "save_npy",
    "stage_dir",
    "now",
    "pause_point",
    "save_torch",
    "load_npy",
    "verify_file",
    "file_record",
    "MANIFEST_KEYS",
    "refused_write",
]

FORMAT_VERSION = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _file_mode() -> int:
    """0666 less the umask: what open() would give a new file (mkstemp's 0600 would hide artifacts from other
    users of a shared run folder). Linux says the umask in /proc; elsewhere it is read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success flush it to disk and rename it over `path`, on failure
    remove it. An OSError from the writer names `path` (np.save and friends raise one without a file name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _file_mode())
        yield tmp_path
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
    except OSError as e:
        if e.filename is None or str(e.filename) == str(tmp_path):
            e.filename = str(path)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    pause_point(path.name)


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save through a temporary file. torch reports a failed write as a bare RuntimeError ("unexpected
    pos"): when the folder refuses writes it becomes the OSError it is, naming `path`."""
    import torch

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError:
        e = refused_write(path.parent)
        if e is None:
            raise
        raise OSError(e.errno or errno.EIO, e.strerror or str(e), str(path)) from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_npy(path: str | Path, array: Any) -> None:
    """np.save through a temporary file (np.save would append '.npy' to a temporary name)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_dir(run: str | Path, stage: str, *sub: str) -> Path:
    return Path(run).joinpath(stage, *sub)


def file_record(path: str | Path) -> dict:
    """What a manifest records of a file: its sha256 and size."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _output_names(outputs: dict) -> list[str]:
    """The file names an `outputs` entry lists: plain names, or {"path": name, ...} records."""
    names = []
    for v in outputs.values():
        name = v.get("path") if isinstance(v, dict) else v
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def write_manifest(folder: str | Path, stage: str, config: dict, outputs: dict, inputs: dict | None = None,
                   **extra: Any) -> dict:
    """Write `folder/manifest.json` (last: it vouches for the rest): the stage, format version, config that made
    it, input and output files, and `files`: the sha256 and size of every output file that exists."""
    folder = Path(folder)
    files = {n: file_record(folder / n) for n in _output_names(outputs) if (folder / n).is_file()}
    manifest = {
        "format": f"plateau.{stage}",
        "version": FORMAT_VERSION,
        "created": now(),
        "config": config,
        "inputs": inputs or {},
        "outputs": outputs,
        **extra,
        "files": {**files, **extra.get("files", {})},
    }
    write_json(folder / "manifest.json", manifest)
    return manifest


# Keys each stage's readers index, with their types (dotted: nested); other keys are optional.
MANIFEST_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "train": {"config": dict, "outputs": dict},
    "export": {"config": dict, "outputs": dict, "outputs.model_qdq.onnx": str, "config.data": str,
               "plateau_cfg": dict, "plateau_cfg.mean": list, "plateau_cfg.std": list, "quantization": dict,
               "quantization.output": dict, "quantization.output.scale": (int, float)},
    "compile": {"config": dict, "outputs": dict, "inputs": dict},
}
# Keys that are optional but must have this type when present.
_OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "inputs": dict, "files": dict, "qdq_sha256": str, "tvm_target": dict, "input": dict, "output": dict,
    "classes": list, "target": str, "model_name": str, "model": str,
}


def _lookup(m: dict, dotted: str) -> tuple[bool, Any]:
    # "outputs.model_qdq.onnx": keys may hold dots themselves, so try the longest key that exists first
    if dotted in m:
        return True, m[dotted]
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in m:
            return _lookup(m[head], ".".join(parts[i:])) if isinstance(m[head], dict) else (False, None)
    return False, None


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(dict.fromkeys(names.get(x, x.__name__) for x in ts))


def _is(value: Any, t: type | tuple[type, ...]) -> bool:
    return isinstance(value, t) and not (isinstance(value, bool) and bool not in (t if isinstance(t, tuple) else (t,)))


def read_manifest(folder: str | Path, stage: str) -> dict:
    """Read and check a stage manifest; a missing, corrupt, foreign or incomplete one is a PlateauError naming
    the file and what is wrong (and what to run)."""
    path = Path(folder) / "manifest.json"
    again = f"run `plateau {stage}` again"
    if not path.is_file():
        settle(Path(folder))  # a writer killed in the middle of swapping the folder in: finish its swap
    if path.is_dir():
        raise PlateauError(f"{path}: is a directory, not a {stage} manifest")
    if not path.is_file():
        raise PlateauError(f"{path}: no {stage} manifest (run `plateau {stage}` first, or pass the file directly)")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PlateauError(f"{path}: corrupt manifest (not UTF-8 text: byte {e.start}); {again}") from None
    except json.JSONDecodeError as e:
        raise PlateauError(f"{path}: corrupt manifest ({e}); {again}") from None
    except OSError as e:
        raise PlateauError(f"{path}: cannot read the manifest ({e.strerror})") from None
    if not isinstance(m, dict):
        raise PlateauError(f"{path}: corrupt manifest (a JSON {type(m).__name__ if m is not None else 'null'}, "
                           f"expected an object); {again}")
    if m.get("format") != f"plateau.{stage}":
        raise PlateauError(f"{path}: expected a plateau.{stage} manifest, found {m.get('format')!r}")
    version = m.get("version")
    if not _is(version, int):
        raise PlateauError(f"{path}: manifest version {version!r} ({type(version).__name__}) is not supported "
                           f"(expected the integer {FORMAT_VERSION}); {again}")
    if version != FORMAT_VERSION:
        raise PlateauError(f"{path}: manifest version {version} is not supported (expected {FORMAT_VERSION})")
    for key, t in MANIFEST_KEYS.get(stage, {}).items():
        found, value = _lookup(m, key)
        if not found:
            raise PlateauError(f"{path}: incomplete {stage} manifest, no {key!r}; {again}")
        if not _is(value, t):
            raise PlateauError(f"{path}: {key!r} is {type(value).__name__}, expected {_type_name(t)}; {again}")
    for key, t in _OPTIONAL_KEYS.items():
        if m.get(key) is not None and not _is(m[key], t):
            raise PlateauError(f"{path}: {key!r} is {type(m[key]).__name__}, expected {_type_name(t)}; {again}")
    return m


def verify_file(folder: str | Path, manifest: dict, name: str, stage: str, required: bool = True,
                fix: str | None = None) -> Path | None:
    """`folder/name`, checked against the sha256 the manifest recorded for it (when it recorded one): a file
    that changed or vanished since the stage wrote it is a PlateauError naming both files and what to run
    (`fix`, default: the stage again). None when the file is absent and not `required`."""
    folder = Path(folder)
    path = folder / name
    fix = fix or f"run `plateau {stage}` again"
    rec = (manifest.get("files") or {}).get(name)
    if not path.is_file():
        if not required and rec is None:
            return None
        listed = f"{folder / 'manifest.json'} lists it" if rec is not None else f"`plateau {stage}` writes it"
        raise PlateauError(f"{path}: missing, but {listed}; {fix}")
    if isinstance(rec, dict) and isinstance(rec.get("sha256"), str):
        got = sha256_file(path)
        if got != rec["sha256"]:
            raise PlateauError(f"{path} (sha256 {got[:12]}) does not match {folder / 'manifest.json'} (sha256 "
                               f"{rec['sha256'][:12]}): it changed after `plateau {stage}` wrote it; {fix}")
    return path


def load_npy(path: str | Path, what: str, ndim: int, kind: str) -> Any:
    """A .npy array (never pickles), checked: `ndim` dimensions and dtype kind in `kind` ("f": float, "iu":
    integers); a file that is not one is a PlateauError naming it."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise PlateauError(f"{path}: missing ({what}); run `plateau export` again")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PlateauError(f"{path}: not a readable .npy array of {what} ({str(e).splitlines()[0][:120]}); "
                           "run `plateau export` again") from None
    if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in kind:
        shape = getattr(a, "shape", "?")
        raise PlateauError(f"{path}: expected {what} ({ndim}-D, dtype kind {kind!r}), found shape {shape} "
                           f"dtype {getattr(a, 'dtype', '?')}; run `plateau export` again")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise PlateauError(f"{path}: {what} hold NaN or inf; run `plateau export` again")
    return a
