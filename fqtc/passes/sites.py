"""Pass 1: find every GEMM site of the joint graph and link its three GEMMs.

A GEMM site is one forward product (``mm``/``addmm``/``bmm``, the ``output`` GEMM) with its two backward products:
``grad_input`` (the gradient of the first operand, which reads the second operand) and ``grad_weight`` (the
gradient of the second operand, which reads the first). Backward GEMMs are linked to their forward GEMM by
``node.meta["seq_nr"]`` (AOTAutograd gives backward nodes the sequence number of the forward op) and then by
operand structure: after stripping transposes, the backward GEMM that reads the forward's second operand is
``grad_input``, the one that reads its first operand is ``grad_weight``. Shapes are never used (square layers
would be ambiguous).

Before::

    addmm = aten.addmm(b, view, t)          # t = aten.t(W)           seq_nr=20, is_forward
    mm_3  = aten.mm(g, t_6)                  # t_6 = aten.t(t)         seq_nr=20, is_backward
    mm_4  = aten.mm(t_7, view)               # t_7 = aten.t(g)         seq_nr=20, is_backward

After (graph unchanged; decisions recorded)::

    addmm.meta["fqt"] = {"site": "fc1", "role": "output", ...}
    mm_3.meta["fqt"]  = {"site": "fc1", "role": "grad_input", ...}
    mm_4.meta["fqt"]  = {"site": "fc1", "role": "grad_weight", ...}

Every GEMM-like node that is not linked (and every unsupported GEMM op) is recorded with status
``full_precision`` and a reason, so nothing is silently left in full precision.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fqtc.fx_utils import node_order
from fqtc.passes.common import UNSUPPORTED_GEMMS, find_gemms, fp_record, is_backward, module_of, strip_operand


@dataclass
class GemmSite:
    """One forward GEMM and its linked backward GEMMs."""

    name: str
    module: str
    module_type: str
    forward: fx.Node
    a_base: fx.Node
    b_base: fx.Node
    b_is_weight: bool
    gemms: dict[str, fx.Node] = field(default_factory=dict)  # role -> node
    # role -> {operand key: arg index in the GEMM's (a, b) operands}; keys: "a" (the forward's first operand,
    # vocabulary "input"), "b" (second operand: "weight" when it is a parameter, else an activation), "g"
    # ("grad_output").
    operand_pos: dict[str, dict[str, int]] = field(default_factory=dict)

    def operand_name(self, key: str) -> str:
        """Vocabulary name of an operand key (docs/architecture.md)."""
        return {"a": "input", "b": "weight" if self.b_is_weight else "input", "g": "grad_output"}[key]

    def report_name(self, key: str) -> str:
        """Name of an operand key in reports (distinguishes the two activations of a bmm)."""
        return {"a": "input", "b": "weight" if self.b_is_weight else "input2", "g": "grad_output"}[key]


def gemm_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The (a, b) operands of ``a @ b`` for mm/bmm/addmm (addmm's first argument is the bias)."""
    if node.target == torch.ops.aten.addmm.default:
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def find_sites(gm: fx.GraphModule, weight_nodes: set[fx.Node]) -> tuple[list[GemmSite], list[dict]]:
    """Find and link GEMM sites. Returns (sites, records of GEMM nodes left unlinked/unsupported)."""
    graph = gm.graph
    order = node_order(graph)
    gemms = sorted(find_gemms(graph), key=order.__getitem__)
    fwd = [n for n in gemms if not is_backward(n)]
    bwd_by_seq: dict[int, list[fx.Node]] = defaultdict(list)
    for n in gemms:
        if is_backward(n):
            bwd_by_seq[n.meta.get("seq_nr", -1)].append(n)

    sites: list[GemmSite] = []
    name_count: dict[str, int] = defaultdict(int)
    claimed: set[fx.Node] = set()
    for f in fwd:
        module, mtype = module_of(f)
        base_name = module or f.name
        k = name_count[base_name]
        name_count[base_name] += 1
        name = base_name if k == 0 else f"{base_name}#{k}"
        a, b = gemm_operands(f)
        a_base, _ = strip_operand(a)
        b_base, _ = strip_operand(b)
        b_is_weight = b_base in weight_nodes
        site = GemmSite(name, module, mtype, f, a_base, b_base, b_is_weight)
        site.gemms["output"] = f
        site.operand_pos["output"] = {"a": 0, "b": 1}
        claimed.add(f)
        for g in bwd_by_seq.get(f.meta.get("seq_nr", -2), []):
            if g in claimed:
                continue
            ga, gb = gemm_operands(g)
            bases = [strip_operand(ga)[0], strip_operand(gb)[0]]
            if a_base is b_base:
                continue  # x @ x.T: roles are ambiguous; reported as unlinked below
            if b_base in bases and "grad_input" not in site.gemms:
                idx = bases.index(b_base)
                site.gemms["grad_input"] = g
                site.operand_pos["grad_input"] = {"b": idx, "g": 1 - idx}
                claimed.add(g)
            elif a_base in bases and "grad_weight" not in site.gemms:
                idx = bases.index(a_base)
                site.gemms["grad_weight"] = g
                site.operand_pos["grad_weight"] = {"a": idx, "g": 1 - idx}
                claimed.add(g)
        sites.append(site)

    unlinked: list[dict] = []
    for n in gemms:
        if n not in claimed:
            unlinked.append(fp_record(n, "GEMM not linked to a forward GEMM site (unknown backward structure)"))
    for target, reason in UNSUPPORTED_GEMMS.items():
        for n in graph.find_nodes(op="call_function", target=target):
            unlinked.append(fp_record(n, reason))
    return sites, unlinked
