"""The fault table, part 2: export, compile, validate and bench given bad input, damaged artifacts, a read-only
folder or a full disk. Every error must leave the stage's previous folder byte-identical (the harness checks
the whole workspace; `same_as_good` says which folder a case is about)."""

from __future__ import annotations

import numpy as np

from .fault_cases import FAST_EXPORT, err, ok
from .fault_harness import Case, Ws, act
from .fault_inputs import (
    absent,
    copy,
    drop_files_record,
    edit_json,
    exists,
    full_disk,
    image_tree,
    malicious_pickle,
    manifest_value,
    nan_checkpoint,
    plateau_checkpoint,
    qdq_variant,
    readonly,
    remove,
    same_as_good,
    seq,
    write,
)

__all__ = ["CASES"]

_EXP = ["export", "--run", "{run}", *FAST_EXPORT]
_CKPT = ["--model", "small_cnn", "--checkpoint"]
_TRAIN_MAN = "run/train/manifest.json"
_EXPORT_MAN = "run/export/manifest.json"
_COMP_MAN = "run/compile/host/manifest.json"


def _npy(rel: str, array: np.ndarray):
    def run(ws: Ws) -> None:
        np.save(ws.p(rel), array)
    return run


def _flip_byte(rel: str):
    def run(ws: Ws) -> None:
        data = bytearray(ws.p(rel).read_bytes())
        data[-100] ^= 0xFF
        ws.p(rel).write_bytes(bytes(data))
    return run


def _damage_cache(ws: Ws) -> None:
    for p in ws.p("cache").glob("imagefolder-*.npz"):
        p.write_bytes(b"PK\x03\x04 not a zip any more")


def _manifest_cases(stage: str, rel: str, argv: list[str], about: str) -> list[Case]:
    """The manifest damage a hostile user tries, against the stage that reads it."""
    name = f"{rel.split('/')[1]}/manifest.json"
    table = [
        ("list", "a JSON list", write(rel, "[1, 2]"), "corrupt manifest"),
        ("null", "JSON null", write(rel, "null"), "corrupt manifest"),
        ("not-utf8", "bytes that are not UTF-8", write(rel, b"\xff\xfe{\x00"), "not UTF-8"),
        ("not-json", "text that is not JSON", write(rel, "{\"format\": "), "corrupt manifest"),
        ("empty-object", "{}", write(rel, "{}"), "expected a plateau"),
        ("version-string", 'version "1" (a string)', edit_json(rel, lambda m: {**m, "version": "1"}), "'1' (str)"),
        ("version-2", "version 2", edit_json(rel, lambda m: {**m, "version": 2}), "version 2"),
        ("no-outputs", "no 'outputs'", edit_json(rel, lambda m: {k: v for k, v in m.items() if k != "outputs"}),
         "'outputs'"),
        ("no-config", "no 'config'", edit_json(rel, lambda m: {k: v for k, v in m.items() if k != "config"}),
         "'config'"),
        ("outputs-list", "'outputs' a list", edit_json(rel, lambda m: {**m, "outputs": []}), "'outputs'"),
        ("is-dir", "a directory", lambda ws: (ws.p(rel).unlink(), ws.p(rel).mkdir()), "directory"),
    ]
    return [Case(f"{stage}-{about}-manifest-{key}", "traceback", f"plateau {stage} with {name} holding {what}",
                 [err(argv, pattern)], prepare=prep, check=_same_stage(stage))
            for key, what, prep, pattern in table]


def _same_stage(stage: str):
    return same_as_good(stage)


def _option(stage: str, argv: list[str], opt: str, value: str, pattern: str | None = None) -> Case:
    return Case(f"{stage}{opt}={value}", "nonsense", f"plateau {stage} {opt} {value}",
                [err([*argv, opt, value], pattern or opt)])


EXPORT = [
    Case("export-w4a8", "valid", "export W4A8 over a W8A8 export", [ok([*_EXP, "--bits", "W4A8"])],
         check=manifest_value(_EXPORT_MAN, "config.bits", "W4A8")),
    Case("export-nan-weights", "nonsense", "export a checkpoint whose weights are NaN",
         [err([*_EXP, *_CKPT, "{ws}/nan.pt"], "down1.0.0.weight")], prepare=nan_checkpoint("nan.pt"),
         check=same_as_good("export")),
    Case("export-inf-weights", "nonsense", "export a checkpoint with an infinite weight tensor",
         [err([*_EXP, *_CKPT, "{ws}/inf.pt"], "inf")], prepare=nan_checkpoint("inf.pt", float("inf"))),
    Case("export-10-class-on-2", "nonsense", "a 10-class checkpoint exported with 2-class data",
         [err([*_EXP, "--data", "{ws}/d"], "10 classes")], prepare=image_tree("d", ["a", "b"])),
    Case("export-class-names-differ", "nonsense", "a checkpoint of classes a, b exported with data of c, d",
         [err([*_EXP, *_CKPT, "{ws}/ab.pt", "--data", "{ws}/cd"], "'a'")],
         prepare=seq(plateau_checkpoint("ab.pt", ["a", "b"]), image_tree("cd", ["c", "d"]))),
    Case("export-split-classes-differ", "nonsense", "data whose test/ classes differ from train/",
         [err([*_EXP, *_CKPT, "{ws}/ab.pt", "--data", "{ws}/d"], "test split")],
         prepare=seq(plateau_checkpoint("ab.pt", ["a", "b"]), image_tree("d", ["a", "b"], ["a", "x"]))),
    Case("export-one-class", "nonsense", "data with one class",
         [err([*_EXP, "--data", "{ws}/d"], "one class")], prepare=image_tree("d", ["a"])),
    Case("export-imagefolder", "valid", "a 2-class checkpoint exported with its 2-class data",
         [ok([*_EXP, *_CKPT, "{ws}/ab.pt", "--data", "{ws}/ab", "--calib-images", "6"])],
         prepare=seq(plateau_checkpoint("ab.pt", ["a", "b"]), image_tree("ab", ["a", "b"]))),
    Case("export-corrupt-cache", "robustness", "a damaged data-cache entry is rebuilt, not trusted", [
             ok([*_EXP, *_CKPT, "{ws}/ab.pt", "--data", "{ws}/ab", "--calib-images", "6"]), act(_damage_cache),
             ok([*_EXP, *_CKPT, "{ws}/ab.pt", "--data", "{ws}/ab", "--calib-images", "6"], "rebuilding")],
         prepare=seq(plateau_checkpoint("ab.pt", ["a", "b"]), image_tree("ab", ["a", "b"]))),
    Case("export-calib-too-many", "nonsense", "--calib-images beyond the training images",
         [err([*_EXP, "--calib-images", "99999"], "--calib-images")]),
    Case("export-last-changed", "data loss", "last.pt changed after train wrote its manifest (a resumed run "
         "killed before the end)", [err(_EXP, "--resume")], prepare=nan_checkpoint("run/train/last.pt"),
         check=same_as_good("export")),
    Case("export-last-missing", "traceback", "train's manifest names last.pt, which is gone",
         [err(_EXP, "last.pt")], prepare=remove("run/train/last.pt")),
    Case("export-train-unfinished", "data loss", "last.pt but no train manifest (training killed)",
         [err(_EXP, "--resume")], prepare=remove(_TRAIN_MAN)),
    Case("export-train-outputs-path", "robustness", "train manifest's checkpoint is '../../x'",
         [err(_EXP, "not a file name")],
         prepare=edit_json(_TRAIN_MAN, lambda m: {**m, "outputs": {**m["outputs"], "checkpoint": "../../x"}})),
    Case("export-checkpoint-missing", "traceback", "--checkpoint names nothing",
         [err([*_EXP, *_CKPT, "{ws}/nope.pt"], "no such file")]),
    Case("export-checkpoint-dir", "traceback", "--checkpoint names a directory",
         [err([*_EXP, *_CKPT, "{ws}"], "is a directory")]),
    Case("export-checkpoint-garbage", "traceback", "--checkpoint is not a torch file",
         [err([*_EXP, *_CKPT, "{ws}/g.pt"], "g.pt")], prepare=write("g.pt", b"\x00garbage")),
    Case("export-checkpoint-malicious", "robustness", "a checkpoint whose pickle would run a command",
         [err([*_EXP, *_CKPT, "{ws}/mal.pt"], "mal.pt")], prepare=malicious_pickle("mal.pt"),
         check=absent("pwned")),
    Case("export-checkpoint-malicious-raw", "traceback", "a raw pickle (protocol 4) that would run a command: "
         "no torch warning before the line", [err([*_EXP, *_CKPT, "{ws}/mal.pt"], "mal.pt")],
         prepare=malicious_pickle("mal.pt", torch_format=False), check=absent("pwned")),
    Case("export-readonly", "traceback", "export into a read-only run folder",
         [err(_EXP, "Permission denied", unprivileged=True)], prepare=readonly(), needs="unprivileged"),
    Case("export-disk-full", "traceback", "export on a disk with 150 kB free",
         [err(["export", "--run", "{ws}/full/run", *FAST_EXPORT, "--bits", "W4A8"], "No space left")],
         prepare=full_disk(150), needs="mount"),
    Case("export-file-size-limit", "traceback", "export where no file may exceed 100 kB (ulimit -f)",
         [err([*_EXP, "--bits", "W4A8"], "cannot write", fsize=100_000)], check=same_as_good("export")),
    Case("export-run-is-file", "traceback", "--run names a file",
         [err(["export", "--run", "{ws}/afile"], "is a file")], prepare=write("afile", "x")),
    Case("export-run-300-chars", "traceback", "a 300-character run name",
         [err(["export", "--run", "{ws}/" + "e" * 300], "255")]),
    Case("export-onnx-no-data", "nonsense", "--onnx without --data", [err([*_EXP, "--onnx", "{ws}/x.onnx"],
                                                                        "--data")]),
    Case("export-onnx-garbage", "traceback", "--onnx is not ONNX",
         [err([*_EXP, "--onnx", "{ws}/x.onnx", "--data", "synthetic"], "x.onnx")], prepare=write("x.onnx", "no")),
    Case("export-onnx-dir", "traceback", "--onnx names a directory",
         [err([*_EXP, "--onnx", "{ws}", "--data", "synthetic"], "is a directory")]),
    Case("export-onnx-missing", "traceback", "--onnx names nothing",
         [err([*_EXP, "--onnx", "{ws}/n.onnx", "--data", "synthetic"], "no such ONNX file")]),
    Case("export-data-missing", "traceback", "--data names nothing", [err([*_EXP, "--data", "{ws}/nope"], "nope")]),
    Case("export-mixed-precision-no-room", "nonsense", "--mixed-precision 4 with --keep-first-last-8bit: the two "
         "8-bit layers leave no room for a 4-bit average", [err([*_EXP, "--bits", "W4A8", "--mixed-precision", "4",
                                                               "--keep-first-last-8bit"], "fixed width")],
         check=same_as_good("export")),
    Case("export-file-modes", "robustness", "exported files are readable by the group and others (umask)",
         [ok(_EXP)], check=lambda ws: next((f"{p.name} has mode {oct(p.stat().st_mode & 0o777)}" for p in
                                            (ws.run / "export").iterdir() if p.stat().st_mode & 0o044 != 0o044),
                                           None)),
    *[_option("export", _EXP, o, v, pat) for o, v, pat, _ in (
        ("--calib-images", "0", None, "fast"), ("--calib-images", "-1", None, "bench"),
        ("--eval-limit", "0", None, "bench"), ("--eval-limit", "-5", None, "bench"),
        ("--mixed-precision", "1", None, "bench"), ("--mixed-precision", "9", None, "bench"),
        ("--mixed-precision", "3.5", None, "bench"),
        ("--sensitivity", "nope", None, "bench"), ("--sensitivity-images", "0", None, "bench"),
        ("--sensitivity", "kl", "--mixed-precision", "fast"),
        ("--img-size", "0", None, "bench"), ("--bits", "W4", "W4", "bench"), ("--bits", "W9A8", "W9A8", "bench"),
        ("--adaround-iters", "0", None, "bench"), ("--rounding", "nope", None, "bench"),
        ("--four-bit-layout", "nope", None, "bench"))],
    *_manifest_cases("export", _TRAIN_MAN, _EXP, "train"),
]

_COMPILE = ["compile", "--run", "{run}"]
_ONNX = ["compile", "--run", "{ws}/c", "--onnx"]

COMPILE = [
    Case("compile-qdq-swapped", "data loss", "model_qdq.onnx replaced by another valid ONNX after export",
         [err(_COMPILE, "model_qdq.onnx")], prepare=copy("run/export/model_fp32.onnx", "run/export/model_qdq.onnx"),
         check=same_as_good("compile")),
    Case("compile-qdq-truncated", "data loss", "model_qdq.onnx cut short",
         [err(_COMPILE, "manifest.json")], prepare=write("run/export/model_qdq.onnx", b"\x08\x07"),
         check=same_as_good("compile")),
    Case("compile-qdq-missing", "traceback", "model_qdq.onnx deleted", [err(_COMPILE, "model_qdq.onnx")],
         prepare=remove("run/export/model_qdq.onnx")),
    Case("compile-sin", "nonsense", "a Sin node (no integer form), no --allow-float",
         [err([*_ONNX, "{ws}/sin.onnx"], "the_sin")], prepare=qdq_variant("sin", "sin.onnx")),
    Case("compile-sin-allow-float", "valid", "the Sin node with --allow-float",
         [ok([*_ONNX, "{ws}/sin.onnx", "--allow-float"], "the_sin")], prepare=qdq_variant("sin", "sin.onnx")),
    Case("compile-lppool", "nonsense", "GlobalLpPool (no integer form), no --allow-float",
         [err([*_ONNX, "{ws}/lp.onnx"], "the_lppool")], prepare=qdq_variant("lppool", "lp.onnx")),
    Case("compile-lppool-allow-float", "valid", "GlobalLpPool with --allow-float",
         [ok([*_ONNX, "{ws}/lp.onnx", "--allow-float"])], prepare=qdq_variant("lppool", "lp.onnx")),
    Case("compile-dynamic-shape", "nonsense", "symbolic image height and width",
         [err([*_ONNX, "{ws}/dyn.onnx"], "symbolic")], prepare=qdq_variant("dynamic", "dyn.onnx")),
    Case("compile-onnx-dir", "traceback", "--onnx names a directory", [err([*_ONNX, "{ws}"], "is a directory")]),
    Case("compile-onnx-garbage", "traceback", "--onnx is not ONNX", [err([*_ONNX, "{ws}/x.onnx"], "x.onnx")],
         prepare=write("x.onnx", b"not onnx")),
    Case("compile-onnx-missing", "traceback", "--onnx names nothing", [err([*_ONNX, "{ws}/n.onnx"], "n.onnx")]),
    Case("compile-readonly", "traceback", "compile into a read-only run folder",
         [err(_COMPILE, "Permission denied", unprivileged=True)], prepare=readonly(), needs="unprivileged"),
    Case("compile-disk-full", "traceback", "compile on a disk with 100 kB free",
         [err(["compile", "--run", "{ws}/full/run"], "No space left")], prepare=full_disk(100), needs="mount"),
    Case("compile-file-size-limit", "traceback", "compile where no file may exceed 100 kB (ulimit -f)",
         [err(_COMPILE, "cannot write", fsize=100_000)], check=same_as_good("compile")),
    Case("compile-run-is-file", "traceback", "--run names a file", [err(["compile", "--run", "{ws}/afile"],
                                                                       "is a file")], prepare=write("afile", "x")),
    Case("compile-run-300-chars", "traceback", "a 300-character run name",
         [err(["compile", "--run", "{ws}/" + "c" * 300], "255")]),
    Case("compile-export-no-plateau-cfg", "traceback", "export manifest without plateau_cfg",
         [err(_COMPILE, "plateau_cfg")], prepare=edit_json(_EXPORT_MAN, lambda m: {
             k: v for k, v in m.items() if k != "plateau_cfg"})),
    Case("compile-export-qdq-name-int", "traceback", "export manifest's model_qdq.onnx entry is a number",
         [err(_COMPILE, "model_qdq.onnx")], prepare=edit_json(_EXPORT_MAN, lambda m: {
             **m, "outputs": {**m["outputs"], "model_qdq.onnx": 5}})),
    *[_option("compile", _COMPILE, o, v, pat) for o, v, pat in (
        ("--tune-minutes", "-1", None), ("--tune-minutes", "nan", None), ("--target", "sparc", "sparc"),
        ("--requant", "round", None), ("--schedule", "fast", None))],
    *_manifest_cases("compile", _EXPORT_MAN, _COMPILE, "export"),
]

_VAL = ["validate", "--run", "{run}", "--limit", "20"]
_REF = "run/export/reference_logits.npy"

VALIDATE = [
    Case("validate-ref-logits-garbage", "traceback", "reference_logits.npy is garbage",
         [err(_VAL, "reference_logits.npy")], prepare=write(_REF, b"garbage"), check=same_as_good("validate")),
    Case("validate-ref-logits-garbage-legacy", "traceback", "reference_logits.npy garbage, manifest without "
         "hashes (older version)", [err(_VAL, "reference_logits.npy")],
         prepare=seq(write(_REF, b"garbage"), drop_files_record(_EXPORT_MAN))),
    Case("validate-ref-logits-shape-legacy", "nonsense", "reference_logits.npy of the wrong shape (legacy "
         "manifest)", [err(_VAL, "reference_logits.npy")],
         prepare=seq(_npy(_REF, np.zeros(7, np.float32)), drop_files_record(_EXPORT_MAN))),
    Case("validate-ref-logits-nan-legacy", "nonsense", "reference_logits.npy holding NaN (legacy manifest)",
         [err(_VAL, "NaN")], prepare=seq(_npy(_REF, np.full((100, 10), np.nan, np.float32)),
                                          drop_files_record(_EXPORT_MAN))),
    Case("validate-labels-missing", "traceback", "labels.npy deleted", [err(_VAL, "labels.npy")],
         prepare=remove("run/export/labels.npy")),
    Case("validate-labels-missing-legacy", "traceback", "labels.npy deleted (legacy manifest)",
         [err(_VAL, "labels.npy")], prepare=seq(remove("run/export/labels.npy"), drop_files_record(_EXPORT_MAN))),
    Case("validate-labels-shuffled-legacy", "nonsense", "labels.npy that no longer matches the test images",
         [err(_VAL, "labels")], prepare=seq(_npy("run/export/labels.npy", (np.arange(100) % 10)[::-1].copy()),
                                            drop_files_record(_EXPORT_MAN))),
    Case("validate-ort-logits-garbage-legacy", "traceback", "ort_logits.npy garbage (legacy manifest)",
         [err(_VAL, "ort_logits.npy")], prepare=seq(write("run/export/ort_logits.npy", b"x"),
                                                    drop_files_record(_EXPORT_MAN))),
    Case("validate-indices-garbage-legacy", "traceback", "test_indices.npy garbage (legacy manifest)",
         [err(_VAL, "test_indices.npy")], prepare=seq(write("run/export/test_indices.npy", b"x"),
                                                      drop_files_record(_EXPORT_MAN))),
    Case("validate-report-garbage-legacy", "traceback", "export report.json garbage (legacy manifest)",
         [err(_VAL, "report.json")], prepare=seq(write("run/export/report.json", b"{"),
                                                 drop_files_record(_EXPORT_MAN))),
    Case("validate-no-plateau-cfg", "traceback", "export manifest without plateau_cfg (KeyError before)",
         [err(_VAL, "plateau_cfg")], prepare=edit_json(_EXPORT_MAN, lambda m: {
             k: v for k, v in m.items() if k != "plateau_cfg"})),
    Case("validate-scale-string", "traceback", "export manifest's output scale is a string",
         [err(_VAL, "scale")], prepare=edit_json(_EXPORT_MAN, lambda m: {**m, "quantization": {
             **m["quantization"], "output": {**m["quantization"]["output"], "scale": "x"}}})),
    Case("validate-scale-zero", "nonsense", "export manifest's output scale is 0",
         [err(_VAL, "output scale")], prepare=edit_json(_EXPORT_MAN, lambda m: {**m, "quantization": {
             **m["quantization"], "output": {**m["quantization"]["output"], "scale": 0}}})),
    Case("validate-library-garbage", "data loss", "model.so overwritten with garbage",
         [err(_VAL, "model.so")], prepare=write("run/compile/host/model.so", b"\x7fELF garbage")),
    Case("validate-library-flipped", "data loss", "model.so with one byte changed (same size, still ELF)",
         [err(_VAL, "model.so")], prepare=_flip_byte("run/compile/host/model.so")),
    Case("validate-stale-library", "data loss", "the export was redone after compile",
         [err(_VAL, "stale")], prepare=edit_json(_COMP_MAN, lambda m: {
             **m, "inputs": {"onnx": {**m["inputs"]["onnx"], "sha256": "0" * 64}}})),
    Case("validate-readonly", "traceback", "validate into a read-only run folder",
         [err(_VAL, "Permission denied", unprivileged=True)], prepare=readonly(), needs="unprivileged"),
    Case("validate-no-compile", "traceback", "validate a target that was never compiled",
         [err(["validate", "--run", "{run}", "--target", "arm64"], "no compile manifest")]),
    Case("validate-limit-beyond", "valid", "--limit larger than the test images export kept",
         [ok(["validate", "--run", "{run}", "--limit", "100000"])]),
    *[_option("validate", _VAL[:3], o, v, pat) for o, v, pat, _ in (
        ("--limit", "0", None, "fast"), ("--limit", "-5", None, "bench"), ("--limit", "abc", None, "bench"),
        ("--batch-size", "0", None, "bench"), ("--tolerance", "-1", None, "bench"),
        ("--per-layer-images", "0", None, "bench"), ("--device", "nope", None, "bench"))],
    *_manifest_cases("validate", _COMP_MAN, _VAL, "compile"),
]

_BENCH = ["bench", "--run", "{run}"]

BENCH = [
    *[_option("bench", _BENCH, o, v) for o, v in (
        ("--threads", "0"), ("--batch", "0"), ("--engines", "nope"), ("--eval-limit", "-1"),
        ("--max-seconds", "0"), ("--calib-images", "0"), ("--repeats", "0"))],
    Case("bench-minimal", "valid", "bench of the run's own library only",
         [ok([*_BENCH, "--engines", "tvm-int8", "--eval-limit", "0", "--repeats", "2", "--min-repeats", "1",
              "--warmup", "0", "--max-seconds", "0.2", "--batch", "2"])], check=exists("run/bench/host/report.json")),
]

CASES = [*EXPORT, *COMPILE, *VALIDATE, *BENCH]
