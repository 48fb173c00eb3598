"""Crash-safe stage folders: one writer at a time, and outputs that land together or not at all.

A stage writes its folder (e.g. `runs/r/export/`) through `staged_output`:

    with staged_output(run / "export") as tmp:   # lock, clean leftovers, fresh staging folder
        ...write every file into tmp...
    # swapped in: runs/r/export/ is now the new, complete set of files

1. A lock file beside the folder (`runs/r/.export.lock`, holding the PID) taken with fcntl.flock: a second process
   on the same folder fails at once naming the holder. The kernel drops the lock of a killed process, so a lock
   left behind is stale by construction; the next run takes it over and says so.
2. Everything is written into `runs/r/.export.staging-<pid>/`. Only when the stage succeeded is it swapped in:
   the old folder is renamed aside (`.export.old-<pid>`), the staging folder renamed into place, the old one
   removed. A kill at any point leaves either the old complete folder or the new complete one (between the two
   renames both exist under their temporary names; `recover` finishes the swap).
3. The next writer (or a reader that finds the folder missing) recovers: an interrupted swap is finished, other
   leftovers (staging folders of killed runs, temporaries of killed atomic writes) are removed, saying so.

Failures to write (read-only folder, full disk, a name too long) become one-line PlateauErrors naming the final
path, never the staging one, and saying that the previous folder is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import PlateauError

__all__ = ["stage_lock", "staged_output", "recover", "settle", "clean_temporaries", "note", "write_failure",
           "check_run_folder", "pause_point", "refused_write"]

# What killed atomic writes leave: atomic_path's `.<name>.<random>.tmp`, the compile stage's
# `.model.so.<random>.so` (export_library picks its format from the suffix).
_TEMP_PATTERNS = (".*.tmp", ".*.so.*.so")


def pause_point(name: str) -> None:
    """Stop here for a while when PLATEAU_PAUSE_AFTER names `name` (the fault tests kill -9 the process in this
    window); a no-op otherwise."""
    if os.environ.get("PLATEAU_PAUSE_AFTER") != name:
        return
    print(f"plateau: paused after {name} (PLATEAU_PAUSE_AFTER), pid {os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("PLATEAU_PAUSE_SECONDS", "600")))


def refused_write(folder: Path) -> OSError | None:
    """The error a write into `folder` gets now (full disk, quota, file-size limit, read-only), or None."""
    probe = folder / f".plateau-probe-{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def note(message: str) -> None:
    """A line saying what Plateau did on the user's behalf (took over a lock, removed leftovers)."""
    print(f"plateau: note: {message}", flush=True)


def write_failure(path: Path | str, e: OSError, unchanged: Path | str | None = None) -> PlateauError:
    """The one-line error for a write that the file system refused: which path, why, and what survived."""
    why = e.strerror or str(e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why += " (the folder is read-only for this user)"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        why += " (free some space, or write the run elsewhere with --run)"
    elif e.errno == errno.EFBIG:
        why += " (a file-size limit: see `ulimit -f`)"
    kept = f"; the previous {unchanged} is unchanged" if unchanged is not None else ""
    return PlateauError(f"cannot write {path}: {why}{kept}")


def check_run_folder(run: Path | str, option: str = "--run") -> Path:
    """`run` as a Path, refused when it cannot be a run folder: a file, an empty name, a component longer
    than the file system allows."""
    text = str(run)
    if not text.strip():
        raise PlateauError(f"{option}: empty folder name")
    p = Path(text)
    for part in p.parts:
        if len(os.fsencode(part)) > 255:
            raise PlateauError(f"{option} {text[:60]}...: the name {part[:40]!r}... is {len(part)} characters; "
                               "file systems allow at most 255 per folder name")
    if p.exists() and not p.is_dir():
        raise PlateauError(f"{option} {p}: is a file, not a run folder")
    return p


def _ensure_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PlateauError(f"cannot create {folder}: a file of that name is in the way") from None
    except NotADirectoryError:
        bad = next((p for p in [*reversed(folder.parents), folder] if p.exists() and not p.is_dir()), folder)
        raise PlateauError(f"cannot create {folder}: {bad} is a file, not a folder") from None
    except OSError as e:
        raise write_failure(folder, e) from None


def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def stage_lock(folder: Path | str) -> Iterator[None]:
    """Hold the lock of `folder` (one writer per stage folder); a PlateauError naming the holder's PID when
    another process holds it."""
    folder = Path(folder)
    _ensure_dir(folder.parent)
    lock = _lock_path(folder)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # the first write of every stage: a read-only run folder is refused here
            raise write_failure(folder, e, unchanged=folder if folder.exists() else None) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"PID {holder}" if holder else "another process"
            raise PlateauError(f"{folder} is in use by {who} (lock {lock}): wait for it to finish, or stop "
                               "it") from None
        except OSError:  # a file system without flock: go on unlocked rather than refuse to work
            break
        # The previous holder unlinks the file on release: if it did so between our open and flock, we hold a
        # lock on a file nobody else will see. Retry on the file that is there now.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_pid(fd)
    if previous and previous != os.getpid() and not _pid_alive(previous):
        note(f"took over the lock of {folder} left by PID {previous}, which is no longer running")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise write_failure(lock, e) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries killed atomic writes left anywhere under `folder`; the paths removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for pattern in _TEMP_PATTERNS:
        for p in folder.rglob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _leftovers(folder: Path, kind: str) -> list[tuple[int, Path]]:
    out = []
    for p in folder.parent.glob(f".{folder.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and p.is_dir():
            out.append((int(pid), p))
    return sorted(out)


def recover(folder: Path | str, quiet: bool = False) -> None:
    """Settle what an interrupted writer of `folder` left (call with its lock held): finish a swap killed
    between its two renames, remove staging folders and temporaries of killed runs."""
    folder = Path(folder)
    say = (lambda m: None) if quiet else note
    olds = _leftovers(folder, "old")
    stagings = dict(_leftovers(folder, "staging"))
    if not folder.exists() and olds:
        pid, old = olds[-1]
        new = stagings.pop(pid, None)
        if new is not None:  # the swap had started: its staging folder was complete; the old one goes below
            os.rename(new, folder)
            say(f"finished the swap of {folder} that PID {pid} started (its new files are in place)")
        else:
            os.rename(old, folder)
            say(f"restored {folder} from {old.name}, left by PID {pid}")
            olds = olds[:-1]
    for pid, p in [*olds, *stagings.items()]:
        if pid == os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True)
        say(f"removed {p}, left by an interrupted run (PID {pid})")
    removed = clean_temporaries(folder)
    if removed:
        say(f"removed {len(removed)} temporary file(s) left by an interrupted write in {folder} "
            f"(e.g. {removed[0].name})")


def settle(folder: Path | str) -> None:
    """For a reader that finds `folder` missing: recover an interrupted swap if no writer holds the lock."""
    folder = Path(folder)
    if folder.exists() or not (_leftovers(folder, "old") or _leftovers(folder, "staging")):
        return
    with contextlib.suppress(PlateauError):  # a writer is at work (or the folder is read-only): leave it
        with stage_lock(folder):
            recover(folder)


def _fsync_tree(folder: Path) -> None:
    """Flush the staging folder's files to disk before it is swapped in (a power cut must not swap in empty
    files)."""
    for p in [*folder.rglob("*"), folder]:
        if p.is_file() or p.is_dir():
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _swap(staging: Path, folder: Path) -> None:
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    _fsync_tree(staging)
    if folder.exists():
        os.rename(folder, old)
        pause_point("swap")
    os.rename(staging, folder)
    _fsync_tree(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def _final_path(path: str | None, staging: Path, folder: Path) -> str:
    """A path inside the staging folder as the user will know it (inside the final folder)."""
    if not path:
        return str(folder)
    try:
        return str(folder / Path(path).relative_to(staging))
    except ValueError:
        return path


@contextlib.contextmanager
def staged_output(folder: Path | str, keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a fresh staging folder for `folder`'s new contents (`keep`: sub-paths of the old folder copied in
    first, e.g. a cache); swap it in when the block succeeds, remove it when it fails."""
    folder = Path(folder)
    _ensure_dir(folder.parent)
    with stage_lock(folder):
        recover(folder)
        staging = folder.parent / f".{folder.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            for sub in keep:
                src = folder / sub
                if src.is_dir():
                    shutil.copytree(src, staging / sub, ignore=shutil.ignore_patterns(*_TEMP_PATTERNS))
                elif src.is_file():
                    shutil.copy2(src, staging / sub)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failure(_final_path(e.filename, staging, folder), e,
                                unchanged=folder if folder.exists() else None) from None
        try:
            yield staging
            _swap(staging, folder)
        except PlateauError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failure(_final_path(e.filename, staging, folder), e,
                                unchanged=folder if folder.exists() else None) from None
        except Exception as e:
            trouble = refused_write(staging) if staging.exists() else None
            shutil.rmtree(staging, ignore_errors=True)
            if trouble is not None:
                raise write_failure(folder, trouble, unchanged=folder if folder.exists() else None) from None
            raise e
        except BaseException:  # KeyboardInterrupt: nothing half-written stays behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
