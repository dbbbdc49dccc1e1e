"""Gradient-quantizer ops (docs/gradient_quantizers.md): ``fqt::grad_quantize``, ``fqt::bhq`` and its two halves.

- ``fqt::grad_quantize(x, quantizer, bits, reduce_dims, rounding, seed, stream, step) -> (codes, scale)`` for the
  quantizers whose result factors as int8 codes x a keepdim fp32 scale (PTQ, PSQ, SCQ, AQ, AQ top-k): the scale is
  constant along the non-reduced axis, so ``fqt::qgemm`` stays an integer GEMM whenever the scale is constant
  along the GEMM's reduction axis (AQ's 1/p reweighting is folded into the scale, dropped groups have zero codes).
- ``fqt::bhq(x, bits, reduce_dims, rounding, seed, stream, step) -> xhat``: BHQ's ``T^-1 Q(T x)`` as a dequantized
  fp32 tensor. T^-1 mixes the rows of the quantized gradient, so it does not factor into per-row scales;
  ``fqt::qgemm`` consumes it as a float operand (scale None) and the GEMM record says so.
- ``fqt::bhq_quantize(x, ...) -> (codes, scale, order, group, v, d)``: BHQ before its inverse: int8 codes and
  per-row scales of ``T x`` and the transform T (`fqtc.quant.gradq.bhq_transform`'s ``aux``). A GEMM whose output
  rows are the rows of ``x`` (``grad_input = g @ W``) stays an integer GEMM on these codes, since
  ``T^-1 Q(T g) W = T^-1 (Q(T g) W)``: ``fqt::bhq_invert`` applies T^-1 to its output rows
  (docs/gradient_quantizers.md, "The quantizers").
- ``fqt::bhq_invert(y, order, group, v, d, reduce_dims) -> T^-1 y``: on a GEMM output, or on the dequantized codes
  (``codes * scale``) for a GEMM that reduces over the rows (``grad_weight``), which is ``fqt::bhq``'s result.

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


@torch.library.custom_op("fqt::bhq_quantize", mutates_args=())
def bhq_quantize(x: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int, step: Tensor,
                 amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BHQ's codes and keepdim scales of ``T x`` with the transform (order, group, v, d): ``fqt::bhq`` without the
    inverse (the same draws: ``bhq_invert(codes * scale, ...)`` is ``fqt::bhq``'s result bit for bit)."""
    q = _gradq.bhq(x, bits, reduce_dims, rounding, seed, step, stream, amax)
    a = q.aux
    return q.codes, q.scale.contiguous(), a["order"], a["group"], a["v"], a["d"]


@bhq_quantize.register_fake
def _(x, bits, reduce_dims, rounding, seed, stream, step, amax=None):
    codes, scale = fake_codes_and_scale(x, reduce_dims)
    n = _gradq._group_perm(x.shape, reduce_dims)[2]  # the number of rows (groups) T acts on
    return (codes, scale, x.new_empty([n], dtype=torch.int64), x.new_empty([n], dtype=torch.int64),
            x.new_empty([n], dtype=torch.float32), x.new_empty([n], dtype=torch.float32))


@torch.library.custom_op("fqt::bhq_invert", mutates_args=())
def bhq_invert(y: Tensor, order: Tensor, group: Tensor, v: Tensor, d: Tensor, reduce_dims: list[int]) -> Tensor:
    """``T^-1 y`` for the transform of `bhq_quantize`, on ``y``'s rows (the groups of ``reduce_dims``), fp32."""
    aux = {"order": order, "group": group, "v": v, "d": d}
    return _gradq.bhq_invert(y, aux, reduce_dims).contiguous()


@bhq_invert.register_fake
def _(y, order, group, v, d, reduce_dims):
    return y.new_empty(y.shape, dtype=torch.float32)
