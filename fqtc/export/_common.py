"""Helpers shared by the ONNX translations of `fqtc.export.onnx`, `fqtc.export.onnx_gradq` and
`fqtc.export.onnx_lwq` (private: the public API is `fqtc.export.onnx`): the onnxscript opsets, static shapes, the
stochastic-rounding mode of the export in progress, the counter stream key and the uniform group quantizer.
"""

from __future__ import annotations

from typing import Any

from fqtc.quant.rng import GOLDEN, mix32_int

FQT_DOMAIN = "com.fqt"
FQT_DOMAIN_VERSION = 1


def _op():
    from onnxscript import opset21

    return opset21


def _fqt_opset():
    from onnxscript import values

    return values.Opset(FQT_DOMAIN, FQT_DOMAIN_VERSION)


def _rank(v: Any) -> int | None:
    shape = getattr(v, "shape", None)
    try:
        return len(shape) if shape is not None else None
    except TypeError:
        return None


def _static_shape(v: Any) -> list[int] | None:
    shape = getattr(v, "shape", None)
    if shape is None:
        return None
    try:
        dims = list(shape)
    except TypeError:
        return None
    return [d if isinstance(d, int) else None for d in dims] if all(isinstance(d, int) for d in dims) else None


_SR_MODE = ["random"]  # set by export_graph for the duration of one export


def _no_given_amax(op: str, amax) -> None:
    """The ONNX translations compute each quantizer's statistic from its input; a graph whose quantizers take a
    precomputed ``amax`` (the CUDA codegen pass's producer statistic) is not what `export_onnx` traces."""
    if amax is not None:
        raise NotImplementedError(f"fqtc.export_onnx: {op} with a precomputed amax (a graph lowered by the CUDA "
                                  "codegen pass) has no ONNX translation; export the model itself (export_onnx "
                                  "traces the unlowered graphs on CPU)")


def _group_scale(x, bits, dims):
    """`fqtc.quant.uniform.absmax_scale` over ``dims``: amax/qmax, 1 for an all-zero group, NaN for a group holding
    a NaN (ReduceMax need not propagate NaN, so it is tested separately), Inf for one holding an Inf."""
    import onnx

    op = _op()
    qmax = (1 << (bits - 1)) - 1 if bits > 1 else 1
    f32 = onnx.TensorProto.FLOAT
    axes = op.Constant(value_ints=dims)
    amax = op.ReduceMax(op.Abs(x), axes, keepdims=1) if dims else op.Abs(x)
    nan = op.Constant(value_float=float("nan"))
    if dims:
        any_nan = op.Cast(op.ReduceMax(op.Cast(op.IsNaN(x), to=f32), axes, keepdims=1), to=onnx.TensorProto.BOOL)
        amax = op.Where(any_nan, nan, amax)
    return op.Where(op.Greater(amax, op.Constant(value_float=0.0)),
                    op.Div(amax, op.Constant(value_float=float(qmax))),
                    op.Where(op.IsNaN(amax), amax, op.Constant(value_float=1.0)))


def _group_codes(x, bits, dims, rounding, seed, stream, step):
    """`fqtc.quant.uniform.quantize` (and `fqtc.quant.gradq`'s uniform group quantizers) over the groups sharing a
    scale along ``dims`` (non-negative, sorted)."""
    import onnx

    op = _op()
    qmax = (1 << (bits - 1)) - 1 if bits > 1 else 1
    f32 = onnx.TensorProto.FLOAT
    scale = _group_scale(x, bits, dims)
    y = op.Div(x, scale)
    if rounding == "nearest":
        q = op.Round(y)
    elif _SR_MODE[0] == "counter":
        key = op.Constant(value=onnx.helper.make_tensor("key", onnx.TensorProto.UINT32, [],
                                                        [mix32_int(seed ^ GOLDEN)]))
        q = op.Floor(op.Add(y, _fqt_opset().CounterUniform(y, _step_key(key, step, stream))))
    else:
        q = op.Floor(op.Add(y, op.RandomUniformLike(y, dtype=f32)))
    q = op.Clip(q, op.Constant(value_float=float(-qmax)), op.Constant(value_float=float(qmax)))
    finite = op.Not(op.Or(op.IsNaN(q), op.IsInf(q)))
    return op.Cast(op.Where(finite, q, op.Constant(value_float=0.0)), to=onnx.TensorProto.INT8), scale


def _step_key(key, step, stream: int):
    """`fqtc.quant.rng.stream_key` in standard ops: mix the step's low and high words, then the stream id."""
    import onnx

    op = _op()
    fq = _fqt_opset()
    u32 = onnx.TensorProto.UINT32
    lo = op.Cast(op.BitwiseAnd(step, op.Constant(value_int=0xFFFFFFFF)), to=u32)
    hi = op.Cast(op.Div(step, op.Constant(value_int=1 << 32)), to=u32)  # step >= 0: division is the shift
    k = fq.Mix32(op.BitwiseXor(key, lo))
    k = fq.Mix32(op.BitwiseXor(k, hi))
    s = op.Constant(value=onnx.helper.make_tensor("stream", u32, [], [stream & 0xFFFFFFFF]))
    return fq.Mix32(op.BitwiseXor(k, s))


def _bias_and_cast(out: Any, bias: Any, out_dtype: Any) -> Any:
    """A GEMM translation's ending: ``+ bias`` in fp32, then the cast to ``out_dtype``, which arrives as a torch
    dtype or as the exporter's ONNX data type (an IntEnum: FLOAT == 1)."""
    import onnx
    import torch

    op = _op()
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=onnx.TensorProto.FLOAT))
    if out_dtype is not None and out_dtype is not torch.float32 and int(getattr(out_dtype, "value", out_dtype)) != 1:
        out = op.Cast(out, to=int(getattr(out_dtype, "value", out_dtype)))
    return out
