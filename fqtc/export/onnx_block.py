"""ONNX translations of the block-scaled ops (``fqt::quantize_block``, ``fqt::block_gemm``; `fqtc.quant.block`).

``fqt::quantize_block`` mirrors `fqtc.quant.block.quantize_block` float op for float op, so codes and scales are
bit-exact: the block abs-max is `fqtc.quant.block.block_amax`'s zero padding of each blocked dim to a multiple of
``block`` (``Pad``), a ``Reshape`` that splits it into [n/block, block], and the uniform quantizer's group scale
(`fqtc.export._common._group_scale`: ``ReduceMax(Abs)`` over the block axes, amax/qmax, 1 for an all-zero block,
NaN/Inf propagated); the compact scale is that keepdim scale reshaped. Each element's scale is the keepdim scale
``Expand``-ed over its block, reshaped back and ``Slice``-d to ``x``'s shape (`fqtc.quant.block.expand_scale`),
and the codes are ``x / s`` (a true division) rounded as `fqtc.quant.uniform.round_codes` does, with the draws of
the counter stream keyed by the element index of the whole, unpadded tensor (``com.fqt::CounterUniform``,
``sr="counter"``) or ``RandomUniformLike`` (``sr="random"``).

``fqt::block_gemm`` is the product of the dequantized operands: per operand, a scale with ``ceil(K/block)``
entries along the reduction dim is first expanded along the other matrix dim when it holds tiles (``Gather`` of
tile ``i // block`` for row ``i``) and broadcast over the batch dims (``Expand``), then applied by one opset-21
*blocked* ``DequantizeLinear`` (``axis`` = the reduction dim, ``block_size`` = ``block``: the ONNX spec's
``y = (x - 0) * scale[..., i // block_size, ...]``, a ragged last block included); a scale constant along K
(per-tensor, per row / per column) is a plain ``DequantizeLinear`` (scalar or per-axis scale) or, when it varies
along several dims (batched per-row scales), ``Mul(Cast(x), s)`` -- the same single fp32 rounding. ``MatMul``
(+ ``bias``) follows. The dequantized operands equal `fqtc.quant.block.dequantize_block` bit for bit, but the fp32
``MatMul`` is not the reference's per-K-block int32 accumulation, so the output agrees only to fp32 rounding
(tests/export/test_onnx_block.py states the bound). onnxruntime's CPU provider (1.32) runs blocked
``DequantizeLinear`` on int8 input with an fp32 scale and no zero point, a ragged last block included.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

import fqtc.ops  # noqa: F401  (registers fqt::quantize_block, fqt::block_gemm)
from fqtc.export import _common
from fqtc.export.onnx_gradq import _uniform
from fqtc.quant import block as _block
from fqtc.quant.uniform import qmax_for

__all__ = ["BLOCK_TRANSLATIONS", "block_gemm", "quantize_block"]


def _ints(v: Sequence[int]):
    return _common._op().Constant(value_ints=[int(x) for x in v])


def _shape_of(x, what: str) -> list[int]:
    shape = _common._static_shape(x)
    if shape is None:
        raise NotImplementedError(f"fqtc.export_onnx: {what} needs static shapes")
    return shape


def _is_int8(v: Any) -> bool:
    import onnx

    dtype = getattr(v, "dtype", None)
    return dtype is not None and int(getattr(dtype, "value", dtype)) == onnx.TensorProto.INT8


# -- fqt::quantize_block ------------------------------------------------------------------------------------------
def _round_to_codes(y, bits: int, rounding: str, seed: int, stream: int, step):
    """`fqtc.quant.uniform.round_codes` + `to_int8_codes` on real-valued codes ``y``: the rounding tail of
    `fqtc.export._common._group_codes` (round half to even, or ``Floor(y + u)`` with the counter stream or
    ``RandomUniformLike``; ``Clip`` to +-qmax; a non-finite code becomes 0)."""
    import onnx

    op = _common._op()
    qmax = qmax_for(bits)
    if rounding == "nearest":
        q = op.Round(y)
    else:
        q = op.Floor(op.Add(y, _uniform(y, seed, stream, step)))
    q = op.Clip(q, op.Constant(value_float=float(-qmax)), op.Constant(value_float=float(qmax)))
    finite = op.Not(op.Or(op.IsNaN(q), op.IsInf(q)))
    return op.Cast(op.Where(finite, q, op.Constant(value_float=0.0)), to=onnx.TensorProto.INT8)


def quantize_block(x, bits: int, dims: Sequence[int], block: int, rounding: str, seed: int, stream: int, step):
    """fqt::quantize_block -> (int8 codes, compact fp32 scale), as `fqtc.quant.block.quantize_block`."""
    import onnx

    what = "fqt::quantize_block"
    if rounding not in ("nearest", "stochastic"):
        raise NotImplementedError(f"fqtc.export_onnx: {what} rounding {rounding!r} has no ONNX translation")
    _block.check_block(block)
    op = _common._op()
    shape = _shape_of(x, what)
    compact = _block.scale_shape(shape, dims, block)  # also validates dims (one or two)
    rank = len(shape)
    ds = sorted({d % rank for d in dims})
    padded = [-(-s // block) * block if i in ds else s for i, s in enumerate(shape)]
    xf = op.Cast(x, to=onnx.TensorProto.FLOAT)  # block_amax and the division work on x.float()
    xp = xf
    if padded != shape:  # zeros never raise an abs-max (block_amax's F.pad)
        xp = op.Pad(xf, _ints([0] * rank + [p - s for p, s in zip(padded, shape)]))
    blocked: list[int] = []
    red: list[int] = []
    for i, s in enumerate(padded):
        if i in ds:
            blocked += [s // block, block]
            red.append(len(blocked) - 1)
        else:
            blocked.append(s)
    # keepdim [.., n/block, 1, ..]: amax/qmax, 1 for an all-zero block, NaN/Inf propagated (scale_from_amax)
    keep = _common._group_scale(op.Reshape(xp, _ints(blocked)), int(bits), red)
    scale = op.Reshape(keep, _ints(compact))
    full = op.Reshape(op.Expand(keep, _ints(blocked)), _ints(padded))  # expand_scale: each element its block's
    if padded != shape:
        full = op.Slice(full, _ints([0] * rank), _ints(shape), _ints(list(range(rank))))
    codes = _round_to_codes(op.Div(xf, full), int(bits), rounding, int(seed), int(stream), step)
    return codes, scale


# -- fqt::block_gemm ----------------------------------------------------------------------------------------------
def _gather_blocks(op, s, axis: int, n: int, block: int):
    """Repeat each entry of ``s`` along ``axis`` over its block, cut to ``n`` (`fqtc.quant.block._row_scale`)."""
    return op.Gather(s, _ints([i // block for i in range(n)]), axis=axis)


def _dequantize_operand(x, scale, block: int, k_axis: int, what: str):
    """One GEMM operand in fp32: ``x`` [..., M, K] (``k_axis=-1``) or [..., K, N] (``k_axis=-2``) times its scale,
    as `fqtc.quant.block.dequantize_block` / the ``_row_scale`` + ``_expand_k`` of `fqtc.quant.block.block_gemm`."""
    import onnx

    op = _common._op()
    f32 = onnx.TensorProto.FLOAT
    if scale is None:  # a full-precision operand of a partially quantized GEMM
        return op.Cast(x, to=f32)
    xs = _shape_of(x, what)
    ss = _shape_of(scale, what)
    r = len(xs)
    if r < 2 or len(ss) > r:
        raise NotImplementedError(f"fqtc.export_onnx: {what} with a {len(ss)}-D scale on a {r}-D operand")
    row_axis = -2 if k_axis == -1 else -1
    k, rows = xs[k_axis], xs[row_axis]
    kb = -(-k // block)
    full = [1] * (r - len(ss)) + list(ss)  # the scale's shape, broadcast to x's rank
    for i, (sd, xd) in enumerate(zip(full, xs)):
        if sd not in (1, xd) and i - r not in (k_axis, row_axis):
            raise NotImplementedError(f"fqtc.export_onnx: {what} scale {ss} does not broadcast to operand {xs}")
    int8 = _is_int8(x)
    s = scale
    if full[row_axis] not in (1, rows):  # b x b tiles: ceil(rows/block) entries along the non-reduction dim
        if full[row_axis] != -(-rows // block):
            raise ValueError(f"{what}: a scale with {full[row_axis]} entries along a dim of {rows} rows is neither "
                             f"per row nor per tile of {block}")
        s = _gather_blocks(op, s, row_axis, rows, block)
        full[row_axis] = rows
    if full[k_axis] not in (1, k):  # block scales along K
        if full[k_axis] != kb:
            raise ValueError(f"{what}: a scale with {full[k_axis]} entries along a reduction dim of {k} is neither "
                             f"per element nor per block of {block}")
        target = [*xs]
        target[k_axis] = kb
        if not int8:  # float "codes": expand along K too and multiply (block_gemm's _expand_k)
            return op.Mul(op.Cast(x, to=f32), _gather_blocks(op, s, k_axis, k, block))
        if full != target:  # blocked DequantizeLinear wants the scale's full rank and extent off the block axis
            s = op.Expand(s, _ints(target))
        return op.DequantizeLinear(x, s, axis=r + k_axis, block_size=int(block))
    # constant along K (or one scale per element): a plain dequantize
    varying = [i for i, d in enumerate(full) if d != 1]
    if int8 and not varying:  # per-tensor: a scalar scale
        return op.DequantizeLinear(x, op.Reshape(s, _ints([])))
    if int8 and len(varying) == 1:  # per row / per column: a 1-D scale along that axis
        return op.DequantizeLinear(x, op.Reshape(s, _ints([-1])), axis=varying[0])
    return op.Mul(op.Cast(x, to=f32), s)  # same x * s, broadcast over several dims


def block_gemm(a, a_scale, b, b_scale, block: int, bias, out_dtype):
    """fqt::block_gemm -> ``MatMul(dequantize(a), dequantize(b))`` (+ bias), cast to ``out_dtype``."""

    what = "fqt::block_gemm"
    _block.check_block(block)
    op = _common._op()
    a_hp = _dequantize_operand(a, a_scale, int(block), -1, what)
    b_hp = _dequantize_operand(b, b_scale, int(block), -2, what)
    out = op.MatMul(a_hp, b_hp)
    return _common._bias_and_cast(out, bias, out_dtype)


BLOCK_TRANSLATIONS = {
    torch.ops.fqt.quantize_block.default: quantize_block,
    torch.ops.fqt.block_gemm.default: block_gemm,
}
