"""Fused fqt ops that the codegen pass (`fqtc.codegen.lower`) puts in place of fqt op chains on CUDA graphs.

Each op's default implementation calls the unfused reference functions in `fqtc.quant`, so a fused graph computes
the same bits as the chain it replaced on every device; `fqtc.codegen.register_cuda_kernels` registers the fused
Triton kernel as its CUDA implementation.

- ``fqt::qgemm_fused_quant``: ``fqt::quantize`` of the GEMM's left operand feeding ``fqt::qgemm``
  (quantization in the GEMM prologue). Returns the GEMM output and the activation codes and scale, which backward
  GEMMs read.
- ``fqt::qgemm_fused_grad_quant``: the same for ``fqt::grad_quantize`` (PTQ/PSQ/SCQ) feeding the
  ``grad_input`` GEMM: the gradient quantization in the prologue.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtc.ops.core import fake_codes_and_scale, fake_gemm_out
from fqtc.quant import gemm as _gemm
from fqtc.quant import gradq as _gradq
from fqtc.quant import uniform as _uniform


@torch.library.custom_op("fqt::qgemm_fused_quant", mutates_args=())
def qgemm_fused_quant(
    a: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int, step: Tensor,
    b: Tensor, b_scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype, a_amax: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``codes, s = quantize(a, bits, reduce_dims, rounding, seed, step, stream, a_amax)``;
    ``out = scaled_gemm(codes, s, b, b_scale, bias, out_dtype)``. Returns ``(out, codes, s)``. ``a_amax``: the
    keepdim group abs-max of ``a`` from its producer (the codegen pass supplies it, `fqtc.codegen.lower`)."""
    codes, scale = _uniform.quantize(a, bits, reduce_dims, rounding, seed=seed, step=step, stream=stream, amax=a_amax)
    return _gemm.scaled_gemm(codes, scale, b, b_scale, bias, out_dtype), codes, scale


@qgemm_fused_quant.register_fake
def _(a, bits, reduce_dims, rounding, seed, stream, step, b, b_scale, bias, out_dtype, a_amax=None):
    return (fake_gemm_out(a, b, bias, out_dtype), *fake_codes_and_scale(a, reduce_dims))


FUSABLE_GRAD_QUANTIZERS = ("ptq", "psq", "scq")  # codes x one scale per row / tensor: a GEMM prologue


@torch.library.custom_op("fqt::qgemm_fused_grad_quant", mutates_args=())
def qgemm_fused_grad_quant(
    a: Tensor, quantizer: str, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int, step: Tensor,
    b: Tensor, b_scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype, a_amax: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``q = grad_quantize(a, quantizer, bits, reduce_dims, ..., a_amax)``;
    ``out = scaled_gemm(q.codes, q.scale, b, ...)``. Returns ``(out, codes, scale)``."""
    if quantizer not in FUSABLE_GRAD_QUANTIZERS:
        raise ValueError(f"fqt::qgemm_fused_grad_quant: quantizer {quantizer!r} is not one of "
                         f"{FUSABLE_GRAD_QUANTIZERS}; keep fqt::grad_quantize + fqt::qgemm for it")
    q = _gradq.grad_quantize(a, quantizer, bits, reduce_dims, rounding, seed, step, stream, a_amax)
    scale = q.scale.contiguous()
    return _gemm.scaled_gemm(q.codes, scale, b, b_scale, bias, out_dtype), q.codes, scale


@qgemm_fused_grad_quant.register_fake
def _(a, quantizer, bits, reduce_dims, rounding, seed, stream, step, b, b_scale, bias, out_dtype, a_amax=None):
    dims = list(range(a.dim())) if quantizer == "ptq" else reduce_dims
    return (fake_gemm_out(a, b, bias, out_dtype), *fake_codes_and_scale(a, dims))
