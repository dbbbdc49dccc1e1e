"""Numerics of the uniform quantizer, the counter-based RNG and the integer GEMM reference."""

import math

import pytest
import torch
from torch.testing import assert_close

from fqtc.quant import int_gemm, quantize, scaled_gemm
from fqtc.quant.rng import mix32, mix32_int, stream_key, uniform_from_index, uniform_like


def test_mix32_matches_python_uint32_arithmetic():
    vals = [0, 1, 2, 0xFFFFFFFF, 0x12345678, 0x9E3779B9, 123456789]
    got = mix32(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [mix32_int(v) for v in vals]


def test_int32_fast_path_matches_int64_reference():
    x = torch.empty(3, 70_001)
    for seed, step, stream in [(0, 0, 0), (7, 123456789012, 0xFFFFFFFF), (2**31 + 5, 3, 17)]:
        key = stream_key(seed, step, stream)
        idx = torch.arange(x.numel(), dtype=torch.int64).view(x.shape)
        assert torch.equal(uniform_like(x, seed=seed, step=step, stream=stream), uniform_from_index(idx, key))


def test_uniform_draws_are_uniform_and_keyed():
    x = torch.empty(200_000)
    u = uniform_like(x, seed=3, step=7, stream=11)
    assert 0.0 <= u.min() and u.max() < 1.0
    # mean 1/2 and variance 1/12 of U[0,1): standard errors 6.5e-4 and 1.9e-4 at n=2e5; 5-sigma tolerances
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / u.numel())
    assert torch.equal(u, uniform_like(x, seed=3, step=7, stream=11)), "same key must replay the same draws"
    for other in [(4, 7, 11), (3, 8, 11), (3, 7, 12)]:
        seed, step, stream = other
        assert not torch.equal(u, uniform_like(x, seed=seed, step=step, stream=stream)), \
            f"key {other} must give a different stream"
    # step may be a tensor (the graph's step counter): same key as the int
    assert torch.equal(stream_key(3, torch.tensor(7), 11), stream_key(3, 7, 11))
    # neighbouring elements are uncorrelated (lag-1 correlation ~ N(0, 1/n))
    c = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(c) < 5 / math.sqrt(u.numel())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dims", [[0, 1], [1], [0]])
def test_nearest_quantizer_bounds_and_scales(bits, dims):
    torch.manual_seed(0)
    x = torch.randn(33, 17) * torch.logspace(-2, 2, 17)
    q, s = quantize(x, bits, dims, "nearest")
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.abs().max() <= qmax
    assert s.shape == tuple(1 if i in dims else n for i, n in enumerate(x.shape))
    assert ((q.float() * s - x).abs() <= s / 2 * (1 + 1e-6)).all()
    assert_close(q.float(), torch.round(x / s))  # round-half-to-even of x/s, then clamp (never active here)
    # the largest element of each group maps to +-qmax exactly
    assert (q.abs().amax(dim=dims) == qmax).all()


def test_zero_group_gets_unit_scale():
    x = torch.zeros(4, 8)
    x[1] = torch.randn(8)
    q, s = quantize(x, 8, [1], "nearest")
    assert torch.equal(s[0], torch.ones(1)) and torch.equal(q[0], torch.zeros(8, dtype=torch.int8))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_non_finite_groups_stay_non_finite(rounding):
    """A NaN or Inf in a group is never turned into finite codes: its scale is NaN/Inf, its codes 0, and the
    dequantized group is NaN; the other groups are untouched (fqtc.quant.uniform's non-finite policy)."""
    x = torch.randn(5, 8)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    q, s = quantize(x, 8, [1], rounding, seed=3, step=4, stream=5)
    assert torch.isnan(s[1]).all() and torch.isinf(s[3]).all()
    assert (q[1] == 0).all() and (q[3] == 0).all()
    assert torch.isnan(q[[1, 3]].float() * s[[1, 3]]).all()
    ok = [0, 2, 4]
    q_ok, s_ok = quantize(x[ok], 8, [1], rounding, seed=3, step=4, stream=5)
    assert torch.isfinite(s[ok]).all() and torch.equal(s[ok], s_ok)
    if rounding == "nearest":  # SR draws are keyed by element index, which differs in the sub-tensor
        assert torch.equal(q[ok], q_ok)
    qt, st = quantize(x, 8, [0, 1], rounding)  # one scale: the whole tensor is non-finite
    assert torch.isnan(st).all() and (qt == 0).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_unbiased_and_variance_bound(bits):
    """E[s*q] = x and Var[s*q] = s^2 f(1-f) (f = frac(x/s)), over n = 20,000 independent draws per element."""
    torch.manual_seed(1)
    n = 20_000
    x = torch.randn(64)
    x[0] = 3.0  # pins the per-tensor scale: amax is 3.0 in every row
    rows = x.repeat(n, 1)  # one scale for all rows; each element of each row draws its own U[0,1)
    q, s = quantize(rows, bits, [0, 1], "stochastic", seed=5, step=0, stream=1)
    sv = s.item()
    deq = q.float() * sv
    f = x / sv - torch.floor(x / sv)
    var_theory = sv**2 * f * (1 - f)
    # mean: standard error sqrt(var/n) <= s/(2 sqrt n); 5 sigma bound per element (64 elements)
    atol = 5 * sv / (2 * math.sqrt(n))
    # pooled over all n*64 errors in units of the step (a z-test on the mean): 1.3M draws give a standard error of
    # ~4e-4 steps, so a rounding bias of 1% of a step (z ~ 25) fails, where the per-element bound below allows 1.8%
    e = ((deq - x) / sv).double()
    z = float(e.mean() / (e.std() / math.sqrt(e.numel())))
    assert abs(z) < 5, z
    assert ((deq.mean(0) - x).abs() <= atol).all()
    # variance: empirical within 10% of s^2 f(1-f) (relative std of a sample variance of a Bernoulli ~ 1/sqrt(n)),
    # and never above the bound s^2/4
    emp = deq.var(0)
    big = var_theory > 1e-2 * sv**2
    assert torch.allclose(emp[big], var_theory[big], rtol=0.1)
    assert (emp <= sv**2 / 4 * 1.05).all()
    assert ((deq - x).abs() < sv * (1 + 1e-6)).all()  # one grid step at most


def test_stochastic_rounding_deterministic_per_seed_and_step():
    x = torch.randn(128, 64)
    a = quantize(x, 4, [1], "stochastic", seed=0, step=3, stream=9)[0]
    assert torch.equal(a, quantize(x, 4, [1], "stochastic", seed=0, step=3, stream=9)[0])
    assert not torch.equal(a, quantize(x, 4, [1], "stochastic", seed=0, step=4, stream=9)[0])
    assert not torch.equal(a, quantize(x, 4, [1], "stochastic", seed=1, step=3, stream=9)[0])


@pytest.mark.parametrize("path", ["int_mm", "fp32"])
@pytest.mark.parametrize("shape", [(7, 13, 5), (64, 1024, 32), (5, 2500, 9), (3, 6, 70, 11)])
def test_int_gemm_exact_vs_int64(shape, path):
    torch.manual_seed(0)
    if len(shape) == 3:
        m, k, n = shape
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    else:
        bsz, m, k, n = shape
        a = torch.randint(-127, 128, (bsz, m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (bsz, k, n), dtype=torch.int8)
    # worst case too: all +127 products (the chunking bound 1024*127^2 < 2^24)
    a[..., 0, :] = 127
    b[..., :, 0] = 127
    a[..., 1, :] = -128  # full int8 range, as torch._int_mm is documented for
    b[..., :, 1] = -128
    ref = torch.matmul(a.long(), b.long())
    out = int_gemm(a, b, path)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), ref)


@pytest.mark.parametrize("sa,sb", [((2, 3, 17, 40), (40, 9)), ((2, 3, 17, 40), (2, 3, 40, 9)),
                                   ((2, 1, 17, 40), (1, 3, 40, 9)), ((4, 17, 40), (1, 40, 9))])
def test_int_gemm_paths_equal_on_same_codes(sa, sb):
    """The two CPU integer GEMMs (torch._int_mm and fp32 emulation) give the same int32 on the same codes, also on
    transposed (non-contiguous) operands and broadcast batch dims: the bits do not depend on the machine."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, sa, dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, sb, dtype=torch.int8, generator=g)
    bt = torch.randint(-128, 128, sb, dtype=torch.int8, generator=g).transpose(-1, -2).contiguous().transpose(-1, -2)
    for rhs in (b, bt):
        ref = torch.matmul(a.long(), rhs.long())
        assert torch.equal(int_gemm(a, rhs, "int_mm").long(), ref)
        assert torch.equal(int_gemm(a, rhs, "fp32"), int_gemm(a, rhs, "int_mm"))


def test_cpu_gemm_choice_recorded_and_overridable(monkeypatch):
    from fqtc.quant import gemm

    info = gemm.probe_cpu_gemm()
    assert info["path"] in gemm.CPU_GEMM_PATHS and info["reason"]
    if not gemm.cpu_int8_dot_flags():  # an AVX2-only CPU never takes the slow _int_mm path
        assert info["path"] == "fp32"
    gemm.probe_cpu_gemm.cache_clear()
    try:
        monkeypatch.setenv("FQTC_CPU_INT_GEMM", "fp32")
        assert gemm.cpu_gemm_path() == "fp32"
        gemm.probe_cpu_gemm.cache_clear()
        monkeypatch.setenv("FQTC_CPU_INT_GEMM", "int8")
        with pytest.raises(ValueError, match="FQTC_CPU_INT_GEMM"):
            gemm.cpu_gemm_path()
    finally:
        gemm.probe_cpu_gemm.cache_clear()
    with pytest.raises(ValueError, match="unknown integer GEMM path"):
        int_gemm(torch.zeros(2, 2, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8), "fast")


@pytest.mark.parametrize("ratio, want", [(0.4, "int_mm"), (1.3, "int_mm"), (3.0, "fp32")])
def test_cpu_gemm_probe_margin(ratio, want, monkeypatch):
    """With int8 dot-product flags, `_int_mm` stays chosen while the probe times it within `PROBE_MARGIN` of fp32
    `mm` (load swings timings by tens of percent), and is dropped when it is clearly slower."""
    from fqtc.quant import gemm

    monkeypatch.delenv("FQTC_CPU_INT_GEMM", raising=False)
    monkeypatch.setattr(gemm, "cpu_int8_dot_flags", lambda: ["avx512_vnni"])
    times = iter([ratio, 1.0])  # _int_mm, then fp32 mm
    monkeypatch.setattr(gemm, "_min_ms", lambda fn, reps=9: next(times))
    gemm.probe_cpu_gemm.cache_clear()
    try:
        info = gemm.probe_cpu_gemm()
        assert info["path"] == want, info
        assert (info["int_mm_ms"], info["fp32_ms"]) == (ratio, 1.0)
    finally:
        gemm.probe_cpu_gemm.cache_clear()


def test_scaled_gemm_matches_dequantized_product():
    torch.manual_seed(0)
    x, w = torch.randn(9, 40), torch.randn(40, 6)
    qa, sa = quantize(x, 8, [1], "nearest")
    qb, sb = quantize(w, 8, [0], "nearest")
    bias = torch.randn(6)
    out = scaled_gemm(qa, sa, qb, sb, bias)
    ref = (qa.double() * sa.double()) @ (qb.double() * sb.double()) + bias.double()
    assert_close(out, ref.float())
    # a scale along K (per-column of the left operand) takes the dequantized path: same product
    qc, sc = quantize(x, 8, [0], "nearest")
    assert_close(scaled_gemm(qc, sc, qb, sb), ((qc.double() * sc) @ (qb.double() * sb)).float())
    # a float operand (scale None)
    assert_close(scaled_gemm(x, None, qb, sb), (x.double() @ (qb.double() * sb)).float())


def test_gemm_path_per_shape(monkeypatch):
    """Small per-batch products with K within one exact fp32 chunk take one fp32 batched GEMM on a machine whose
    GEMM is _int_mm; 2-D products, shared right operands, large or long-K products keep the machine's path; a
    forced path is always honoured. Both paths give the same int32 (test_int_gemm_paths_equal_on_same_codes)."""
    from fqtc.quant import gemm

    monkeypatch.setattr(gemm, "cpu_gemm_path", lambda: "int_mm")
    assert gemm.gemm_path((32, 128, 64), (32, 64, 128)) == "fp32"  # 1M multiply-adds per head
    assert gemm.gemm_path((2, 4, 128, 64), (2, 4, 64, 128)) == "fp32"
    assert gemm.gemm_path((8, 512, 64), (8, 64, 512)) == "int_mm"  # 16M per batch: the int8 loop is faster
    assert gemm.gemm_path((4, 16, 2048), (4, 2048, 16)) == "int_mm"  # K beyond one exact fp32 chunk
    assert gemm.gemm_path((256, 1024), (1024, 1024)) == "int_mm"  # 2-D
    assert gemm.gemm_path((4, 16, 64), (64, 32)) == "int_mm"  # shared right operand: one GEMM over all rows
    assert gemm.gemm_path((32, 128, 64), (32, 64, 128), "int_mm") == "int_mm"
    monkeypatch.setattr(gemm, "cpu_gemm_path", lambda: "fp32")
    assert gemm.gemm_path((8, 512, 64), (8, 64, 512)) == "fp32"
