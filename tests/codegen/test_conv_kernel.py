"""conv2d output / grad_input / grad_weight as implicit-GEMM kernels vs `fqtc.quant.conv` under the Triton
interpreter. Bit-identical: the int32 accumulation is exact on both sides and the epilogue applies the scales (and
the bias, and the cast) with the reference's float ops in its order. Shapes are odd so the M, N and K masks and the
padding/stride/dilation edges are all exercised; more than 16 channels or taps span several 16-wide N tiles."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fqtc.codegen import conv as kc  # noqa: E402
from fqtc.codegen import impls  # noqa: E402
from fqtc.quant import conv  # noqa: E402
from fqtc.quant.uniform import quantize  # noqa: E402

GEOMETRY = [  # stride, padding, dilation
    ((1, 1), (1, 1), (1, 1)),
    ((2, 1), (0, 2), (1, 2)),
    ((2, 2), (0, 0), (1, 1)),  # width 8: the last input column is in no window, grad_input there is 0
    ((1, 2), (2, 1), (2, 1)),
]


def _eq(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _codes(shape, dims, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(shape, generator=g), 8, dims)


def _out_hw(h, w, k, stride, padding, dilation):
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, st in zip((h, w), padding, dilation, stride))


@pytest.mark.parametrize("stride,padding,dilation", GEOMETRY)
def test_conv2d_output(stride, padding, dilation):
    x, sx = _codes((2, 3, 9, 7), [1, 2, 3], 1)  # per-sample activation scale
    w, sw = _codes((5, 3, 3, 3), [1, 2, 3], 2)  # per-output-channel weight scale
    bias = torch.randn(5)
    got = kc.scaled_conv2d(x, sx, w, sw, bias, stride, padding, dilation)
    want = conv.scaled_conv2d(x, sx, w, sw, bias, stride, padding, dilation, 1)
    _eq(got, want)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_conv2d_output_per_tensor_scales_cast_and_wide(out_dtype):
    """Per-tensor scales (stride-0 scale loads), a bf16 bias, a half-precision output, 20 output channels (two N
    tiles, the second masked), a 1x5 kernel and K = 6*5 = 30 (one masked K step)."""
    x, sx = _codes((3, 6, 5, 11), [0, 1, 2, 3], 3)
    w, sw = _codes((20, 6, 1, 5), [0, 1, 2, 3], 4)
    bias = torch.randn(20).to(torch.bfloat16)
    args = ((1, 2), (0, 2), (1, 1))
    got = kc.scaled_conv2d(x, sx, w, sw, bias, *args, out_dtype=out_dtype)
    want = conv.scaled_conv2d(x, sx, w, sw, bias, *args, 1, out_dtype)
    assert got.dtype == out_dtype
    _eq(got, want)


def test_conv2d_output_int32_accumulator_exact():
    """Unit scales expose the raw accumulator: equal to the reference's exact int32 conv, also for codes at +-127
    (every product at its largest magnitude)."""
    x, _ = _codes((2, 16, 6, 6), [1, 2, 3], 5)
    x[0] = 127
    w, _ = _codes((7, 16, 3, 3), [1, 2, 3], 6)
    w[:3] = -127
    one = torch.ones(1, 1, 1, 1)
    got = kc.scaled_conv2d(x, one, w, one, None, (1, 1), (1, 1), (1, 1))
    _eq(got, conv.int_conv2d(x, w, (1, 1), (1, 1), (1, 1), 1).float())
    full = -127 * 127 * 16
    assert (got[0, :3, 0, 0] == 4 * full).all()  # a corner sees 4 of the 9 taps inside the image
    assert (got[0, :3, 1:5, 1:5] == 9 * full).all()


@pytest.mark.parametrize("stride,padding,dilation", GEOMETRY)
def test_conv2d_grad_weight(stride, padding, dilation):
    x, sx = _codes((2, 3, 8, 9), [0, 2, 3], 1)  # per-input-channel activation scale
    ho, wo = _out_hw(8, 9, 3, stride, padding, dilation)
    g, sg = _codes((2, 4, ho, wo), [0, 2, 3], 2)  # per-output-channel gradient scale
    got = kc.scaled_conv2d_weight(x, sx, [4, 3, 3, 3], g, sg, stride, padding, dilation)
    want = conv.scaled_conv2d_weight(x, sx, [4, 3, 3, 3], g, sg, stride, padding, dilation, 1)
    _eq(got, want)


def test_conv2d_grad_weight_per_tensor_bf16():
    x, sx = _codes((3, 5, 7, 6), [0, 1, 2, 3], 3)
    g, sg = _codes((3, 6, 7, 6), [0, 1, 2, 3], 4)
    got = kc.scaled_conv2d_weight(x, sx, [6, 5, 3, 3], g, sg, (1, 1), (1, 1), (1, 1), out_dtype=torch.bfloat16)
    want = conv.scaled_conv2d_weight(x, sx, [6, 5, 3, 3], g, sg, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16)
    _eq(got, want)


@pytest.mark.parametrize("stride,padding,dilation", GEOMETRY)
def test_conv2d_grad_input(stride, padding, dilation):
    size = [2, 3, 9, 8]
    ho, wo = _out_hw(9, 8, 3, stride, padding, dilation)
    g, sg = _codes((2, 5, ho, wo), [1, 2, 3], 1)  # per-sample gradient scale
    w, sw = _codes((5, 3, 3, 3), [0, 2, 3], 2)  # per-input-channel weight scale
    got = kc.scaled_conv2d_input(size, w, sw, g, sg, stride, padding, dilation)
    want = conv.scaled_conv2d_input(size, w, sw, g, sg, stride, padding, dilation, 1)
    _eq(got, want)
    if stride == (2, 2) and padding == (0, 0):
        assert not got[..., -1].any() and got[..., -2].any()


def test_conv2d_grad_input_wide_per_tensor_fp16():
    """18 input channels (two N tiles) and per-tensor scales, fp16 output."""
    size = [1, 18, 7, 7]
    g, sg = _codes((1, 4, 7, 7), [0, 1, 2, 3], 7)
    w, sw = _codes((4, 18, 3, 3), [0, 1, 2, 3], 8)
    got = kc.scaled_conv2d_input(size, w, sw, g, sg, (1, 1), (1, 1), (1, 1), out_dtype=torch.float16)
    want = conv.scaled_conv2d_input(size, w, sw, g, sg, (1, 1), (1, 1), (1, 1), 1, torch.float16)
    _eq(got, want)


def test_conv_kernels_reject_bad_input():
    x, sx = _codes((1, 4, 6, 6), [1, 2, 3], 1)
    w, sw = _codes((3, 5, 3, 3), [1, 2, 3], 3)
    with pytest.raises(ValueError, match="4 channels, weight expects 5"):
        kc.scaled_conv2d(x, sx, w, sw, None, (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="stride, dilation >= 1"):
        kc.scaled_conv2d(x, sx, w[:, :4], sw, None, (0, 1), (1, 1), (1, 1))
    g, sg = _codes((1, 3, 5, 5), [1, 2, 3], 2)
    with pytest.raises(ValueError, match="does not match"):
        kc.scaled_conv2d_weight(x, sx.reshape(1, 1, 1, 1), [3, 4, 3, 3], g, sg.reshape(1, 1, 1, 1), (1, 1), (1, 1),
                                (1, 1))


def test_conv_op_impls_and_fallback():
    x, sx = _codes((1, 4, 6, 6), [1, 2, 3], 1)
    w, sw = _codes((3, 4, 3, 3), [1, 2, 3], 3)
    args = ([1, 1], [1, 1], [1, 1])
    impls.FALLBACKS.clear()
    _eq(impls.qconv2d_cuda(x, sx, w, sw, None, *args, 1, torch.float32),
        torch.ops.fqt.qconv2d(x, sx, w, sw, None, *args, 1, torch.float32))
    g, sg = _codes((1, 3, 6, 6), [1, 2, 3], 4)
    swi = sw.reshape(1, 3, 1, 1)[:, :1].expand(1, 4, 1, 1).contiguous()  # per input channel for grad_input
    _eq(impls.qconv2d_input_cuda(g, sg, w, swi, [1, 4, 6, 6], *args, 1, torch.float32),
        torch.ops.fqt.qconv2d_input(g, sg, w, swi, [1, 4, 6, 6], *args, 1, torch.float32))
    gw, sgw = _codes((1, 3, 6, 6), [0, 2, 3], 5)  # per output channel for grad_weight
    _eq(impls.qconv2d_weight_cuda(x, sx, gw, sgw, [3, 4, 3, 3], *args, 1, torch.float32),
        torch.ops.fqt.qconv2d_weight(x, sx, gw, sgw, [3, 4, 3, 3], *args, 1, torch.float32))
    assert not impls.FALLBACKS  # all three ran their kernels
    wg, swg = _codes((4, 2, 3, 3), [1, 2, 3], 2)  # groups=2: no implicit-GEMM kernel, the reference runs (counted)
    with pytest.warns(UserWarning, match="grouped convolution"):
        got = impls.qconv2d_cuda(x, sx, wg, swg, None, *args, 2, torch.float32)
    _eq(got, torch.ops.fqt.qconv2d(x, sx, wg, swg, None, *args, 2, torch.float32))
    assert sum(impls.FALLBACKS.values()) == 1
