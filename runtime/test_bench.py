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
