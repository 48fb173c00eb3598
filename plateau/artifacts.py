"""Run folders, manifests and atomic writes: how stages talk to each other.

A run folder `runs/<name>/` holds one sub-folder per stage, each with a `manifest.json`:

    runs/<name>/train/      checkpoint-epochNNN.pt, last.pt, metrics.jsonl, manifest.json, report.md
    runs/<name>/export/     model_qdq.onnx, model_fp32.onnx, reference.pt, report.json/.md, manifest.json
    runs/<name>/compile/<target>/  model.so, manifest.json
    runs/<name>/validate/<target>/ report.json/.md/.html

Everything is written to a temporary file in the same folder and renamed into place, so a run killed half-way
never leaves a half-written artifact over a good one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PlateauError

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
]

FORMAT_VERSION = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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


def write_manifest(folder: str | Path, stage: str, config: dict, outputs: dict, inputs: dict | None = None,
                   **extra: Any) -> dict:
    """Write `folder/manifest.json`: the stage, format version, config that made it, input and output files."""
    manifest = {
        "format": f"plateau.{stage}",
        "version": FORMAT_VERSION,
        "created": now(),
        "config": config,
        "inputs": inputs or {},
        "outputs": outputs,
        **extra,
    }
    write_json(Path(folder) / "manifest.json", manifest)
    return manifest


def read_manifest(folder: str | Path, stage: str) -> dict:
    """Read and check a stage manifest; a missing, corrupt or foreign one is a PlateauError naming the file."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise PlateauError(f"{path}: no {stage} manifest (run `plateau {stage}` first, or pass the file directly)")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlateauError(f"{path}: corrupt manifest ({e})") from None
    if m.get("format") != f"plateau.{stage}":
        raise PlateauError(f"{path}: expected a plateau.{stage} manifest, found {m.get('format')!r}")
    if m.get("version") != FORMAT_VERSION:
        raise PlateauError(f"{path}: manifest version {m.get('version')} is not supported (expected {FORMAT_VERSION})")
    return m
