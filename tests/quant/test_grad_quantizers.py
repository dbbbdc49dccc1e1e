"""Gradient quantizers PTQ/PSQ/SCQ/BHQ/AQ: unbiasedness, variance bounds, BHQ's reflection, AQ's bit
budget, the variance ordering on heavy-tailed gradients, bad input, config validation and the ops' fake impls.

Statistical tests are deterministic: the stochastic-rounding stream is counter-based, so a test draws the same bits
on every run; the tolerances are still derived from the variance so that they would hold for any seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from fqtc.config import FQTConfig
from fqtc.quant import gradq as G

R = 400  # seeds (steps) per statistical test


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of small-tensor quantizations: on the shared 2-core machine intra-op threads
    only contend (measured 20 s vs 0.9 s for 200 BHQ calls on 64x64 under load), so run them single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def heavy_tailed(n: int = 32, c: int = 48, heavy: int = 2, factor: float = 100.0, seed: int = 0) -> torch.Tensor:
    """A gradient whose first ``heavy`` rows are ``factor`` x larger: most samples are already fit (tiny grads)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:heavy] *= factor
    return x


# (quantizer, bits, reduce_dims): SCQ's two groupings, PSQ/BHQ per sample (PSQ also at 1 bit), AQ at an average of
# 1 and 2 bits
CASES = [
    ("ptq", 4, [0, 1]),
    ("psq", 4, [1]),
    ("psq", 1, [1]),  # the two-level form: codes -1/+1
    ("scq", 4, [1]),  # grad_input: samples
    ("scq", 4, [0]),  # grad_weight: channels
    ("bhq", 4, [1]),
    ("bhq", 2, [1]),
    ("aq", 1, [1]),
    ("aq", 2, [0]),
]


def _samples(x, name, bits, dims, n=R, stream=7):
    outs = [G.grad_dequantize(G.grad_quantize(x, name, bits, dims, "stochastic", 0, s, stream), name, dims)
            for s in range(n)]
    return torch.stack(outs).double()


@pytest.mark.parametrize("name,bits,dims", CASES, ids=[f"{c[0]}{c[1]}-{c[2]}" for c in CASES])
def test_unbiased_and_variance_within_bound(name, bits, dims):
    x = heavy_tailed()
    s = _samples(x, name, bits, dims)
    q = G.grad_quantize(x, name, bits, dims, "stochastic", 0, 0, 7)
    vb = G.variance_bound(x, q, name, dims).double()
    if name == "bhq":  # BHQ's transform depends only on x, so the bound is the same for every step
        assert torch.equal(q.aux["order"], G.grad_quantize(x, name, bits, dims, "stochastic", 0, 5, 7).aux["order"])
    # Unbiased: the mean of R draws deviates from x by sigma/sqrt(R) per element, sigma^2 <= vb. 5.5 sigma over
    # 1536 elements (Gaussian tail 4e-8 each); the small atol covers fp32 rounding of exactly representable values.
    tol = 5.5 * torch.sqrt(vb / R) + 1e-5 * x.abs().max()
    err = (s.mean(0) - x.double()).abs()
    assert bool((err <= tol).all()), f"{name}: max err/tol {float((err / tol).max()):.2f}"
    # Pooled over elements: the summed error of each draw, d_r = sum_i (xhat_ri - x_i), is i.i.d. over the R draws
    # whatever the correlation between elements (BHQ's transform mixes them), so a z-test on its mean is exact.
    # A bias of 1% of a step on every element adds 0.01 * sum_i s_i to E[d]: ~15 standard errors here.
    d = (s - x.double()).sum(dim=(1, 2))
    z = float(d.mean() / (d.std() / math.sqrt(R)))
    assert abs(z) < 5, f"{name}: pooled z = {z:.2f}"
    # Variance within its bound. The bounds are the exact SR variances given the scales (s^2 f(1-f), which is
    # <= s^2/4), so the empirical total variance must match them within sampling error: relative SE of a sum of
    # 1536 per-element variance estimates from 400 draws is ~1-5% (AQ's Bernoulli draws are heavier: 10%).
    emp, bound = float(s.var(0).sum()), float(vb.sum())
    slack = 0.15 if name == "aq" else 0.08
    assert emp <= bound * (1 + slack), f"{name}: empirical {emp:.4g} > bound {bound:.4g}"
    assert emp >= bound * (1 - slack), f"{name}: bound {bound:.4g} is not tight (empirical {emp:.4g})"


def test_psq_one_bit_is_two_levels():
    """PSQ at 1 bit: every code of a nonzero group is -1 or +1 (two levels, ±max|x_i| per sample, one bit each),
    nearest rounding is the sign, an all-zero row keeps zero codes and a row with a NaN dequantizes to NaN while
    the other rows stay finite."""
    x = heavy_tailed(16, 24)
    x[5] = 0.0
    for rounding in ("stochastic", "nearest"):
        q = G.grad_quantize(x, "psq", 1, [1], rounding, 0, 3, 7)
        assert q.codes.dtype == torch.int8
        nonzero = torch.ones(16, dtype=torch.bool)
        nonzero[5] = False
        assert set(q.codes[nonzero].unique().tolist()) == {-1, 1}
        assert bool((q.codes[5] == 0).all()) and float(q.scale[5]) == 1.0
        torch.testing.assert_close(q.scale[nonzero].flatten(), x.abs().amax(1)[nonzero])
        if rounding == "nearest":
            assert torch.equal(q.codes[nonzero], torch.where(x[nonzero] >= 0, 1, -1).to(torch.int8))
    xn = x.clone()
    xn[2, 3] = float("nan")
    d = G.dequantize(G.grad_quantize(xn, "psq", 1, [1], "stochastic", 0, 3, 7))
    assert bool(d[2].isnan().all()) and bool(torch.isfinite(d[torch.arange(16) != 2]).all())
    # its variance is the two-level one, s^2 (1 - (x/s)^2): far above PSQ at 2 bits (three levels, step s)
    v1 = float(G.variance_bound(x, G.grad_quantize(x, "psq", 1, [1]), "psq", [1]).sum())
    v2 = float(G.variance_bound(x, G.grad_quantize(x, "psq", 2, [1]), "psq", [1]).sum())
    assert v1 > v2


def test_uniform_bounds_below_worst_case():
    """PTQ's and PSQ's exact SR variances stay below their documented worst cases numel*s^2/4, E*sum s_i^2/4."""
    x = heavy_tailed()
    qt = G.ptq(x, 4)
    assert float(G.uniform_variance_bound(x, qt).sum()) <= x.numel() * float(qt.scale) ** 2 / 4
    qs = G.psq(x, 4)
    assert float(G.uniform_variance_bound(x, qs).sum()) <= x.shape[1] * float((qs.scale ** 2).sum()) / 4


def test_variance_ordering_heavy_tailed():
    """var(BHQ) < var(PSQ) < var(PTQ) on a gradient with a few 100x rows; >= 10x from PTQ to BHQ at 4 bits.

    4 bits: empirical over 200 draws; 2, 5 and 8 bits: the exact SR variances (`variance_bound`, whose match
    to the empirical variance is tested above). Measured (64x64, 4 rows x100): 4 bits empirical PTQ/PSQ = 4.3x,
    PSQ/BHQ = 12.4x, PTQ/BHQ = 53x (exact: 4.2x, 12.3x, 52x); exact 2 bits 2.1x, 11.8x (24x); 5 bits 7.4x,
    11.8x (87x); 8 bits 27.7x, 12.1x (334x).
    """
    x = heavy_tailed(64, 64, heavy=4)
    var = {n: float(_samples(x, n, 4, [1], n=200).var(0).sum()) for n in ("ptq", "psq", "bhq")}
    assert var["bhq"] < var["psq"] < var["ptq"], var
    assert var["ptq"] / var["bhq"] >= 10, var
    for bits in (2, 5, 8):
        exact = {n: float(G.variance_bound(x, G.grad_quantize(x, n, bits, [1]), n, [1]).sum())
                 for n in ("ptq", "psq", "bhq")}
        assert exact["bhq"] < exact["psq"] < exact["ptq"], (bits, exact)


def test_bhq_reflection_orthogonal_and_exact_inverse():
    x = heavy_tailed(40, 24, heavy=3)
    aux = G.bhq_transform(x)
    n = x.shape[0]
    assert sorted(aux["order"].tolist()) == list(range(n))  # a permutation of the rows
    eye = torch.eye(n)
    h = G._reflect(eye, aux["group"], aux["v"])  # the block-diagonal H in grouped order, as an fp32 matrix
    torch.testing.assert_close(h @ h.T, eye, atol=1e-6, rtol=0)  # orthogonal to fp32 precision (measured 1.1e-7)
    torch.testing.assert_close(h, h.T, atol=1e-6, rtol=0)  # symmetric: its own inverse
    # H maps each group's large row (its first position) evenly onto all k rows of the group: entries 1/sqrt(k)
    group = aux["group"]
    for gi in group.unique().tolist():
        pos = torch.nonzero(group == gi).flatten()
        k = pos.numel()
        assert k >= 2  # 3 heavy rows among 40: every large row gets small rows
        torch.testing.assert_close(h[pos, pos[0]], torch.full((k,), 1 / math.sqrt(k)))
    # the heavy rows are the large rows of the groups
    firsts = aux["order"][torch.cat([torch.ones(1, dtype=torch.bool), group[1:] != group[:-1]])]
    assert set(firsts.tolist()) == {0, 1, 2}
    # T^-1 T x = x to fp32 precision (D and H applied as rank-1 updates, never as a dense matrix)
    torch.testing.assert_close(G.bhq_invert(G.bhq_apply(x, aux), aux), x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    # with nearest rounding at 8 bits the round trip is close: SQNR well above the 4-bit case
    q8 = G.bhq(x, 8, rounding="nearest")
    err = (G.bhq_dequantize(q8) - x).norm() / x.norm()
    assert float(err) < 0.01


@pytest.mark.parametrize("groups", [64, 30])
def test_aq_bit_budget(groups):
    """Average bits per element <= 1 + overhead, overhead = (32 * m + G) / numel: the fp32 scales of the m kept
    groups plus a 1-bit keep mask per group. 64 groups of 64: m = 16, exactly 1 + 576/4096 = 1.140625 bits on every
    call (systematic sampling keeps floor(m) or ceil(m) groups); 30 groups: m = 7.5, 7 or 8 kept."""
    x = heavy_tailed(groups, 64, heavy=3)
    m = groups * 1 / G.AQ_KEEP_BITS
    overhead = (G.SCALE_BITS * math.ceil(m) + groups) / x.numel()
    kept = []
    for s in range(50):
        q = G.aq(x, 1, step=s)
        b = G.aq_bits(q)
        assert b["bits_per_element"] <= 1 * math.ceil(m) / m + overhead + 1e-12
        assert b["kept_groups"] in (math.floor(m), math.ceil(m))
        assert int((q.codes != 0).any(dim=1).sum()) <= b["kept_groups"]  # codes outside kept groups are zero
        kept.append(b["kept_groups"])
    avg_bits = sum(k * 64 * 4 for k in kept) / len(kept) / x.numel()
    assert abs(avg_bits - 1.0) < 0.1  # code bits alone average 1 bit per element
    if groups == 64:
        assert G.aq_bits(G.aq(x, 1))["bits_per_element"] == 1.140625


def test_aq_inclusion_probabilities():
    """p_i proportional to the range (capped at 1), summing to m; keep frequencies match p_i (statistical)."""
    x = heavy_tailed(40, 16, heavy=2)
    r = x.abs().amax(1)
    p = G.inclusion_probabilities(r, 10.0)
    assert abs(float(p.sum()) - 10.0) < 1e-9 and bool((p <= 1).all()) and bool((p[:2] == 1).all())
    assert float(G.inclusion_probabilities(r, 0.0).sum()) == 0.0  # no budget
    assert torch.equal(G.inclusion_probabilities(r, 50.0), torch.ones(40, dtype=torch.float64))  # budget > groups
    free = p < 1
    ratio = p[free] / r[free].double()
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))  # proportional below the cap
    freq = torch.stack([G.aq(x, 1, step=s).aux["keep"].double() for s in range(R)]).mean(0)
    sigma = torch.sqrt(p * (1 - p) / R)
    assert bool(((freq - p).abs() <= 5.5 * sigma + 1e-12).all())


def test_aq_topk_keeps_largest_groups_and_is_biased():
    x = heavy_tailed(32, 16, heavy=2)
    q = G.aq(x, 1, sampling="topk")
    keep = q.aux["keep"]
    assert int(keep.sum()) == 8 and bool(keep[:2].all())
    # deterministic pruning drops 24 small rows every time: the mean is not x (the documented bias)
    mean = torch.stack([G.dequantize(G.aq(x, 1, step=s, sampling="topk")) for s in range(50)]).mean(0)
    dropped = ~keep
    torch.testing.assert_close(mean[dropped], torch.zeros_like(mean[dropped]))
    assert float(x[dropped].abs().max()) > 0


@pytest.mark.parametrize("name", ["ptq", "psq", "scq", "bhq", "aq", "aq_topk"])
def test_bad_input(name):
    """Zero gradients and a single row give finite results; NaN/Inf rows propagate (a loss scaler sees them)."""
    dims = [1]
    z = G.grad_dequantize(G.grad_quantize(torch.zeros(6, 5), name, 2, dims), name, dims)
    assert torch.equal(z, torch.zeros(6, 5))
    one = torch.randn(1, 9)
    y = G.grad_dequantize(G.grad_quantize(one, name, 2, dims, step=3), name, dims)
    assert bool(torch.isfinite(y).all())
    x = heavy_tailed(8, 6, heavy=1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[3, 2] = bad
        y = G.grad_dequantize(G.grad_quantize(xb, name, 4, dims, step=1), name, dims)
        assert not bool(torch.isfinite(y[3]).all()), (name, bad)  # the bad row is non-finite
        if name != "ptq":  # per-row quantizers keep the other rows finite (PTQ has one scale: all of it is NaN)
            assert bool(torch.isfinite(y[torch.arange(8) != 3]).all()), (name, bad)


def test_ops_fake_and_reference_agree():
    """The custom ops' fake impls match their real outputs (torch.library.opcheck: schema, fake, autograd regs)."""
    x = heavy_tailed(8, 12, heavy=1)
    step = torch.tensor(3)
    for quantizer, dims in (("ptq", [0, 1]), ("psq", [1]), ("scq", [0]), ("aq", [1]), ("aq_topk", [0])):
        torch.library.opcheck(torch.ops.fqt.grad_quantize.default, (x, quantizer, 2, dims, "stochastic", 0, 5, step))
    torch.library.opcheck(torch.ops.fqt.bhq.default, (x, 5, [1], "stochastic", 0, 5, step))
    codes, scale = torch.ops.fqt.grad_quantize(x, "aq", 1, [1], "stochastic", 0, 5, step)
    ref = G.aq(x, 1, [1], "stochastic", 0, step, 5)
    assert torch.equal(codes, ref.codes) and torch.equal(scale, ref.scale)
    xhat = torch.ops.fqt.bhq(x, 5, [1], "stochastic", 0, 5, step)
    assert torch.equal(xhat, G.bhq_dequantize(G.bhq(x, 5, [1], "stochastic", 0, step, 5)))


def test_bhq_integer_grad_input_equals_the_dequantized_product():
    """``fqt::bhq_quantize`` + ``fqt::bhq_invert`` are ``fqt::bhq`` split in two (bit for bit), and applying T^-1 to
    the output of the integer GEMM on the codes of T g gives the float GEMM on T^-1 Q(T g): T^-1 Q(T g) W =
    T^-1 (Q(T g) W), equal up to fp32 rounding of the two orders of summation."""
    g = heavy_tailed(16, 24, heavy=2)
    step = torch.tensor(7)
    args = (g, 5, [1], "stochastic", 0, 5, step)
    torch.library.opcheck(torch.ops.fqt.bhq_quantize.default, args)
    codes, scale, order, group, v, d = torch.ops.fqt.bhq_quantize(*args)
    assert int(torch.bincount(group).max()) > 1  # a real block transform, not the identity
    torch.library.opcheck(torch.ops.fqt.bhq_invert.default, (g, order, group, v, d, [1]))
    ghat = torch.ops.fqt.bhq_invert(codes.float() * scale, order, group, v, d, [1])
    assert torch.equal(ghat, torch.ops.fqt.bhq(*args))
    w8, sw = torch.ops.fqt.quantize(torch.randn(24, 10), 8, [0, 1], "nearest", 0, 1, step)
    integer = torch.ops.fqt.bhq_invert(torch.ops.fqt.qgemm(codes, scale, w8, sw, None, torch.float32),
                                       order, group, v, d, [1])
    dequantized = torch.ops.fqt.qgemm(ghat, None, w8, sw, None, torch.float32)
    torch.testing.assert_close(integer, dequantized, rtol=1e-5, atol=1e-6 * dequantized.abs().max().item())


def test_config_bits_and_operands():
    spec, _ = FQTConfig.from_options({"grad_quantizer": "aq", "bits": "W4A4G1"}).resolve("fc", "grad_weight",
                                                                                         "grad_output")
    assert (spec.bits, spec.quantizer, spec.granularity) == (1, "aq", "channel")
    spec, _ = FQTConfig.from_options({"grad_quantizer": "bhq", "bits": "W4A4G5"}).resolve("fc", "grad_input",
                                                                                          "grad_output")
    assert (spec.bits, spec.quantizer, spec.granularity) == (5, "bhq", "sample")
    with pytest.raises(ValueError, match="G1 .*needs grad_quantizer='aq'"):
        FQTConfig.from_options({"grad_quantizer": "bhq", "bits": "W4A4G1"})
    with pytest.raises(ValueError, match="G1"):
        FQTConfig.from_options({"bits": "W8A8G1"})
    with pytest.raises(ValueError, match="needs quantizer 'aq'"):
        FQTConfig.from_options({"rules": [{"operand": "grad_output", "quantizer": "scq", "bits": 1}]})
    spec, _ = FQTConfig.from_options({"grad_quantizer": "psq", "bits": "W8A8G1"}).resolve("fc", "grad_input",
                                                                                         "grad_output")
    assert (spec.bits, spec.quantizer, spec.granularity) == (1, "psq", "sample")
    with pytest.raises(ValueError, match="grad_output only"):
        FQTConfig.from_options({"rules": [{"operand": "weight", "quantizer": "bhq"}]})
    with pytest.raises(ValueError, match="grad_output only"):
        FQTConfig.from_options({"rules": [{"module": "fc1", "quantizer": "psq"}]})
    # a per-module rule selects a quantizer for one site's gradients only
    cfg = FQTConfig.from_options({"bits": "W8A8G8", "rules": [
        {"module": "fc1", "operand": "grad_output", "quantizer": "aq", "bits": 1}]})
    assert cfg.resolve("fc1", "grad_input", "grad_output")[0].quantizer == "aq"
    assert cfg.resolve("fc2", "grad_input", "grad_output")[0].quantizer == "uniform"
