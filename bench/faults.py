"""Every fault case (tests/support/fault_cases*.py) through the real CLI: the measured table of issue 14.

    .venv/bin/python bench/faults.py                  # all cases, 2 at a time; ~10 minutes on 2 cores
    .venv/bin/python bench/faults.py --only kill-     # the cases whose id contains "kill-"

Builds one good run (small_cnn, synthetic data: train -> export -> compile -> validate), copies it per case,
breaks something, runs the case's commands and classifies the outcome (pass, traceback, silent success, damaged,
wrong; see tests/support/fault_harness.py). Writes bench/results/faults.json and the table in docs/faults.md, and
prints the totals for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.fault_cases import all_cases  # noqa: E402
from support.fault_harness import Case, Verdict, can_mount, can_run_unprivileged, make_good_run, run_case  # noqa: E402

RESULTS = ("pass", "traceback", "silent success", "damaged", "wrong", "skipped")


def _machine() -> str:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}".strip()


def _command(case: Case) -> str:
    parts = []
    for s in case.steps:
        if s.call is not None:
            parts.append("(damage the cache)")
            continue
        head = "make" if s.make else "plateau"
        extra = (f"PLATEAU_PAUSE_AFTER={s.pause} " if s.pause else "") + ("[as nobody] " if s.unprivileged else "") \
            + (f"[ulimit -f {s.fsize // 1024}k] " if s.fsize else "")
        parts.append(f"{extra}{head} {' '.join(s.argv)}" + (" + kill -9" if s.expect == "kill" else ""))
    return "; ".join(parts)


def _cell(text: str, n: int = 150) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown(rows: list[dict], meta: dict) -> str:
    t = meta["totals"]
    lines = [
        "# Crash safety and bad input: the fault table (issue 14)",
        "",
        f"Measured with `{meta['command']}` on {meta['date']} ({meta['machine']}); {meta['seconds']:.0f} s. Each "
        "case copies one good run (small_cnn on synthetic data: train, export, compile, validate), breaks "
        "something, runs the commands through the real CLI (kills are a real SIGKILL at the named artifact, via "
        "`PLATEAU_PAUSE_AFTER`) and is classified: **pass**, or traceback, silent success (a command that must "
        "fail exited 0), damaged (a file that existed before a failing or killed command changed) or wrong (exit "
        "status, more than one stderr line, a line that does not name the file or option, a failed check).",
        *[f"Measured again on {u['date']} after a fix ({u['machine']}): {', '.join(f'`{c}`' for c in u['cases'])}."
          for u in meta.get("updated", [])],
        "",
        f"**{t['cases']} cases: {t['pass']} pass, {t['traceback']} tracebacks, {t['silent success']} silent "
        f"successes, {t['damaged']} damaged, {t['wrong']} wrong, {t['skipped']} skipped.**",
        "",
        "| # | case | kind | what | commands ({run}: the copy of the good run) | result | what the user saw, step by "
        "step (stderr for errors) |",
        "|---:|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        seen = r["detail"] if r["result"] != "pass" else " → ".join(x for x in r["lines"] if x)
        lines.append(f"| {i} | `{r['case']}` | {r['issue']} | {_cell(r['title'], 110)} | {_cell(r['command'], 150)} "
                     f"| {r['result']} | {_cell(seen, 260)} |")
    lines += ["", "Cases that need a facility this machine lacks (a tmpfs mount for a real full disk, `setpriv` "
              "for a read-only folder as root) are listed as skipped, with the reason.", ""]
    return "\n".join(lines)


def _totals(rows: list[dict]) -> dict:
    """How many cases, and how many of them ended in each result."""
    return {"cases": len(rows), **{r: sum(x["result"] == r for x in rows) for r in RESULTS}}


def _at_a_time(jobs: int) -> str:
    return "one case at a time" if jobs == 1 else f"{jobs} cases at a time"


def summary(rows: list[dict], meta: dict) -> str:
    """The bench/RESULTS.md section: totals per kind of failure the issue names."""
    t = meta["totals"]
    lines = [
        "## Crash safety and bad input (issue 14)",
        "",
        f"`{meta['command']}` on {meta['date']}, {meta['machine']} ({meta['seconds'] / 60:.0f} min, "
        f"{_at_a_time(meta.get('jobs', 2))}). Every case copies one good run (small_cnn, synthetic data: train, "
        "export, compile, validate), breaks something and runs the real CLI or `make`; kills are a real SIGKILL "
        "at a named artifact "
        "(`PLATEAU_PAUSE_AFTER`). The full table, one row per case with the line the user saw, is "
        "[docs/faults.md](../docs/faults.md); the data is `bench/results/faults.json`.",
        "",
        "| kind of case | cases | pass | tracebacks | silent successes | damaged files | wrong | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("data loss", "nonsense", "traceback", "robustness", "valid"):
        sel = [r for r in rows if r["issue"] == kind]
        if sel:
            n = {k: sum(r["result"] == k for r in sel) for k in RESULTS}
            lines.append(f"| {_KINDS[kind]} | {len(sel)} | {n['pass']} | {n['traceback']} | {n['silent success']} "
                         f"| {n['damaged']} | {n['wrong']} | {n['skipped']} |")
    lines += [f"| **all** | **{t['cases']}** | **{t['pass']}** | **{t['traceback']}** | **{t['silent success']}** | "
              f"**{t['damaged']}** | **{t['wrong']}** | **{t['skipped']}** |", ""]
    return "\n".join(lines)


_KINDS = {"data loss": "data loss: kills, concurrent writers, changed or damaged artifacts, the Makefile",
          "nonsense": "nonsense input, to be refused (options, classes, NaN weights, unlowerable ops, shapes)",
          "traceback": "input that crashes a careless reader (manifests, arrays, paths, read-only, full disk)",
          "robustness": "where the issue is silent (stale locks, caches, malicious pickles, file modes)",
          "valid": "valid variants, which must still succeed"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default="", help="run the cases whose id contains one of these (comma-separated)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "faults.md"))
    p.add_argument("--render", action="store_true", help="only rewrite the table and the summary from --out")
    p.add_argument("--update", action="store_true", help="with --only: run those cases again and replace their rows "
                   "in --out (after a fix), the table then saying which rows were measured when")
    args = p.parse_args()
    if args.render:
        data = json.loads(Path(args.out).read_text())
        Path(args.md).write_text(markdown(data["cases"], data))
        print(summary(data["cases"], data))
        return 0
    wanted = [w for w in args.only.split(",") if w] or [""]
    cases = [c for c in all_cases() if any(w in c.id for w in wanted)]
    have = {"unprivileged": can_run_unprivileged(), "mount": can_mount()}
    base = Path(tempfile.mkdtemp(prefix="plateau-faults-"))
    os.chmod(base, 0o755)  # the read-only cases run as nobody, who must reach the workspaces
    t0 = time.time()
    try:
        print(f"faults: building the good run in {base}", flush=True)
        good = make_good_run(base / "good", base / "cache")

        def one(case: Case) -> Verdict:
            if case.needs and not have[case.needs]:
                return Verdict(case.id, "skipped", f"needs {case.needs}", [], [], 0.0)
            v = run_case(case, good, base / "cases")
            print(f"faults: {v.result:14s} {case.id} ({v.seconds} s) {v.detail[:160]}", flush=True)
            return v

        with ThreadPoolExecutor(max(1, args.jobs)) as ex:
            verdicts = list(ex.map(one, cases))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [{"case": c.id, "issue": c.issue, "title": c.title, "command": _command(c), "tier": c.tier,
             "result": v.result, "detail": v.detail, "lines": v.lines, "returncodes": v.returncodes,
             "seconds": v.seconds} for c, v in zip(cases, verdicts, strict=True)]
    totals = _totals(rows)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"command": "python bench/faults.py" + (f" --only {args.only}" if args.only else ""),
            "date": now, "machine": _machine(), "seconds": round(time.time() - t0, 1), "jobs": args.jobs,
            "totals": totals,
            "issues": {k: sum(x["issue"] == k for x in rows) for k in sorted({x["issue"] for x in rows})}}
    if args.update:  # the earlier table with these rows replaced; its command, date and seconds kept
        old = json.loads(Path(args.out).read_text())
        new = {r["case"]: r for r in rows}
        rows = [new.pop(r["case"], r) for r in old["cases"]] + list(new.values())
        totals = _totals(rows)
        meta = {**{k: v for k, v in old.items() if k != "cases"}, "totals": totals,
                "updated": [*old.get("updated", []), {"cases": sorted(c.id for c in cases), "date": now,
                                                      "machine": _machine()}]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**meta, "cases": rows}, indent=1) + "\n")
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(markdown(rows, meta))
    print(json.dumps(meta, indent=1))
    print(summary(rows, meta))
    return 0 if totals["pass"] + totals["skipped"] == totals["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
