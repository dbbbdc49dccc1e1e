"""fqt convolution ops: the three GEMMs of a conv site as custom ops.

``fqt::qconv2d`` (``output``), ``fqt::qconv2d_input`` (``grad_input``) and ``fqt::qconv2d_weight``
(``grad_weight``) replace ``aten.convolution`` and the getitems of ``aten.convolution_backward`` (fqtc/passes/conv.py).
They take int8 codes with keepdim fp32 scales (a ``None`` scale marks a full-precision operand) and call the
reference numerics in `fqtc.quant.conv`. Fake impls compute output shapes from the conv arithmetic so they work
with symbolic batch and spatial sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtc.quant import conv as _conv


def _out_size(size, k: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@torch.library.custom_op("fqt::qconv2d", mutates_args=())
def qconv2d(x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor | None, bias: Tensor | None,
            stride: list[int], padding: list[int], dilation: list[int], groups: int, out_dtype: torch.dtype) -> Tensor:
    """``conv2d(x_scale*x, w_scale*w) + bias`` (the ``output`` GEMM of a conv site)."""
    return _conv.scaled_conv2d(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype)


@qconv2d.register_fake
def _(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    n, h, wd = x.shape[0], x.shape[2], x.shape[3]
    ho = _out_size(h, w.shape[2], stride[0], padding[0], dilation[0])
    wo = _out_size(wd, w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((n, w.shape[0], ho, wo), dtype=out_dtype)


@torch.library.custom_op("fqt::qconv2d_input", mutates_args=())
def qconv2d_input(g: Tensor, g_scale: Tensor | None, w: Tensor, w_scale: Tensor | None, input_size: list[int],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  out_dtype: torch.dtype) -> Tensor:
    """Gradient of a conv2d w.r.t. its input, ``input_size`` = ``[N, C_in, H, W]`` (the ``grad_input`` GEMM)."""
    return _conv.scaled_conv2d_input(input_size, w, w_scale, g, g_scale, stride, padding, dilation, groups,
                                     out_dtype)


@qconv2d_input.register_fake
def _(g, g_scale, w, w_scale, input_size, stride, padding, dilation, groups, out_dtype):
    return g.new_empty(list(input_size), dtype=out_dtype)


@torch.library.custom_op("fqt::qconv2d_weight", mutates_args=())
def qconv2d_weight(x: Tensor, x_scale: Tensor | None, g: Tensor, g_scale: Tensor | None, weight_size: list[int],
                   stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   out_dtype: torch.dtype) -> Tensor:
    """Gradient of a conv2d w.r.t. its weight, ``weight_size`` = ``[C_out, C_in/groups, kh, kw]`` (``grad_weight``)."""
    return _conv.scaled_conv2d_weight(x, x_scale, weight_size, g, g_scale, stride, padding, dilation, groups,
                                      out_dtype)


@qconv2d_weight.register_fake
def _(x, x_scale, g, g_scale, weight_size, stride, padding, dilation, groups, out_dtype):
    return x.new_empty(list(weight_size), dtype=out_dtype)


# -- accumulators: the integer part of each conv GEMM, as fp32 (fqtc/codegen/inductor_cpu.py inlines the epilogue)


@torch.library.custom_op("fqt::conv2d_acc", mutates_args=())
def conv2d_acc(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
               groups: int) -> Tensor:
    """Exact integer ``conv2d(x, w)`` of int8 codes as fp32 (`fqtc.quant.conv.conv2d_acc`)."""
    return _conv.conv2d_acc(x, w, stride, padding, dilation, groups)


@conv2d_acc.register_fake
def _(x, w, stride, padding, dilation, groups):
    n, h, wd = x.shape[0], x.shape[2], x.shape[3]
    ho = _out_size(h, w.shape[2], stride[0], padding[0], dilation[0])
    wo = _out_size(wd, w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((n, w.shape[0], ho, wo), dtype=torch.float32)


@torch.library.custom_op("fqt::conv2d_input_acc", mutates_args=())
def conv2d_input_acc(g: Tensor, w: Tensor, input_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int) -> Tensor:
    """Exact integer gradient of a conv2d w.r.t. its input, as fp32 (`fqtc.quant.conv.conv2d_input_acc`)."""
    return _conv.conv2d_input_acc(input_size, w, g, stride, padding, dilation, groups)


@conv2d_input_acc.register_fake
def _(g, w, input_size, stride, padding, dilation, groups):
    return g.new_empty(list(input_size), dtype=torch.float32)


@torch.library.custom_op("fqt::conv2d_weight_acc", mutates_args=())
def conv2d_weight_acc(x: Tensor, g: Tensor, weight_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int) -> Tensor:
    """Exact integer gradient of a conv2d w.r.t. its weight, as fp32 (`fqtc.quant.conv.conv2d_weight_acc`)."""
    return _conv.conv2d_weight_acc(x, weight_size, g, stride, padding, dilation, groups)


@conv2d_weight_acc.register_fake
def _(x, g, weight_size, stride, padding, dilation, groups):
    return x.new_empty(list(weight_size), dtype=torch.float32)
