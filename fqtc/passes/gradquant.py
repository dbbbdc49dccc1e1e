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

    ghat  = fqt.bhq(tangents_1, 5, [1], "stochastic", seed, stream, step)   # T^-1 Q(T g), fp32
    qgemm = fqt.qgemm(ghat, None, w8, sw, None, float32)               # float operand: not an integer GEMM

Records: the quantize node's ``meta["fqt"]`` has ``kind`` (``grad_quantize``/``bhq``), the spec, stream and
``output`` (``codes_scale`` or ``dequantized``); the BHQ GEMMs' records get ``integer_gemm=False`` and a note.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fqtc.fx_utils import copy_meta, set_fake_val
from fqtc.passes.assign import GemmPlan, OperandPlan
from fqtc.passes.common import insert_quantizer, stable_stream
from fqtc.passes.records import BHQ_NOTE
from fqtc.passes.rewrite import QUANTIZE_LOWERINGS


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
    """BHQ: ``fqt::bhq`` -> a dequantized fp32 operand (scale None); marks every GEMM reading it as a float product."""
    site = plan.site
    stream = stable_stream(site.name, plan.role, site.report_name(op.key), spec.short_str())
    with graph.inserting_before(plan.node):
        xhat = graph.call_function(
            torch.ops.fqt.bhq.default, (base, spec.bits, list(dims), spec.rounding, config.seed, stream, step)
        )
    copy_meta(xhat, plan.node)
    set_fake_val(xhat, fake_mode)
    xhat.meta["fqt"] = _record(plan, op, base, spec, dims, stream, "bhq", "dequantized")
    # every backward GEMM of this site that shares this quantization (same spec and grouping) reads a float operand
    for role, gemm in site.gemms.items():
        rec = gemm.meta.get("fqt", {})
        g = rec.get("operands", {}).get("grad_output")
        if g and g.get("quantizer") == "bhq" and g.get("bits") == spec.bits and list(g.get("reduce_dims", [])) == list(
                dims):
            rec["integer_gemm"] = False
            notes = rec.setdefault("notes", [])
            if BHQ_NOTE not in notes:
                notes.append(BHQ_NOTE)
    return xhat, None


for _name in ("ptq", "psq", "scq", "aq", "aq_topk"):
    QUANTIZE_LOWERINGS[_name] = lower_codes_scale
QUANTIZE_LOWERINGS["bhq"] = lower_bhq
