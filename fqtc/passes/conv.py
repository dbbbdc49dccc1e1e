"""Pass: rewrite 2-D convolution sites into fqt conv ops (``output``, ``grad_input``, ``grad_weight``).

A convolution site (`fqtc.passes.sites.ConvSite`, found by `fqtc.passes.sites.find_sites`, its operands resolved
by `fqtc.passes.assign.assign`) has its three GEMMs in two nodes: the forward ``aten.convolution`` and the
``aten.convolution_backward`` whose getitems 0, 1, 2 are ``grad_input``, ``grad_weight`` and ``grad_bias``. Each
getitem becomes its own op, so the partitioner sees exactly what each gradient reads:

Before::

    conv = aten.convolution(x, W, b, stride, padding, dilation, False, [0, 0], groups)       # seq_nr=24, fwd
    cb   = aten.convolution_backward(g, x, W, [C], stride, ..., groups, [True, True, True])  # seq_nr=24, bwd
    dx, dW, db = cb[0], cb[1], cb[2]

After::

    x8, sx = fqt.quantize(x, 8, [0,1,2,3], ...)        # per tensor: shared by output and grad_weight, saved int8
    w8, sw = fqt.quantize(W, 8, [1,2,3], ...)          # per output channel (MUST_RECOMPUTE, see save.py)
    conv   = fqt.qconv2d(x8, sx, w8, sw, b, stride, padding, dilation, groups, float32)
    g8, sg = fqt.quantize(g, 8, [1,2,3], "stochastic", ...)      # per sample, for grad_input
    w8t, swt = fqt.quantize(W, 8, [0,1,2,3], ...)                 # per tensor, for grad_input
    dx     = fqt.qconv2d_input(g8, sg, w8t, swt, [N, C, H, W], ...)
    g8c, sgc = fqt.quantize(g, 8, [0,2,3], "stochastic", ...)    # per output channel, for grad_weight
    dW     = fqt.qconv2d_weight(x8, sx, g8c, sgc, W.shape, ...)
    db     = aten.sum(g, [0, 2, 3])                               # not a GEMM: full precision

Specs come from `FQTConfig.resolve` with the same (role, operand) vocabulary as linear sites; granularities map to
4-D tensors as: ``tensor`` -> one scale; weight ``channel`` -> per output channel; activation/gradient ``token`` or
``sample`` -> per sample; activation/gradient ``channel`` -> per channel. A scale varying along a GEMM's reduction
axes (`fqtc.quant.conv.SCALE_FREE_DIM`) gives a dequantized product and the record says so.

Every convolution node gets a ``node.meta["fqt"]`` record (`fqtc.passes.records.gemm_record`). Sites whose
operands are all in full precision keep their aten nodes (the FP path stays bit-identical to eager); transposed
convolutions and 1-D/3-D convolutions are kept in full precision by `find_sites`, recorded with the reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fqtc.config import FQTConfig, QuantSpec
from fqtc.fx_utils import copy_meta, graph_fake_mode, set_fake_val
from fqtc.passes.common import fp_record, get_or_insert_step, insert_quantizer, stable_stream, tensor_shape
from fqtc.passes.gradquant import attach_bhq_transform, bhq_dequantized, bhq_invert_after
from fqtc.passes.records import BHQ_INT_NOTE, BHQ_NOTE, gemm_record
from fqtc.passes.sites import ConvSite
from fqtc.quant.conv import scale_ok

aten = torch.ops.aten
fqt = torch.ops.fqt

def conv_reduce_dims(spec: QuantSpec, operand: str, where: str) -> list[int]:
    """Dims of a 4-D conv operand sharing one scale (see the module docstring for the mapping)."""
    if spec.granularity == "tensor":
        return [0, 1, 2, 3]
    if operand == "weight":
        if spec.granularity != "channel":
            raise ValueError(f"fqt: granularity {spec.granularity!r} does not apply to the weight operand ({where}); "
                             "weights allow 'tensor' or 'channel' (per output channel)")
        return [1, 2, 3]
    if spec.granularity in ("token", "sample"):
        return [1, 2, 3]
    return [0, 2, 3]  # channel of an activation/gradient


def _scale_shape(dims: list[int]) -> list[int]:
    return [1 if d in dims else 2 for d in range(4)]


def rewrite_convs(gm: fx.GraphModule, sites: list[ConvSite], config: FQTConfig) -> tuple[list[dict], dict[str, int]]:
    """Rewrite the convolution sites ``sites`` (their ``specs`` resolved by assign) in place.

    Returns (records, counters).
    """
    graph = gm.graph
    records: list[dict] = []
    counters = {"conv_sites": len(sites), "conv_gemms_rewritten": 0, "conv_quantize_nodes": 0}
    if not sites:
        return records, counters
    fake_mode = graph_fake_mode(graph)
    todo = [s for s in sites if any(sp is not None for sp, _ in s.specs.values())]
    for site in sites:
        if site not in todo:  # every operand in full precision: keep the aten ops (bit-identical to eager)
            records.append(_site_fp_record(site, site.forward, "output"))
            if site.backward is not None:
                records.append(_site_fp_record(site, site.backward, "grad_input/grad_weight"))
    if not todo:
        return records, counters

    step = get_or_insert_step(graph, fake_mode, todo[0].forward.meta["val"].device)
    quantized: dict[tuple, tuple[fx.Node, fx.Node]] = {}

    def quant(base: fx.Node, spec: QuantSpec, dims: list[int], site: ConvSite, role: str, operand: str,
              before: fx.Node) -> tuple[fx.Node, fx.Node]:
        key = (base, spec, tuple(dims))
        if key in quantized:
            codes, scale = quantized[key]
            nodes = (codes,) if scale is None else (codes.args[0], codes, scale)  # bhq: one node
            if not _precedes(nodes[0], before):
                # first created for a consumer later in the graph (e.g. one input read by two convs' grad_weight
                # in backward, visited in forward order): move it before this earlier consumer
                for n in nodes:
                    before.prepend(n)
            return codes, scale
        stream = stable_stream(site.name, role, operand, spec.short_str())
        record = {"kind": "quantize", "site": site.name, "role": role, "operand": operand, "spec": spec.to_dict(),
                  "reduce_dims": dims, "base": base.name, "is_weight": operand == "weight", "stream": stream}
        if spec.quantizer == "bhq":  # codes of T g + the transform (passes/gradquant.py; read per role below)
            codes, scale = insert_quantizer(
                graph, fake_mode, fqt.bhq_quantize.default,
                (base, spec.bits, dims, spec.rounding, config.seed, stream, step), before,
                {**record, "kind": "bhq", "quantizer": "bhq", "output": "codes_scale_transform"})
            attach_bhq_transform(graph, fake_mode, codes, scale, dims)
        elif spec.quantizer != "uniform":  # the papers' gradient quantizers: int8 codes + keepdim scale
            codes, scale = insert_quantizer(
                graph, fake_mode, fqt.grad_quantize.default,
                (base, spec.quantizer, spec.bits, dims, spec.rounding, config.seed, stream, step), before,
                {**record, "kind": "grad_quantize", "quantizer": spec.quantizer, "output": "codes_scale"})
        else:
            codes, scale = insert_quantizer(
                graph, fake_mode, fqt.quantize.default,
                (base, spec.bits, dims, spec.rounding, config.seed, stream, step), before, record)
        quantized[key] = (codes, scale)
        counters["conv_quantize_nodes"] += 1
        return codes, scale

    for site in todo:
        f = site.forward
        x, w, bias = f.args[0], f.args[1], f.args[2]
        stride, padding, dilation, groups = f.args[3], f.args[4], f.args[5], f.args[8]
        conv_args = (list(stride), list(padding), list(dilation), groups)
        nodes = {"input": x, "weight": w}
        where = f"conv site {site.name!r}"

        def operand_args(role: str, operand: str, before: fx.Node) -> tuple[fx.Node, fx.Node | None, dict, bool]:
            spec, reason = site.specs[(role, operand)]
            base = nodes[operand] if operand != "grad_output" else site.backward.args[0]
            if spec is None:
                return base, None, {"bits": None, "reason": reason}, False
            dims = conv_reduce_dims(spec, operand, f"{where}, role {role!r}")
            codes, scale = quant(base, spec, dims, site, role, operand, before)
            entry = {**spec.to_dict(), "reason": reason, "reduce_dims": dims}
            if "fqt_bhq" in codes.meta:
                # BHQ rows are samples: grad_input's output rows are the same samples, so it stays an integer conv
                # and T^-1 goes on its output; grad_weight reduces over samples and reads T^-1 Q(T g)
                if role == "grad_input" and sorted(dims) == [1, 2, 3]:
                    posts.append(lambda out, c=codes: bhq_invert_after(graph, fake_mode, out, c, [1, 2, 3]))
                    site.notes.append(f"{role}: {BHQ_INT_NOTE}")
                else:
                    site.notes.append(f"{role}: {BHQ_NOTE}")
                    return bhq_dequantized(graph, fake_mode, codes, scale), None, entry, False
            return codes, scale, entry, scale is not None and scale_ok(role, operand, _scale_shape(dims))

        posts: list = []
        # output
        xa, xs, xe, xok = operand_args("output", "input", f)
        wa, ws, we, wok = operand_args("output", "weight", f)
        with graph.inserting_before(f):
            q = graph.call_function(fqt.qconv2d.default, (xa, xs, wa, ws, bias, *conv_args, f.meta["val"].dtype))
        _finish(graph, fake_mode, site, f, q, "output", {"input": xe, "weight": we}, xok and wok,
                {"a": tensor_shape(x), "b": tensor_shape(w), "out": tensor_shape(f)}, records)
        f.replace_all_uses_with(q)
        graph.erase_node(f)
        counters["conv_gemms_rewritten"] += 1

        if site.backward is None:
            continue
        b = site.backward
        g = b.args[0]
        for idx, gi in sorted(site.getitems.items()):
            if idx == 2:  # grad_bias = sum of grad_output over (N, H, W): a reduction, not a GEMM
                with graph.inserting_before(gi):
                    new = graph.call_function(aten.sum.dim_IntList, (g, [0, 2, 3]))
                copy_meta(new, b)
                set_fake_val(new, fake_mode)
                gi.replace_all_uses_with(new)
                graph.erase_node(gi)
                continue
            role = "grad_input" if idx == 0 else "grad_weight"
            posts: list = []  # maps on the new op's output (BHQ's T^-1)
            if role == "grad_input":
                ga, gs, ge, gok = operand_args(role, "grad_output", b)
                wa, ws, we, wok = operand_args(role, "weight", b)
                size = _size_nodes(graph, fake_mode, x, f_meta=site)
                args = (ga, gs, wa, ws, size, *conv_args, gi.meta["val"].dtype)
                target, operands, ok = fqt.qconv2d_input.default, {"grad_output": ge, "weight": we}, gok and wok
            else:
                xa, xs, xe, xok = operand_args(role, "input", b)
                ga, gs, ge, gok = operand_args(role, "grad_output", b)
                size = _size_nodes(graph, fake_mode, w, f_meta=site)
                args = (xa, xs, ga, gs, size, *conv_args, gi.meta["val"].dtype)
                target, operands, ok = fqt.qconv2d_weight.default, {"input": xe, "grad_output": ge}, xok and gok
            with graph.inserting_before(b):
                new = graph.call_function(target, args)
            _finish(graph, fake_mode, site, b, new, role, operands, ok,
                    {"a": tensor_shape(g), "b": tensor_shape(w if role == "grad_input" else x),
                     "out": tensor_shape(gi)}, records, original=gi)
            for post in posts:
                new = post(new)
            gi.replace_all_uses_with(new)
            graph.erase_node(gi)
            counters["conv_gemms_rewritten"] += 1
        if not b.users:
            graph.erase_node(b)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return records, counters


def _finish(graph, fake_mode, site: ConvSite, orig: fx.Node, new: fx.Node, role: str, operands: dict, ok: bool,
            shapes: dict, records: list[dict], original: fx.Node | None = None) -> None:
    copy_meta(new, orig)
    set_fake_val(new, fake_mode)
    rec = gemm_record(site=site.name, module=site.module, module_type=site.module_type, role=role,
                      op="convolution" if role == "output" else "convolution_backward", node=new.name,
                      operands=operands, integer_gemm=ok, shapes=shapes,
                      notes=[n for n in site.notes if n.startswith(role)], original_node=(original or orig).name)
    new.meta["fqt"] = rec
    records.append(rec)


def _site_fp_record(site: ConvSite, n: fx.Node, role: str) -> dict:
    rec = fp_record(n, "; ".join(sorted({r for _, r in site.specs.values()})), role)
    rec["site"] = site.name
    return rec


def _size_nodes(graph: fx.Graph, fake_mode, t: fx.Node, f_meta: ConvSite) -> list:
    """``t``'s shape as ints, with ``aten.sym_size`` nodes for symbolic dims (dynamic batch or image size).

    The sym_size nodes sit right after ``t`` in the forward region: the partitioner then saves the symbolic
    size, not the tensor.
    """
    out: list = []
    for d, s in enumerate(t.meta["val"].shape):
        if isinstance(s, torch.SymInt):
            with graph.inserting_after(t):
                n = graph.call_function(aten.sym_size.int, (t, d))
            copy_meta(n, f_meta.forward)
            n.meta["val"] = s
            out.append(n)
        else:
            out.append(int(s))
    return out


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    """Is node ``a`` before node ``b`` in graph order (walks forward from ``a``)?"""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False
