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
    assert ms["gemm/fused_quant/row (own statistic)"].min_bytes == fused_min
    assert ms["gemm/fused_quant/row (own statistic)"].ratio == 1.0  # the row sweep stays in L2 at this shape
    assert ms["gemm/fused_quant/row"].bytes == ms["gemm/fused_quant/row"].min_bytes == fused_min + 4 * M
    # per-tensor prologue: the amax (4 bytes) comes from A's producer, A is read once
    assert ms["gemm/fused_quant/tensor"].bytes == ms["gemm/fused_quant/tensor"].min_bytes == fused_min + 4
    # called without the producer's statistic it pays one more read of A (the partial-amax pass)
    assert ms["gemm/fused_quant/tensor (own statistic)"].bytes == fused_min + 4 * M * K
    assert not ms["gemm/fused_quant/tensor (own statistic)"].fused
    # quantize per tensor: read once with the producer's amax; twice without; the statistic alone reads x once
    assert ms["quantize/tensor"].bytes == 4 * M * K + M * K + 4 + 4
    assert ms["quantize/tensor (own statistic)"].bytes == 2 * 4 * M * K + M * K + 4
    assert ms["stat/amax (standalone)"].bytes == 4 * M * K + 4
    # BHQ: g read once (fp32 here), dequantized fp32 written, row ranges (4 bytes per row) from the producer
    assert ms["gradq/bhq"].bytes == ms["gradq/bhq"].min_bytes == 4 * M * K + 4 * M * K + 4 * M
    assert ms["gradq/bhq (own statistic)"].bytes == 3 * 4 * M * K
    # the unfused chain writes the codes and reads them back: more than the fused kernel
    assert ms["chain quantize/row + gemm"].bytes > ms["gemm/fused_quant/row"].bytes
    # quantize per row: read-once (row fits one tile)
    assert ms["quantize/row"].bytes == 4 * M * K + M * K + 4 * M == ms["quantize/row"].min_bytes


def test_lwq_and_conv_models_match_hand_count():
    ms = bench.models([(256, 128, 512)], "bf16", "bf16", conv_shapes=[(2, 16, 10, 10, 32, 3)])
    lwq = _by_kernel(ms)["lwq_update/adamw"]
    # packed q and r (N*K/2 each) + scales, read and written; bf16 gradient; fp32 m and v read and written
    N, K = 128, 512
    assert lwq.bytes == lwq.min_bytes == 2 * (N * K + 4 * N) + 2 * N * K + 16 * N * K
    conv = _by_kernel([m for m in ms if m.kernel.startswith("conv/")])
    x, w, y = 2 * 16 * 100, 32 * 16 * 9, 2 * 32 * 100  # int8 input, weight, grad_output codes
    # forward: codes, weight, per-sample and per-channel scales, bf16 bias and output; the input read once
    assert conv["conv/output (implicit gemm)"].bytes == x + w + 4 * 2 + 4 * 32 + 2 * 32 + 2 * y
    assert conv["conv/grad_input (implicit gemm)"].bytes == y + w + 4 * 2 + 4 * 16 + 2 * x
    assert conv["conv/grad_weight (implicit gemm)"].bytes == x + y + 4 * 16 + 4 * 32 + 2 * w
    assert all(m.ratio == 1.0 and m.flops == 2 * 2 * 100 * 32 * 16 * 9 for m in conv.values())
    assert "gathers 9x from L2" in conv["conv/output (implicit gemm)"].note


def test_conv_model_charges_gathers_when_l2_overflows():
    """2048 input channels: two waves' input rows (2 * 132 * 128 positions * 2048 B = 66 MiB) exceed L2, so every
    one of the 9 tap gathers is charged to DRAM."""
    n, c, h, w, co = 32, 2048, 32, 32, 64
    (fwd,) = [m for m in bench._conv_models(n, c, h, w, co, 3, "bf16") if m.kernel.startswith("conv/output")]
    x = n * c * h * w
    assert fwd.bytes - fwd.min_bytes == 8 * x
    assert "> L2" in fwd.note and fwd.ratio > bench.FUSED_RATIO_LIMIT


def test_fused_ratios_within_bound():
    """Every fused kernel, as the codegen pass launches it, <= 1.1x the minimum. The same
    kernels without the producer's statistic (direct API use) are listed as such, and over the bound."""
    ms = bench.models([(4096, 4096, 4096), (8192, 11008, 4096), (16, 4096, 4096), (4096, 256, 4096),
                       (4096, 4096, 16384)], "bf16", "bf16")
    for m in ms:
        if m.fused:
            assert m.ratio <= bench.FUSED_RATIO_LIMIT, (m.kernel, m.shape, m.ratio)
    own = {m.kernel for m in ms if "own statistic" in m.kernel and m.ratio > bench.FUSED_RATIO_LIMIT}
    # ... including the per-row prologue's sweep at K=16384, where GROUP_M row slabs of A overflow L2
    assert own == {"quantize/tensor (own statistic)", "gemm/fused_quant/tensor (own statistic)",
                   "gemm/fused_quant/row (own statistic)", "gradq/bhq (own statistic)"}
    assert all(not m.fused for m in ms if "own statistic" in m.kernel or m.kernel.startswith("stat/"))
    long_rows = [m for m in ms if m.kernel == "quantize/row" and m.shape.startswith("4096x16384")]
    assert long_rows and "from the producer" in long_rows[0].note


def test_cli_prints_every_kernel(capsys):
    assert cli_main(["bench", "kernels", "--shape", "256x128x512", "--a-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    for k in ("quantize/row", "quantize/row/int4", "quantize/col", "quantize/tensor", "gemm/int8",
              "gemm/fused_quant/row", "gemm/fused_quant/tensor", "gemm/fused_quant/row+requant"):
        assert f"\n{k} " in out
    for k in ("gradq/psq", "gradq/bhq", "lwq_update/sgd", "lwq_update/adamw", "conv/output (implicit gemm)",
              "conv/grad_input (implicit gemm)", "conv/grad_weight (implicit gemm)"):
        assert f"\n{k}" in out
    assert "fused kernels modelled over 1.1x the minimum: none" in out


def test_cli_rejects_bad_shape(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "3x4"])
    assert "MxNxK" in capsys.readouterr().err


def test_timed_closures_launch_every_kernel():
    """The closures `fqtc bench kernels` times on CUDA, run once here under the interpreter on a small shape."""
    pytest.importorskip("triton")
    conv = [(2, 4, 6, 6, 8, 3)]
    ms = bench.models([(64, 32, 64)], "fp32", "fp32", conv_shapes=conv)
    bench._attach_runs(ms, [(64, 32, 64)], "fp32", "fp32", device="cpu", conv_shapes=conv)
    runs = [m for m in ms if m.run is not None]
    assert {m.kernel for m in runs} == {m.kernel for m in ms if not m.kernel.startswith("chain ")}
    for m in runs:
        m.run()
