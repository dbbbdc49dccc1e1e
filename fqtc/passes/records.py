"""The GEMM record: what ``node.meta["fqt"]`` holds for every GEMM (fqtc/passes/README.md, "One source of truth").

`GemmRecord` types it; `gemm_record` is its one builder, used for Linear/bmm GEMMs (`fqtc.passes.assign`),
convolutions (`fqtc.passes.conv`) and GEMMs left in full precision (`fqtc.passes.common.fp_record`), so status,
reason and notes follow one rule. It stays a plain dict at run time (a ``TypedDict``): inspect, export, JSON reports
and tests read it by key. `fqtc.passes.verify` later replaces ``status`` and ``integer_gemm`` with what the
rewritten graph does and adds ``evidence``; the Inductor lowering adds ``codegen``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypedDict

# a BHQ grad_output reaches its GEMM dequantized (docs/gradient_quantizers.md): the record of that GEMM says so
BHQ_NOTE = ("grad_output by BHQ: T^-1 mixes rows, so the GEMM reads the dequantized fp32 gradient T^-1 Q(T g) "
            "(fqt::bhq), not int8 codes: a float product")
BHQ_INT_NOTE = ("grad_output by BHQ: integer GEMM on the codes of T g, T^-1 applied to its output rows "
                "(fqt::bhq_invert)")
NOT_INTEGER_NOTE = "a scale varies along the reduction axis: dequantized product, not an integer GEMM"


class OperandRecord(TypedDict, total=False):
    """One operand's decision: the `fqtc.config.QuantSpec` fields (``bits`` None when kept in full precision), the
    ``reason`` (default, rule, keep_fp, ...) and the ``reduce_dims`` its scale is shared over."""

    bits: int | None
    granularity: str
    rounding: str
    quantizer: str
    reason: str
    reduce_dims: list[int]


class GemmRecord(TypedDict, total=False):
    """The record of one GEMM (``output``, ``grad_input`` or ``grad_weight`` of a site)."""

    site: str
    module: str | None
    module_type: str
    role: str
    op: str
    node: str
    status: str  # "quantized" | "partial" | "full_precision"
    reason: str
    operands: dict[str, OperandRecord]
    integer_gemm: bool
    shapes: dict[str, Any]
    notes: list[str]
    original_node: str
    evidence: Any
    codegen: dict[str, Any]


def status_of(operands: Mapping[str, Mapping[str, Any]]) -> str:
    """``quantized`` when every operand has bits, ``full_precision`` when none has, else ``partial``."""
    n = sum(e.get("bits") is not None for e in operands.values())
    return "quantized" if n == len(operands) else ("full_precision" if n == 0 else "partial")


def reason_of(status: str, operands: Mapping[str, Mapping[str, Any]]) -> str:
    """The record's reason: the operands' reasons, or for ``partial`` which operands stayed in full precision."""
    if status == "partial":
        return "some operands kept in full precision: " + ", ".join(
            f"{k} ({e['reason']})" for k, e in operands.items() if e.get("bits") is None)
    return "; ".join(sorted({e["reason"] for e in operands.values()}))


def gemm_record(*, site: str, module: str | None, module_type: str, role: str, op: str, node: str,
                operands: Mapping[str, OperandRecord], integer_gemm: bool, shapes: Mapping[str, Any],
                notes: Sequence[str] = (), original_node: str | None = None) -> GemmRecord:
    """The record of a planned GEMM: status and reason from its operands; ``integer_gemm`` only when quantized;
    a note when a quantized GEMM is not an integer GEMM (a scale along the reduction axis)."""
    status = status_of(operands)
    integer = bool(integer_gemm) and status == "quantized"
    all_notes = list(notes)
    if status == "quantized" and not integer:
        all_notes.append(NOT_INTEGER_NOTE)
    rec = GemmRecord(site=site, module=module, module_type=module_type, role=role, op=op, node=node, status=status,
                     reason=reason_of(status, operands), operands=dict(operands), integer_gemm=integer,
                     shapes=dict(shapes), notes=all_notes)
    if original_node is not None:
        rec["original_node"] = original_node
    return rec


def full_precision_record(*, site: str, module: str | None, module_type: str, role: str, op: str, node: str,
                          reason: str, shapes: Mapping[str, Any]) -> GemmRecord:
    """The record of a GEMM-like node left in full precision outside any planned site, with the reason."""
    return GemmRecord(site=site, module=module, module_type=module_type, role=role, op=op, node=node,
                      status="full_precision", reason=reason, operands={}, integer_gemm=False, shapes=dict(shapes),
                      notes=[])
