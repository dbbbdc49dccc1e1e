"""Gradient-quantizer kernels (docs/kernels.md, "4. gradient quantizers") vs `fqtc.quant.gradq` under the Triton
interpreter: codes and scales bit-identical, BHQ's dequantized output identical (the fused kernel reproduces the
reference's op order, including the ``index_add_`` summation order of the group reflections)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fqtc.codegen import gemm as kg  # noqa: E402
from fqtc.codegen import gradq as kgq  # noqa: E402
from fqtc.codegen import impls  # noqa: E402
from fqtc.quant import gradq  # noqa: E402
from fqtc.quant.gemm import scaled_gemm  # noqa: E402
from fqtc.quant.uniform import quantize  # noqa: E402

STEP = torch.tensor(9)


def _eq(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _grad(shape, seed=0):
    """A gradient with a few dominant rows (the case BHQ and PSQ are built for) and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x2 = x.view(-1, shape[-1])
    x2[0] *= 50
    x2[min(3, x2.shape[0] - 1)] *= 20
    if x2.shape[0] > 5:
        x2[5] = 0
    return x


@pytest.mark.parametrize("quantizer", ["ptq", "psq", "scq"])
@pytest.mark.parametrize("dims", [[-1], [0]])
def test_uniform_grad_quantizers(quantizer, dims):
    x = _grad((40, 30))
    codes, scale = kgq.grad_quantize(x, quantizer, 4, dims, "stochastic", 3, STEP, 55)
    ref = gradq.grad_quantize(x, quantizer, 4, dims, "stochastic", 3, STEP, 55)
    _eq(codes, ref.codes)
    _eq(scale, ref.scale.contiguous())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN / Inf in numpy, on purpose
def test_grad_nonfinite_policy():
    """A NaN row keeps a NaN scale and zero codes; an Inf row an Inf scale (non-finite gradients propagate)."""
    x = _grad((12, 20))
    x[4, 3] = float("nan")
    x[7, 1] = float("inf")
    codes, scale = kgq.grad_quantize(x, "psq", 8, [-1], "stochastic", 3, STEP, 55)
    ref = gradq.grad_quantize(x, "psq", 8, [-1], "stochastic", 3, STEP, 55)
    _eq(codes, ref.codes)
    _eq(scale, ref.scale)
    assert torch.isnan(scale[4]).all() and (codes[4] == 0).all()


@pytest.mark.parametrize("shape", [(40, 30), (2, 9, 17)])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bhq_fused_matches_reference(shape, rounding):
    x = _grad(shape)
    aux = gradq.bhq_transform(x, [-1])
    assert (aux["v"] != 0).any() and int(aux["group"].max()) + 1 < aux["group"].numel()  # real groups, not identity
    out = kgq.bhq(x, 4, [-1], rounding, 3, STEP, 55)
    ref = gradq.bhq_dequantize(gradq.bhq(x, 4, [-1], rounding, 3, STEP, 55), [-1])
    _eq(out, ref)


def test_bhq_identity_transform_and_bad_input():
    x = torch.zeros(6, 8)  # zero gradient: identity transform, zero output
    _eq(kgq.bhq(x, 4, [-1]), gradq.bhq_dequantize(gradq.bhq(x, 4, [-1]), [-1]))
    with pytest.raises(ValueError, match="trailing reduce_dims"):
        kgq.bhq(_grad((6, 8)), 4, [0])


def test_op_impls_match_grad_ops():
    x = _grad((16, 24))
    step = torch.tensor(4)
    got = impls.grad_quantize_cuda(x, "psq", 4, [-1], "stochastic", 3, 55, step)
    want = torch.ops.fqt.grad_quantize(x, "psq", 4, [-1], "stochastic", 3, 55, step)
    _eq(got[0], want[0])
    _eq(got[1], want[1])
    _eq(impls.bhq_cuda(x, 4, [-1], "stochastic", 3, 55, step), torch.ops.fqt.bhq(x, 4, [-1], "stochastic", 3, 55,
                                                                                 step))
    impls.FALLBACKS.clear()
    with pytest.warns(UserWarning, match="no kernel for gradient quantizer 'aq'"):
        got = impls.grad_quantize_cuda(x, "aq", 2, [-1], "stochastic", 3, 55, step)
    want = torch.ops.fqt.grad_quantize(x, "aq", 2, [-1], "stochastic", 3, 55, step)
    _eq(got[0], want[0])
    assert impls.FALLBACKS
    # PSQ's two-level (1-bit) codes are not the kernels' uniform grid: the reference runs, said once
    with pytest.warns(UserWarning, match="two-level"):
        got = impls.grad_quantize_cuda(x, "psq", 1, [-1], "stochastic", 3, 55, step)
    want = torch.ops.fqt.grad_quantize(x, "psq", 1, [-1], "stochastic", 3, 55, step)
    _eq(got[0], want[0])
    _eq(got[1], want[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("quantizer", ["psq", "ptq"])
def test_grad_quantizer_in_gemm_prologue(quantizer):
    """grad_input GEMM with the gradient quantized in the prologue (fqt::qgemm_fused_grad_quant's kernel),
    including a NaN row (NaN scale, zero codes, NaN output row as in the reference)."""
    g = _grad((24, 40))
    g[9, 2] = float("nan")
    w, sw = quantize(torch.randn(40, 16), 8, [0])
    got = impls.qgemm_fused_grad_quant_cuda(g, quantizer, 4, [-1], "stochastic", 3, 55, STEP, w, sw, None,
                                            torch.float32)
    want = torch.ops.fqt.qgemm_fused_grad_quant(g, quantizer, 4, [-1], "stochastic", 3, 55, STEP, w, sw, None,
                                                torch.float32)
    for a, b in zip(got, want):
        _eq(a, b)
    ref = gradq.grad_quantize(g, quantizer, 4, [-1], "stochastic", 3, STEP, 55)
    _eq(want[0], scaled_gemm(ref.codes, ref.scale, w, sw))
    out, codes, scale = kg.qgemm_fused_quant(g, 4, [-1] if quantizer == "psq" else [0, 1], "stochastic", 3, 55,
                                             STEP, w, sw)
    _eq(codes, ref.codes)


@pytest.mark.parametrize("shape", [(40, 30), (2, 9, 17)])
def test_bhq_with_producer_row_amax(shape):
    """Row ranges from the producer (the codegen pass's ``aten.amax``): same transform, same output, ``x`` read
    only by the kernel."""
    from fqtc.quant.uniform import group_amax

    x = _grad(shape)
    amax = group_amax(x, [-1])
    ref = gradq.bhq_dequantize(gradq.bhq(x, 4, [-1], "stochastic", 3, STEP, 55), [-1])
    _eq(gradq.bhq_dequantize(gradq.bhq(x, 4, [-1], "stochastic", 3, STEP, 55, amax), [-1]), ref)
    _eq(kgq.bhq(x, 4, [-1], "stochastic", 3, STEP, 55, amax), ref)
    x[1, 2] = float("nan")  # a non-finite row range: identity transform in both paths
    a2 = group_amax(x, [-1])
    assert gradq.bhq_transform(x, [-1], a2)["v"].eq(0).all()


@pytest.mark.parametrize("quantizer", ["ptq", "psq"])
def test_grad_quantize_with_producer_amax(quantizer):
    from fqtc.quant.uniform import group_amax

    x = _grad((40, 30))
    dims = [0, 1] if quantizer == "ptq" else [-1]
    amax = group_amax(x, dims)
    codes, scale = kgq.grad_quantize(x, quantizer, 4, [-1], "stochastic", 3, STEP, 55, amax)
    ref = gradq.grad_quantize(x, quantizer, 4, [-1], "stochastic", 3, STEP, 55)
    _eq(codes, ref.codes)
    _eq(scale, ref.scale.contiguous())
    with pytest.raises(ValueError, match="does not take a precomputed amax"):
        gradq.grad_quantize(x, "aq", 4, [-1], "stochastic", 3, STEP, 55, amax)
