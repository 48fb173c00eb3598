"""Bad inputs for the fault cases: each function returns a `prepare(ws)` (or a `check(ws)`) for a Case.

Everything is derived from the workspace's copy of the good run, so the bad inputs are realistic: a manifest
with one key damaged, a checkpoint with one tensor made NaN, the run's own QDQ file with one node swapped.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from .fault_harness import Ws, snapshot

__all__ = ["seq", "edit_json", "write", "remove", "readonly", "nan_checkpoint", "plateau_checkpoint", "image_tree",
           "qdq_variant", "malicious_pickle", "leftovers", "stale_lock", "full_disk", "drop_files_record",
           "same_as_good", "exists", "absent", "no_leftovers", "manifest_value", "all_of", "copy", "stdout_file"]

Prepare = Callable[[Ws], None]
Check = Callable[[Ws], "str | None"]


def seq(*steps: Prepare) -> Prepare:
    def run(ws: Ws) -> None:
        for s in steps:
            s(ws)
    return run


def edit_json(rel: str, fn: Callable[[Any], Any]) -> Prepare:
    """Replace the JSON at ws/rel by fn(its value)."""
    def run(ws: Ws) -> None:
        p = ws.p(rel)
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return run


def write(rel: str, data: bytes | str) -> Prepare:
    def run(ws: Ws) -> None:
        p = ws.p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return run


def copy(src: str, dst: str) -> Prepare:
    def run(ws: Ws) -> None:
        shutil.copy2(ws.p(src), ws.p(dst))
    return run


def remove(rel: str) -> Prepare:
    def run(ws: Ws) -> None:
        p = ws.p(rel)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return run


def readonly(rel: str = "run") -> Prepare:
    """The folder and everything in it read-only (the steps then run unprivileged: root ignores modes)."""
    def run(ws: Ws) -> None:
        subprocess.run(["chmod", "-R", "a-w", str(ws.p(rel))], check=True)
    return run


def nan_checkpoint(out: str, value: float = float("nan"), tensor: str = "down1.0.0.weight") -> Prepare:
    """The run's last.pt with one weight tensor set to `value` (NaN, inf) everywhere."""
    def run(ws: Ws) -> None:
        import torch

        blob = torch.load(ws.run / "train" / "last.pt", map_location="cpu", weights_only=True)
        blob["model"][tensor].fill_(value)
        torch.save(blob, ws.p(out))
    return run


def plateau_checkpoint(out: str, classes: list[str]) -> Prepare:
    """A Plateau checkpoint of small_cnn for `classes` (random weights)."""
    def run(ws: Ws) -> None:
        import torch

        from plateau.models import create_model, model_cfg

        m = create_model("small_cnn", num_classes=len(classes))
        torch.save({"format": "plateau.train.checkpoint", "version": 1, "model": m.state_dict(),
                    "model_name": "small_cnn", "num_classes": len(classes), "classes": classes,
                    "plateau_cfg": model_cfg(m)}, ws.p(out))
    return run


def image_tree(rel: str, train: list[str], test: list[str] | None = None, n: int = 3, size: int = 32) -> Prepare:
    """An ImageFolder tree of small random PNGs: train/<class>/*.png, test/<class>/*.png."""
    def run(ws: Ws) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for split, classes in (("train", train), ("test", test if test is not None else train)):
            for c in classes:
                d = ws.p(rel) / split / c
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return run


def qdq_variant(kind: str, out: str) -> Prepare:
    """The run's QDQ file with a change the compiler must not accept silently: "sin" (a Sin after the global
    pool), "lppool" (GlobalLpPool instead of GlobalAveragePool), "dynamic" (symbolic image height and width)."""
    def run(ws: Ws) -> None:
        import onnx
        from onnx import helper

        m = onnx.load(str(ws.run / "export" / "model_qdq.onnx"))
        nodes = list(m.graph.node)
        pool = next(n for n in nodes if n.op_type == "GlobalAveragePool")
        if kind == "sin":
            out_name = pool.output[0]
            pool.output[0] = out_name + ".pre"
            m.graph.node.insert(nodes.index(pool) + 1,
                                helper.make_node("Sin", [out_name + ".pre"], [out_name], name="the_sin"))
        elif kind == "lppool":
            pool.op_type, pool.name = "GlobalLpPool", "the_lppool"
            pool.attribute.append(helper.make_attribute("p", 2))
        elif kind == "dynamic":
            dims = m.graph.input[0].type.tensor_type.shape.dim
            dims[2].dim_param, dims[3].dim_param = "H", "W"
        else:
            raise ValueError(kind)
        onnx.save(m, str(ws.p(out)))
    return run


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(out: str, torch_format: bool = True) -> Prepare:
    """A checkpoint whose unpickling would run `touch <ws>/pwned` (never loaded: weights_only refuses it)."""
    def run(ws: Ws) -> None:
        blob = {"model": _Evil(str(ws.p("pwned")))}
        if torch_format:
            import torch

            torch.save(blob, ws.p(out))
        else:
            ws.p(out).write_bytes(pickle.dumps(blob, protocol=4))
    return run


def leftovers(stage_rel: str) -> Prepare:
    """What a kill -9 left around a stage folder: the staging folder of a dead PID, and temporaries of atomic
    writes and of export_library inside the folder."""
    def run(ws: Ws) -> None:
        folder = ws.p(stage_rel)
        staging = folder.parent / f".{folder.name}.staging-999999"
        staging.mkdir()
        (staging / "model_qdq.onnx").write_bytes(b"half")
        (folder / ".manifest.json.abc123.tmp").write_text("{")
        (folder / ".model.so.xyz789.so").write_bytes(b"\x7fELF half")
    return run


def stale_lock(stage_rel: str, pid: int = 999999) -> Prepare:
    def run(ws: Ws) -> None:
        folder = ws.p(stage_rel)
        (folder.parent / f".{folder.name}.lock").write_text(f"{pid}\n")
    return run


def full_disk(free_kb: int) -> Prepare:
    """Move the run onto a tmpfs with `free_kb` KiB left ({ws}/full/run): a real 'No space left on device'."""
    def run(ws: Ws) -> None:
        full = ws.p("full")
        full.mkdir()
        used = sum(p.stat().st_size for p in ws.run.rglob("*") if p.is_file()) // 1024
        size = used + free_kb + 256  # tmpfs rounds to pages and counts inodes
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(full)], check=True)
        ws.cleanups.append(lambda: subprocess.run(["umount", "-l", str(full)], capture_output=True))
        shutil.copytree(ws.run, full / "run", symlinks=True)
        avail = int(subprocess.run(["df", "-k", "--output=avail", str(full)], capture_output=True, text=True,
                                   check=True).stdout.split()[-1])
        if avail > free_kb:
            subprocess.run(["dd", "if=/dev/zero", f"of={full / 'filler'}", "bs=1k", f"count={avail - free_kb}"],
                           capture_output=True)
    return run


def drop_files_record(manifest_rel: str) -> Prepare:
    """A manifest as older Plateau versions wrote it: no `files` hashes (readers must still cope)."""
    return edit_json(manifest_rel, lambda m: {k: v for k, v in m.items() if k != "files"})


# --- checks ---------------------------------------------------------------------------------------------------
def same_as_good(rel: str) -> Check:
    """ws/run/rel byte-identical to the good run's."""
    def check(ws: Ws) -> str | None:
        a, b = snapshot(ws.good / rel), snapshot(ws.run / rel)
        if not a:
            return f"the good run has no {rel}"
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"{rel} differs from the good run: {', '.join(diff[:4])}" if diff else None
    return check


def exists(rel: str) -> Check:
    return lambda ws: None if ws.p(rel).exists() else f"{rel} is missing"


def absent(rel: str) -> Check:
    return lambda ws: f"{rel} exists" if ws.p(rel).exists() else None


def no_leftovers(rel: str = "run") -> Check:
    """No staging or old-swap folder, lock, or temporary left anywhere under ws/rel."""
    def check(ws: Ws) -> str | None:
        bad = [p for p in ws.p(rel).rglob("*") if p.name.startswith(".") and (
            ".staging-" in p.name or ".old-" in p.name or p.name.endswith((".tmp", ".lock"))
            or (p.name.startswith(".model.so.") and p.name.endswith(".so")))]
        return f"leftovers: {', '.join(str(p.relative_to(ws.root)) for p in bad[:4])}" if bad else None
    return check


def manifest_value(rel: str, key: str, want: Any) -> Check:
    def check(ws: Ws) -> str | None:
        m = json.loads(ws.p(rel).read_text())
        for k in key.split("."):
            m = m.get(k) if isinstance(m, dict) else None
        return None if m == want else f"{rel}: {key} is {m!r}, expected {want!r}"
    return check


def stdout_file(rel: str, text: str) -> Check:
    def check(ws: Ws) -> str | None:
        return None if text in ws.p(rel).read_text() else f"{rel} does not contain {text!r}"
    return check


def all_of(*checks: Check) -> Check:
    def check(ws: Ws) -> str | None:
        return next((msg for c in checks if (msg := c(ws))), None)
    return check
