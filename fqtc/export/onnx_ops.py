"""ONNX translations of the fqt ops (onnxscript functions that torch.onnx's exporter traces) and the ``com.fqt``
function library they call (counter-based stochastic rounding, the lowbias32 hash): what `fqtc.export.onnx`
hands the exporter. Every translation mirrors its op's reference in `fqtc.quant` (docs/inspect_export.md); the
gradient quantizers, latent-weight ops and rotations live in `onnx_gradq`, `onnx_lwq` and `onnx_rotate`."""

from __future__ import annotations

from typing import Any, Callable

import torch

from fqtc.export._common import (
    FQT_DOMAIN,
    FQT_DOMAIN_VERSION,
    _bias_and_cast,
    _group_codes,
    _group_scale,
    _no_given_amax,
    _op,
    _rank,
    _static_shape,
)
from fqtc.quant.gradq import two_level
from fqtc.quant.rng import GOLDEN, M1, M2

OPSET = 21  # the ONNX opset of the exported graphs (opset-21 int4/uint4 and blocked quantization)


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
    if two_level(quantizer, bits):
        raise NotImplementedError("fqtc.export_onnx: the two-level (1-bit) PSQ has no ONNX translation (its codes "
                                  "are -1/+1, not a uniform grid's); export PSQ at G2..G8 or AQ at G1")
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
    return _bias_and_cast(out, bias, out_dtype)


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
    from fqtc.export import onnx_block as _blk  # block scaling: fqt::quantize_block, fqt::block_gemm
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
        torch.ops.fqt.bhq_quantize.default: _gq.bhq_quantize,
        torch.ops.fqt.bhq_invert.default: _gq.bhq_invert,
        torch.ops.fqt.rotate.default: _rot.rotate,
        **_lwq.LWQ_TRANSLATIONS,
        **_blk.BLOCK_TRANSLATIONS,
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


def register_schemas() -> None:
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
