"""Pass: randomized Hadamard rotation of the ``output`` GEMM of Linear sites (option ``rotate``, docs/options.md).

Runs after `rewrite`. For a Linear site whose ``output`` GEMM ``y = x W^T`` is an integer GEMM on codes from the
uniform quantizer, both quantizers get a rotated input along ``K``: ``x -> x D H`` and ``W -> W D H``
(`fqtc.quant.rotate`, the same signs for both), so the product of the rotated operands is ``x W^T`` and the
quantization error is that of the rotated tensors, whose outlier channels are spread over their Hadamard block
(QuaRot, HALO; ../shared/papers.md). The scales keep their layout (per token / per channel), so the GEMM stays the
same integer GEMM.

The codes are shared: the forward input's codes also feed ``grad_weight`` (``g^T x``), and the weight's codes feed
``grad_input`` (``g W``) when both roles use the same weight spec. There ``K`` is not reduced but is the output's
column dimension, so that GEMM's output is un-rotated (``(g^T x D H) H D = g^T x``) by one inverse rotation of the
(small) gradient. A shared-code consumer that *reduces* over the rotated ``K`` (only possible for a layout this pass
does not know) or anything other than fqt GEMMs reading the codes keeps the site unrotated, with a note.

Before::

    qx = fqt.quantize(x, 8, [1], "nearest", ...);  qw = fqt.quantize(W, 8, [1], "nearest", ...)
    y  = fqt.qgemm(x8, sx, t(w8), t(sw), b, f32);  gW = fqt.qgemm(t(g8), gs, x8, sx, None, f32)

After::

    xr = fqt.rotate(x, 1, 64, seed, s, False);     wr = fqt.rotate(W, 1, 64, seed, s, False)
    qx = fqt.quantize(xr, ...);                     qw = fqt.quantize(wr, ...)
    y  = fqt.qgemm(x8, sx, t(w8), t(sw), b, f32)
    gW = fqt.rotate(fqt.qgemm(t(g8), gs, x8, sx, None, f32), 1, 64, seed, s, True)

Records: the output GEMM's record gets ``rotate = {"kind": "hadamard", "block": b}`` and a note; each un-rotated
consumer a note; a site left unrotated a note with the reason.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from fqtc.config import FQTConfig
from fqtc.fx_utils import copy_meta, graph_fake_mode, set_fake_val
from fqtc.passes.common import IDENTITIES, TRANSPOSES, stable_stream, strip_operand
from fqtc.quant.rotate import rotation_block

fqt = torch.ops.fqt


def _axis_after(chain: list[fx.Node], axis: int, ndim: int) -> int | None:
    """Where dim ``axis`` of a tensor ends up after the transposes in ``chain`` (None: a node this pass does not
    follow)."""
    for t in chain:
        if t.target is torch.ops.aten.t.default:
            axis = {0: 1, 1: 0}.get(axis, axis) if ndim == 2 else axis
        elif t.target is torch.ops.aten.transpose.int:
            d0, d1 = (d % ndim for d in t.args[1:3])
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
        elif t.target is torch.ops.aten.permute.default:
            axis = [d % ndim for d in t.args[1]].index(axis)
        elif t.target not in IDENTITIES:
            return None
    return axis


# the uniform quantizers whose codes a rotation may precede, and the GEMMs reading them (block scaling included:
# a rotation along K and K-blocks of scales compose, the blocks then hold rotated values)
_QUANTIZERS = (fqt.quantize.default, fqt.quantize_block.default)
_GEMMS = (fqt.qgemm.default, fqt.block_gemm.default)


def _code_readers(codes: fx.Node) -> list[tuple[fx.Node, int, list[fx.Node]]]:
    """(reader, arg index, transposes between ``codes`` and the reader) for every node reading ``codes``."""
    out, frontier = [], [(codes, [])]
    while frontier:
        n, chain = frontier.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in TRANSPOSES + IDENTITIES:
                frontier.append((u, chain + [u]))
            else:
                out += [(u, i, chain) for i, a in enumerate(u.args) if a is n]
    return out


def _source(operand: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(quantize node, its codes getitem) behind a GEMM operand, or None when the operand is not uniform codes."""
    n, _ = strip_operand(operand)
    if (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0
            and isinstance(n.args[0], fx.Node) and n.args[0].target in _QUANTIZERS):
        return n.args[0], n
    return None


def _plan(q: fx.Node, block: int, peers: frozenset[fx.Node] = frozenset()) -> tuple[dict | None, str]:
    """What rotating site ``q`` (an output qgemm) takes: the two quantize nodes, the block and the consumers to
    un-rotate; or None and the reason it cannot be rotated. ``peers``: the other output GEMMs rotated together
    with ``q`` because they read the same input codes (they reduce over the rotated K as ``q`` does)."""
    a, b = q.args[0], q.args[2]
    srcs = [_source(a), _source(b)]
    if any(s is None for s in srcs):
        return None, "an operand is not int8 codes of the uniform quantizer (e.g. latent-weight codes)"
    aval, bval = a.meta.get("val"), b.meta.get("val")
    if aval is None or bval is None or aval.dim() != 2 or bval.dim() != 2:
        return None, "not a 2-D GEMM"
    k = int(aval.shape[1])
    blk = rotation_block(k, block)
    if blk is None:
        return None, f"K = {k} has no power-of-two factor >= 16"
    unrotate: dict[fx.Node, int] = {}
    observers: list[fx.Node] = []
    for (qn, codes), want in zip(srcs, (1, 0)):  # the output GEMM reduces over a's dim 1 and b's dim 0
        base_val = qn.args[0].meta.get("val")
        if base_val is None or base_val.dim() != 2 or int(base_val.shape[-1]) != k:
            return None, "a quantizer input is not the 2-D operand with K last"
        for reader, idx, chain in _code_readers(codes):
            axis = _axis_after(chain, 1, 2)
            if reader.target is fqt.observe.default:  # option log_sqnr
                observers.append(reader)
                continue
            if reader.target not in _GEMMS or axis is None or idx not in (0, 2):
                return None, f"the codes are also read by {reader.target}"
            reduced = 1 if idx == 0 else 0
            if reader is q or (reader in peers and want == 1 and idx == 0):
                if axis != want:
                    return None, "the rotated dimension is not the output GEMM's reduction"
                continue
            if axis == reduced:
                return None, f"{reader.name} reduces over the rotated dimension"
            rval = reader.meta.get("val")
            if rval is None or rval.dim() != 2 or rval.dtype != torch.float32:
                return None, f"{reader.name}: un-rotating needs a 2-D fp32 GEMM output"
            unrotate[reader] = 0 if idx == 0 else 1
    return {"quantize": [s[0] for s in srcs], "block": blk, "unrotate": unrotate, "observers": observers}, ""


def rotate_linear_sites(gm: fx.GraphModule, config: FQTConfig) -> dict[str, int]:
    """Rotate the output GEMMs of the Linear sites ``config.rotation`` selects, in place. Returns counters
    (``rotated_sites``, ``rotation_nodes``)."""
    counters = {"rotated_sites": 0, "rotation_nodes": 0}
    graph = gm.graph
    candidates = []
    for q in [n for t in _GEMMS for n in graph.find_nodes(op="call_function", target=t)]:
        rec = q.meta.get("fqt") or {}
        if rec.get("role") != "output":
            continue
        if config.rotation(rec.get("module") or rec.get("site") or "", rec.get("module_type") or "") != "hadamard":
            continue
        candidates.append((q, rec))
    if not candidates:
        return counters
    fake_mode = graph_fake_mode(graph)
    for group in _groups(candidates):
        peers = frozenset(q for q, _ in group)
        plans = [(q, rec, *_plan(q, config.rotate_block, peers - {q})) for q, rec in group]
        why = next((w for _, _, p, w in plans if p is None), "")
        if why:  # the sites sharing input codes are rotated together or not at all
            for _, rec, _, _ in plans:
                rec.setdefault("notes", []).append(f"rotate: not applied ({why})")
            continue
        # one sign vector per input, from the group's first site name: a site rotated alone keeps its own stream, and
        # every graph of the model (training, inference) draws the same signs
        blk = plans[0][2]["block"]
        stream = stable_stream(min(str(rec.get("site")) for _, rec in group), "rotate")
        _apply(graph, fake_mode, config, plans, blk, stream, counters)
    graph.lint()
    gm.recompile()
    return counters


def _groups(candidates: list[tuple[fx.Node, dict]]) -> list[list[tuple[fx.Node, dict]]]:
    """The candidate output GEMMs grouped by the input codes they read (graph order): Linear sites reading one
    activation (attention's q/k/v projections, a gated MLP's gate/up) share its codes, so they share its rotation
    (QuaRot rotates each activation once; every weight reading it absorbs the same rotation)."""
    groups: dict[fx.Node | int, list[tuple[fx.Node, dict]]] = {}
    for i, (q, rec) in enumerate(candidates):
        src = _source(q.args[0])
        groups.setdefault(src[0] if src is not None else i, []).append((q, rec))
    return list(groups.values())


def _apply(graph: fx.Graph, fake_mode, config: FQTConfig, plans: list, blk: int, stream: int,
           counters: dict[str, int]) -> None:
    """Insert the rotations of one group of sites: each quantizer's input once, each un-rotated consumer once."""
    sites = [rec.get("site") for _, rec, _, _ in plans]
    rotated: set[fx.Node] = set()
    unrotate: dict[fx.Node, int] = {}
    for q, rec, plan, _ in plans:
        for qn in plan["quantize"]:
            if qn in rotated:  # the shared input codes: rotated once for the whole group
                continue
            rotated.add(qn)
            base = qn.args[0]
            with graph.inserting_before(qn):
                r = graph.call_function(fqt.rotate.default, (base, 1, blk, config.seed, stream, False))
            copy_meta(r, qn)
            set_fake_val(r, fake_mode)
            if (qn.meta.get("fqt") or {}).get("is_weight"):
                # like the weight quantizer after it (passes/save.py): re-run in backward from the parameter rather
                # than saving a rotated fp32 copy of the weight
                r.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                r.meta["ac_graph_id"] = 0
            qn.args = (r, *qn.args[1:])
            qn.meta.setdefault("fqt", {})["rotated"] = {"kind": "hadamard", "block": blk}
            for obs in plan["observers"]:  # log_sqnr compares the codes with what they quantize: the rotated base
                if obs.args[0] is base:
                    obs.args = (r, *obs.args[1:])
            counters["rotation_nodes"] += 1
        unrotate.update(plan["unrotate"])
        rec["rotate"] = {"kind": "hadamard", "block": blk}
        shared = f"; input rotated once with {', '.join(x for x in sites if x != rec.get('site'))} (shared input " \
                 "codes)" if len(sites) > 1 else ""
        rec.setdefault("notes", []).append(
            f"rotated: randomized Hadamard (block {blk}) on input and weight along K before quantizing{shared}")
        counters["rotated_sites"] += 1
    for reader, dim in unrotate.items():
        with graph.inserting_after(reader):
            inv = graph.call_function(fqt.rotate.default, (reader, dim, blk, config.seed, stream, True))
        copy_meta(inv, reader)
        set_fake_val(inv, fake_mode)
        reader.replace_all_uses_with(inv, delete_user_cb=lambda u: u is not inv)
        other = reader.meta.get("fqt")
        if other is not None:
            other.setdefault("notes", []).append(
                f"reads codes rotated for {' / '.join(sites)}'s output GEMM: output un-rotated along dim {dim}")
        counters["rotation_nodes"] += 1
