"""Pass 1: find every GEMM site of the joint graph, of every kind, and link its three GEMMs.

One site model for every GEMM kind (`Site`): a site has a ``kind`` (``"linear"`` for ``mm``/``addmm``, ``"bmm"``,
``"conv"``), a name, its module, its forward product and the roles it has. `find_sites` is the one find step:
assign resolves every site's operands with one rule counter, and the rewrite dispatches on the kind
(`fqtc.passes.REWRITERS`).

Linear and bmm sites (`GemmSite`):

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

Convolution sites (`ConvSite`): one forward ``aten.convolution`` and the ``aten.convolution_backward`` with the
same ``seq_nr`` that reads the same input and weight nodes. The backward node computes up to three gradients at
once (``output_mask``) and is consumed by getitems 0 (``grad_input``), 1 (``grad_weight``) and 2 (``grad_bias``).

Every GEMM-like node that is not linked (and every unsupported GEMM op, transposed / 1-D / 3-D convolution) is
recorded with status ``full_precision`` and a reason, so nothing is silently left in full precision.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx

from fqtc.config import QuantSpec
from fqtc.fx_utils import node_order
from fqtc.passes.common import UNSUPPORTED_GEMMS, find_gemms, fp_record, is_backward, module_of, strip_operand

aten = torch.ops.aten

# role -> the (first, second) operand names of a convolution site's GEMMs (docs/architecture.md vocabulary)
CONV_ROLES: dict[str, tuple[str, str]] = {
    "output": ("input", "weight"),
    "grad_input": ("grad_output", "weight"),
    "grad_weight": ("input", "grad_output"),
}


@dataclass
class GemmSite:
    """One forward GEMM (``mm``/``addmm``: kind ``"linear"``; ``bmm``: kind ``"bmm"``) and its linked backward
    GEMMs."""

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

    @property
    def kind(self) -> str:
        return "bmm" if self.forward.target == aten.bmm.default else "linear"

    @property
    def roles(self) -> list[str]:
        return list(self.gemms)

    def operand_name(self, key: str) -> str:
        """Vocabulary name of an operand key (docs/architecture.md)."""
        return {"a": "input", "b": "weight" if self.b_is_weight else "input", "g": "grad_output"}[key]

    def report_name(self, key: str) -> str:
        """Name of an operand key in reports (distinguishes the two activations of a bmm)."""
        return {"a": "input", "b": "weight" if self.b_is_weight else "input2", "g": "grad_output"}[key]


@dataclass
class ConvSite:
    """One forward 2-D convolution and its ``convolution_backward`` (kind ``"conv"``). ``specs`` holds assign's
    decision per (role, operand)."""

    name: str
    module: str
    module_type: str
    forward: fx.Node
    backward: fx.Node | None = None
    getitems: dict[int, fx.Node] = field(default_factory=dict)  # index of convolution_backward output -> getitem
    specs: dict[tuple[str, str], tuple[QuantSpec | None, str]] = field(default_factory=dict)  # (role, operand)
    notes: list[str] = field(default_factory=list)
    kind: str = "conv"

    @property
    def roles(self) -> list[str]:
        roles = ["output"]
        if 0 in self.getitems:
            roles.append("grad_input")
        if 1 in self.getitems:
            roles.append("grad_weight")
        return roles


Site = Union[GemmSite, ConvSite]


def gemm_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The (a, b) operands of ``a @ b`` for mm/bmm/addmm (addmm's first argument is the bias)."""
    if node.target == torch.ops.aten.addmm.default:
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def find_sites(gm: fx.GraphModule, weight_nodes: set[fx.Node]) -> tuple[list[Site], list[dict]]:
    """Find and link the sites of every kind, in forward graph order. Returns (sites, records of the GEMM nodes
    left in full precision: unlinked or unsupported, each with its reason)."""
    gemm_sites, unlinked = _find_gemm_sites(gm, weight_nodes)
    conv_sites, conv_unsupported = _find_conv_sites(gm)
    order = node_order(gm.graph)
    sites: list[Site] = sorted([*gemm_sites, *conv_sites], key=lambda s: order[s.forward])
    return sites, unlinked + conv_unsupported


def _find_gemm_sites(gm: fx.GraphModule, weight_nodes: set[fx.Node]) -> tuple[list[GemmSite], list[dict]]:
    """Find and link mm/addmm/bmm sites. Returns (sites, records of GEMM nodes left unlinked/unsupported)."""
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


def conv_unsupported_reason(n: fx.Node) -> str | None:
    """Why a forward convolution is kept in full precision, or None for a 2-D convolution the rewrite handles."""
    transposed = n.args[6]
    if transposed:
        return "transposed convolution is not rewritten (kept in full precision)"
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return "only 2-D convolution is rewritten; this 1-D/3-D convolution is kept in full precision"
    if any(p != 0 for p in n.args[7]):
        return "convolution with output_padding is not rewritten (kept in full precision)"
    return None


def _find_conv_sites(gm: fx.GraphModule) -> tuple[list[ConvSite], list[dict]]:
    """Link each forward convolution to its convolution_backward; record the ones that stay in FP."""
    graph = gm.graph
    order = node_order(graph)
    convs = sorted(graph.find_nodes(op="call_function", target=aten.convolution.default), key=order.__getitem__)
    bwds = graph.find_nodes(op="call_function", target=aten.convolution_backward.default)
    by_seq: dict[int, list[fx.Node]] = defaultdict(list)
    for b in bwds:
        by_seq[b.meta.get("seq_nr", -1)].append(b)
    sites: list[ConvSite] = []
    fp_records: list[dict] = []
    claimed: set[fx.Node] = set()
    names: dict[str, int] = defaultdict(int)
    for f in convs:
        if is_backward(f):
            fp_records.append(fp_record(f, "convolution inside the backward graph (double backward) is not "
                                           "rewritten", "output"))
            continue
        module, mtype = module_of(f)
        base = module or f.name
        k = names[base]
        names[base] += 1
        site = ConvSite(base if k == 0 else f"{base}#{k}", module, mtype, f)
        reason = conv_unsupported_reason(f)
        for b in by_seq.get(f.meta.get("seq_nr", -2), []):
            if b not in claimed and b.args[1] is f.args[0] and b.args[2] is f.args[1]:
                site.backward = b
                claimed.add(b)
                for u in b.users:
                    if u.target is operator.getitem:
                        site.getitems[u.args[1]] = u
                break
        if reason is not None:
            fp_records.append(fp_record(f, reason, "output"))
            if site.backward is not None:
                fp_records.append(fp_record(site.backward, reason, "grad_input/grad_weight"))
            continue
        sites.append(site)
    for b in bwds:
        if b not in claimed:
            fp_records.append(fp_record(b, "convolution_backward not linked to a forward convolution",
                                        "grad_input/grad_weight"))
    return sites, fp_records
