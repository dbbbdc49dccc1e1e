"""Lowering of the gradient quantizers into fqt ops, registered in `rewrite.QUANTIZE_LOWERINGS`.

`rewrite` calls a lowering once per (grad_output base, spec, reduce_dims), right before the first backward GEMM that
reads it; the grouping (``reduce_dims``) was chosen by `FQTConfig.resolve` from the quantizer and the role
(`fqtc.config.GRAD_QUANTIZER_GRANULARITY`), so assign's integer-GEMM check already holds.

Before::

    mm_3 = aten.mm(tangents_1, t_6)                                   # grad_input of fc1

After (``grad_quantizer="aq"``)::

    gq   = fqt.grad_quantize(tangents_1, "aq", 1, [1], "stochastic", seed, stream, step)
    g8, gs = gq[0], gq[1]
    qgemm = fqt.qgemm(g8, gs, w8, sw, None, float32)                   # integer GEMM, scales in the epilogue

After (``grad_quantizer="bhq"``)::

    bq = fqt.bhq_quantize(tangents_1, 5, [1], "stochastic", seed, stream, step)
    g8, gs, order, group, v, d = bq[0], bq[1], bq[2], bq[3], bq[4], bq[5]   # codes, scales of T g; T
    ghat  = fqt.bhq_invert(g8.float() * gs, order, group, v, d, [1])         # T^-1 Q(T g), fp32
    mm_3  = fqt.qgemm(g8, gs, w8, sw, None, float32)                     # grad_input: integer GEMM ...
    dx    = fqt.bhq_invert(mm_3, order, group, v, d, [1])                # ... T^-1 on its output rows
    mm_4  = fqt.qgemm(ghat_t, None, x8, sx, None, float32)               # grad_weight: float operand

``T^-1 Q(T g) W = T^-1 (Q(T g) W)``: the ``grad_input`` GEMM stays integer when its output rows are the gradient's
rows (`bhq_rows_preserved`); a GEMM that reduces over the rows (``grad_weight``) reads the dequantized gradient.

Records: the quantize node's ``meta["fqt"]`` has ``kind`` (``grad_quantize``/``bhq``), the spec, stream and
``output``; a BHQ GEMM's record notes which form it reads (``integer_gemm=False`` for the dequantized one).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fqtc.fx_utils import call_node
from fqtc.passes.assign import GemmPlan, OperandPlan
from fqtc.passes.common import insert_quantizer, stable_stream
from fqtc.passes.records import BHQ_INT_NOTE, BHQ_NOTE
from fqtc.passes.rewrite import OPERAND_HOOKS, QUANTIZE_LOWERINGS


def _record(plan: GemmPlan, op: OperandPlan, base: fx.Node, spec, dims, stream: int, kind: str, output: str) -> dict:
    """The quantizer node's ``meta["fqt"]`` (same keys as rewrite's uniform quantize records, plus the quantizer)."""
    site = plan.site
    return {
        "kind": kind, "site": site.name, "role": plan.role, "operand": site.operand_name(op.key),
        "spec": spec.to_dict(), "reduce_dims": list(dims), "base": base.name, "is_weight": False, "stream": stream,
        "quantizer": spec.quantizer, "output": output,
    }


def lower_codes_scale(graph, fake_mode, base, spec, dims, plan: GemmPlan, op: OperandPlan, config, step):
    """PTQ/PSQ/SCQ/AQ/AQ top-k: ``fqt::grad_quantize`` -> (int8 codes, keepdim scale)."""
    site = plan.site
    stream = stable_stream(site.name, plan.role, site.report_name(op.key), spec.short_str())
    return insert_quantizer(
        graph, fake_mode, torch.ops.fqt.grad_quantize.default,
        (base, spec.quantizer, spec.bits, list(dims), spec.rounding, config.seed, stream, step), plan.node,
        _record(plan, op, base, spec, dims, stream, "grad_quantize", "codes_scale"),
    )


def lower_bhq(graph, fake_mode, base, spec, dims, plan: GemmPlan, op: OperandPlan, config, step):
    """BHQ: one ``fqt::bhq_quantize`` per (grad_output, spec, grouping): codes and per-row scales of ``T g`` and the
    transform (order, group, v, d), kept in ``codes.meta["fqt_bhq"]``. `bhq_operand` then decides per GEMM."""
    site = plan.site
    stream = stable_stream(site.name, plan.role, site.report_name(op.key), spec.short_str())
    codes, scale = insert_quantizer(
        graph, fake_mode, torch.ops.fqt.bhq_quantize.default,
        (base, spec.bits, list(dims), spec.rounding, config.seed, stream, step), plan.node,
        _record(plan, op, base, spec, dims, stream, "bhq", "codes_scale_transform"))
    attach_bhq_transform(graph, fake_mode, codes, scale, list(dims))
    return codes, scale


def attach_bhq_transform(graph, fake_mode, codes: fx.Node, scale: fx.Node, dims: list[int]) -> None:
    """The transform outputs (order, group, v, d) of the ``fqt::bhq_quantize`` behind ``codes``, as getitems right
    after ``scale``; recorded in ``codes.meta["fqt_bhq"]`` with the grouping."""
    qn = codes.args[0]
    aux = []
    at = scale
    for i in (2, 3, 4, 5):
        with graph.inserting_after(at):
            at = call_node(graph, fake_mode, operator.getitem, (qn, i), scale)
        aux.append(at)
    codes.meta["fqt_bhq"] = {"aux": aux, "dims": dims, "dequantized": None}


def bhq_rows_preserved(base: fx.Node, gemm_out: fx.Node, dims: list[int]) -> bool:
    """Are the rows of the GEMM output the rows of the BHQ-quantized ``base`` (the groups of ``dims``), in order? True
    when ``base`` is the GEMM's first operand as is (no transpose or view between), grouped along its last dim, and
    the output has the same leading dims: then ``T^-1`` can be applied to the output rows."""
    bv, ov = base.meta.get("val"), gemm_out.meta.get("val")
    if bv is None or ov is None or bv.dim() != ov.dim() or bv.dim() < 2:
        return False
    return sorted(d % bv.dim() for d in dims) == [bv.dim() - 1] and list(bv.shape[:-1]) == list(ov.shape[:-1])


def bhq_invert_after(graph, fake_mode, out: fx.Node, codes: fx.Node, dims: list[int]) -> fx.Node:
    """``fqt::bhq_invert`` of a GEMM output ``out`` whose rows (groups of ``dims``) are the BHQ rows of ``codes``."""
    aux = codes.meta["fqt_bhq"]["aux"]
    with graph.inserting_after(out):
        inv = call_node(graph, fake_mode, torch.ops.fqt.bhq_invert.default, (out, *aux, list(dims)), out)
    inv.meta["fqt"] = {"kind": "bhq_invert", "of": out.name}
    return inv


def bhq_dequantized(graph, fake_mode, codes: fx.Node, scale: fx.Node) -> fx.Node:
    """``T^-1 (codes * scale)`` (``fqt::bhq``'s result), once per quantization, right after the transform outputs:
    the float operand of a GEMM that reduces over the BHQ rows (``grad_weight``)."""
    meta = codes.meta["fqt_bhq"]
    if meta["dequantized"] is not None:
        return meta["dequantized"]
    aux = meta["aux"]
    with graph.inserting_after(aux[-1]):  # nodes inserted in turn, each after the previous one
        f = call_node(graph, fake_mode, torch.ops.aten._to_copy.default, (codes,), aux[-1], {"dtype": torch.float32})
    with graph.inserting_after(f):
        m = call_node(graph, fake_mode, torch.ops.aten.mul.Tensor, (f, scale), aux[-1])
    with graph.inserting_after(m):
        deq = call_node(graph, fake_mode, torch.ops.fqt.bhq_invert.default, (m, *aux, list(meta["dims"])), aux[-1])
    deq.meta["fqt"] = {"kind": "bhq_dequantize", "codes": codes.name, "output": "dequantized"}
    meta["dequantized"] = deq
    return deq


def bhq_operand(graph, fake_mode, plan: GemmPlan, op: OperandPlan, codes: fx.Node, scale: fx.Node,
                chain: list[fx.Node]):
    """How one GEMM reads a BHQ quantization: ``(codes, scale, post)``.

    ``grad_input`` (the GEMM whose output rows are the gradient's rows, `bhq_rows_preserved`): the int8 codes of
    ``T g`` and their scales, an integer GEMM, and ``post`` applies ``T^-1`` to its output. Any other GEMM (e.g.
    ``grad_weight``, which reduces over the rows): the dequantized ``T^-1 Q(T g)`` as a float operand (scale
    None), and its record says so."""
    meta = codes.meta["fqt_bhq"]
    rec = plan.node.meta.setdefault("fqt", {})
    notes = rec.setdefault("notes", [])
    base = codes.args[0].args[0]
    if plan.role == "grad_input" and op.arg_index == 0 and not chain and bhq_rows_preserved(
            base, plan.node, meta["dims"]):
        if BHQ_INT_NOTE not in notes:
            notes.append(BHQ_INT_NOTE)
        out_dims = [plan.node.meta["val"].dim() - 1]
        return codes, scale, lambda out: bhq_invert_after(graph, fake_mode, out, codes, out_dims)
    rec["integer_gemm"] = False
    if BHQ_NOTE not in notes:
        notes.append(BHQ_NOTE)
    return bhq_dequantized(graph, fake_mode, codes, scale), None, None


for _name in ("ptq", "psq", "scq", "aq", "aq_topk"):
    QUANTIZE_LOWERINGS[_name] = lower_codes_scale
QUANTIZE_LOWERINGS["bhq"] = lower_bhq
OPERAND_HOOKS["bhq"] = bhq_operand
