"""CUDA implementations of the fqt ops: the Triton kernels behind each op's exact schema.

Each function takes the op's arguments and returns what the op's reference implementation returns, bit for bit.
Arguments outside a kernel's coverage (a reduction that is neither a prefix nor a suffix of the dims, a GEMM with
a float operand or a scale along K, a prologue scale that is neither per-tensor nor per-row) run the reference
implementation instead; each such call is counted in `FALLBACKS` and warned about once, so a fallback is never
silent.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import Tensor

from fqtc.codegen import gemm as _kg
from fqtc.codegen import quantize as _kq
from fqtc.quant import gemm as _gemm
from fqtc.quant import uniform as _uniform

FALLBACKS: Counter = Counter()


def _fallback(op: str, why: str) -> None:
    if not FALLBACKS[(op, why)]:
        warnings.warn(f"fqtc.codegen: {op} runs the reference implementation: {why}", stacklevel=3)
    FALLBACKS[(op, why)] += 1


def quantize_cuda(x: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int,
                  step: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``fqt::quantize`` on the Triton quantize kernels."""
    try:
        _kq.layout_of(tuple(x.shape), reduce_dims)
    except NotImplementedError as e:
        _fallback("fqt::quantize", str(e))
        return _uniform.quantize(x, bits, reduce_dims, rounding, seed=seed, step=step, stream=stream, amax=amax)
    return _kq.quantize(x, bits, reduce_dims, rounding, seed=seed, step=step, stream=stream, amax=amax)


def qgemm_cuda(a: Tensor, a_scale: Tensor | None, b: Tensor, b_scale: Tensor | None, bias: Tensor | None,
               out_dtype: torch.dtype) -> Tensor:
    """``fqt::qgemm`` on the Triton int8 GEMM (scales, bias and cast in the epilogue)."""
    why = _gemm.not_integer_reason(a, a_scale, b, b_scale)
    if why:
        _fallback("fqt::qgemm", why)
        return _gemm.scaled_gemm(a, a_scale, b, b_scale, bias, out_dtype)
    return _kg.scaled_gemm(a, a_scale, b, b_scale, bias, out_dtype)


def _prologue_unsupported(a: Tensor, dims: list[int], b: Tensor, b_scale: Tensor | None) -> str | None:
    """Why the quantizing-prologue GEMM kernel cannot take A quantized over ``dims``, else None."""
    n = a.dim()
    if b.dtype != torch.int8 or b_scale is None:
        return "B is not int8 codes with a scale"
    if sorted({d % n for d in dims}) not in (list(range(n)), [n - 1]):
        return f"prologue scale over reduce_dims={list(dims)} is neither per-tensor nor per-row"
    if tuple(a.shape[:-2]) != tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])):
        return "A is broadcast over the batch"
    return None


def qgemm_fused_quant_cuda(a: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int,
                           step: Tensor, b: Tensor, b_scale: Tensor | None, bias: Tensor | None,
                           out_dtype: torch.dtype, a_amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``fqt::qgemm_fused_quant`` on the GEMM kernel with the quantizing prologue."""
    why = _prologue_unsupported(a, list(reduce_dims), b, b_scale)
    if why:
        _fallback("fqt::qgemm_fused_quant", why)
        codes, scale = _uniform.quantize(a, bits, reduce_dims, rounding, seed=seed, step=step, stream=stream,
                                         amax=a_amax)
        return _gemm.scaled_gemm(codes, scale, b, b_scale, bias, out_dtype), codes, scale
    out, codes, scale = _kg.qgemm_fused_quant(a, bits, reduce_dims, rounding, seed, stream, step, b, b_scale, bias,
                                              out_dtype, amax=a_amax)
    return out, codes, scale


def qgemm_fused_grad_quant_cuda(a: Tensor, quantizer: str, bits: int, reduce_dims: list[int], rounding: str,
                                seed: int, stream: int, step: Tensor, b: Tensor, b_scale: Tensor | None,
                                bias: Tensor | None, out_dtype: torch.dtype,
                                a_amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``fqt::qgemm_fused_grad_quant``: the same prologue kernel (PTQ quantizes per tensor, PSQ per row; every
    quantizer shares `fqtc.quant.uniform`'s non-finite policy)."""
    dims = list(range(a.dim())) if quantizer == "ptq" else list(reduce_dims)
    why = _prologue_unsupported(a, dims, b, b_scale)
    if why:
        from fqtc.ops import fused as _fused

        _fallback("fqt::qgemm_fused_grad_quant", why)
        return _fused.qgemm_fused_grad_quant._init_fn(a, quantizer, bits, reduce_dims, rounding, seed, stream, step,
                                                      b, b_scale, bias, out_dtype, a_amax)
    out, codes, scale = _kg.qgemm_fused_quant(a, bits, dims, rounding, seed, stream, step, b, b_scale, bias,
                                              out_dtype, amax=a_amax)
    return out, codes, scale


def grad_quantize_cuda(x: Tensor, quantizer: str, bits: int, reduce_dims: list[int], rounding: str, seed: int,
                       stream: int, step: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``fqt::grad_quantize``: PTQ/PSQ/SCQ on the quantize kernels; AQ and uncovered layouts run the
    reference (counted)."""
    from fqtc.codegen import gradq as _kgq
    from fqtc.quant import gradq as _gradq

    why = None
    if quantizer not in _kgq.KERNEL_QUANTIZERS:
        why = f"no kernel for gradient quantizer {quantizer!r} (host-side group sampling)"
    elif _gradq.two_level(quantizer, bits):  # the kernels quantize on the uniform grid only
        why = "no kernel for the two-level (1-bit) PSQ"
    elif quantizer != "ptq":
        try:
            _kq.layout_of(tuple(x.shape), reduce_dims)
        except NotImplementedError as e:
            why = str(e)
    if why:
        if quantizer == "bhq":
            raise ValueError("fqt::grad_quantize: BHQ does not factor as codes x scale; use fqt::bhq")
        _fallback("fqt::grad_quantize", why)
        q = _gradq.grad_quantize(x, quantizer, bits, reduce_dims, rounding, seed, step, stream, amax)
        return q.codes, q.scale.contiguous()
    return _kgq.grad_quantize(x, quantizer, bits, reduce_dims, rounding, seed, step, stream, amax)


def bhq_cuda(x: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int,
             step: Tensor, amax: Tensor | None = None) -> Tensor:
    """``fqt::bhq``: transform, quantize, dequantize and invert fused per Householder group."""
    from fqtc.codegen import gradq as _kgq
    from fqtc.quant import gradq as _gradq

    why = _kgq.bhq_supported(x.shape, reduce_dims)
    if why:
        _fallback("fqt::bhq", why)
        return _gradq.bhq_dequantize(_gradq.bhq(x, bits, reduce_dims, rounding, seed, step, stream, amax),
                                     reduce_dims).contiguous()
    return _kgq.bhq(x, bits, reduce_dims, rounding, seed, step, stream, amax)


def lwq_update_cuda(q: Tensor, r: Tensor, s: Tensor, mu: Tensor, grad: Tensor, states: list[Tensor], kind: str,
                    hparams: list[float], shape: list[int], wbits: int, lbits: int, seed: int, stream: int,
                    step: Tensor, skip: Tensor, refresh: bool, mu_interval: int, lr: Tensor | None = None,
                    mu_thresholds: list[float] | None = None, index_offset: int = 0, mu_next: int = -1) -> Tensor:
    """``fqt::lwq_update``: the one-pass SGD or AdamW kernel where it applies (fp32 optimizer states,
    no importance-level re-selection step), else the reference (counted). A tensor ``lr`` is read once here (one
    host sync) and passed to the kernel as its scalar; the kernel's float64/fp32 roundings of it match the
    reference's tensor-lr expressions (`fqtc.ops.lwq.optimizer_math`)."""
    from fqtc.codegen import lwq as _klwq
    from fqtc.ops import lwq as _olwq

    why = _klwq.unsupported(q, states, kind, hparams, shape, wbits, lbits, step, mu_interval)
    if not why and index_offset:
        why = "a row shard of a parameter (index_offset > 0): the kernel draws from element 0"
    if why:
        _fallback("fqt::lwq_update", why)
        # the op's own reference body (calling the op would dispatch back here on CUDA tensors)
        return _olwq.lwq_update._init_fn(q, r, s, mu, grad, states, kind, hparams, shape, wbits, lbits, seed, stream,
                                         step, skip, refresh, mu_interval, lr, mu_thresholds, index_offset,
                                         mu_next)
    if lr is not None:
        hparams = [float(lr)] + list(hparams[1:])
    return _klwq.lwq_update(q, r, s, mu, grad, states, kind, hparams, shape, wbits, lbits, seed, stream, step, skip,
                            refresh, mu_interval)


def qconv2d_cuda(x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor | None, bias: Tensor | None,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 out_dtype: torch.dtype) -> Tensor:
    """``fqt::qconv2d``: the implicit-GEMM int8 conv kernel (groups=1), else the reference (counted)."""
    from fqtc.codegen import conv as _kc
    from fqtc.quant import conv as _conv

    why = _kc.conv2d_supported(x, x_scale, w, w_scale, groups)
    if why:
        _fallback("fqt::qconv2d", why)
        return _conv.scaled_conv2d(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype)
    return _kc.scaled_conv2d(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype)


def qconv2d_input_cuda(g: Tensor, g_scale: Tensor | None, w: Tensor, w_scale: Tensor | None, input_size: list[int],
                       stride: list[int], padding: list[int], dilation: list[int], groups: int,
                       out_dtype: torch.dtype) -> Tensor:
    """``fqt::qconv2d_input``: the transposed conv as an implicit-GEMM kernel (groups=1), else the
    reference (counted)."""
    from fqtc.codegen import conv as _kc
    from fqtc.quant import conv as _conv

    why = _kc.conv2d_input_supported(g, g_scale, w, w_scale, groups)
    if why:
        _fallback("fqt::qconv2d_input", why)
        return _conv.scaled_conv2d_input(input_size, w, w_scale, g, g_scale, stride, padding, dilation, groups,
                                         out_dtype)
    return _kc.scaled_conv2d_input(input_size, w, w_scale, g, g_scale, stride, padding, dilation, groups, out_dtype)


def qconv2d_weight_cuda(x: Tensor, x_scale: Tensor | None, g: Tensor, g_scale: Tensor | None,
                        weight_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, out_dtype: torch.dtype) -> Tensor:
    """``fqt::qconv2d_weight``: implicit-GEMM kernel reducing over N*H_out*W_out (groups=1), else the
    reference (counted)."""
    from fqtc.codegen import conv as _kc
    from fqtc.quant import conv as _conv

    why = _kc.conv2d_weight_supported(x, x_scale, g, g_scale, groups)
    if why:
        _fallback("fqt::qconv2d_weight", why)
        return _conv.scaled_conv2d_weight(x, x_scale, weight_size, g, g_scale, stride, padding, dilation, groups,
                                          out_dtype)
    return _kc.scaled_conv2d_weight(x, x_scale, weight_size, g, g_scale, stride, padding, dilation, groups,
                                    out_dtype)


def quantize_block_cuda(x: Tensor, bits: int, dims: list[int], block: int, rounding: str, seed: int, stream: int,
                        step: Tensor) -> tuple[Tensor, Tensor]:
    """``fqt::quantize_block`` on the block quantize kernel (1 x b groups along any dim, b x b tiles of the last
    two dims), else the reference (counted)."""
    from fqtc.codegen import block as _kb
    from fqtc.quant import block as _block

    _block.check_block(block)
    why = _kb.quantize_block_unsupported(x, dims)
    if why:
        _fallback("fqt::quantize_block", why)
        return _block.quantize_block(x, bits, dims, block, rounding, seed=seed, step=step, stream=stream)
    return _kb.quantize_block(x, bits, dims, block, rounding, seed=seed, step=step, stream=stream)


def block_gemm_cuda(a: Tensor, a_scale: Tensor | None, b: Tensor, b_scale: Tensor | None, block: int,
                    bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``fqt::block_gemm`` on the block-scaled int8 GEMM kernel; the dequantized-float form and scale layouts it
    does not cover run the reference (counted)."""
    from fqtc.codegen import block as _kb
    from fqtc.quant import block as _block

    _block.check_block(block)
    why = _kb.block_gemm_unsupported(a, a_scale, b, b_scale, block, bias, out_dtype)
    if why:
        _fallback("fqt::block_gemm", why)
        return _block.block_gemm(a, a_scale, b, b_scale, block, bias, out_dtype)
    return _kb.block_gemm(a, a_scale, b, b_scale, block, bias, out_dtype)


CUDA_IMPLS = {
    "fqt::quantize": quantize_cuda,
    "fqt::qgemm": qgemm_cuda,
    "fqt::qgemm_fused_quant": qgemm_fused_quant_cuda,
    "fqt::qgemm_fused_grad_quant": qgemm_fused_grad_quant_cuda,
    "fqt::grad_quantize": grad_quantize_cuda,
    "fqt::bhq": bhq_cuda,
    "fqt::lwq_update": lwq_update_cuda,
    "fqt::qconv2d": qconv2d_cuda,
    "fqt::qconv2d_input": qconv2d_input_cuda,
    "fqt::qconv2d_weight": qconv2d_weight_cuda,
    "fqt::quantize_block": quantize_block_cuda,
    "fqt::block_gemm": block_gemm_cuda,
}
