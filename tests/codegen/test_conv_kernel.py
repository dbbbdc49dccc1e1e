"""conv2d as im2col + the Triton int8 GEMM vs `fqtc.quant.conv` under the Triton interpreter (bit-identical:
the integer sums are exact on both sides and the epilogue applies the scales in the reference's order)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fqtc.codegen import conv as kc  # noqa: E402
from fqtc.codegen import impls  # noqa: E402
from fqtc.quant import conv  # noqa: E402
from fqtc.quant.uniform import quantize  # noqa: E402


def _eq(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _codes(shape, dims, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(shape, generator=g), 8, dims)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2))])
def test_conv2d_output(stride, padding, dilation):
    x, sx = _codes((2, 3, 9, 7), [1, 2, 3], 1)  # per-sample activation scale
    w, sw = _codes((5, 3, 3, 3), [1, 2, 3], 2)  # per-output-channel weight scale
    bias = torch.randn(5)
    got = kc.scaled_conv2d(x, sx, w, sw, bias, stride, padding, dilation)
    want = conv.scaled_conv2d(x, sx, w, sw, bias, stride, padding, dilation, 1)
    _eq(got, want)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 0), (1, 1))])
def test_conv2d_grad_weight(stride, padding, dilation):
    x, sx = _codes((2, 3, 8, 8), [0, 2, 3], 1)  # per-input-channel activation scale
    ho = (8 + 2 * padding[0] - 2 - 1) // stride[0] + 1
    wo = (8 + 2 * padding[1] - 2 - 1) // stride[1] + 1
    g, sg = _codes((2, 4, ho, wo), [0, 2, 3], 2)  # per-output-channel gradient scale
    got = kc.scaled_conv2d_weight(x, sx, [4, 3, 3, 3], g, sg, stride, padding, dilation)
    want = conv.scaled_conv2d_weight(x, sx, [4, 3, 3, 3], g, sg, stride, padding, dilation, 1)
    _eq(got, want)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 0), (1, 2))])
def test_conv2d_grad_input(stride, padding, dilation):
    size = [2, 3, 9, 8]
    ho = (9 + 2 * padding[0] - dilation[0] * 2 - 1) // stride[0] + 1
    wo = (8 + 2 * padding[1] - dilation[1] * 2 - 1) // stride[1] + 1
    g, sg = _codes((2, 5, ho, wo), [1, 2, 3], 1)  # per-sample gradient scale
    w, sw = _codes((5, 3, 3, 3), [0, 2, 3], 2)  # per-input-channel weight scale
    got = kc.scaled_conv2d_input(size, w, sw, g, sg, stride, padding, dilation)
    want = conv.scaled_conv2d_input(size, w, sw, g, sg, stride, padding, dilation, 1)
    _eq(got, want)


def test_conv_op_impls_and_fallback():
    x, sx = _codes((1, 4, 6, 6), [1, 2, 3], 1)
    w, sw = _codes((3, 4, 3, 3), [1, 2, 3], 3)
    args = ([1, 1], [1, 1], [1, 1])
    _eq(impls.qconv2d_cuda(x, sx, w, sw, None, *args, 1, torch.float32),
        torch.ops.fqt.qconv2d(x, sx, w, sw, None, *args, 1, torch.float32))
    wg, swg = _codes((4, 2, 3, 3), [1, 2, 3], 2)  # groups=2: no im2col kernel, the reference runs (counted)
    impls.FALLBACKS.clear()
    with pytest.warns(UserWarning, match="grouped convolution"):
        got = impls.qconv2d_cuda(x, sx, wg, swg, None, *args, 2, torch.float32)
    _eq(got, torch.ops.fqt.qconv2d(x, sx, wg, swg, None, *args, 2, torch.float32))
    assert sum(impls.FALLBACKS.values()) == 1
