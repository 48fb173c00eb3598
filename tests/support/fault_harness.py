"""Running fault cases through the real CLI: a workspace per case, steps as subprocesses, a verdict per case.

A case copies one good run (train -> export -> compile -> validate on small_cnn, synthetic data) into its own
workspace, breaks something (`prepare`), runs its steps (`plateau ...` or `make ...`) and classifies what
happened:

    traceback        "Traceback" on stderr
    silent success   a step that must fail exited 0
    damaged          a file that existed before an error (or a kill) is not byte-identical after it
    wrong            another broken promise: exit status not 2, not exactly one stderr line, the line does not
                     name the file or option, a kill point never reached, the case's own check failed
    pass             everything as promised

Kill steps set PLATEAU_PAUSE_AFTER=<artifact>, wait for the process to say it paused there, and SIGKILL it. Steps
marked `unprivileged` run as `nobody` when the tests run as root (root ignores a read-only folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Step", "act", "Case", "Ws", "Verdict", "run_case", "make_good_run", "tiered", "snapshot",
           "can_run_unprivileged",
           "can_mount", "ROOT"]

ROOT = Path(__file__).resolve().parents[2]
# What Plateau's own machinery leaves beside a stage folder while it works; not user files.
_OURS = re.compile(r"^\.(.+\.(staging|old)-\d+|.+\.lock|.+\.tmp|model\.so\..+\.so|plateau-probe-\d+\.tmp)$")


@dataclass
class Step:
    """One command. argv follows `plateau` (or `make` with make=True); {run}, {ws}, {py} are filled in."""

    argv: list[str]
    expect: str = "error"  # "error": exit 2 with one line; "ok": exit 0; "kill": paused at `pause`, then killed
    pattern: str = ""  # must appear in the error line ("ok": in stdout)
    pause: str | None = None  # PLATEAU_PAUSE_AFTER
    hold: bool = False  # a kill step kept paused (holding its lock) until the case ends
    make: bool = False
    unprivileged: bool = False
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: a disk that takes no file larger
    env: dict[str, str] = field(default_factory=dict)
    protect: bool = True  # error and kill steps: files that existed before must be byte-identical after
    timeout: float = 600.0
    call: Callable[[Ws], None] | None = None  # not a command: change the workspace between two commands


def act(fn: Callable[[Ws], None]) -> Step:
    """A step that changes the workspace (e.g. damages a cache entry a previous command wrote)."""
    return Step([], expect="ok", call=fn)


@dataclass
class Case:
    id: str
    issue: str  # "data loss", "nonsense", "traceback", "robustness", "valid"
    title: str
    steps: list[Step]
    prepare: Callable[[Ws], None] | None = None
    check: Callable[[Ws], str | None] | None = None  # after the steps: a problem, or None
    tier: str = "bench"  # "fast": default test suite; "slow": test suite, marked slow; "bench": bench/faults.py only
    needs: str | None = None  # "unprivileged" or "mount": skipped (and said so) where impossible


@dataclass
class Verdict:
    case: str
    result: str  # pass / traceback / silent success / damaged / wrong / skipped
    detail: str
    lines: list[str]  # the error line of each step (or its last stdout line)
    returncodes: list[int | None]
    seconds: float


class Ws:
    """A case's workspace: `root/run` (copy of the good run), `root/cache` (its data cache), `root/home`."""

    def __init__(self, root: Path, good: Path) -> None:
        self.root = root
        self.run = root / "run"
        self.good = good
        root.mkdir(parents=True)
        os.chmod(root, 0o755)
        shutil.copytree(good, self.run, symlinks=True)
        for d in ("cache", "home"):
            (root / d).mkdir()
            os.chmod(root / d, 0o777)
        self.procs: list[subprocess.Popen] = []
        self.cleanups: list[Callable[[], None]] = []

    def p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def vars(self) -> dict[str, str]:
        return {"run": str(self.run), "ws": str(self.root), "py": sys.executable, "root": str(ROOT)}


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (Plateau's own temporaries and locks, and a workspace's data cache and
    home, excepted)."""
    out = {}
    if not folder.exists():
        return out
    for p in sorted(folder.rglob("*")):
        parts = p.relative_to(folder).parts
        if parts[0] in ("cache", "home"):
            continue
        if p.is_file() and not any(_OURS.match(part) for part in parts):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [k for k, v in before.items() if after.get(k) != v]


def can_run_unprivileged() -> bool:
    """Whether a read-only folder can be tested: as a normal user, or as root through setpriv to nobody."""
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def can_mount() -> bool:
    """Whether a small tmpfs can be mounted here (root with CAP_SYS_ADMIN): a real full disk."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/plateau-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _command(step: Step, ws: Ws) -> list[str]:
    argv = [a.format(**ws.vars) for a in step.argv]
    if step.make:
        cmd = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(ws.root),
               f"PYTHON={sys.executable}", *argv]
    else:
        cmd = [sys.executable, "-m", "plateau", *argv]
    if step.unprivileged and os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
    return cmd


def _env(step: Step, ws: Ws) -> dict[str, str]:
    env = {**os.environ, "PLATEAU_CACHE": str(ws.p("cache")), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PLATEAU_PAUSE_AFTER", None)
    if step.unprivileged:
        env["HOME"] = str(ws.p("home"))
    if step.pause:
        env["PLATEAU_PAUSE_AFTER"] = step.pause
    env.update({k: v.format(**ws.vars) for k, v in step.env.items()})
    return env


def _preexec(step: Step) -> Callable[[], None] | None:
    if step.fsize is None:
        return None

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (step.fsize, step.fsize))

    return limit


def _kill_at_pause(step: Step, ws: Ws) -> tuple[int | None, str, str]:
    """Start the step, wait until it says it paused, SIGKILL it (or keep it, `hold`). (rc, stdout, stderr)."""
    proc = subprocess.Popen(_command(step, ws), cwd=ws.root, env=_env(step, ws), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_preexec(step))
    err_lines = []
    deadline = time.time() + step.timeout
    paused = False
    assert proc.stderr is not None
    for line in proc.stderr:  # blocks per line; the pause line is flushed before the sleep
        err_lines.append(line)
        if "paused after" in line:
            paused = True
            break
        if time.time() > deadline:
            break
    if not paused:
        proc.kill()
        out, err = proc.communicate()
        return proc.returncode, out, "".join(err_lines) + err
    if step.hold:
        ws.procs.append(proc)
        return None, "", "".join(err_lines)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    return proc.returncode, out, "".join(err_lines) + err


def _error_lines(stderr: str, make: bool) -> list[str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if make:  # make's own "make: *** [Makefile:NN: train] Error 2" follows the command's line
        lines = [ln for ln in lines if not re.match(r"make(\[\d+\])?: \*\*\* \[", ln)]
    return lines


def run_case(case: Case, good: Path, base: Path) -> Verdict:
    """Run `case` in a fresh workspace under `base`; the verdict (the workspace is removed after)."""
    t0 = time.time()
    ws = Ws(base / case.id, good)
    lines: list[str] = []
    rcs: list[int | None] = []
    try:
        if case.prepare:
            case.prepare(ws)
        for i, step in enumerate(case.steps):
            if step.call is not None:
                step.call(ws)
                continue
            before = snapshot(ws.root)
            if step.expect == "kill":
                rc, out, err = _kill_at_pause(step, ws)
            else:
                p = subprocess.run(_command(step, ws), cwd=ws.root, env=_env(step, ws), capture_output=True,
                                   text=True, timeout=step.timeout, preexec_fn=_preexec(step))
                rc, out, err = p.returncode, p.stdout, p.stderr
            rcs.append(rc)
            errs = _error_lines(err, step.make)
            outs = [ln for ln in out.splitlines() if ln.strip()]
            lines.append(_seen(step, rc, errs, outs, err).replace(f"{ws.root}/", "").replace(str(ws.root), "."))
            where = f"step {i + 1} ({' '.join(step.argv)[:80]})"
            if "Traceback" in err:
                return _verdict(case, "traceback", f"{where}: {errs[-1] if errs else ''}", lines, rcs, t0)
            if step.expect == "error" and rc == 0:
                return _verdict(case, "silent success", f"{where} exited 0: {outs[-1] if outs else ''}", lines,
                                rcs, t0)
            if step.expect in ("error", "kill") and step.protect:
                gone = _changed(before, snapshot(ws.root))
                if gone:
                    return _verdict(case, "damaged", f"{where} changed {', '.join(gone[:4])}", lines, rcs, t0)
            problem = _step_problem(step, rc, errs, outs, err) or (_staging_named(ws) if step.expect == "ok" else None)
            if problem:
                return _verdict(case, "wrong", f"{where}: {problem}", lines, rcs, t0)
        problem = case.check(ws) if case.check else None
        if problem:
            return _verdict(case, "wrong", f"check: {problem}", lines, rcs, t0)
        return _verdict(case, "pass", "", lines, rcs, t0)
    finally:
        for proc in ws.procs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.communicate()
        for undo in ws.cleanups:
            with contextlib.suppress(Exception):
                undo()
        subprocess.run(["chmod", "-R", "u+w", str(ws.root)], capture_output=True)
        shutil.rmtree(ws.root, ignore_errors=True)


def _seen(step: Step, rc: int | None, errs: list[str], outs: list[str], err: str) -> str:
    """What the user saw of a step, for the table: the error line, the note the case looks for, or the exit."""
    if step.expect == "error":
        return " | ".join(errs) if errs else f"exit {rc}, nothing on stderr"
    if step.expect == "kill":
        return f"paused after {step.pause}, " + ("kept paused" if step.hold else "killed (SIGKILL)") \
            if "paused after" in err else f"exit {rc} before {step.pause}"
    hit = next((ln for ln in outs if step.pattern and step.pattern in ln), None)
    return hit or f"exit {rc}"


def _staging_named(ws: Ws) -> str | None:
    """A report or manifest that names a staging folder would point at a path that no longer exists."""
    for p in ws.root.rglob("*"):
        if p.suffix in (".json", ".md") and p.is_file() and ".staging-" in p.read_text(errors="replace"):
            return f"{p.relative_to(ws.root)} names a staging folder"
    return None


def _step_problem(step: Step, rc: int | None, errs: list[str], outs: list[str], err: str) -> str | None:
    if step.expect == "kill":
        if "paused after" not in err:
            return f"never paused after {step.pause} (exit {rc}): {errs[-1] if errs else ''}"
        return None
    if step.expect == "ok":
        if rc != 0:
            return f"exit {rc}: {errs[-1] if errs else ''}"
        if step.pattern and not any(step.pattern in ln for ln in outs):
            return f"stdout does not say {step.pattern!r}"
        return None
    if rc != 2:
        return f"exit {rc}, expected 2: {errs[-1] if errs else ''}"
    if len(errs) != 1:
        return f"{len(errs)} stderr lines, expected one: {' | '.join(errs)[:300]}"
    if step.pattern and step.pattern not in errs[0]:
        return f"the error does not name {step.pattern!r}: {errs[0]}"
    return None


def _verdict(case: Case, result: str, detail: str, lines: list[str], rcs: list[int | None], t0: float) -> Verdict:
    return Verdict(case.id, result, detail, lines, rcs, round(time.time() - t0, 1))


def tiered(cases: list[Case]) -> list:
    """pytest params of the cases the test suite runs: "fast" ones plain, "slow" ones marked slow (bench/faults.py
    runs the "bench" ones too)."""
    import pytest

    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.tier == "slow" else [])
            for c in cases if c.tier in ("fast", "slow")]


def make_good_run(folder: Path, cache: Path) -> Path:
    """train (1 epoch) -> export -> compile (host) -> validate on small_cnn with synthetic data, in a few
    seconds each: the run every case starts from."""
    env = {**os.environ, "PLATEAU_CACHE": str(cache)}
    env.pop("PLATEAU_PAUSE_AFTER", None)
    run = str(folder)
    for argv in (["train", "--run", run, "--epochs", "1", "--train-limit", "256", "--batch-size", "64",
                  "--flatness", "off", "--eval-limit", "100", "--bn-recalibrate", "0", "--no-quant-gap",
                  "--no-progress"],
                 ["export", "--run", run, "--eval-limit", "100", "--calib-images", "64"],
                 ["compile", "--run", run],
                 ["validate", "--run", run, "--limit", "50"]):
        p = subprocess.run([sys.executable, "-m", "plateau", *argv], capture_output=True, text=True, env=env,
                           timeout=900)
        assert p.returncode == 0, (argv, p.stderr[-2000:])
    for p in [folder, *folder.rglob("*")]:  # readable by `nobody` for the read-only cases
        os.chmod(p, (p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0)) & 0o7777)
    return folder
