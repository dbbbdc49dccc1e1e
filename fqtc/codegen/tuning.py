"""Tile-config autotuning keyed on bucketed shapes: no re-autotune for every sequence length.

A GEMM's bucket is its shape class (``small_m`` / ``large``) and the next powers of two of M, N and K, plus whatever
changes the kernel's code (prologue mode, requantizing epilogue, bias, output dtype). The first launch of a bucket
on CUDA times every candidate config of its class on the real operands (``triton.testing.do_bench``) and keeps the
fastest; every later launch of the bucket (another sequence length, another batch size in the same power of two)
reuses it without timing anything. Candidates that do not compile or exceed the device's resources are skipped.

Results cannot depend on the choice: the GEMM accumulates exactly in int32 (any K blocking gives the same sums),
the epilogue is per element, and stochastic rounding is keyed by element index, not by tile. The launch is
idempotent (each output element is written, never accumulated), so timing a candidate on the real output buffers
is safe. Under the Triton interpreter and with ``FQTC_AUTOTUNE=0`` the first candidate (the documented default)
is used without timing.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Sequence

import triton

Config = tuple[int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)


def bucket(M: int, N: int, K: int) -> tuple[int, int, int]:
    """Next powers of two of the GEMM dims (at least 16): all shapes of one bucket share a tuned config."""
    return tuple(max(16, triton.next_power_of_2(max(1, int(d)))) for d in (M, N, K))  # type: ignore[return-value]


def _do_bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


class BucketTuner:
    """Per-bucket choice among candidate configs, timed once per bucket.

    Args:
        timer: measures one call of a zero-argument launch, in ms (default ``triton.testing.do_bench``).
        enabled: time the candidates (True) or always take the first one (False).
    """

    def __init__(self, timer: Callable[[Callable[[], object]], float] | None = None, enabled: bool = True) -> None:
        self.timer = timer or _do_bench
        self.enabled = enabled
        self.cache: dict[Hashable, Config] = {}
        self.timings: dict[Hashable, dict[Config, float]] = {}

    def pick(self, key: Hashable, candidates: Sequence[Config], run: Callable[[Config], object]) -> Config:
        """The config for bucket ``key``: cached, else the fastest candidate under ``run`` (which launches the
        kernel with one config). Raises the last error when no candidate runs."""
        if key in self.cache:
            return self.cache[key]
        if not self.enabled or len(candidates) == 1:
            self.cache[key] = candidates[0]
            return candidates[0]
        times: dict[Config, float] = {}
        last_error: Exception | None = None
        for cfg in candidates:
            try:
                times[cfg] = self.timer(lambda cfg=cfg: run(cfg))
            except Exception as e:  # out of shared memory / registers for this tile: not a candidate here
                last_error = e
        if not times:
            assert last_error is not None
            raise last_error
        best = min(times, key=times.__getitem__)
        self.cache[key] = best
        self.timings[key] = times
        return best


def autotune_enabled() -> bool:
    """``FQTC_AUTOTUNE=0`` turns timing off (the first candidate of each class is used)."""
    return os.environ.get("FQTC_AUTOTUNE", "1") != "0"


__all__ = ["BucketTuner", "Config", "autotune_enabled", "bucket"]
