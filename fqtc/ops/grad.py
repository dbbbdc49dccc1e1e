"""Gradient-quantizer ops (docs/gradient_quantizers.md): ``fqt::grad_quantize`` and ``fqt::bhq``.

- ``fqt::grad_quantize(x, quantizer, bits, reduce_dims, rounding, seed, stream, step) -> (codes, scale)`` for the
  quantizers whose result factors as int8 codes x a keepdim fp32 scale (PTQ, PSQ, SCQ, AQ, AQ top-k): the scale is
  constant along the non-reduced axis, so ``fqt::qgemm`` stays an integer GEMM whenever the scale is constant
  along the GEMM's reduction axis (AQ's 1/p reweighting is folded into the scale, dropped groups have zero codes).
- ``fqt::bhq(x, bits, reduce_dims, rounding, seed, stream, step) -> xhat``: BHQ's ``T^-1 Q(T x)`` as a dequantized
  fp32 tensor. T^-1 mixes the rows of the quantized gradient, so it does not factor into per-row scales;
  ``fqt::qgemm`` consumes it as a float operand (scale None) and the GEMM record says so.

Reference implementations call `fqtc.quant.gradq`; fake implementations give shapes and dtypes only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtc.ops.core import fake_codes_and_scale
from fqtc.quant import gradq as _gradq


@torch.library.custom_op("fqt::grad_quantize", mutates_args=())
def grad_quantize(
    x: Tensor, quantizer: str, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int, step: Tensor,
    amax: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A gradient quantizer with a codes x scale result: int8 codes (x's shape) and a keepdim fp32 scale.
    ``amax``: the group abs-max from ``x``'s producer (PTQ/PSQ/SCQ; `fqtc.quant.gradq.AMAX_QUANTIZERS`)."""
    if quantizer == "bhq":
        raise ValueError("fqt::grad_quantize: BHQ does not factor as codes x scale; use fqt::bhq")
    q = _gradq.grad_quantize(x, quantizer, bits, reduce_dims, rounding, seed, step, stream, amax)
    return q.codes, q.scale.contiguous()


@grad_quantize.register_fake
def _(x, quantizer, bits, reduce_dims, rounding, seed, stream, step, amax=None):
    if not x.dim():
        return fake_codes_and_scale(x, [])
    return fake_codes_and_scale(x, list(range(x.dim())) if quantizer == "ptq" else reduce_dims)


@torch.library.custom_op("fqt::bhq", mutates_args=())
def bhq(x: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int, step: Tensor,
        amax: Tensor | None = None) -> Tensor:
    """Block Householder quantization, dequantized: ``T^-1 Q(T x)`` in fp32 (an unbiased estimate of ``x``).
    ``amax``: the rows' abs-max (keepdim over ``reduce_dims``) from ``x``'s producer: the transform's input."""
    q = _gradq.bhq(x, bits, reduce_dims, rounding, seed, step, stream, amax)
    return _gradq.bhq_dequantize(q, reduce_dims).contiguous()


@bhq.register_fake
def _(x, bits, reduce_dims, rounding, seed, stream, step, amax=None):
    return x.new_empty(x.shape, dtype=torch.float32)
