"""``fqtc bench kernels``: the analytic traffic model (hand-checked on one shape) and the printed report."""

from __future__ import annotations

import pytest

from fqtc.cli import main as cli_main
from fqtc.codegen import bench


def _by_kernel(ms):
    return {m.kernel: m for m in ms}


def test_model_matches_hand_count():
    M, N, K = 256, 128, 512  # fp32 activation, bf16 output
    ms = _by_kernel(bench.models([(M, N, K)], "fp32", "bf16"))
    # int8 GEMM: codes A (M*K) + row scales (4M) + codes B (K*N) + col scales (4N) + bias (2N) + out (2MN)
    assert ms["gemm/int8"].bytes == M * K + 4 * M + K * N + 4 * N + 2 * N + 2 * M * N
    assert ms["gemm/int8"].flops == 2 * M * N * K
    # fused prologue: fp32 A read once + codes/scales written, the rest as above
    fused_min = 4 * M * K + K * N + 4 * N + 2 * N + 2 * M * N + M * K + 4 * M
    assert ms["gemm/fused_quant/row"].min_bytes == fused_min
    assert ms["gemm/fused_quant/row"].ratio == 1.0
    # per-tensor prologue pays one more read of A (the partial-amax pass)
    assert ms["gemm/fused_quant/tensor"].bytes == fused_min + 4 * M * K
    # the unfused chain writes the codes and reads them back: more than the fused kernel
    assert ms["chain quantize/row + gemm"].bytes > ms["gemm/fused_quant/row"].bytes
    # quantize per row: read-once (row fits one tile)
    assert ms["quantize/row"].bytes == 4 * M * K + M * K + 4 * M == ms["quantize/row"].min_bytes


# Fused kernels whose input must be read once before the fused pass can start (a whole-tensor amax; BHQ's row
# ranges that build its transform): over the bound by construction, reported as such by the bench, never hidden.
OVER_BOUND = {"gemm/fused_quant/tensor", "gradq/bhq"}


def test_fused_ratios_within_bound_except_two_pass():
    """Issue 6 acceptance: fused kernels <= 1.1x the minimum, except the two documented two-pass kernels."""
    ms = bench.models([(4096, 4096, 4096), (8192, 11008, 4096), (4096, 256, 4096)], "bf16", "bf16")
    for m in ms:
        if m.fused and m.kernel not in OVER_BOUND:
            assert m.ratio <= bench.FUSED_RATIO_LIMIT, (m.kernel, m.shape, m.ratio)
    over = {m.kernel for m in ms if m.fused and m.ratio > bench.FUSED_RATIO_LIMIT}
    assert over == OVER_BOUND


def test_cli_prints_every_kernel(capsys):
    assert cli_main(["bench", "kernels", "--shape", "256x128x512", "--a-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    for k in ("quantize/row", "quantize/row/int4", "quantize/col", "quantize/tensor", "gemm/int8",
              "gemm/fused_quant/row", "gemm/fused_quant/tensor", "gemm/fused_quant/row+requant"):
        assert f"\n{k} " in out
    for k in ("gradq/psq", "gradq/bhq", "lwq_update/sgd", "conv/output (im2col+gemm)", "conv/grad_input"):
        assert f"\n{k}" in out
    assert "fused kernels over 1.1x the minimum: gemm/fused_quant/tensor" in out


def test_cli_rejects_bad_shape(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "3x4"])
    assert "MxNxK" in capsys.readouterr().err


def test_timed_closures_launch_every_kernel():
    """The closures `fqtc bench kernels` times on CUDA, run once here under the interpreter on a small shape."""
    pytest.importorskip("triton")
    ms = bench.models([(64, 32, 64)], "fp32", "fp32")
    bench._attach_runs(ms, [(64, 32, 64)], "fp32", "fp32", device="cpu")
    runs = [m for m in ms if m.run is not None]
    assert {m.kernel for m in runs} == {m.kernel for m in ms if m.kernel.startswith(("quantize/", "gemm/", "gradq/"))}
    for m in runs:
        m.run()
