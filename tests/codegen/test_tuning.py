"""Autotuning keyed on bucketed shapes (`fqtc.codegen.tuning`): one timing per bucket, the fastest candidate kept,
results independent of the choice. Under the interpreter the GEMM launcher is made to take its CUDA path
(``_interpreting`` patched off) with a fake timer, so every candidate config really launches."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fqtc.codegen import gemm as kg  # noqa: E402
from fqtc.codegen.tuning import BucketTuner, bucket  # noqa: E402
from fqtc.quant.gemm import scaled_gemm  # noqa: E402
from fqtc.quant.uniform import quantize  # noqa: E402

A, B, C = (64, 64, 64, 1, 4), (32, 64, 32, 1, 4), (16, 32, 64, 1, 4)


def test_bucket_rounds_up_to_powers_of_two():
    assert bucket(37, 50, 100) == (64, 64, 128) == bucket(64, 33, 65)
    assert bucket(1, 1, 1) == (16, 16, 16)


def test_tuner_picks_fastest_once_per_bucket_and_skips_failing_configs():
    times = {A: 3.0, B: 1.0, C: 2.0}
    calls = []

    def timer(fn):
        fn()
        return times[calls[-1]]

    def run(cfg):
        calls.append(cfg)
        if cfg == C:
            raise RuntimeError("out of resources")

    t = BucketTuner(timer=timer)
    assert t.pick("k1", [A, B, C], run) == B
    assert calls == [A, B, C] and set(t.timings["k1"]) == {A, B}  # C failed: not a candidate
    assert t.pick("k1", [A, B, C], run) == B and len(calls) == 3  # cached: nothing timed again
    assert BucketTuner(timer=timer, enabled=False).pick("k1", [A, B, C], run) == A
    with pytest.raises(RuntimeError, match="out of resources"):
        BucketTuner(timer=timer).pick("k2", [C, C], run)  # no candidate runs: the error is raised


def test_gemm_tunes_per_bucket_and_results_do_not_depend_on_the_config(monkeypatch):
    monkeypatch.setattr(kg, "_interpreting", lambda: False)
    monkeypatch.setitem(kg.CANDIDATES, "small_m", [A, B, C])
    timed = []

    def timer(fn):
        fn()
        timed.append(1)
        return float(len(timed) % 3)  # candidates get times 1, 2, 0: the last one (C) wins

    tuner = BucketTuner(timer=timer)
    monkeypatch.setattr(kg, "TUNER", tuner)
    g = torch.Generator().manual_seed(0)
    w, sw = quantize(torch.randn(40, 24, generator=g), 8, [0])
    for M in (37, 50, 20):  # 37 and 50 share bucket 64; 20 is bucket 32
        x, sx = quantize(torch.randn(M, 40, generator=g), 8, [1])
        got = kg.scaled_gemm(x, sx, w, sw, None, torch.float32)
        torch.testing.assert_close(got, scaled_gemm(x, sx, w, sw), rtol=0, atol=0)
        for cfg in (A, B, C):  # every candidate gives the same bits
            monkeypatch.setitem(kg.CANDIDATES, "small_m", [cfg])
            fresh = BucketTuner(timer=timer, enabled=False)
            monkeypatch.setattr(kg, "TUNER", fresh)
            out = kg.scaled_gemm(x, sx, w, sw, None, torch.float32)
            torch.testing.assert_close(out, got, rtol=0, atol=0)
        monkeypatch.setattr(kg, "TUNER", tuner)
        monkeypatch.setitem(kg.CANDIDATES, "small_m", [A, B, C])
    assert len(tuner.cache) == 2 and len(timed) == 6  # two buckets, three candidates timed in each
    assert all(cfg == C for cfg in tuner.cache.values())
