"""Codegen pass: on CUDA graphs, fuse ``fqt::quantize -> fqt::qgemm`` chains into ``fqt::qgemm_fused_quant``
(and ``fqt::grad_quantize`` PTQ/PSQ/SCQ -> ``fqt::qgemm`` into ``fqt::qgemm_fused_grad_quant``).

Runs on the partitioned forward and backward graphs (the backend's fw/bw compilers call `wrap_compiler`), after
the fqtc passes. A chain is fused when the GEMM's left operand ``a`` and its scale are the two outputs of one
``fqt::quantize`` node (no transpose in between) whose scale is per-tensor or per-row, and ``b`` is int8 codes
with a scale. The fused op also returns the codes and scale, so other readers of the activation codes (the
backward ``grad_weight`` GEMM, the saved-tensor output) read those; a chain whose codes are read *before* the GEMM
is left alone. Every GEMM's record ``node.meta["fqt"]["codegen"]`` says which kernel runs it and, when not fused,
why.

Before::

    q      = fqt.quantize(x, 8, [1], "stochastic", seed, stream, step);  x8, sx = q[0], q[1]
    out    = fqt.qgemm(x8, sx, w8t, swt, bias, float32)

After::

    f      = fqt.qgemm_fused_quant(x, 8, [1], "stochastic", seed, stream, step, w8t, swt, bias, float32)
    out, x8, sx = f[0], f[1], f[2]

**Statistics from the producer.** A scale whose group does not fit one tile (per tensor; a row longer than the
quantize kernel's ``MAX_BLOCK``; a column taller than one tile; a GEMM prologue's rows, which span all of K) and
BHQ's row ranges need the group abs-max before the first element can be quantized; computed inside the kernel
that is a second read of ``x``. (A per-row prologue whose input comes from an extern kernel or a graph input keeps
its in-kernel slab sweep instead, which re-reads the slab from L2 rather than DRAM: `extern_producer`.) The pass
instead inserts ``amax = aten.amax(aten.abs(x), dims, keepdim=True)`` and passes it as the quantizer's ``amax``
argument: Inductor, which compiles the rest of the graph, fuses this reduction into the kernel that produces
``x`` (its scheduler fuses a pointwise producer into a reduction over the same elements), so the fqt kernel is
the only other reader of ``x``. When ``x`` is a graph input or the output of an extern kernel (another GEMM),
the reduction is one standalone read, as before. The record says ``"statistic": "producer"``.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from fqtc.fx_utils import copy_meta, graph_fake_mode, node_order, set_fake_val
from fqtc.ops.fused import FUSABLE_GRAD_QUANTIZERS
from fqtc.quant.gemm import not_integer_reason
from fqtc.quant.gradq import AMAX_QUANTIZERS, two_level

fqt = torch.ops.fqt
# fqt::grad_quantize exists when the gradient quantizers (fqtc/ops/grad.py) are installed
_GRAD_QUANTIZE = getattr(getattr(fqt, "grad_quantize", None), "default", None)


def graph_device(gm: fx.GraphModule) -> torch.device | None:
    """The device of the graph's GEMMs (from their fake values); None when the graph has no fqt GEMM."""
    for n in gm.graph.find_nodes(op="call_function", target=fqt.qgemm.default):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return None


def _val(n: Any) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _reference_reason(q: fx.Node) -> str | None:
    """Why ``q`` runs the reference implementation even on CUDA (not an integer GEMM), else None; the same test as
    `fqtc.codegen.impls.qgemm_cuda`, on fake values."""
    a, sa, b, sb = (_val(x) for x in q.args[:4])
    if a is None or b is None:  # no traced value: not known to be int8 codes
        return "an operand is not int8 codes (a partially quantized GEMM): reference float product"
    why = not_integer_reason(a, sa, b, sb)
    return None if why is None else f"{why}: reference float product"


def _fusable(q: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node | None, str]:
    """The quantize node feeding ``q``'s left operand when the chain can be fused, else (None, reason)."""
    a, sa, b, sb = q.args[:4]
    if not (isinstance(a, fx.Node) and isinstance(sa, fx.Node) and a.target is operator.getitem
            and sa.target is operator.getitem and a.args[1] == 0 and sa.args[1] == 1 and a.args[0] is sa.args[0]):
        return None, "left operand is not the direct output of one fqt::quantize (transposed or precomputed codes)"
    qn = a.args[0]
    if qn.target == fqt.quantize.default:
        x, _bits, dims = qn.args[:3]
    elif qn.target == _GRAD_QUANTIZE:
        x, quantizer, _bits, dims = qn.args[:4]
        if quantizer not in FUSABLE_GRAD_QUANTIZERS:
            return None, f"gradient quantizer {quantizer!r} is not a per-row/per-tensor codes x scale quantizer"
        if two_level(quantizer, _bits):
            return None, "the two-level (1-bit) PSQ has no fused prologue (its codes are not the uniform grid's)"
        if quantizer == "ptq":
            dims = list(range(_val(x).dim())) if _val(x) is not None else dims
    else:
        return None, f"left operand comes from {qn.target}, not fqt::quantize / fqt::grad_quantize"
    xv, bv = _val(x), _val(b)
    if xv is None or bv is None:
        return None, "operands have no fake values"
    n = xv.dim()
    dims = sorted({d % n for d in dims})
    if dims not in (list(range(n)), [n - 1]):
        return None, f"activation scale over dims {dims} is neither per-tensor nor per-row"
    if bv.dtype != torch.int8 or sb is None:
        return None, "right operand is not int8 codes with a scale"
    if tuple(xv.shape[:-2]) != tuple(torch.broadcast_shapes(xv.shape[:-2], bv.shape[:-2])):
        return None, "left operand is broadcast over the batch"
    for out in (a, sa):
        early = [u for u in out.users if u is not q and order.get(u, 0) < order[q]]
        if early:
            return None, f"codes/scale are read before the GEMM by {early[0].name}"
    if any(u.target is not operator.getitem for u in qn.users):
        return None, "fqt::quantize has a non-getitem user"
    return qn, ""


def _insert_amax(graph: fx.Graph, before: fx.Node, x: fx.Node, dims: list[int], fake_mode) -> fx.Node:
    """``aten.amax(aten.abs(x), dims, keepdim=True)`` before ``before``: the statistic Inductor fuses into ``x``'s
    producer (`fqtc.quant.uniform.group_amax`: abs-max propagates NaN and Inf, as the kernels' own sweep does)."""
    with graph.inserting_before(before):
        ab = graph.call_function(torch.ops.aten.abs.default, (x,))
        am = graph.call_function(torch.ops.aten.amax.default, (ab, dims, True))
    for n in (ab, am):
        n.meta["fqt"] = {"kind": "statistic", "of": x.name, "dims": list(dims)}
        set_fake_val(n, fake_mode)
    return am


# Ops Inductor runs as extern kernels (or that are graph inputs): a reduction over their output cannot be fused into
# the kernel producing it. View ops are looked through: a view of an extern output is still that buffer.
_EXTERN_TARGETS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                   torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default,
                   torch.ops.aten.convolution_backward.default}
_VIEW_TARGETS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
                 torch.ops.aten.t.default, torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
                 torch.ops.aten.expand.default, torch.ops.aten.squeeze.dim, torch.ops.aten.unsqueeze.default}


def extern_producer(x: fx.Node) -> bool:
    """True when ``x`` (views looked through) is a graph input, an fqt op's output or an extern GEMM/conv/SDPA
    output: Inductor cannot fuse a reduction over it into its producer."""
    n = x
    while n.op == "call_function" and n.target in _VIEW_TARGETS:
        n = n.args[0]
    if n.op != "call_function":
        return True
    if n.target is operator.getitem:
        n = n.args[0]
    if getattr(n.target, "namespace", None) == "fqt":
        return True
    name = str(n.target)
    return n.target in _EXTERN_TARGETS or "scaled_dot_product" in name


def _stat_dims(n: fx.Node) -> list[int] | None:
    """The group dims of a standalone quantizer node whose kernel would read its input twice (so the statistic
    comes from the producer), else None."""
    try:
        from fqtc.codegen.quantize import reads_twice
    except ImportError:  # no Triton: no kernels, the reference implementations run
        return None

    x = n.args[0]
    xv = _val(x)
    if xv is None or xv.dim() == 0 or xv.numel() <= 1:
        return None
    nd = xv.dim()
    if n.target in (fqt.bhq.default, fqt.bhq_quantize.default):
        if len(n.args) > 7:
            return None
        return sorted({d % nd for d in n.args[2]})
    if n.target == fqt.quantize.default:
        if len(n.args) > 7:
            return None
        dims = n.args[2]
    else:  # fqt::grad_quantize
        quantizer = n.args[1]
        if len(n.args) > 8 or quantizer not in AMAX_QUANTIZERS:
            return None
        dims = list(range(nd)) if quantizer == "ptq" else n.args[3]
    dims = sorted({d % nd for d in dims})
    try:
        return dims if reads_twice(tuple(xv.shape), dims) else None
    except NotImplementedError:  # no kernel layout: the reference runs (counted as a fallback)
        return None


def lower_graph(gm: fx.GraphModule, device: str | torch.device | None = None) -> dict[str, int]:
    """Fuse quantize->qgemm chains when the graph runs on CUDA (``device`` overrides the graph's own device, which
    lets tests lower CPU-traced graphs), and give every quantizer whose kernel would read its input twice the
    group abs-max from the input's producer. Returns counters ``fused``, ``unfused`` and ``statistics``. Non-CUDA
    graphs are left untouched (the reference path)."""
    dev = torch.device(device) if device is not None else graph_device(gm)
    if dev is None or dev.type != "cuda":
        return {"fused": 0, "unfused": 0, "statistics": 0}
    from fqtc.codegen import register_cuda_kernels

    register_cuda_kernels()  # no-op without CUDA; the fused op's reference impl then runs
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    order = node_order(graph)
    fused = unfused = 0
    for q in list(graph.find_nodes(op="call_function", target=fqt.qgemm.default)):
        rec = q.meta.setdefault("fqt", {})
        qn, why = _fusable(q, order)
        if qn is None:
            ref_why = _reference_reason(q)
            rec["codegen"] = {"device": "cuda", "kernel": "reference" if ref_why else "triton:qgemm", "fused": False,
                              "reason": ref_why or why}
            unfused += 1
            continue
        a_codes, a_scale = q.args[0], q.args[1]
        b, sb, bias, out_dtype = q.args[2:6]
        if qn.target == fqt.quantize.default:
            x, bits, dims, rounding, seed, stream, step = qn.args[:7]
            target, fargs = fqt.qgemm_fused_quant.default, (x, bits, dims, rounding, seed, stream, step)
        else:
            x, quantizer, bits, dims, rounding, seed, stream, step = qn.args[:8]
            target = fqt.qgemm_fused_grad_quant.default
            fargs = (x, quantizer, bits, dims, rounding, seed, stream, step)
            if quantizer == "ptq":
                dims = list(range(x.meta["val"].dim()))
        if fake_mode is None:
            fake_mode = getattr(_val(q), "fake_mode", None)
        nd = x.meta["val"].dim()
        per_tensor = len({d % nd for d in dims}) == nd
        # the statistic from the producer (module docstring): per tensor it would be a second read of x anyway;
        # per row only where Inductor can fold it into x's producer (a standalone reduction would read x from
        # DRAM, where the kernel's own slab sweep re-reads it from L2)
        from_producer = per_tensor or not extern_producer(x)
        amax = (_insert_amax(graph, q, x, list(range(nd)) if per_tensor else [nd - 1], fake_mode)
                if from_producer else None)
        with graph.inserting_before(q):
            f = graph.call_function(target, (*fargs, b, sb, bias, out_dtype, amax))
            outs = [graph.call_function(operator.getitem, (f, i)) for i in range(3)]
        copy_meta(f, q)
        set_fake_val(f, fake_mode)
        for o in outs:
            copy_meta(o, q)
            set_fake_val(o, fake_mode)
        q.replace_all_uses_with(outs[0])
        a_codes.replace_all_uses_with(outs[1])
        a_scale.replace_all_uses_with(outs[2])
        rec["codegen"] = {
            "device": "cuda", "kernel": f"triton:{target._schema.name.split('::')[1]}", "fused": True,
            "node": f.name,
            "replaced": [qn.name, q.name], "quantize": dict(qn.meta.get("fqt", {})),
            "prologue": "per_tensor" if per_tensor else "per_row",
            "statistic": "producer" if from_producer else "kernel",
        }
        f.meta["fqt"] = rec
        for n in (q, a_codes, a_scale, qn):
            graph.erase_node(n)
        order = node_order(graph)
        fused += 1
    stats = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in (fqt.quantize.default, _GRAD_QUANTIZE, fqt.bhq.default,
                                                         fqt.bhq_quantize.default):
            continue
        dims = _stat_dims(n)
        if dims is None:
            continue
        if fake_mode is None:
            fake_mode = getattr(_val(n.args[0]), "fake_mode", None)
        am = _insert_amax(graph, n, n.args[0], dims, fake_mode)
        n.args = (*n.args, am)
        n.meta.setdefault("fqt", {})["codegen"] = {"device": "cuda", "statistic": "producer", "amax": am.name}
        stats += 1
    graph.lint()
    gm.recompile()
    return {"fused": fused, "unfused": unfused, "statistics": stats}


def wrap_compiler(compile_fn: Callable) -> Callable:
    """A fw/bw compiler that first lowers CUDA graphs to the fused kernels, then calls ``compile_fn``."""

    def compile_with_codegen(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        lower_graph(gm)
        return compile_fn(gm, example_inputs)

    return compile_with_codegen
