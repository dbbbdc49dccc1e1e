"""Block scaling (fqtc.quant.block): codes and scales against a per-block loop written out, the blocked integer
GEMM against the per-block int64 sum in block order, stochastic rounding's unbiasedness, and what block scales
buy on operands with outlier channels."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fqtc.quant import block as B
from fqtc.quant.gemm import int_gemm
from fqtc.quant.uniform import quantize
from tests.helpers import sqnr


def _loop_quantize(x: torch.Tensor, bits: int, dims: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-rounding block quantization of a 2-D tensor, one block at a time (the definition)."""
    qmax = 2 ** (bits - 1) - 1
    rb, cb = (block if 0 in dims else 1), (block if 1 in dims else 1)
    nr, nc = math.ceil(x.shape[0] / rb), math.ceil(x.shape[1] / cb)
    scale = torch.empty(nr if 0 in dims else x.shape[0], nc if 1 in dims else x.shape[1])
    codes = torch.empty(x.shape, dtype=torch.int8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r = slice(i * rb, (i + 1) * rb) if 0 in dims else slice(i, i + 1)
            c = slice(j * cb, (j + 1) * cb) if 1 in dims else slice(j, j + 1)
            amax = x[r, c].abs().max()
            s = amax / qmax if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            codes[r, c] = torch.round(x[r, c] / s).clamp(-qmax, qmax).to(torch.int8)
    return codes, scale


@pytest.mark.parametrize("dims", [[0], [1], [0, 1]])
@pytest.mark.parametrize("shape,block", [((37, 80), 16), ((64, 64), 32), ((5, 300), 128)])
def test_codes_and_scales_equal_the_per_block_definition(dims, shape, block):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.rand(shape[1]) * 10
    x[:3, :7] = 0.0  # an all-zero block where blocks are small: scale 1, codes 0
    codes, scale = B.quantize_block(x, 8, dims, block)
    want_c, want_s = _loop_quantize(x, 8, dims, block)
    torch.testing.assert_close(scale, want_s, rtol=0, atol=0)
    torch.testing.assert_close(codes, want_c, rtol=0, atol=0)
    assert list(scale.shape) == B.scale_shape(shape, dims, block)


def test_one_block_covering_everything_is_the_per_tensor_quantizer():
    x = torch.randn(16, 32)
    c1, s1 = B.quantize_block(x, 6, [0, 1], 32)
    c2, s2 = quantize(x, 6, [0, 1])
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2.reshape(1, 1), rtol=0, atol=0)


def test_non_finite_values_stay_in_their_block():
    x = torch.randn(4, 64)
    x[1, 40] = float("nan")
    codes, scale = B.quantize_block(x, 8, [1], 32)
    assert torch.isnan(scale[1, 1]) and torch.isfinite(scale[1, 0]) and torch.isfinite(scale[0]).all()
    assert (codes[1, 32:] == 0).all()


def test_stochastic_rounding_is_unbiased_per_block():
    """Mean over 2000 counter-stream draws: within 4 standard errors of x for every element (variance <= s^2/4)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 20, 64)
    n = 2000
    acc = torch.zeros(8, 64, dtype=torch.float64)
    for step in range(n):
        c, s = B.quantize_block(x, 4, [1], 16, "stochastic", seed=3, step=step, stream=5)
        acc += B.dequantize_block(c, s, [1], 16).double()
    _, s = B.quantize_block(x, 4, [1], 16)
    se = B.expand_scale(s, x.shape, [1], 16).double() / 2 / math.sqrt(n)
    assert ((acc / n - x.double()).abs() <= 4 * se + 1e-7).all()
    # and a different seed rounds differently
    a, _ = B.quantize_block(x, 4, [1], 16, "stochastic", seed=3, step=0, stream=5)
    b, _ = B.quantize_block(x, 4, [1], 16, "stochastic", seed=4, step=0, stream=5)
    assert not torch.equal(a, b)


def _loop_gemm(a, sa, b, sb, block):
    """Per K-block int64 products, scaled and summed in fp32 in block order, with the scales expanded by hand."""
    m, k = a.shape
    n = b.shape[1]
    sa = sa.expand(m, -1) if sa.shape[0] == 1 else sa.repeat_interleave(block, 0)[:m] if sa.shape[0] != m else sa
    sb = sb.expand(-1, n) if sb.shape[1] == 1 else sb.repeat_interleave(block, 1)[:, :n] if sb.shape[1] != n else sb
    acc = torch.zeros(m, n)
    for j in range(math.ceil(k / block)):
        ks = slice(j * block, (j + 1) * block)
        p = (a[:, ks].long() @ b[ks].long()).float()
        acc = acc + p * (sa[:, j if sa.shape[1] > 1 else 0, None] * sb[None, j if sb.shape[0] > 1 else 0, :])
    return acc


@pytest.mark.parametrize("m,k,n,block", [(37, 80, 45, 16), (64, 96, 32, 32), (3, 256, 5, 128)])
@pytest.mark.parametrize("a_form,b_form", [("tiles", "groups"), ("groups", "tiles"), ("tiles", "tensor"),
                                           ("row", "tiles")])
def test_block_gemm_equals_the_block_order_sum(m, k, n, block, a_form, b_form):
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    kb, mb, nb = -(-k // block), -(-m // block), -(-n // block)
    sa = {"tiles": torch.rand(mb, kb), "groups": torch.rand(m, kb), "row": torch.rand(m, 1)}[a_form]
    sb = {"tiles": torch.rand(kb, nb), "groups": torch.rand(kb, n), "tensor": torch.rand(1, 1)}[b_form]
    bias = torch.randn(n)
    got = B.block_gemm(a, sa, b, sb, block, bias)
    torch.testing.assert_close(got, _loop_gemm(a, sa, b, sb, block) + bias, rtol=0, atol=0)
    # both integer GEMM paths give the same bits
    for path in ("int_mm", "fp32"):
        alt = B.block_gemm(a, sa, b, sb, block, bias, gemm=functools.partial(int_gemm, path=path))
        torch.testing.assert_close(alt, got, rtol=0, atol=0)


def test_block_gemm_batched_and_dequantized_forms():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (2, 3, 20, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (2, 3, 64, 24), dtype=torch.int8, generator=g)
    sa, sb = torch.rand(2, 3, 2, 4), torch.rand(2, 3, 4, 24)
    got = B.block_gemm(a, sa, b, sb, 16)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(got[i, j], _loop_gemm(a[i, j], sa[i, j], b[i, j], sb[i, j], 16), rtol=0,
                                       atol=0)
    # a scale varying inside a K-block has no blocked integer form: the dequantized operands are multiplied
    sa_fine = torch.rand(20, 64)
    assert B.block_form(a[0, 0], sa_fine, b[0, 0], sb[0, 0], 16) is not None
    want = (a[0, 0].float() * sa_fine) @ B.dequantize_block(b[0, 0], sb[0, 0], [0], 16)
    torch.testing.assert_close(B.block_gemm(a[0, 0], sa_fine, b[0, 0], sb[0, 0], 16), want)


def test_block_scales_survive_outlier_channels():
    """Activations with a few channels 50x larger: per-token 8-bit scales lose the small channels, 32-wide blocks
    keep them (the case block scaling exists for, papers.md / docs/outliers.md)."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    x[:, [3, 97, 200]] *= 50
    small = torch.ones(256, dtype=torch.bool)
    small[[3, 97, 200]] = False
    c, s = quantize(x, 8, [1])
    per_token = sqnr(x[:, small], (c.float() * s)[:, small])
    cb, sb = B.quantize_block(x, 8, [1], 32)
    blocked = sqnr(x[:, small], B.dequantize_block(cb, sb, [1], 32)[:, small])
    assert blocked >= per_token + 6, (per_token, blocked)


def test_block_size_is_checked():
    with pytest.raises(ValueError, match="block size"):
        B.quantize_block(torch.randn(4, 4), 8, [1], 24)
    with pytest.raises(ValueError, match="one dim"):
        B.quantize_block(torch.randn(4, 4, 4), 8, [0, 1, 2], 16)
