"""Property-based tests (hypothesis) of every quantizer and of the integer GEMM.

Shapes include empty and one-element tensors, values include extremes and NaN/Inf, bits run over 1-8. Properties:
no crash, codes within +-qmax, non-finite inputs never hidden (their group dequantizes to non-finite values),
finite groups within one step of the scale, unbiased stochastic rounding where the quantizer claims it, and an
exact integer GEMM on both CPU paths.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fqtc.quant import gemm, gradq, uniform

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 3.0e38  # near float32's largest finite value


@st.composite
def tensors(draw, max_dims: int = 3, allow_nonfinite: bool = True):
    ndim = draw(st.integers(1, max_dims))
    shape = [draw(st.sampled_from([0, 1, 2, 3, 5])) for _ in range(ndim)]
    n = math.prod(shape)
    finite = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([0.0, -0.0, BIG, -BIG, 1e-38, -1e-45]))
    vals = draw(st.lists(finite, min_size=n, max_size=n))
    x = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    if allow_nonfinite and n and draw(st.booleans()):
        idx = draw(st.integers(0, n - 1))
        x.view(-1)[idx] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x


def _groups(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Per group: does it hold a non-finite value (keepdim over ``dims``)?"""
    bad = ~x.isfinite()
    return bad.any(dim=dims, keepdim=True) if dims and x.numel() else bad


@SETTINGS
@given(x=tensors(), bits=st.integers(1, 8), rounding=st.sampled_from(["nearest", "stochastic"]),
       data=st.data())
def test_uniform_quantizer_properties(x, bits, rounding, data):
    dims = sorted(data.draw(st.sets(st.integers(0, x.dim() - 1), min_size=1)))
    codes, scale = uniform.quantize(x, bits, dims, rounding, seed=1, step=3, stream=7)
    qmax = uniform.qmax_for(bits)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.shape == torch.Size([1 if i in dims else s for i, s in enumerate(x.shape)])
    assert int(codes.abs().max()) <= qmax if codes.numel() else True
    dq = uniform.dequantize(codes, scale)
    bad = _groups(x, dims).expand_as(x)
    assert not dq[bad].isfinite().any()  # a NaN/Inf is never hidden: its whole group is non-finite
    good = ~bad
    err = (dq - x).abs()[good]
    step = scale.expand_as(x)[good]
    assert torch.all(err <= step * (0.5 if rounding == "nearest" else 1.0) * (1 + 1e-6) + 1e-30)


@SETTINGS
@given(x=tensors(max_dims=2), bits=st.integers(1, 8),
       quantizer=st.sampled_from(["ptq", "psq", "scq", "bhq", "aq", "aq_topk"]))
def test_gradient_quantizers_never_crash_and_propagate_nonfinite(x, bits, quantizer):
    if x.dim() == 1:
        x = x.unsqueeze(0)
    q = gradq.grad_quantize(x, quantizer, bits, [-1], "stochastic", seed=2, step=5, stream=11)
    dq = gradq.grad_dequantize(q, quantizer, [-1])
    assert dq.shape == x.shape and q.codes.dtype == torch.int8
    if x.numel() and not x.isfinite().all():
        assert not dq.isfinite().all()  # non-finite input -> non-finite result (never hidden)
    elif x.numel() and x.abs().max() < 1e30:
        assert dq.isfinite().all()


@settings(max_examples=8, deadline=None)
@given(vals=st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=6), bits=st.integers(2, 8),
       quantizer=st.sampled_from(["uniform", "ptq", "psq"]))
def test_stochastic_rounding_is_unbiased(vals, bits, quantizer):
    x = torch.tensor([vals], dtype=torch.float32)
    n = 400
    total = torch.zeros_like(x, dtype=torch.float64)
    for step in range(n):
        if quantizer == "uniform":
            dq = uniform.dequantize(*uniform.quantize(x, bits, [0, 1], "stochastic", seed=3, step=step, stream=9))
        else:
            dq = gradq.grad_dequantize(gradq.grad_quantize(x, quantizer, bits, [-1], "stochastic", 3, step, 9),
                                       quantizer, [-1])
        total += dq.double()
    scale = x.abs().max().item() / uniform.qmax_for(bits)
    # each draw's error is within one scale step, variance <= scale^2/4: 6 standard deviations of the mean
    assert torch.all((total / n - x.double()).abs() <= 6 * scale / (2 * math.sqrt(n)) + 1e-6)


@SETTINGS
@given(m=st.sampled_from([0, 1, 3, 17]), k=st.sampled_from([0, 1, 5, 1100]), n=st.sampled_from([0, 1, 4]),
       batch=st.sampled_from([(), (2,)]), seed=st.integers(0, 2**16))
def test_integer_gemm_is_exact_on_every_path(m, k, n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (*batch, m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (*batch, k, n), generator=g, dtype=torch.int8)
    if a.numel():
        a.view(-1)[0] = -127  # extremes: the largest products
    want = torch.matmul(a.long(), b.long())
    for path in gemm.CPU_GEMM_PATHS:
        got = gemm.int_gemm(a, b, path)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want), path
    sa = torch.rand(*batch, m, 1, generator=g) + 0.5
    sb = torch.rand(*batch, 1, n, generator=g) + 0.5
    out = gemm.scaled_gemm(a, sa, b, sb)
    torch.testing.assert_close(out.double(), want.double() * sa.double() * sb.double(), rtol=1e-6, atol=1e-3)
    nan_scale = sa.clone()
    if m and n:
        nan_scale.view(-1)[0] = math.nan  # a NaN scale (a group that held a NaN) reaches its output row
        assert gemm.scaled_gemm(a, nan_scale, b, sb).reshape(-1, m, n)[0, 0].isnan().all()
