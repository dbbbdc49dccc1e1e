"""Codegen pass for CPU graphs compiled by Inductor: fqt ops become the aten ops of their reference functions, so
Inductor fuses them into the loops of the ops around them.

An ``fqt::quantize`` left as a custom op is an extern call for Inductor: it reads ``x`` once for the abs-max, then
runs about twenty full-tensor aten passes (the counter-based hash of `fqtc.quant.rng`, division, rounding, clamp,
cast), each a separate read and write of memory. Inlined as aten ops, the same computation is pointwise integer
and float arithmetic plus one reduction: Inductor's C++ backend emits one vectorized loop for the abs-max, fused
into ``x``'s producer where it can, and one loop that hashes the element index, rounds and writes int8 codes
(the element index is a loop variable there, not a tensor). ``fqt::qgemm`` becomes ``aten._int_mm`` (or the exact
fp32 emulation, whichever `fqtc.quant.gemm.cpu_gemm_path` chose) with its dequantize epilogue
``acc * a_scale * b_scale + bias`` as pointwise ops that Inductor fuses into the GEMM's consumer; a batched GEMM
(attention) keeps its loop of int8 GEMMs as one ``fqt::int_gemm`` op and inlines the same epilogue.

The inlined graph is the reference function traced as it runs (``make_fx`` on the node's fake values), so it
computes the same bits: IEEE division, round-half-to-even, the same int32 hash; Inductor compiles with
``-ffp-contract=off`` (no fused multiply-add) and keeps true division. tests/codegen/test_inductor_cpu.py checks
codes, scales and GEMM outputs bit for bit against the eager reference.

Nodes whose fake values have symbolic shapes (a graph Dynamo recompiled with dynamic shapes) stay custom ops: the
reference's shape-dependent branches (K-chunking) would add guards after Dynamo has set them. Each GEMM record's
``codegen`` entry says which form runs.

Before::  q = fqt.quantize(x, 8, [1], "stochastic", seed, stream, step); x8, sx = q[0], q[1]
          out = fqt.qgemm(x8, sx, w8t, swt, bias, float32)
After::   amax = amax(abs(x), [1]); sx = where(amax > 0, amax / 127, ...); u = hash(iota ^ key(step)) ...
          x8 = convert(clamp(floor(x / sx + u))); out = _int_mm(x8, w8t).float() * sx * swt + bias
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from fqtc.passes.common import graph_fake_mode
from fqtc.quant import gemm as _gemm
from fqtc.quant import uniform as _uniform

fqt = torch.ops.fqt


def _static(v: Any) -> bool:
    return not isinstance(v, torch.Tensor) or all(isinstance(s, int) for s in v.shape)


def _quantize_fn(node: fx.Node, fake_mode: Any) -> tuple[Callable, list[fx.Node]]:
    x, bits, dims, rounding, seed, stream, step, *rest = node.args
    amax = rest[0] if rest else node.kwargs.get("amax")
    inputs = [x]
    if rounding == "stochastic":
        # the stream key as its own (extern, 0-d) node: computed once, not inlined into every vector iteration
        with node.graph.inserting_before(node):
            key = node.graph.call_function(fqt.stream_key.default, (seed, stream, step))
        with fake_mode:
            key.meta["val"] = fqt.stream_key.default(seed, stream, step.meta["val"])
        key.meta["partitioner_tag"] = node.meta.get("partitioner_tag")
        inputs.append(key)
    if amax is not None:
        inputs.append(amax)

    def fn(xv, *rest_v):
        rest_v = list(rest_v)
        kv = rest_v.pop(0) if rounding == "stochastic" else None
        av = rest_v.pop(0) if amax is not None else None
        return _uniform.quantize(xv, bits, dims, rounding, seed, 0, stream, av, kv)

    return fn, inputs


def _qgemm_fn(node: fx.Node, fake_mode: Any) -> tuple[Callable, list[fx.Node]] | None:
    a, a_scale, b, b_scale, bias, out_dtype = node.args
    vals = [n.meta.get("val") if isinstance(n, fx.Node) else n for n in (a, a_scale, b, b_scale)]
    if any(v is None for v in vals) or _gemm.not_integer_reason(*vals) is not None:
        return None  # a float or partially quantized GEMM: the custom op's reference product stays
    tensors = [a, a_scale, b, b_scale] + ([bias] if bias is not None else [])
    batched = vals[0].dim() != 2 or vals[2].dim() != 2

    def fn(av, asv, bv, bsv, *maybe_bias):
        bias_v = maybe_bias[0] if maybe_bias else None
        if not batched:  # aten._int_mm (or the exact fp32 emulation), as the reference runs it
            return _gemm.scaled_gemm(av, asv, bv, bsv, bias_v, out_dtype)
        # a batched product (attention): the loop of int8 GEMMs stays one extern op, its epilogue is inlined
        out = fqt.int_gemm.default(av, bv).float() * asv * bsv
        return (out if bias_v is None else out + bias_v.float()).to(out_dtype)

    return fn, tensors


_DECOMPOSERS: dict[Any, Callable[[fx.Node, Any], tuple[Callable, list[fx.Node]] | None]] = {
    fqt.quantize.default: _quantize_fn,
    fqt.qgemm.default: _qgemm_fn,
}


def _inline(gm: fx.GraphModule, node: fx.Node, fn: Callable, inputs: list[fx.Node], fake_mode) -> None:
    """Replace ``node`` by the aten graph of ``fn`` traced on the inputs' fake values."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.decomposition import select_decomp_table

    # Inductor's own decompositions (as its pattern matcher traces replacements): aten ops it has no lowering for
    # (ones_like, ...) must arrive decomposed
    with fake_mode, enable_python_dispatcher():
        traced = make_fx(fn, select_decomp_table(), tracing_mode="real")(*[n.meta["val"] for n in inputs])
    graph = gm.graph
    env: dict[fx.Node, Any] = {}
    phs = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for ph, inp in zip(phs, inputs):
        env[ph] = inp
    out_vals: Any = None
    with graph.inserting_before(node):
        for tn in traced.graph.nodes:
            if tn.op == "placeholder":
                continue
            if tn.op == "output":
                out_vals = tn.args[0]
                break
            if tn.op == "get_attr":  # constants the reference made (e.g. a scalar tensor): copy onto gm
                value = getattr(traced, tn.target)
                name = f"_fqt_const_{len([k for k in gm._buffers if k.startswith('_fqt_const_')])}"
                gm.register_buffer(name, value)
                new = graph.get_attr(name)
            else:
                new = graph.node_copy(tn, lambda n: env[n])
            new.meta.update({k: v for k, v in tn.meta.items() if k in ("val", "tensor_meta")})
            for k in ("partitioner_tag", "seq_nr", "stack_trace", "nn_module_stack", "fwd_nn_module_stack"):
                if k in node.meta:
                    new.meta[k] = node.meta[k]
            env[tn] = new
    outs = [env[o] if isinstance(o, fx.Node) else o for o in (out_vals if isinstance(out_vals, (tuple, list))
                                                                 else [out_vals])]
    if isinstance(out_vals, (tuple, list)):
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
    else:
        node.replace_all_uses_with(outs[0])
    if node.users:
        raise RuntimeError(f"fqt: {node.name} still has users after inlining its reference")
    graph.erase_node(node)


def decompose_for_inductor(gm: fx.GraphModule) -> dict[str, Any]:
    """Inline ``fqt::quantize`` and integer 2-D ``fqt::qgemm`` nodes of a CPU graph as aten ops (see module doc).

    Returns ``{"inlined_quantize", "inlined_qgemm", "kept_ops", "codegen"}``: counts, and per GEMM node name the
    record entry ``{"device": "cpu", "kernel": "inductor:<int_mm|fp32>" or "reference", "fused", "reason"}``
    (the backend copies it into the GEMM's record: AOTAutograd hands the compiler a copy of the backward graph)."""
    out: dict[str, Any] = {"inlined_quantize": 0, "inlined_qgemm": 0, "kept_ops": 0, "codegen": {}}
    fake_mode = graph_fake_mode(gm.graph)
    if fake_mode is None:
        return out
    path = None
    for node in list(gm.graph.nodes):
        decomp = _DECOMPOSERS.get(node.target) if node.op == "call_function" else None
        if decomp is None:
            continue
        val = node.meta.get("val")
        first = val[0] if isinstance(val, (tuple, list)) else val
        if not isinstance(first, torch.Tensor) or first.device.type != "cpu":
            continue
        path = path or _gemm.cpu_gemm_path()  # decided on real tensors before any tracing (quant/gemm.py)
        got = decomp(node, fake_mode)
        is_gemm = node.target is fqt.qgemm.default
        if got is None or not (_static(first) and all(_static(n.meta.get("val")) for n in got[1])):
            out["kept_ops"] += 1
            if is_gemm:
                why = "symbolic shapes" if got is not None else "float or partially quantized product"
                out["codegen"][node.name] = {"device": "cpu", "kernel": "reference", "fused": False, "reason": why}
            continue
        name = node.name
        _inline(gm, node, got[0], got[1], fake_mode)
        if is_gemm:
            out["codegen"][name] = {"device": "cpu", "kernel": f"inductor:{path}", "fused": True}
            out["inlined_qgemm"] += 1
        else:
            out["inlined_quantize"] += 1
    if out["inlined_quantize"] or out["inlined_qgemm"]:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return out


def retrace_with_inductor_decompositions(gm: fx.GraphModule, example_inputs: Any) -> fx.GraphModule:
    """``gm`` retraced through Inductor's decomposition table, which ``compile_fx_inner`` expects.

    The backend traces the joint graph without Inductor's decompositions, so fqtc's passes see the same graph for
    every compiler (native LayerNorm / BatchNorm / activation backward ops included); this turns the partitioned
    graph into the decomposed form Inductor lowers. Values are traced under the graph's fake mode, so symbolic
    shapes stay symbolic."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.decomposition import select_decomp_table

    fake_mode = graph_fake_mode(gm.graph)
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    with fake_mode, enable_python_dispatcher():
        new = make_fx(fx.Interpreter(gm).run, select_decomp_table(), tracing_mode="real")(*vals)
    new.meta.update(gm.meta)
    # random ops (dropout's mask) become Inductor's seeded random ops, as its joint-graph passes would do
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    with V.set_fake_mode(fake_mode):
        replace_random_passes(new)
    return new
