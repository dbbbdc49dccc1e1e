"""Export fqt's quantized training graphs (forward, backward, latent-weight update) to ONNX, opset 21.

``fqtc.export_onnx(model, example_inputs, path)`` compiles the model with the fqt backend, takes the partitioned
forward and backward graphs the partitioner produced (the graphs that run in training) and exports each with
``torch.onnx.export(dynamo=True)``; aten ops use torch's own ONNX translations, fqt ops the translations below
(docs/inspect_export.md has the full table):

| fqt op | ONNX |
|---|---|
| ``fqt::step`` | a graph input ``fqt_step`` (int64 scalar): the runtime owns the step counter |
| ``fqt::quantize`` (nearest, 8 bits, per-tensor/per-axis scale) | ``ReduceMax(Abs)``/qmax scale, ``QuantizeLinear`` |
| ``fqt::quantize`` (nearest, other) | ``Round(x / s)``, ``Clip(-qmax, qmax)``, ``Cast(INT8)`` |
| ``fqt::quantize`` (stochastic, ``sr="random"``) | ``Floor(x / s + RandomUniformLike(x))``, ``Clip``, ``Cast`` |
| ``fqt::quantize`` (stochastic, ``sr="counter"``) | ``Floor(x / s + com.fqt::CounterUniform(...))``: bit-exact |
| ``fqt::qgemm`` (int8 operands, scales off the reduction axis) | ``MatMulInteger``, ``Cast``, ``Mul`` by the scales |
| ``fqt::qgemm`` (other) | ``Mul(Cast(codes), scale)`` per operand (the dequantized product), ``MatMul`` |
| ``fqt::observe`` (``log_sqnr``) | ``Identity`` of the scale (logging is a PyTorch-side debug switch) |
| ``fqt::grad_quantize`` (PTQ/PSQ/SCQ) | as ``fqt::quantize`` over the groups (the same non-finite policy, ``IsNaN``) |
| ``fqt::grad_quantize`` (AQ, AQ top-k) | ``TopK``/``CumSum`` group sampling (`fqtc.export.onnx_gradq`), then as PSQ |
| ``fqt::bhq`` | the block Householder transform from ``TopK``/``CumSum``/masks, ``ScatterElements(add)`` |
| ``fqt::lwq_unpack``, ``fqt::lwq_dequantize`` | nibble unpacking, codebook ``Gather`` (`fqtc.export.onnx_lwq`) |
| ``fqt::lwq_step`` (update graph) | decode, SGD/AdamW math, re-encode with SR (`fqtc.export.onnx_lwq`) |
| ``fqt::qconv2d`` | ``ConvInteger`` + scale epilogue (or ``Conv`` on dequantized operands) |
| ``fqt::qconv2d_input`` | ``ConvTranspose`` on fp32-cast codes + scale epilogue |
| ``fqt::qconv2d_weight`` | grouped ``ConvInteger`` over the batch (x regrouped, g^T), ``Slice``, ``Transpose`` |

The ``com.fqt`` domain (version 1) holds what no standard op expresses. Each of its ops ships as a model-local
``FunctionProto`` whose body uses only standard ops, so any ONNX runtime runs it:

- ``com.fqt::Mix32(x: uint32) -> uint32``: the ``lowbias32`` integer hash of `fqtc.quant.rng`.
- ``com.fqt::CounterUniform(like: float, key: uint32[]) -> float``: U[0, 1) per element of ``like`` from the
  counter-based stream (element index, key), identical bits to `fqtc.quant.rng.uniform_like`.

A graph with an fqt op that has no translation yet fails before export with a `NotImplementedError` naming the
op (no silent fallback); an aten op torch cannot export fails with torch's error, re-raised naming the op.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from fqtc.config import FQTConfig
from fqtc.export._common import (
    _SR_MODE,
    FQT_DOMAIN,
    FQT_DOMAIN_VERSION,
    _group_codes,
    _group_scale,
    _no_given_amax,
    _op,
    _rank,
    _static_shape,
)
from fqtc.export._names import grad_names, graph_outputs, saved_names
from fqtc.inspect import driver as _inspect
from fqtc.quant.rng import GOLDEN, M1, M2

OPSET = 21
SR_MODES = ("random", "counter")

__all__ = ["FQT_DOMAIN", "OPSET", "TRANSLATIONS", "ExportedGraph", "export_graph", "export_onnx", "fqt_functions"]


# -- translations (onnxscript, traced by torch.onnx's exporter) ---------------------------------------------------
def _quantize(x, bits, reduce_dims, rounding, seed, stream, step, amax=None):
    """fqt::quantize -> (int8 codes, fp32 keepdim scale); same float ops in the same order as
    `fqtc.quant.uniform.quantize` (scale = amax/qmax; x / scale is a true division; round half to even), with its
    non-finite policy (a group holding NaN/Inf gets a NaN/Inf scale and zero codes): `_group_codes`, except that
    8-bit nearest rounding with a per-tensor or per-axis scale becomes a standard QuantizeLinear."""
    import onnx

    _no_given_amax("fqt::quantize", amax)
    if rounding not in ("nearest", "stochastic"):
        raise NotImplementedError(f"fqtc.export_onnx: fqt::quantize rounding {rounding!r} has no ONNX translation")
    op = _op()
    rank = _rank(x)
    dims = sorted({d % rank for d in reduce_dims}) if rank is not None else list(reduce_dims)
    kept = [d for d in range(rank) if d not in dims] if rank is not None else None
    if not (rounding == "nearest" and bits == 8 and kept is not None and len(kept) <= 1):
        return _group_codes(x, bits, dims, rounding, seed, stream, step)
    scale = _group_scale(x, bits, dims)
    # QuantizeLinear divides and rounds half to even; |x / s| <= 127, so its [-128, 127] saturation never differs
    # from fqt's symmetric clamp to [-127, 127].
    if not kept:  # per-tensor: QuantizeLinear wants a scalar scale
        scalar = op.Constant(value=onnx.helper.make_tensor("scalar_shape", onnx.TensorProto.INT64, [0], []))
        codes = op.QuantizeLinear(x, op.Reshape(scale, scalar), output_dtype=onnx.TensorProto.INT8)
    else:  # per-axis: a 1-D scale along the one dim that keeps its extent
        codes = op.QuantizeLinear(x, op.Reshape(scale, op.Constant(value_ints=[-1])), axis=kept[0],
                                  output_dtype=onnx.TensorProto.INT8)
    # a non-finite group's codes are 0 (QuantizeLinear's result for x / NaN is not specified)
    bad = op.Or(op.IsNaN(scale), op.IsInf(scale))
    zero = op.Constant(value=onnx.helper.make_tensor("zero_i8", onnx.TensorProto.INT8, [], [0]))
    return op.Where(bad, zero, codes), scale


def _grad_quantize(x, quantizer, bits, reduce_dims, rounding, seed, stream, step, amax=None):
    """fqt::grad_quantize for the codes x scale quantizers that are uniform over groups (PTQ: one group; PSQ/SCQ:
    the groups of ``reduce_dims``), with fqtc's non-finite policy (`fqtc.quant.uniform`): a NaN anywhere in a group
    makes its scale NaN, and non-finite codes become 0. AQ and AQ top-k: `fqtc.export.onnx_gradq.aq`."""
    if quantizer in ("aq", "aq_topk"):
        from fqtc.export import onnx_gradq

        return onnx_gradq.aq(x, quantizer, bits, reduce_dims, rounding, seed, stream, step)
    _no_given_amax("fqt::grad_quantize", amax)
    if quantizer not in ("ptq", "psq", "scq"):
        raise NotImplementedError(f"fqtc.export_onnx: fqt::grad_quantize with quantizer {quantizer!r} has no ONNX "
                                  "translation (translated: ptq, psq, scq, aq, aq_topk)")
    rank = _rank(x)
    if rank is None:
        raise NotImplementedError("fqtc.export_onnx: fqt::grad_quantize needs a static rank")
    dims = list(range(rank)) if quantizer == "ptq" else sorted({d % rank for d in reduce_dims})
    return _group_codes(x, bits, dims, rounding, seed, stream, step)


def _qgemm(a, a_scale, b, b_scale, bias, out_dtype):
    """fqt::qgemm: the exact integer product when both operands are int8 codes with scales off the reduction axis
    (as `fqtc.quant.gemm.scaled_gemm`), else the product of the dequantized operands."""
    import onnx

    op = _op()
    sa, sb = _static_shape(a_scale), _static_shape(b_scale)
    along_k = (sa is not None and len(sa) > 0 and sa[-1] != 1) or (sb is not None and len(sb) > 1 and sb[-2] != 1)
    unknown = (a_scale is not None and sa is None) or (b_scale is not None and sb is None)
    if a_scale is not None and b_scale is not None and not along_k and not unknown:
        out = op.Mul(op.Mul(op.Cast(op.MatMulInteger(a, b), to=onnx.TensorProto.FLOAT), a_scale), b_scale)
    else:
        a_hp = op.Cast(a, to=onnx.TensorProto.FLOAT)
        b_hp = op.Cast(b, to=onnx.TensorProto.FLOAT)
        if a_scale is not None:
            a_hp = op.Mul(a_hp, a_scale)
        if b_scale is not None:
            b_hp = op.Mul(b_hp, b_scale)
        out = op.MatMul(a_hp, b_hp)
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=onnx.TensorProto.FLOAT))
    # out_dtype arrives as a torch dtype or as the exporter's ONNX data type (an IntEnum: FLOAT == 1)
    if out_dtype is not None and out_dtype is not torch.float32 and int(getattr(out_dtype, "value", out_dtype)) != 1:
        out = op.Cast(out, to=int(getattr(out_dtype, "value", out_dtype)))
    return out


def _scale_free_along(scale, dim: int) -> bool:
    """Is a keepdim scale (static shape) constant along every dim but ``dim``? (`fqtc.quant.conv.scale_ok`)"""
    shape = _static_shape(scale)
    return shape is not None and all(d == 1 for i, d in enumerate(shape) if i != dim)


def _deq(op, t, s):
    import onnx

    t = op.Cast(t, to=onnx.TensorProto.FLOAT)
    return t if s is None else op.Mul(t, s)


def _channel_vec(op, s):
    """A keepdim scale as a [1, C, 1, 1] (or [1, 1, 1, 1]) broadcast operand."""
    return op.Reshape(s, op.Constant(value_ints=[1, -1, 1, 1]))


def _conv_out_dtype(op, out, out_dtype):
    if out_dtype is not None and out_dtype is not torch.float32 and int(getattr(out_dtype, "value", out_dtype)) != 1:
        out = op.Cast(out, to=int(getattr(out_dtype, "value", out_dtype)))
    return out


def _qconv2d(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    """fqt::qconv2d (`fqtc.quant.conv.scaled_conv2d`): ConvInteger (exact int32) with the scales in the epilogue
    when both operands are codes with per-sample / per-output-channel scales, else Conv on dequantized operands."""
    import onnx

    op = _op()
    attrs = dict(strides=list(stride), pads=[*padding, *padding], dilations=list(dilation), group=int(groups))
    if x_scale is not None and w_scale is not None and _scale_free_along(x_scale, 0) and \
            _scale_free_along(w_scale, 0):
        acc = op.Cast(op.ConvInteger(x, w, **attrs), to=onnx.TensorProto.FLOAT)
        out = op.Mul(op.Mul(acc, op.Reshape(x_scale, op.Constant(value_ints=[-1, 1, 1, 1]))),
                     _channel_vec(op, w_scale))
    else:
        out = op.Conv(_deq(op, x, x_scale), _deq(op, w, w_scale), **attrs)
    if bias is not None:
        out = op.Add(out, _channel_vec(op, op.Cast(bias, to=onnx.TensorProto.FLOAT)))
    return _conv_out_dtype(op, out, out_dtype)


def _qconv2d_input(g, g_scale, w, w_scale, input_size, stride, padding, dilation, groups, out_dtype):
    """fqt::qconv2d_input (`scaled_conv2d_input`): ConvTranspose of the gradient with the weight. ONNX has no
    integer ConvTranspose, so the codes are cast to fp32, as the reference does: exact while every partial sum
    stays below 2^24, i.e. (C_out/groups)*kh*kw <= 1024 (the reference splits larger reductions into chunks)."""
    import onnx

    op = _op()
    gshape, wshape = _static_shape(g), _static_shape(w)
    if gshape is None or wshape is None:
        raise NotImplementedError("fqtc.export_onnx: fqt::qconv2d_input needs static shapes")
    out_pad = [int(input_size[2 + i]) - (stride[i] * (gshape[2 + i] - 1) + dilation[i] * (wshape[2 + i] - 1) + 1
                                         - 2 * padding[i]) for i in range(2)]
    attrs = dict(strides=list(stride), pads=[*padding, *padding], dilations=list(dilation), group=int(groups),
                 output_padding=out_pad)
    integer = g_scale is not None and w_scale is not None and _scale_free_along(g_scale, 0) and \
        _scale_free_along(w_scale, 1)
    if integer:
        f32 = onnx.TensorProto.FLOAT
        acc = op.ConvTranspose(op.Cast(g, to=f32), op.Cast(w, to=f32), **attrs)
        sw = op.Reshape(w_scale, op.Constant(value_ints=[-1]))
        if (_static_shape(w_scale) or [1])[1] > 1 and groups > 1:  # per input channel of a group -> per channel
            sw = op.Tile(sw, op.Constant(value_ints=[int(groups)]))
        out = op.Mul(op.Mul(acc, op.Reshape(g_scale, op.Constant(value_ints=[-1, 1, 1, 1]))), _channel_vec(op, sw))
    else:
        out = op.ConvTranspose(_deq(op, g, g_scale), _deq(op, w, w_scale), **attrs)
    return _conv_out_dtype(op, out, out_dtype)


def _qconv2d_weight(x, x_scale, g, g_scale, weight_size, stride, padding, dilation, groups, out_dtype):
    """fqt::qconv2d_weight (`scaled_conv2d_weight`): dW[o, j] = sum_{n,h,w} g[n, o] * x_pad[n, group(o)*cin_g + j]
    as one grouped convolution over the batch: input x' [cin_g, G*N, H, W] (x'[j, G_idx*N + n] = x[n, G_idx*cin_g
    + j]), weight g^T [C_out, N, Ho, Wo], ``group=G``, stride and dilation swapped; cropped to the kernel size and
    transposed to [C_out, cin_g, kh, kw]. ConvInteger keeps the int32 sum over N*Ho*Wo exact."""
    import onnx

    op = _op()
    xshape = _static_shape(x)
    if xshape is None or len(xshape) != 4:
        raise NotImplementedError("fqtc.export_onnx: fqt::qconv2d_weight needs a static 4-D input shape")
    n, cin, h, w = xshape
    cout, cin_g, kh, kw = (int(v) for v in weight_size)
    grp = int(groups)
    perm = [1, 0, 2, 3]

    def regroup(t):  # [N, C_in, H, W] -> [cin_g, G*N, H, W]
        t = op.Reshape(t, op.Constant(value_ints=[n, grp, cin_g, h, w]))
        t = op.Transpose(t, perm=[2, 1, 0, 3, 4])
        return op.Reshape(t, op.Constant(value_ints=[cin_g, grp * n, h, w]))

    attrs = dict(strides=list(dilation), pads=[*padding, *padding], dilations=list(stride), group=grp)
    integer = x_scale is not None and g_scale is not None and _scale_free_along(x_scale, 1) and \
        _scale_free_along(g_scale, 1)
    if integer:
        acc = op.Cast(op.ConvInteger(regroup(x), op.Transpose(g, perm=perm), **attrs), to=onnx.TensorProto.FLOAT)
    else:
        acc = op.Conv(regroup(_deq(op, x, x_scale)), op.Transpose(_deq(op, g, g_scale), perm=perm), **attrs)
    acc = op.Slice(acc, op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[kh, kw]),
                   op.Constant(value_ints=[2, 3]))
    out = op.Transpose(acc, perm=perm)
    if integer:
        out = op.Mul(out, op.Reshape(g_scale, op.Constant(value_ints=[-1, 1, 1, 1])))
        if (_static_shape(x_scale) or [1, 1])[1] > 1:
            # per-input-channel scales, gathered per group: sx[o, j] = x_scale[group(o)*cin_g + j]
            sx = op.Expand(op.Reshape(x_scale, op.Constant(value_ints=[grp, 1, cin_g])),
                           op.Constant(value_ints=[grp, cout // grp, cin_g]))
            out = op.Mul(out, op.Reshape(sx, op.Constant(value_ints=[cout, cin_g, 1, 1])))
        else:
            out = op.Mul(out, op.Reshape(x_scale, op.Constant(value_ints=[1, 1, 1, 1])))
    return _conv_out_dtype(op, out, out_dtype)


def _observe(x, codes, scale, step, tag):
    return _op().Identity(scale)


def _translations() -> dict[Any, Callable]:
    import fqtc.ops  # noqa: F401  (registers the fqt ops, fqt::observe included)
    from fqtc.export import onnx_gradq as _gq  # AQ and BHQ (they use the helpers above)
    from fqtc.export import onnx_lwq as _lwq  # latent-weight ops and fqt::lwq_step (registers it)
    from fqtc.export import onnx_rotate as _rot  # option rotate="hadamard"

    return {
        torch.ops.fqt.quantize.default: _quantize,
        torch.ops.fqt.qgemm.default: _qgemm,
        torch.ops.fqt.observe.default: _observe,
        torch.ops.fqt.grad_quantize.default: _grad_quantize,
        torch.ops.fqt.qconv2d.default: _qconv2d,
        torch.ops.fqt.qconv2d_input.default: _qconv2d_input,
        torch.ops.fqt.qconv2d_weight.default: _qconv2d_weight,
        torch.ops.fqt.bhq.default: _gq.bhq,
        torch.ops.fqt.rotate.default: _rot.rotate,
        **_lwq.LWQ_TRANSLATIONS,
    }


# fqt OpOverload -> onnxscript translation. Owners of new fqt ops add theirs here (fqt::step becomes a graph input).
TRANSLATIONS: dict[Any, Callable] = _translations()


# -- com.fqt functions --------------------------------------------------------------------------------------------
def fqt_functions() -> list:
    """The ``com.fqt`` FunctionProtos (bodies in standard opset-21 ops) added to every exported model."""
    from onnx import TensorProto, helper

    def const(name: str, dtype: int, value: int) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))

    u32 = TensorProto.UINT32
    nodes = [
        const("c16", u32, 16), const("c15", u32, 15), const("m1", u32, M1), const("m2", u32, M2),
        helper.make_node("BitShift", ["x", "c16"], ["a1"], direction="RIGHT"),
        helper.make_node("BitwiseXor", ["x", "a1"], ["a2"]),
        helper.make_node("Mul", ["a2", "m1"], ["a3"]),  # uint32 multiply wraps modulo 2^32, as lowbias32 needs
        helper.make_node("BitShift", ["a3", "c15"], ["a4"], direction="RIGHT"),
        helper.make_node("BitwiseXor", ["a3", "a4"], ["a5"]),
        helper.make_node("Mul", ["a5", "m2"], ["a6"]),
        helper.make_node("BitShift", ["a6", "c16"], ["a7"], direction="RIGHT"),
        helper.make_node("BitwiseXor", ["a6", "a7"], ["y"]),
    ]
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(FQT_DOMAIN, FQT_DOMAIN_VERSION)]
    mix32 = helper.make_function(FQT_DOMAIN, "Mix32", ["x"], ["y"], nodes, opsets,
                                 doc_string="lowbias32 hash of uint32 values (fqtc.quant.rng.mix32)")
    # CounterUniform(like, key): h = mix32(idx_lo ^ key); h = mix32(h ^ idx_hi ^ GOLDEN); u = (h >> 8) * 2^-24,
    # idx = row-major element index of `like` (fqtc.quant.rng.uniform_from_index).
    nodes = [
        helper.make_node("Shape", ["like"], ["shape"]),
        helper.make_node("Size", ["like"], ["n"]),
        const("zero", TensorProto.INT64, 0), const("one", TensorProto.INT64, 1),
        helper.make_node("Range", ["zero", "n", "one"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["idx"]),
        const("mask", TensorProto.INT64, 0xFFFFFFFF), const("two32", TensorProto.INT64, 1 << 32),
        helper.make_node("BitwiseAnd", ["idx", "mask"], ["lo64"]),
        helper.make_node("Cast", ["lo64"], ["lo"], to=u32),
        helper.make_node("Div", ["idx", "two32"], ["hi64"]),
        helper.make_node("Cast", ["hi64"], ["hi"], to=u32),
        helper.make_node("BitwiseXor", ["lo", "key"], ["h0"]),
        helper.make_node("Mix32", ["h0"], ["h1"], domain=FQT_DOMAIN),
        const("golden", u32, GOLDEN),
        helper.make_node("BitwiseXor", ["h1", "hi"], ["h2"]),
        helper.make_node("BitwiseXor", ["h2", "golden"], ["h3"]),
        helper.make_node("Mix32", ["h3"], ["h4"], domain=FQT_DOMAIN),
        const("c8", u32, 8),
        helper.make_node("BitShift", ["h4", "c8"], ["h5"], direction="RIGHT"),
        helper.make_node("Cast", ["h5"], ["h6"], to=TensorProto.FLOAT),  # < 2^24: exact in fp32
        helper.make_node("Constant", [], ["inv"], value=helper.make_tensor("inv", TensorProto.FLOAT, [],
                                                                             [1.0 / 16777216.0])),
        helper.make_node("Mul", ["h6", "inv"], ["u"]),
    ]
    uniform = helper.make_function(FQT_DOMAIN, "CounterUniform", ["like", "key"], ["u"], nodes, opsets,
                                   doc_string="U[0,1) draws keyed by (key, element index): "
                                              "fqtc.quant.rng.uniform_from_index")
    return [mix32, uniform]


def _register_schemas() -> None:
    """torch.onnx traces translations through onnxscript, which needs a schema for every op it calls."""
    from onnx import defs

    for name, inputs, doc in (("Mix32", [("x", "tensor(uint32)")], "lowbias32 hash"),
                              ("CounterUniform", [("like", "tensor(float)"), ("key", "tensor(uint32)")],
                               "counter-based U[0,1)")):
        if defs.has(name, FQT_DOMAIN):
            continue
        out_type = "tensor(uint32)" if name == "Mix32" else "tensor(float)"
        schema = defs.OpSchema(
            name, FQT_DOMAIN, FQT_DOMAIN_VERSION, doc=doc,
            inputs=[defs.OpSchema.FormalParameter(n, t) for n, t in inputs],
            outputs=[defs.OpSchema.FormalParameter("y", out_type)],
        )
        defs.register_schema(schema)


# -- graph preparation --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportedGraph:
    """One exported graph: where it was written and how its inputs/outputs map to the FX graph."""

    which: str
    path: str
    input_names: list[str]
    output_names: list[str]


def _op_name(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else str(target)


def check_exportable(gm: fx.GraphModule, which: str = "graph") -> None:
    """Raise `NotImplementedError` naming every fqt op of ``gm`` that has no ONNX translation."""
    missing: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if n.target.namespace == "fqt" and n.target not in TRANSLATIONS and n.target != torch.ops.fqt.step.default:
            missing.setdefault(_op_name(n.target), []).append(n.name)
    if missing:
        ops = "; ".join(f"{op} (nodes {', '.join(nodes)})" for op, nodes in missing.items())
        known = ", ".join(sorted(_op_name(t) for t in TRANSLATIONS))
        raise NotImplementedError(
            f"fqtc.export_onnx: the {which} graph uses fqt op(s) with no ONNX translation: {ops}. Translated fqt "
            f"ops: fqt::step, {known}. Add a translation to fqtc.export.onnx.TRANSLATIONS, or keep the sites that "
            "use the op in full precision (option keep_fp) to export the rest."
        )


def _prepare(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` with ``fqt::step`` turned into an input ``fqt_step`` and ``None`` outputs dropped.
    Returns (copy, positions of the kept outputs in the original output tuple)."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    steps = list(g.find_nodes(op="call_function", target=torch.ops.fqt.step.default))
    placeholders = list(g.find_nodes(op="placeholder"))
    for s in steps:
        with g.inserting_after(placeholders[-1] if placeholders else next(iter(g.nodes))):
            ph = g.placeholder("fqt_step")
        ph.meta["val"] = s.meta.get("val")
        s.replace_all_uses_with(ph)
        g.erase_node(s)
    out = g.output_node()
    vals = out.args[0]
    vals = list(vals) if isinstance(vals, (tuple, list)) else [vals]
    kept = [i for i, v in enumerate(vals) if isinstance(v, fx.Node)]
    out.args = (tuple(vals[i] for i in kept),)
    g.lint()
    gm.recompile()
    return gm, kept


_REGISTRY: list[Any] = []
_DECOMPOSE = ("aten::_native_batch_norm_legit_functional", "aten::_native_batch_norm_legit", "aten::native_batch_norm",
              "aten::_native_batch_norm_legit.no_stats")


def _torch_onnx_export(gm: fx.GraphModule, args: tuple, names: list[str]) -> Any:
    """``torch.onnx.export(dynamo=True, custom_translation_table=TRANSLATIONS)``, reusing one translation registry:
    torch rebuilds it from torchlib on every call (2.5 s here, measured with cProfile), which dominated exporting
    a forward/backward pair. Falls back to the public call if the internal entry point moves."""
    try:
        from torch.onnx._internal.exporter import _core, _registration
    except ImportError:
        _core = None
    if _core is None or not hasattr(_core, "export"):
        return torch.onnx.export(gm, args, dynamo=True, opset_version=OPSET, custom_translation_table=TRANSLATIONS,
                                 input_names=names, optimize=False, verbose=False, report=False)
    if not _REGISTRY or _REGISTRY[0][1] != tuple(TRANSLATIONS.items()):
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
        # Training-mode batch norm becomes BatchNormalization(training_mode=1), which onnxruntime's inference
        # build runs with the running statistics (measured: ResNet forward outputs at 1-7 dB SQNR vs PyTorch).
        # Without a registry entry the exporter decomposes it into mean/var/rsqrt ops, which run as traced.
        for name in _DECOMPOSE:
            registry.functions.pop(name, None)
        for target, fn in TRANSLATIONS.items():
            registry.register_op(target, fn, is_complex=False)
        _REGISTRY[:] = [(registry, tuple(TRANSLATIONS.items()))]
    return _core.export(gm, args, registry=_REGISTRY[0][0], input_names=names, optimize=False, verbose=False,
                        report=False, opset_version=OPSET)


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


def export_graph(gm: fx.GraphModule, args: Sequence[Any], path: str, which: str = "graph",
                 input_names: Sequence[str] | None = None, sr: str = "random",
                 metadata: Mapping[str, str] | None = None,
                 output_names: Sequence[str | None] | None = None) -> ExportedGraph:
    """Export one fqt graph module (forward, backward, inference or update) to ``path``.

    ``args`` are its inputs in placeholder order; a ``fqt::step`` node becomes the input ``fqt_step``, which must be
    given last-but-placeholders order as `export_onnx` does (after the original placeholders). ``None`` outputs
    (gradients of inputs that need none) are dropped. ``output_names`` renames the (kept) outputs (``None``
    keeps the exporter's name, as does leaving it out; a graph input's name outputs that input unchanged). The
    model is checked with ``onnx.checker.check_model(full_check=True)`` before it is written.
    """
    import onnx

    if sr not in SR_MODES:
        raise ValueError(f"fqtc.export_onnx: sr={sr!r}; allowed: {', '.join(SR_MODES)}")
    check_exportable(gm, which)
    prepared, kept = _prepare(gm)
    placeholders = [n.name for n in prepared.graph.find_nodes(op="placeholder")]
    if len(args) != len(placeholders):
        raise ValueError(f"fqtc.export_onnx: {which} graph has {len(placeholders)} inputs {placeholders}, "
                         f"got {len(args)} example values")
    names = _unique(list(input_names) if input_names is not None else placeholders)
    outs = prepared.graph.output_node().args[0]
    out_names = _unique([o.name for o in outs])
    _register_schemas()
    _SR_MODE[0] = sr
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            prog = _torch_onnx_export(prepared, tuple(args), names)
    except Exception as e:  # name the op torch could not translate (a clear error naming the op)
        text = str(e)
        ours = re.search(r"fqtc\.export_onnx: [^\n]*", text)
        if ours:
            raise NotImplementedError(ours.group(0)) from e
        m = re.search(r"No ONNX function found for ([^\s'\"]+)", text)
        node = re.search(r"Error when translating node %(\w+) : [^\n]*?target=([^\]]+)\]", text)
        what = f"op {m.group(1).rstrip('.')}" if m else (f"node {node.group(1)} ({node.group(2)})" if node else "an op")
        raise NotImplementedError(f"fqtc.export_onnx: exporting the {which} graph failed on {what}; keep the sites "
                                  f"that use it in full precision or add a translation. Cause: "
                                  f"{text.splitlines()[0] if text else type(e).__name__}") from e
    finally:
        _SR_MODE[0] = "random"
    model = prog.model_proto
    if output_names is not None:
        if len(output_names) != len(model.graph.output):
            raise ValueError(f"fqtc.export_onnx: {len(output_names)} output names for the {which} graph's "
                             f"{len(model.graph.output)} outputs")
        graph_input_names = {i.name for i in model.graph.input}
        for o, new_name in zip(model.graph.output, output_names):
            if new_name is None or new_name == o.name:
                continue
            if new_name in graph_input_names:  # an input passed through (a saved parameter): output it as is
                o.name = new_name
                continue
            model.graph.node.append(onnx.helper.make_node("Identity", [o.name], [new_name]))  # keeps producers
            o.name = new_name
    uses_fqt = any(n.domain == FQT_DOMAIN for n in model.graph.node)
    if uses_fqt:
        model.functions.extend(fqt_functions())
        if not any(o.domain == FQT_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(FQT_DOMAIN, FQT_DOMAIN_VERSION))
    model.doc_string = f"fqtc {which} graph (quantized training); fqt op translations: fqtc/export/onnx.py"
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model.metadata_props.append(onnx.StringStringEntryProto(key="fqt.graph", value=which))
    # output i of the ONNX model is output kept[i] of the FX graph, the FX node out_names[i]
    model.metadata_props.append(onnx.StringStringEntryProto(key="fqt.output_positions", value=json.dumps(kept)))
    model.metadata_props.append(onnx.StringStringEntryProto(key="fqt.output_names", value=json.dumps(out_names)))
    onnx.checker.check_model(model, full_check=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)
    return ExportedGraph(which, path, [i.name for i in model.graph.input], [o.name for o in model.graph.output])


# -- model-level API ----------------------------------------------------------------------------------------------
def graph_inputs(model: torch.nn.Module, example_inputs: Sequence[Any], options: Mapping[str, Any] | FQTConfig | None
                 = None, training: bool = True) -> list[dict[str, Any]]:
    """Compile ``model`` with fqt and return, per Dynamo graph, the graph modules and their runtime inputs:
    ``{"cg": CompiledGraph, "forward"/"backward"/"inference": (GraphModule, [args], [names])}``. The forward args
    end with the step value; backward args are the forward's saved outputs and seeded N(0,1) tangents."""
    config = dataclasses.replace(FQTConfig.from_options(options), compiler="eager")
    ctx = contextlib.nullcontext() if training else torch.no_grad()
    with _inspect.preserve_step(), _inspect.preserve_buffers(model), ctx:
        cgs, recorded = _inspect.compile_and_capture(model, example_inputs, config, record_args=True)
    out = []
    from fqtc.ops import get_step

    for i, cg in enumerate(cgs):
        entry: dict[str, Any] = {"cg": cg}
        fwd_name = "forward" if cg.forward is not None else "inference"
        gm = getattr(cg, fwd_name)
        if gm is None or fwd_name not in recorded.get(i, {}):
            continue
        args = list(recorded[i][fwd_name])
        phs = list(gm.graph.find_nodes(op="placeholder"))
        names = _input_names(model, phs, recorded[i].get(fwd_name + ".keys", []))
        has_step = bool(list(gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default)))
        step = torch.tensor(get_step(model), dtype=torch.int64)
        input_names = list(names)
        if has_step:
            args.append(step)
            names.append("fqt_step")
        entry[fwd_name] = (gm, args, names)
        if training and cg.backward is not None:
            # the backward graph reads forward outputs by name: run the forward (same step) to get them
            interp = _inspect.KeepAll(_prepare(gm)[0])
            with _inspect.preserve_step():
                interp.run(*_inspect.clone_args(args))  # the forward updates BatchNorm buffers in place
            env = {n.name: v for n, v in interp.env.items()}
            step_names = {s.name for s in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default)}
            saved = saved_names(gm, cg.backward, input_names, step_names)
            bargs, bnames = [], []
            for n in cg.backward.graph.find_nodes(op="placeholder"):
                val = n.meta.get("val")
                if n.name.startswith("tangents"):
                    bargs.append(_inspect.grad_like(val))
                elif n.name in step_names:
                    bargs.append(step)  # the step node's value, saved for backward
                elif n.name in env:
                    bargs.append(env[n.name])
                else:
                    raise RuntimeError(f"fqtc.export_onnx: backward input {n.name!r} is not a forward output")
                bnames.append(saved.get(n.name, n.name))
            entry["backward"] = (cg.backward, bargs, bnames)
            entry["forward.output_names"] = [saved.get(o.name) for o in graph_outputs(gm) if isinstance(o, fx.Node)]
            entry["backward.output_names"] = grad_names(cg.backward, input_names)
        out.append(entry)
    return out


def _input_names(model: torch.nn.Module, placeholders: Sequence[fx.Node], keys: Sequence[tuple | None]
                 ) -> list[str]:
    """ONNX input names of a forward graph: ``param.<fqn>``/``buffer.<fqn>`` for the model's tensors (matched by
    storage, so the names are the model's own), the FX placeholder name for data inputs."""
    from fqtc.optim.latent import LatentWeight

    owned: dict[tuple, str] = {}
    for kind, items in (("buffer", model.named_buffers()), ("param", model.named_parameters())):
        for name, t in items:
            if isinstance(t, LatentWeight):  # graphs read its inner tensors (the update graph's names too)
                for inner in ("q", "r", "s", "mu"):
                    owned[_inspect.storage_key(getattr(t, inner))] = f"lwq.{name}.{inner}"
            else:
                owned[_inspect.storage_key(t)] = f"{kind}.{name}"
    names = [owned.get(k, n.name) if k is not None else n.name
             for n, k in zip(placeholders, list(keys) + [None] * len(placeholders))]
    return _unique(names)


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Any] | Tensor, path: str,
                options: Mapping[str, Any] | FQTConfig | None = None, training: bool = True,
                sr: str = "random", optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Write the fqt-quantized graphs of ``model`` as ONNX (opset 21) and return the paths written.

    Args:
        model: the module; compiled with the fqt backend on ``example_inputs`` (its ``.grad`` and the fqt step
            counter are left unchanged).
        example_inputs: the inputs of one forward call (a tensor or a sequence of them).
        path: ``"dir/name.onnx"``. With ``training=True``: ``dir/name.forward.onnx`` (inputs: parameters as
            ``param.<name>``, data, ``fqt_step``; outputs: the model outputs, then the tensors saved for backward,
            named after the input they are or ``saved.<fx name>``) and ``dir/name.backward.onnx`` (inputs: the saved
            tensors under the forward outputs' names, ``tangents_*``; outputs: ``grad.<name>`` per parameter and
            ``grad.<input>`` per data input that needs a gradient), so a runtime wires the graphs by name. With
            ``training=False``: the inference graph at ``path``. A model Dynamo splits into several graphs gets
            ``.g<i>`` before the suffix. With ``training=True`` and an ``optimizer`` (needed
            when the model has latent weights, `fqtc.prepare`): also ``dir/name.update.onnx``, one optimizer step
            (`fqtc.export.onnx_lwq`: inputs ``lwq.<name>.{q,r,s,mu}`` / ``param.<name>``, ``grad.<name>``,
            ``state.<name>.step``, ``state.<name>.buffers.<i>``; outputs ``<input>.new``, ``stats.<name>``,
            ``found_inf``).
        options: the fqt options (as for ``torch.compile``).
        training: export the training pair (forward + backward) or the inference graph.
        sr: stochastic rounding as ``"random"`` (standard ``RandomUniformLike``: not the same draws as PyTorch) or
            ``"counter"`` (``com.fqt::CounterUniform``: the same bits as fqtc's counter-based stream).
        optimizer: a `fqtc.optim` optimizer over the model's parameters: its kind, hyperparameters and current
            state define the update graph (the optimizer and model are not modified).

    Raises:
        NotImplementedError: the graphs use an op with no ONNX translation; the message names it.
        ValueError: ``training=True`` on a model with latent weights but no ``optimizer`` (the update graph needs
            one), or an ``optimizer`` with ``training=False``.
        TypeError: ``optimizer`` is not a `fqtc.optim` optimizer.
    """
    from fqtc.optim.latent import LatentWeight

    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not str(path).endswith(".onnx"):
        raise ValueError(f"fqtc.export_onnx: path must end with .onnx, got {path!r}")
    latent = [n for n, p in model.named_parameters() if isinstance(p, LatentWeight)]
    if training and latent and optimizer is None:
        raise ValueError(f"fqtc.export_onnx: the model has latent weights ({', '.join(latent[:3])}"
                         f"{', ...' if len(latent) > 3 else ''}), so training=True also writes their update graph, "
                         "which needs the optimizer: pass optimizer=fqtc.optim.SGD(...) or AdamW(...) (the one you "
                         "train with), or training=False for the inference graph")
    if optimizer is not None and not training:
        raise ValueError("fqtc.export_onnx: optimizer= is for the training export (the update graph); "
                         "drop it or pass training=True")
    if optimizer is not None:
        from fqtc.optim.base import LatentOptimizer

        if not isinstance(optimizer, LatentOptimizer):
            raise TypeError(f"fqtc.export_onnx: optimizer must be a fqtc.optim optimizer (SGD, AdamW), got "
                            f"{type(optimizer).__name__}; torch.optim optimizers cannot update latent weights")
    graphs = graph_inputs(model, example_inputs, options, training)
    if not graphs:
        raise RuntimeError("fqtc.export_onnx: the fqt backend compiled no graph for this model and input")
    if training and not any("forward" in e for e in graphs):
        raise ValueError("fqtc.export_onnx: training=True, but the model compiled no training graph (nothing "
                         "requires grad); make a parameter or input require grad, or pass training=False")
    stem = str(path)[: -len(".onnx")]
    written: list[str] = []
    for i, entry in enumerate(graphs):
        gtag = f".g{i}" if len(graphs) > 1 else ""
        records = json.dumps([_jsonable(r) for r in entry["cg"].records])
        meta = {"fqt.config": entry["cg"].config.short_str(), "fqt.records": records}
        for which in (("forward", "backward") if training else ("inference", "forward")):
            if which not in entry:
                continue
            gm, args, names = entry[which]
            if training:
                p = f"{stem}{gtag}.{which}.onnx"
            else:
                p = f"{stem}{gtag}.onnx"
            export_graph(gm, args, p, which, names, sr, meta, entry.get(which + ".output_names"))
            written.append(p)
            if not training:
                break
    if optimizer is not None:
        from fqtc.export import onnx_lwq

        gm, args, names, out_names = onnx_lwq.update_graph(optimizer, model)
        p = f"{stem}.update.onnx"
        meta = {"fqt.optimizer": type(optimizer).__name__}
        export_graph(gm, args, p, "update", names, sr, meta, out_names)
        written.append(p)
    return written


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
