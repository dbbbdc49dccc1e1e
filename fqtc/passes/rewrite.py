"""Pass 3: rewrite planned GEMMs into ``fqt::quantize`` + ``fqt::qgemm`` (block scaling: ``fqt::quantize_block`` +
``fqt::block_gemm``).

Preconditions: `assign` planned every GEMM (``node.meta["fqt"]``). Each operand's base tensor is quantized once per
distinct (base, spec) — the forward activation's codes are shared by the ``output`` and ``grad_weight`` GEMMs and
by every site reading it (identical views of one activation count as one base, `same_tensor`), the gradient is
quantized once per spec — right before its first consumer (inserting backward quantizers earlier
would pull them into the forward partition). Transposes between base and GEMM are replayed on codes and scales.
The stochastic-rounding key is (seed, step, stream): the step comes from one ``fqt::step`` node per graph, the
stream is a stable hash of (site, role, operand, spec).

Before::

    t     = aten.t(W)
    addmm = aten.addmm(b, x, t)

After::

    step   = fqt.step(cpu)
    qx     = fqt.quantize(x, 8, [0, 1], "nearest", seed, stream_x, step);  x8, sx = qx[0], qx[1]
    qw     = fqt.quantize(W, 8, [1], "nearest", seed, stream_w, step);     w8, sw = qw[0], qw[1]
    qgemm  = fqt.qgemm(x8, sx, aten.t(w8), aten.t(sw), b, float32)

A ``grad_input`` GEMM whose weight is quantized per output channel (rule ``grad_input``/``weight``: ``channel``)
has the weight's scales along its reduction axis, so no epilogue can apply them. The scales are folded into the
other operand instead: the gradient is multiplied by them before it is quantized (``g · diag(s_w)``, one fused
multiply in its quantizer's loop), and the GEMM reads the weight's per-channel codes, the same codes as the
``output`` GEMM, with a unit scale: ``g W = (g · diag(s_w)) W_codes``, an integer GEMM (docs/architecture.md,
"Scales and integer GEMMs")::

    sw_t = aten.t(sw);  gs = aten.mul(g, sw_t)
    qg   = fqt.quantize(gs, 8, [1], "stochastic", ...);  g8, sg = qg[0], qg[1]
    gi   = fqt.qgemm(g8, sg, w8, ones([1, 1]), None, float32)

Guarantees: ``node.meta["val"]`` is set on every new node; the graph stays functional; a GEMM that cannot be
rewritten keeps its op and its record says why (status ``full_precision``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.fx as fx

from fqtc.config import FQTConfig
from fqtc.fx_utils import copy_meta, graph_fake_mode, node_order, set_fake_val
from fqtc.ops import observe as _observe  # noqa: F401  (registers fqt::observe)
from fqtc.passes.assign import GemmPlan, OperandPlan
from fqtc.passes.common import get_or_insert_step, insert_quantizer, stable_stream, strip_operand
from fqtc.passes.records import NOT_INTEGER_NOTE
from fqtc.passes.sites import gemm_operands

aten = torch.ops.aten


def rewrite(gm: fx.GraphModule, plans: list[GemmPlan], config: FQTConfig) -> dict[str, int]:
    """Rewrite GEMMs in place. Returns counters (``gemms_rewritten``, ``quantize_nodes``)."""
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    order = node_order(graph)
    todo = []
    for plan in plans:
        if plan.status == "full_precision":
            continue
        node = plan.node
        if node.target == aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            node.meta["fqt"].update(status="full_precision", reason="addmm with beta/alpha != 1 is not rewritten")
            continue
        todo.append(plan)
    if not todo:
        return {"gemms_rewritten": 0, "quantize_nodes": 0}

    # phase 1: group operand requests by (same tensor, spec, dims) so each tensor is quantized once per spec
    # Keys and transpose chains are resolved before any GEMM is replaced: replacing a GEMM whose output feeds
    # another GEMM (Linear -> Linear) changes that consumer's base node.
    requests: dict[tuple, list[tuple[GemmPlan, OperandPlan]]] = defaultdict(list)
    resolved: dict[tuple[fx.Node, int], tuple[tuple, list[fx.Node]]] = {}
    bases: dict[tuple[fx.Node, int], fx.Node] = {}
    folds = {plan.node: f for plan in todo if (f := _scale_fold(plan)) is not None}
    for plan in todo:
        args = gemm_operands(plan.node)
        folded = folds.get(plan.node, (None,))[0]
        for op in plan.operands:
            if op.spec is None or op is folded:  # a folded gradient is quantized in phase 2, after the fold
                continue
            base, chain = strip_operand(args[op.arg_index])
            key = (same_tensor(base), op.spec, tuple(op.reduce_dims))
            requests[key].append((plan, op))
            resolved[(plan.node, op.arg_index)] = (key, chain)
            bases[(plan.node, op.arg_index)] = base

    step = get_or_insert_step(graph, fake_mode, todo[0].node.meta["val"].device)

    quantized: dict[tuple, tuple[fx.Node, fx.Node]] = {}
    for (same, spec, dims), users in requests.items():
        first_plan, first_op = min(users, key=lambda u: order[u[0].node])
        # the first reader's own base node: it is defined before the quantizer, which precedes that reader
        base = bases[(first_plan.node, first_op.arg_index)]
        q = _insert_quantize(graph, fake_mode, base, spec, list(dims), first_plan, first_op, config, step)
        if config.log_sqnr and q[1] is not None and spec.quantizer != "bhq" and any(
                config.logs_sqnr(p.site.name, p.site.module, p.role) for p, _ in users):
            q = _insert_observer(graph, fake_mode, base, q, first_plan, first_op, step)
        quantized[(same, spec, dims)] = q

    # phase 2: replace each GEMM by qgemm on (replayed) codes and scales
    for plan in todo:
        node = plan.node
        args = list(gemm_operands(node))
        new_args: list[fx.Node | None] = [None, None, None, None]  # a, sa, b, sb
        for idx in (0, 1):
            new_args[2 * idx] = args[idx]
        lowered: set[int] = set()
        posts: list[Callable[[fx.Node], fx.Node]] = []
        fold = folds.get(node)
        with graph.inserting_before(node):
            for op in plan.operands:
                if op.spec is None or (fold is not None and op is fold[0]):
                    continue
                key, chain = resolved[(node, op.arg_index)]
                codes, scale = quantized[key]
                hook = OPERAND_HOOKS.get(op.spec.quantizer)
                if hook is not None:  # a quantizer whose GEMMs read it in several forms (BHQ)
                    codes, scale, post = hook(graph, fake_mode, plan, op, codes, scale, chain)
                    if post is not None:
                        posts.append(post)
                for t in chain:
                    codes = _replay(graph, fake_mode, t, codes, node)
                    # scale None: a lowering returned a dequantized float operand (e.g. BHQ)
                    scale = scale if scale is None else _replay(graph, fake_mode, t, scale, node)
                new_args[2 * op.arg_index] = codes
                new_args[2 * op.arg_index + 1] = scale
                lowered.add(op.arg_index)
            if fold is not None:  # after the weight's codes and scale are in place
                gi, wi = fold[0].arg_index, fold[1].arg_index
                new_args[2 * gi], new_args[2 * gi + 1], new_args[2 * wi + 1] = _fold_scale(
                    graph, fake_mode, plan, fold[0], args[gi], new_args[2 * wi + 1], config, step)
                lowered.add(gi)
            for idx in (0, 1):
                if idx not in lowered:  # full-precision operand: replay-free, the original arg
                    new_args[2 * idx] = args[idx]
            bias = node.args[0] if node.target == aten.addmm.default else None
            out_dtype = node.meta["val"].dtype
            block = next((op.spec.block_size for op in plan.operands
                          if op.spec is not None and op.spec.granularity == "block"), None)
            if block is None:
                q = graph.call_function(torch.ops.fqt.qgemm.default, (*new_args, bias, out_dtype))
            else:  # block scales along K: the integer GEMM accumulates each K-block (fqtc.quant.block)
                q = graph.call_function(torch.ops.fqt.block_gemm.default, (*new_args[:4], block, bias, out_dtype))
        copy_meta(q, node)
        set_fake_val(q, fake_mode)
        rec = dict(node.meta["fqt"])
        rec["node"] = q.name
        rec["original_node"] = node.name
        q.meta["fqt"] = rec
        out = q
        for post in posts:  # e.g. BHQ's T^-1 on the output rows
            out = post(out)
        node.replace_all_uses_with(out)
        graph.erase_node(node)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return {"gemms_rewritten": len(todo), "quantize_nodes": len(quantized)}


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def same_tensor(base: fx.Node) -> object:
    """A key equal for nodes that are the same tensor: a view (reshape) is keyed by its input and shape, so GEMM
    sites that each reshape one activation (Hugging Face attention's q/k/v projections flatten the same hidden
    states three times) quantize it once and share the codes, as sites reading one node already do."""
    if base.op == "call_function" and base.target in _VIEWS and isinstance(base.args[0], fx.Node):
        try:
            key = (base.target, base.args[0], tuple(base.args[1]))
            hash(key)
            return key
        except TypeError:  # a shape holding something unhashable: key the node itself
            return base
    return base


# Extension points (one entry per feature, registered by the module that owns it):
# QUANTIZE_LOWERINGS[spec.quantizer](graph, fake_mode, base, spec, dims, plan, op, config, step) -> (codes, scale)
#   lowers a non-uniform quantizer (e.g. gradient quantizers) to its fqt op(s); "uniform" is built in. scale None:
#   ``codes`` is a dequantized float operand (qgemm multiplies it in float; fqtc.passes.gradquant's BHQ).
# A base node whose meta["fqt_int"] = {"codes": Node, "scale": Node, "bits": int, "reduce_dims": [...]} is already
#   stored in integer form (latent-weight parameters): matching specs reuse its codes instead of re-quantizing.
QUANTIZE_LOWERINGS: dict[str, Callable] = {}
# OPERAND_HOOKS[spec.quantizer](graph, fake_mode, plan, op, codes, scale, chain) -> (codes, scale, post): how one
#   GEMM reads a quantization whose GEMMs need different forms of it; ``post`` (or None) maps the new GEMM node to
#   the node its users read (BHQ: T^-1 on the integer grad_input's output rows, fqtc.passes.gradquant).
OPERAND_HOOKS: dict[str, Callable] = {}


def _scale_fold(plan: GemmPlan) -> tuple[OperandPlan, OperandPlan] | None:
    """(gradient operand, weight operand) of a 2-D ``grad_input`` GEMM ``g @ W`` whose weight scales (per output
    channel) lie along the reduction axis while the gradient's do not: the GEMM is made integer by folding the
    weight scales into the gradient (module docstring). None for every other GEMM."""
    if plan.role != "grad_input" or len(plan.operands) != 2 or any(op.spec is None for op in plan.operands):
        return None
    by_name = {plan.site.operand_name(op.key): op for op in plan.operands}
    g, w = by_name.get("grad_output"), by_name.get("weight")
    if g is None or w is None or g.arg_index != 0 or w.arg_index != 1:
        return None
    if any(op.spec.quantizer != "uniform" or op.spec.granularity == "block" for op in (g, w)):
        return None
    args = gemm_operands(plan.node)
    (g_base, g_chain), (w_base, w_chain) = strip_operand(args[0]), strip_operand(args[1])
    gv, wv = g_base.meta.get("val"), w_base.meta.get("val")
    if g_chain or gv is None or wv is None or gv.dim() != 2 or wv.dim() != 2 or 1 not in g.reduce_dims:
        return None
    scale = torch.empty([1 if i in w.reduce_dims else int(d) for i, d in enumerate(wv.shape)], device="meta")
    for t in w_chain:  # the weight scale as the GEMM reads it
        scale = t.target(scale, *t.args[1:], **t.kwargs)
    m = int(gv.shape[1])
    if tuple(scale.shape) != (m, 1) or m == 1:
        return None
    return g, w


def _fold_scale(graph, fake_mode, plan: GemmPlan, op: OperandPlan, g: fx.Node, w_scale: fx.Node,
                config: FQTConfig, step: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Quantize ``g * w_scale^T`` with ``op``'s spec right before the GEMM; returns (codes, scale, unit weight
    scale) for the folded integer GEMM."""
    node = plan.node
    with graph.inserting_before(node):
        st = graph.call_function(aten.t.default, (w_scale,))
        gs = graph.call_function(aten.mul.Tensor, (g, st))
        one = graph.call_function(aten.ones.default, ([1, 1],),
                                  {"dtype": torch.float32, "device": g.meta["val"].device})
    for n in (st, gs, one):
        copy_meta(n, node)
        set_fake_val(n, fake_mode)
    codes, scale = _insert_quantize(graph, fake_mode, gs, op.spec, list(op.reduce_dims), plan, op, config, step)
    rec = node.meta["fqt"]
    rec["integer_gemm"] = True
    rec["notes"] = [n for n in rec.get("notes", []) if n != NOT_INTEGER_NOTE] + [
        "weight scales folded into grad_output before quantizing it (integer GEMM on the weight's per-channel "
        "codes)"]
    return codes, scale, one


def _insert_quantize(graph, fake_mode, base, spec, dims, plan, op: OperandPlan, config, step):
    site = plan.site
    operand = site.operand_name(op.key)
    pre = base.meta.get("fqt_int")
    if pre and spec.granularity != "block" and pre["bits"] == spec.bits and list(pre["reduce_dims"]) == list(dims):
        return pre["codes"], pre["scale"]
    if spec.quantizer != "uniform":
        if spec.quantizer not in QUANTIZE_LOWERINGS:
            raise NotImplementedError(f"fqt: no lowering registered for quantizer {spec.quantizer!r}")
        return QUANTIZE_LOWERINGS[spec.quantizer](graph, fake_mode, base, spec, dims, plan, op, config, step)
    stream = stable_stream(site.name, plan.role, site.report_name(op.key), spec.short_str())
    if spec.granularity == "block":
        return insert_quantizer(
            graph, fake_mode, torch.ops.fqt.quantize_block.default,
            (base, spec.bits, dims, spec.block_size, spec.rounding, config.seed, stream, step), plan.node,
            {"kind": "quantize", "site": site.name, "role": plan.role, "operand": operand, "spec": spec.to_dict(),
             "block_dims": dims, "base": base.name, "is_weight": operand == "weight", "stream": stream},
        )
    return insert_quantizer(
        graph, fake_mode, torch.ops.fqt.quantize.default,
        (base, spec.bits, dims, spec.rounding, config.seed, stream, step), plan.node,
        {"kind": "quantize", "site": site.name, "role": plan.role, "operand": operand, "spec": spec.to_dict(),
         "reduce_dims": dims, "base": base.name, "is_weight": operand == "weight", "stream": stream},
    )


def _replay(graph, fake_mode, t: fx.Node, src: fx.Node, user: fx.Node) -> fx.Node:
    n = graph.call_function(t.target, (src, *t.args[1:]), dict(t.kwargs))
    copy_meta(n, user)
    set_fake_val(n, fake_mode)
    return n


def _insert_observer(graph, fake_mode, base, q, plan, op: OperandPlan, step):
    """Option ``log_sqnr``: route the scale through ``fqt::observe``, which logs the operand's SQNR and
    range each step. The GEMMs read the observer's copy of the scale, so the node survives dead-code elimination
    and partitioning; it sits before the first consumer GEMM, in the same partition as that GEMM."""
    codes, scale = q
    tag = f"{plan.site.name}/{plan.role}/{plan.site.report_name(op.key)}"
    with graph.inserting_before(plan.node):
        obs = graph.call_function(torch.ops.fqt.observe.default, (base, codes, scale, step, tag))
    copy_meta(obs, plan.node)
    set_fake_val(obs, fake_mode)
    obs.meta["fqt"] = {"kind": "observe", "tag": tag}
    return codes, obs
