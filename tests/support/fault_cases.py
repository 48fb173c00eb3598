"""The fault table, part 1: kills at chosen points, concurrent writers, training, the Makefile, the CLI itself.

Each Case says what a careful user expects; tier "fast" cases run in the default test suite, "slow" ones in the
test suite marked slow, "bench" ones only in bench/faults.py (which runs every case). Part 2 (export, compile,
validate, bench) is fault_cases_stages.py; `all_cases()` joins them.
"""

from __future__ import annotations

from .fault_harness import Case, Step, Ws, act
from .fault_inputs import (
    absent,
    all_of,
    exists,
    full_disk,
    image_tree,
    leftovers,
    malicious_pickle,
    manifest_value,
    nan_checkpoint,
    no_leftovers,
    plateau_checkpoint,
    readonly,
    remove,
    same_as_good,
    seq,
    stale_lock,
    write,
)

__all__ = ["all_cases", "CASES", "FAST_TRAIN", "FAST_EXPORT", "err", "ok", "kill"]

# A training run of a second or two (the run folder {ws}/new is fresh unless a case says otherwise).
FAST_TRAIN = ["--epochs", "1", "--train-limit", "128", "--batch-size", "64", "--flatness", "off", "--eval-limit",
              "50", "--bn-recalibrate", "0", "--no-quant-gap", "--no-progress"]
# --fast: round to nearest, seconds (the faults are under test, not the learned rounding the default runs)
FAST_EXPORT = ["--fast", "--eval-limit", "50", "--calib-images", "64"]


def err(argv: list[str], pattern: str, **kw) -> Step:
    return Step(argv, "error", pattern, **kw)


def ok(argv: list[str], pattern: str = "", **kw) -> Step:
    return Step(argv, "ok", pattern, **kw)


def kill(argv: list[str], pause: str, **kw) -> Step:
    return Step(argv, "kill", pause=pause, **kw)


def _metrics_lines(rel: str, most: int):
    def check(ws: Ws) -> str | None:
        p = ws.p(rel)
        n = len(p.read_text().splitlines()) if p.exists() else 0
        return None if n <= most else f"{rel} has {n} lines (interleaved writers?), expected at most {most}"
    return check


def _cut_metrics(ws: Ws) -> None:
    with open(ws.run / "train" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "trai')


def _damage_cache(ws: Ws) -> None:
    entries = list(ws.p("cache").glob("imagefolder-*.npz"))
    assert entries, "no cache entry to damage"
    for p in entries:
        p.write_bytes(p.read_bytes()[:200])  # a truncated zip: what a full disk or a kill leaves


_RUN2 = ["--run", "{ws}/run2"]
_TRAIN2 = ["train", *_RUN2, *FAST_TRAIN, "--epochs", "2"]

KILL = [
    Case("kill-export-after-qdq", "data loss", "export W4A8 killed right after writing model_qdq.onnx; then "
         "compile and validate the run", [
             kill(["export", "--run", "{run}", "--bits", "W4A8", *FAST_EXPORT], "model_qdq.onnx"),
             ok(["compile", "--run", "{run}"]), ok(["validate", "--run", "{run}", "--limit", "20"])],
         check=same_as_good("export")),
    Case("kill-export-after-reference", "data loss", "export killed after reference.pt; the next export cleans "
         "the leftovers and says so", [
             kill(["export", "--run", "{run}", "--bits", "W4A8", *FAST_EXPORT], "reference.pt"),
             ok(["export", "--run", "{run}", *FAST_EXPORT], "removed")],
         check=no_leftovers()),
    Case("kill-export-after-manifest", "data loss", "export killed after its (staged) manifest, before the swap: "
         "the old export and library still validate", [
             kill(["export", "--run", "{run}", "--bits", "W4A8", *FAST_EXPORT], "manifest.json"),
             ok(["validate", "--run", "{run}", "--limit", "20"])],
         check=same_as_good("export")),
    Case("kill-export-at-swap", "data loss", "export killed between the two renames of its swap; the next "
         "command finishes the swap, and says the library must be recompiled", [
             kill(["export", "--run", "{run}", "--bits", "W4A8", *FAST_EXPORT], "swap", protect=False),
             err(["validate", "--run", "{run}", "--limit", "20"], "plateau compile"),
             ok(["compile", "--run", "{run}"]), ok(["validate", "--run", "{run}", "--limit", "20"])],
         check=all_of(manifest_value("run/export/manifest.json", "config.bits", "W4A8"), no_leftovers())),
    Case("kill-compile-after-so", "data loss", "compile killed right after model.so; the old library still "
         "validates", [
             kill(["compile", "--run", "{run}", "--requant", "fixed"], "model.so"),
             ok(["validate", "--run", "{run}", "--limit", "20"])],
         check=same_as_good("compile")),
    Case("kill-compile-at-swap", "data loss", "compile killed in the middle of its swap; validate finishes the "
         "swap", [
             kill(["compile", "--run", "{run}", "--requant", "fixed"], "swap", protect=False),
             ok(["validate", "--run", "{run}", "--limit", "20"])],
         check=all_of(manifest_value("run/compile/host/manifest.json", "config.requant", "fixed"),
                      no_leftovers())),
    Case("kill-compile-then-compile", "data loss", "compile killed after model.so; the next compile removes "
         "the leftovers and says so", [
             kill(["compile", "--run", "{run}"], "model.so"), ok(["compile", "--run", "{run}"], "removed")],
         check=no_leftovers()),
    Case("kill-train-then-train", "data loss", "train killed after epoch 1 of 2; a plain re-run refuses (says "
         "--resume), --resume finishes", [
             kill(_TRAIN2, "checkpoint-epoch001.pt"),
             err(["train", *_RUN2, *FAST_TRAIN, "--epochs", "2"], "--resume"),
             ok(["train", *_RUN2, "--resume", "--no-progress"])],
         check=all_of(exists("run2/train/manifest.json"), _metrics_lines("run2/train/metrics.jsonl", 2))),
    Case("kill-train-then-export", "data loss", "train killed after last.pt of epoch 1; export says to resume", [
             kill(_TRAIN2, "last.pt"), err(["export", *_RUN2, *FAST_EXPORT], "--resume")],
         check=exists("run2/train/checkpoint-epoch001.pt")),
    Case("kill-validate-after-report", "data loss", "validate killed after report.json; the old report is "
         "intact", [kill(["validate", "--run", "{run}", "--limit", "30"], "report.json")],
         check=same_as_good("validate")),
    Case("half-swap-old-only", "data loss", "a swap killed before its staging folder was complete left only "
         "the old folder aside; the next reader restores it", [ok(["compile", "--run", "{run}"], "restored")],
         prepare=lambda ws: (ws.run / "export").rename(ws.run / ".export.old-999999"),
         check=all_of(same_as_good("export"), no_leftovers())),
    Case("leftovers-compile", "data loss", "temporaries of a killed compile (old versions) are removed by the "
         "next compile", [ok(["compile", "--run", "{run}"], "removed")],
         prepare=leftovers("run/compile/host"), check=no_leftovers()),
    Case("leftovers-export", "data loss", "a killed export's staging folder and temporaries are removed by the "
         "next export", [ok(["export", "--run", "{run}", *FAST_EXPORT], "removed")],
         prepare=leftovers("run/export"), check=no_leftovers()),
    Case("stale-lock-export", "robustness", "a lock file left by a dead process is taken over, and said so",
         [ok(["export", "--run", "{run}", *FAST_EXPORT], "took over the lock")],
         prepare=stale_lock("run/export"), check=no_leftovers()),
    Case("concurrent-export", "data loss", "a second export on the same run while one is running", [
             kill(["export", "--run", "{run}", *FAST_EXPORT], "model_qdq.onnx", hold=True),
             err(["export", "--run", "{run}", *FAST_EXPORT], "PID")],
         check=same_as_good("export")),
    Case("concurrent-train", "data loss", "two trainings of one folder: the second fails at once naming the "
         "first's PID; metrics.jsonl is not interleaved", [
             kill(_TRAIN2, "checkpoint-epoch001.pt", hold=True),
             err(["train", *_RUN2, "--resume", "--no-progress"], "PID")],
         check=_metrics_lines("run2/train/metrics.jsonl", 1)),
    Case("concurrent-compile", "data loss", "a second compile of one target while one is running", [
             kill(["compile", "--run", "{run}"], "model.so", hold=True),
             err(["compile", "--run", "{run}"], "PID")],
         check=same_as_good("compile")),
]

_NEW = ["--run", "{ws}/new"]


def _train_option(opt: str, value: str, pattern: str | None = None) -> Case:
    return Case(f"train{opt}={value}", "nonsense", f"plateau train {opt} {value}",
                [err(["train", *_NEW, *FAST_TRAIN, opt, value], pattern or opt)])


TRAIN_OPTIONS = [
    _train_option("--train-limit", "0"), _train_option("--train-limit", "-3"),
    _train_option("--epochs", "0"), _train_option("--epochs", "-1"), _train_option("--epochs", "abc"),
    _train_option("--batch-size", "0"), _train_option("--lr", "0"), _train_option("--lr", "-0.1"),
    _train_option("--lr", "nan"), _train_option("--eval-limit", "0"), _train_option("--calib-images", "0"),
    _train_option("--flatness-images", "0"), _train_option("--trace-samples", "0"), _train_option("--alpha", "-1"),
    _train_option("--noise-p", "0"), _train_option("--noise-p", "1.5"), _train_option("--momentum", "2"),
    _train_option("--label-smoothing", "1"), _train_option("--img-size", "0"), _train_option("--threads", "0"),
    _train_option("--threads", "-2"), _train_option("--bn-recalibrate", "-1"), _train_option("--seed", "-1"),
    _train_option("--warmup-epochs", "-1"), _train_option("--weight-decay", "-1"),
    _train_option("--bits", "W9A8", "W9A8"), _train_option("--method", "nope"),
    _train_option("--optimizer", "nope"), _train_option("--model-kwargs", "=x"),
    _train_option("--model", "no_such_net", "no_such_net"),
]

TRAIN = [
    Case("train-over-existing-run", "data loss", "plateau train on a run that has checkpoints, no flags",
         [err(["train", "--run", "{run}", *FAST_TRAIN], "--overwrite")]),
    Case("train-overwrite", "valid", "plateau train --overwrite on a run with checkpoints",
         [ok(["train", "--run", "{run}", *FAST_TRAIN, "--overwrite", "--seed", "1"], "deleted the earlier run")],
         check=manifest_value("run/train/manifest.json", "config.seed", 1)),
    Case("train-resume-finished", "valid", "plateau train --resume on a finished run",
         [ok(["train", "--run", "{run}", "--resume", "--no-progress"])], check=exists("run/train/manifest.json")),
    Case("train-resume-and-overwrite", "nonsense", "plateau train --resume --overwrite",
         [err(["train", "--run", "{run}", "--resume", "--overwrite"], "--overwrite")]),
    Case("train-one-class", "nonsense", "a data set with a single class",
         [err(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/d1"], "one class")],
         prepare=image_tree("d1", ["only"])),
    Case("train-split-classes-differ", "nonsense", "test/ has other class folders than train/",
         [err(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/d2"], "test split")],
         prepare=image_tree("d2", ["a", "b"], ["a", "c"])),
    Case("train-data-is-file", "traceback", "--data names a file",
         [err(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/f.txt"], "f.txt")], prepare=write("f.txt", "x")),
    Case("train-data-missing", "traceback", "--data names nothing",
         [err(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/nope"], "no such directory")]),
    Case("train-checkpoint-dir", "traceback", "--checkpoint names a directory",
         [err(["train", *_NEW, *FAST_TRAIN, "--checkpoint", "{run}"], "is a directory")]),
    Case("train-checkpoint-nan", "nonsense", "fine-tuning a checkpoint whose weights are NaN",
         [err(["train", *_NEW, *FAST_TRAIN, "--checkpoint", "{ws}/nan.pt"], "down1.0.0.weight")],
         prepare=nan_checkpoint("nan.pt")),
    Case("train-checkpoint-10-on-2", "nonsense", "a 10-class checkpoint fine-tuned on 2-class data",
         [err(["train", *_NEW, *FAST_TRAIN, "--checkpoint", "{run}/train/last.pt", "--data", "{ws}/d"],
              "10 classes")], prepare=image_tree("d", ["a", "b"])),
    Case("train-checkpoint-other-names", "nonsense", "fine-tuning a checkpoint of classes a, b on data of c, d",
         [err(["train", *_NEW, *FAST_TRAIN, "--checkpoint", "{ws}/ab.pt", "--data", "{ws}/cd"], "'a'")],
         prepare=seq(plateau_checkpoint("ab.pt", ["a", "b"]), image_tree("cd", ["c", "d"]))),
    Case("train-checkpoint-malicious", "robustness", "a checkpoint whose pickle would run a command",
         [err(["train", *_NEW, *FAST_TRAIN, "--checkpoint", "{ws}/mal.pt"], "mal.pt")],
         prepare=malicious_pickle("mal.pt"), check=absent("pwned")),
    Case("train-run-is-file", "traceback", "--run names a file",
         [err(["train", "--run", "{ws}/afile", *FAST_TRAIN], "is a file")], prepare=write("afile", "x")),
    Case("train-run-300-chars", "traceback", "a 300-character run name",
         [err(["train", "--run", "{ws}/" + "r" * 300, *FAST_TRAIN], "255")]),
    Case("train-readonly-resume", "traceback", "plateau train --resume in a read-only run folder",
         [err(["train", "--run", "{run}", "--resume"], "Permission denied", unprivileged=True)],
         prepare=readonly(), needs="unprivileged"),
    Case("train-readonly-overwrite", "traceback", "plateau train --overwrite in a read-only run folder",
         [err(["train", "--run", "{run}", *FAST_TRAIN, "--overwrite"], "Permission denied", unprivileged=True)],
         prepare=readonly(), needs="unprivileged"),
    Case("train-file-size-limit", "traceback", "train where no file may exceed 100 kB (ulimit -f)",
         [err(["train", *_NEW, *FAST_TRAIN], "cannot write", fsize=100_000)]),
    Case("train-disk-full", "traceback", "train on a disk with 100 kB free",
         [err(["train", "--run", "{ws}/full/new", *FAST_TRAIN], "No space left")], prepare=full_disk(100),
         needs="mount"),
    Case("train-resume-corrupt-last", "robustness", "--resume when last.pt is garbage but an epoch checkpoint "
         "survives", [ok(["train", "--run", "{run}", "--resume", "--no-progress"], "continuing from")],
         prepare=write("run/train/last.pt", b"garbage")),
    Case("train-resume-only-corrupt", "traceback", "--resume when the only checkpoint is garbage",
         [err(["train", "--run", "{run}", "--resume"], "last.pt")],
         prepare=seq(write("run/train/last.pt", b"garbage"), remove("run/train/checkpoint-epoch001.pt"))),
    Case("train-resume-cut-metrics", "robustness", "--resume when metrics.jsonl ends in a line cut by a kill",
         [ok(["train", "--run", "{run}", "--resume", "--no-progress"])],
         prepare=_cut_metrics),
    Case("train-imagefolder", "valid", "training on a small ImageFolder tree",
         [ok(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/d3"])], prepare=image_tree("d3", ["a", "b", "c"])),
    Case("train-corrupt-cache", "robustness", "a damaged entry in the decoded-data cache is rebuilt, not trusted",
         [ok(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/d3"]), act(_damage_cache),
          ok(["train", "--run", "{ws}/new2", *FAST_TRAIN, "--data", "{ws}/d3"], "rebuilding")],
         prepare=image_tree("d3", ["a", "b", "c"])),
    Case("train-cache-is-file", "robustness", "PLATEAU_CACHE names a file: decode without a cache, and say so",
         [ok(["train", *_NEW, *FAST_TRAIN, "--data", "{ws}/d3"], "unusable", env={"PLATEAU_CACHE": "{ws}/afile"})],
         prepare=seq(image_tree("d3", ["a", "b"]), write("afile", "x"))),
]


def _runs_g(ws: Ws) -> None:
    import shutil

    (ws.root / "runs").mkdir()
    shutil.copytree(ws.run, ws.root / "runs" / "g")


MAKE = [
    Case("make-clean-run-two-words", "data loss", 'make clean-run RUN="cr1 victimfile" deletes only runs/cr1 '
         "victimfile", [ok(["clean-run", "RUN=cr1 victimfile"], make=True)],
         prepare=seq(write("victimfile", "keep me"), write("runs/cr1/x", "keep me too"),
                     write("runs/cr1 victimfile/y", "delete me")),
         check=all_of(exists("victimfile"), exists("runs/cr1/x"), absent("runs/cr1 victimfile"))),
    Case("make-clean-run-dotdot", "data loss", "make clean-run RUN=../run (outside runs/)",
         [err(["clean-run", "RUN=../run"], "RUN=", make=True)], check=exists("run/export/manifest.json")),
    Case("make-clean-run-empty", "data loss", "make clean-run RUN= (would be runs/ itself)",
         [err(["clean-run", "RUN="], "RUN=", make=True)], prepare=write("runs/keep/x", "x"),
         check=exists("runs/keep/x")),
    Case("make-clean-run-semicolon", "data loss", "make clean-run RUN='a;touch pwned': no command runs",
         [ok(["clean-run", "RUN=a;touch pwned"], make=True)], check=absent("pwned")),
    Case("make-train-space-in-run", "valid", 'make train RUN="my run"',
         [ok(["train", "RUN=my run", "EPOCHS=1", "TRAIN_ARGS=" + " ".join(FAST_TRAIN[2:])], make=True)],
         check=exists("runs/my run/train/manifest.json")),
    Case("make-train-again", "data loss", "make train on a run that has checkpoints",
         [err(["train", "RUN=g"], "RESUME=1", make=True)], prepare=_runs_g),
    Case("make-train-resume", "valid", "make train RESUME=1 on a finished run",
         [ok(["train", "RUN=g", "RESUME=1", "TRAIN_ARGS=--no-progress"], make=True)], prepare=_runs_g),
    Case("make-train-overwrite", "valid", "make train OVERWRITE=1",
         [ok(["train", "RUN=g", "OVERWRITE=1", "EPOCHS=1", "TRAIN_ARGS=" + " ".join(FAST_TRAIN[2:])], make=True)],
         prepare=_runs_g),
    Case("make-export-img-size-0", "nonsense", "make export IMG_SIZE=0",
         [err(["export", "RUN=g", "IMG_SIZE=0"], "--img-size", make=True)], prepare=_runs_g),
    Case("make-train-bad-model-kwargs", "nonsense", "make train MODEL_KWARGS='=x' OVERWRITE=1",
         [err(["train", "RUN=g", "OVERWRITE=1", "MODEL_KWARGS==x"], "--model-kwargs", make=True)],
         prepare=_runs_g, check=exists("runs/g/train/last.pt")),
    Case("make-validate-limit-0", "nonsense", "make validate LIMIT=0",
         [err(["validate", "RUN=g", "LIMIT=0"], "--limit", make=True)], prepare=_runs_g),
    Case("make-compile-target-injection", "data loss", "make compile TARGET='host; touch pwned'",
         [err(["compile", "RUN=g", "TARGET=host; touch pwned"], "host; touch pwned", make=True)],
         prepare=_runs_g, check=absent("pwned")),
]

CLI = [
    Case("cli-no-command", "traceback", "plateau with no command", [err([], "COMMAND")]),
    Case("cli-unknown-command", "traceback", "plateau frobnicate", [err(["frobnicate"], "frobnicate")]),
    Case("cli-unknown-option", "traceback", "plateau export --bogus", [err(["export", "--bogus"], "--bogus")]),
]

CASES = [*KILL, *TRAIN, *TRAIN_OPTIONS, *MAKE, *CLI]

# The test suite's share of the table (bench/faults.py runs all): one or two cases per kind of failure, the cheap
# ones in the default suite, the ones that kill, build or train in the slow one (a few minutes on 2 cores).
FAST = {
    "train-over-existing-run", "train--train-limit=0", "train--lr=0", "kill-export-after-reference",
    "export-nan-weights",
    "export-checkpoint-malicious", "export--calib-images=0", "export--sensitivity=kl", "compile-qdq-swapped",
    "export-mixed-precision-no-room",
    "compile-export-manifest-version-string", "validate-ref-logits-garbage", "validate--limit=0",
    "make-clean-run-two-words", "make-clean-run-dotdot",
}
SLOW = {
    "kill-export-after-qdq", "kill-export-at-swap", "kill-compile-after-so", "kill-train-then-train",
    "concurrent-train", "stale-lock-export", "leftovers-export", "export-readonly", "export-file-size-limit",
    "compile-sin", "export-10-class-on-2", "train-one-class", "validate-no-plateau-cfg", "validate-labels-missing",
    "make-train-again", "export-corrupt-cache", "train-split-classes-differ",
}


def all_cases() -> list[Case]:
    """Every case of both parts, ids checked unique, each with its tier (FAST, SLOW, else bench only)."""
    from .fault_cases_stages import CASES as STAGES

    cases = [*CASES, *STAGES]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert not (FAST | SLOW) - set(ids), (FAST | SLOW) - set(ids)
    for c in cases:
        c.tier = "fast" if c.id in FAST else "slow" if c.id in SLOW else "bench"
    return cases
