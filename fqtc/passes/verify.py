"""Pass 5: every GEMM record's status is read back from the rewritten graph, not taken from the plan.

`fqtc.passes.assign` writes what it *plans* for each GEMM (``status`` ``quantized``/``partial``/``full_precision``)
before any rewrite; `fqtc.passes.rewrite` and `fqtc.passes.conv` then replace the GEMMs. This pass looks at the
node each record names and counts the operands that really arrive quantized:

- the node must be one of fqt's GEMM ops (``fqt::qgemm``, ``fqt::block_gemm``, ``fqt::qconv2d``, ``fqt::qconv2d_input``,
  ``fqt::qconv2d_weight``); an aten GEMM left in place quantizes nothing;
- an operand is quantized when, through transposes and views, it is an int8 tensor (codes, with their scale next
  to it) or the output of an fqt quantizer op (BHQ's dequantized gradient, `fqtc.passes.gradquant`).

The record's ``status`` becomes what the graph shows (``quantized`` only if every planned operand is quantized),
``integer_gemm`` is true only if both operands are int8 codes with scales, and ``evidence`` says what was found.
A plan the graph does not carry out is reported with the reason, never as ``quantized`` (no silent fallback).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fqtc.passes.common import strip_operand

fqt = torch.ops.fqt

# fqt GEMM op -> positions of its (operand, scale) argument pairs
GEMM_OPS: dict = {
    fqt.qgemm.default: ((0, 1), (2, 3)),
    fqt.block_gemm.default: ((0, 1), (2, 3)),
    fqt.qconv2d.default: ((0, 1), (2, 3)),
    fqt.qconv2d_input.default: ((0, 1), (2, 3)),
    fqt.qconv2d_weight.default: ((0, 1), (2, 3)),
}


def _dtype(n) -> torch.dtype | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _from_fqt_op(n: fx.Node) -> bool:
    """Is ``n`` (through transposes/views and tuple getitems) the output of an fqt op?"""
    base, _ = strip_operand(n)
    while isinstance(base, fx.Node) and base.op == "call_function" and base.target.__name__ == "getitem":
        base = base.args[0]
    return (isinstance(base, fx.Node) and base.op == "call_function"
            and getattr(base.target, "namespace", None) == "fqt")


def operand_evidence(node: fx.Node) -> list[str]:
    """Per operand of an fqt GEMM node: ``"int8"`` (codes + scale), ``"dequantized"`` (a float produced by an fqt
    quantizer) or ``"float"`` (not quantized)."""
    out = []
    for i, j in GEMM_OPS[node.target]:
        a, s = node.args[i], node.args[j]
        if _dtype(a) == torch.int8 and s is not None:
            out.append("int8")
        elif isinstance(a, fx.Node) and _from_fqt_op(a):
            out.append("dequantized")
        else:
            out.append("float")
    return out


def verify_records(gm: fx.GraphModule, records: list[dict]) -> None:
    """Set each GEMM record's ``status``, ``integer_gemm`` and ``evidence`` from the graph, in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for rec in records:
        planned = rec.get("status")
        if planned not in ("quantized", "partial"):
            continue
        n = nodes.get(rec.get("node"))
        if n is None or n.op != "call_function" or n.target not in GEMM_OPS:
            what = "absent" if n is None else str(n.target)
            rec.update(status="full_precision", integer_gemm=False, evidence=f"not rewritten: node is {what}",
                       reason=f"planned {planned} ({rec.get('reason', '')}) but the GEMM was not rewritten")
            continue
        ev = operand_evidence(n)
        n_q = sum(e != "float" for e in ev)
        n_planned = sum(e.get("bits") is not None for e in rec.get("operands", {}).values())
        rec["evidence"] = f"{n.target.name()}({', '.join(ev)})"
        if n_q < n_planned:
            status = "full_precision" if n_q == 0 else "partial"
            rec.update(status=status, reason=f"planned {planned} ({rec.get('reason', '')}) but only {n_q} of "
                                             f"{n_planned} operands reach the GEMM quantized")
        if rec.get("integer_gemm") and ev != ["int8", "int8"]:
            rec["integer_gemm"] = False
