"""plateau bench's pieces: the stability loop, one engine measured in its own process (no timing asserts)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from plateau.errors import PlateauError
from plateau.runtime import bench
from plateau.runtime._bench_worker import time_until_stable


def test_time_until_stable_counts():
    r = time_until_stable(lambda: None, warmup=2, min_repeats=10, max_repeats=40, max_seconds=5)
    assert 10 <= r["repeat"] <= 40 and r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    capped = time_until_stable(lambda: None, warmup=0, min_repeats=100, max_repeats=7, max_seconds=5)
    assert capped["repeat"] == 7 and capped["stable"] is False


def test_measure_tvm_engine_in_subprocess(artifacts, inputs, tmp_path):
    args = argparse.Namespace(threads=1, batch=4, warmup=1, min_repeats=5, repeats=10, max_seconds=1.0)
    lib = artifacts("host", "int8") / "model.so"
    res, out = bench._measure("tvm", lib, "local", args, inputs[:4], inputs, tmp_path, "t")
    assert set(res["latency"]) == {"batch_1", "batch_4"}
    assert res["latency"]["batch_4"]["repeat"] >= 3
    assert res["peak_rss_mb"] > 0 and out.shape == (len(inputs), 10)
    from plateau.runtime import run_artifact

    np.testing.assert_array_equal(out, run_artifact(artifacts("host", "int8"), inputs).outputs)


def test_measure_bad_artifact(tmp_path, inputs):
    (tmp_path / "model.so").write_bytes(b"not a library")
    args = argparse.Namespace(threads=1, batch=2, warmup=0, min_repeats=3, repeats=3, max_seconds=1.0)
    with pytest.raises(PlateauError, match="bench worker .* failed"):
        bench._measure("tvm", tmp_path / "model.so", "local", args, inputs[:2], None, tmp_path, "t")


def test_engine_names():
    assert bench._engines("tvm-int8, ort-fp32") == ["tvm-int8", "ort-fp32"]
    with pytest.raises(PlateauError, match="unknown engine 'tvm-int2'; valid: tvm-int8"):
        bench._engines("tvm-int2")


def test_onnxruntime_int8_note_on_x86_without_vnni(monkeypatch):
    """Where onnxruntime's U8S8 kernels saturate (x86-64 without VNNI) the report warns beside its int8 engines;
    nowhere else, and not when only its FP32 engine ran."""
    rows = [{"engine": "TVM int8", "runtime": "TVM", "bits": "W8A8"},
            {"engine": "ORT fp32", "runtime": "onnxruntime", "bits": "fp32"},
            {"engine": "ORT int8 QDQ u8s8", "runtime": "onnxruntime", "bits": "W8A8"}]
    monkeypatch.setattr(bench, "ort_u8s8_saturates", lambda: True)
    note = bench.ort_int8_note("local", rows)
    assert note is not None and "without VNNI" in note and "saturates" in note
    assert bench.ort_int8_note("local", rows[:2]) is None  # no onnxruntime int8 engine
    assert bench.ort_int8_note("qemu", rows) is None  # onnxruntime ran on no x86 CPU
    report = {"model": "m", "target": "host", "device": "local", "emulated": False, "machine": "x86_64 cpu",
              "threads": 2, "date": "today", "note": "one run", "onnxruntime_int8_note": note,
              "settings": {"warmup": 1, "min_repeats": 1, "max_repeats": 1, "max_seconds": 1}, "eval_images": 1,
              "batches": [1], "engines": [], "failed": [], "skipped": []}
    text = bench.render_document(report).markdown()
    assert "without VNNI" in text
    monkeypatch.setattr(bench, "ort_u8s8_saturates", lambda: False)
    assert bench.ort_int8_note("local", rows) is None
