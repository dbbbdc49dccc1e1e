"""Core fqt ops: stream keys, uniform quantization and the scaled integer GEMM (step counter: `fqtc.ops.stepcounter`).

Every op is a ``torch.library`` custom op with a fake (meta) implementation so it composes with Dynamo,
AOTAutograd, the partitioners, Inductor (as an extern call) and export. The default implementation calls the pure
reference functions in `fqtc.quant`; `fqtc.codegen` registers fused Triton kernels for CUDA tensors.

Graphs must use the OpOverloads (``torch.ops.fqt.quantize.default``), not the Python functions below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtc.quant import gemm as _gemm
from fqtc.quant import rng as _rng
from fqtc.quant import rotate as _rotate
from fqtc.quant import uniform as _uniform


@torch.library.custom_op("fqt::stream_key", mutates_args=())
def stream_key(seed: int, stream: int, step: Tensor) -> Tensor:
    """The 0-d int64 key of one stochastic-rounding stream at this step (`fqtc.quant.rng.stream_key`): computed
    once per quantizer in compiled CPU graphs, where Inductor would otherwise recompute it per vector of elements."""
    if step.device.type == "cpu":  # host arithmetic on Python ints: one small tensor instead of ~20 tiny ops
        return torch.tensor(_rng.stream_key_int(seed, int(step), stream), dtype=torch.int64)
    return _rng.stream_key(seed, step, stream).to(step.device)


@stream_key.register_fake
def _(seed: int, stream: int, step: Tensor) -> Tensor:
    return torch.empty((), dtype=torch.int64, device=step.device)


@torch.library.custom_op("fqt::stream_keys", mutates_args=())
def stream_keys(seed: int, streams: list[int], step: Tensor) -> Tensor:
    """`stream_key` of several streams at once, as a 1-D int64 tensor: a compiled graph computes every key of its
    stochastic quantizers with one op call (each custom-op call costs tens of microseconds of dispatch)."""
    if step.device.type == "cpu":
        s = int(step)
        return torch.tensor(_rng.stream_keys_int(seed, s, list(streams)), dtype=torch.int64)
    return torch.stack([_rng.stream_key(seed, step, st).to(step.device) for st in streams]) if streams else \
        torch.empty(0, dtype=torch.int64, device=step.device)


@stream_keys.register_fake
def _(seed: int, streams: list[int], step: Tensor) -> Tensor:
    return torch.empty(len(streams), dtype=torch.int64, device=step.device)


@torch.library.custom_op("fqt::round_codes", mutates_args=())
def round_codes(y: Tensor, qmax: int, rounding: str, key: Tensor | None = None) -> Tensor:
    """int8 codes of real-valued codes ``y`` (``x / scale``): `fqtc.quant.uniform.round_codes` (NaN to 0, nearest
    or stochastic rounding with the draws of the 0-d int64 stream ``key``, clamp to ``±qmax``) then the int8 cast.
    The compiled CPU graphs lower it to one Inductor loop body (`fqtc.codegen.inductor_cpu`): traced as aten ops,
    every value read twice (``y`` by the NaN test, the hash's ``x ^ (x >> 16)``) is re-expanded or stored by
    Inductor."""
    if rounding == "stochastic" and key is None:
        raise ValueError("fqt::round_codes: stochastic rounding needs the stream key")
    return _uniform.to_int8_codes(_uniform.round_codes(y, qmax, rounding, key=key))


@round_codes.register_fake
def _(y: Tensor, qmax: int, rounding: str, key: Tensor | None = None) -> Tensor:
    return torch.empty(y.shape, dtype=torch.int8, device=y.device)


# -- quantize ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("fqt::quantize", mutates_args=())
def quantize(
    x: Tensor, bits: int, reduce_dims: list[int], rounding: str, seed: int, stream: int, step: Tensor,
    amax: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Symmetric uniform quantization: int8 codes and an fp32 keepdim scale shared over ``reduce_dims``.

    ``amax`` (optional): the keepdim group abs-max of ``x``, computed by the caller; the codegen pass supplies it
    from ``x``'s producer so the quantize kernel reads ``x`` once (docs/kernels.md)."""
    return _uniform.quantize(x, bits, reduce_dims, rounding, seed=seed, step=step, stream=stream, amax=amax)


def fake_codes_and_scale(x: Tensor, reduce_dims: list[int]) -> tuple[Tensor, Tensor]:
    """Fake (int8 codes, fp32 keepdim scale over ``reduce_dims``) of a quantizer of ``x`` (shared by fake impls)."""
    dims = {d % x.dim() for d in reduce_dims}
    sshape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(sshape, dtype=torch.float32)


@quantize.register_fake
def _(x, bits, reduce_dims, rounding, seed, stream, step, amax=None):
    return fake_codes_and_scale(x, reduce_dims)


@torch.library.custom_op("fqt::int_gemm", mutates_args=())
def int_gemm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 ``a @ b`` of int8 codes (batched or 2-D, `fqtc.quant.gemm.int_gemm`): the integer part of a
    batched `qgemm` in compiled CPU graphs, whose dequantize epilogue Inductor fuses into the consumer."""
    return _gemm.int_gemm(a, b)


@int_gemm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return fake_gemm_out(a, b, None, torch.int32)


# -- integer GEMM ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fqt::qgemm", mutates_args=())
def qgemm(
    a: Tensor, a_scale: Tensor | None, b: Tensor, b_scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``(a_scale*a) @ (b_scale*b) + bias``: exact int8 GEMM with the scales in the epilogue (2-D or batched).

    A ``None`` scale marks a full-precision operand (a partially quantized GEMM, e.g. weight-only).
    """
    return _gemm.scaled_gemm(a, a_scale, b, b_scale, bias, out_dtype)


def fake_gemm_out(a: Tensor, b: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Fake output of ``a @ b + bias`` (batch dims broadcast), shared by the GEMM ops' fake impls."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    shape = (*batch, a.shape[-2], b.shape[-1])
    if bias is not None:
        shape = torch.broadcast_shapes(shape, bias.shape)
    return a.new_empty(shape, dtype=out_dtype)


@qgemm.register_fake
def _(a, a_scale, b, b_scale, bias, out_dtype):
    return fake_gemm_out(a, b, bias, out_dtype)


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return _uniform.dequantize(codes, scale)


@torch.library.custom_op("fqt::rotate", mutates_args=())
def rotate(x: Tensor, dim: int, block: int, seed: int, stream: int, inverse: bool) -> Tensor:
    """Randomized Hadamard rotation of ``x`` along ``dim`` (`fqtc.quant.rotate.rotate`), fp32."""
    return _rotate.rotate(x, dim, block, seed, stream, inverse).contiguous()


@rotate.register_fake
def _(x, dim, block, seed, stream, inverse):
    return torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)
