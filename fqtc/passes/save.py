"""Pass 4: decide what backward reads — int8 forward codes, never fp32 activations, never a second weight copy.

After `rewrite`, backward GEMMs already consume the forward activation's int8 codes and scale (they are outputs of
forward ``fqt::quantize`` nodes), so the partitioner saves int8 + scale instead of the fp32 activation. Weight
quantizers are tagged ``CheckpointPolicy.MUST_RECOMPUTE``: the partitioner re-runs them in backward from the
parameter (which is alive anyway) instead of saving an int8 copy of every weight. The ``fqt::step`` node is
``MUST_SAVE``: recomputing it would draw a new step and break the forward/backward pairing of random streams.

Before::  quantize(W, ...)            # saved for backward as int8 by the partitioner
After::   quantize(W, ...)            # meta["recompute"] = MUST_RECOMPUTE -> recomputed in backward

ReLU's backward (``threshold_backward(g, y, 0)``) would keep the fp32 ReLU output alive only to read its sign: it
is rewritten to ``where(mask, g, 0)`` with the bool ``mask = ~(y <= 0)`` computed in forward (exact); ReLU6
(``hardtanh_backward``) likewise. `fqtc.passes.save_act` then folds each mask into the sign bit of the int8 codes
the next GEMM saves, or packs it 8 per byte, and quantizes what the other elementwise and normalization backward
ops read (GELU, SiLU, softmax, norms) to 8 bits.

Before::  y = relu(x) ... threshold_backward(g, detach(y), 0)        # saves fp32 y
After::   y = relu(x); m = ~(y <= 0) ... where(m, g, 0.0)            # saves bool m
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from fqtc.fx_utils import copy_meta, graph_fake_mode, set_fake_val
from fqtc.passes.common import is_forward, strip_operand

aten = torch.ops.aten


def _mask_of(tb: fx.Node) -> tuple[fx.Node, tuple, str] | None:
    """(source tensor, mask key, op) of a ReLU / ReLU6 backward, or None when it is not a constant threshold."""
    if tb.target == aten.threshold_backward.default:
        _, y, thr = tb.args
        return (strip_operand(y)[0], (float(thr),), "relu") if isinstance(thr, (int, float)) else None
    _, x, lo, hi = tb.args
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return strip_operand(x)[0], (float(lo), float(hi)), "hardtanh"
    return None


def compress_relu_masks(gm: fx.GraphModule) -> int:
    """threshold_backward(g, y, t) -> where(mask, g, 0) with the bool ``mask = ~(y <= t)`` computed (and saved) in
    forward; hardtanh_backward(g, x, lo, hi) (ReLU6) likewise with ``mask = ~((x <= lo) | (x >= hi))``. The negated
    comparisons are what ATen's kernels compute, so a NaN passes its gradient through exactly as in eager. Each mask
    node's ``meta["fqt"]`` is a ``relu_mask`` record; `save_act` may then fold it into int8 codes or pack it."""
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    masks: dict[tuple, fx.Node] = {}
    count = 0
    targets = (aten.threshold_backward.default, aten.hardtanh_backward.default)
    for tb in [n for t in targets for n in graph.find_nodes(op="call_function", target=t)]:
        found = _mask_of(tb)
        if found is None or not is_forward(found[0]):
            continue
        base, params, op = found
        key = (base, op, params)
        if key not in masks:
            with graph.inserting_before(base.next):  # in creation order, right after the source
                made = [graph.call_function(aten.le.Scalar, (base, params[0]))]
                if op == "hardtanh":
                    made.append(graph.call_function(aten.ge.Scalar, (base, params[1])))
                    made.append(graph.call_function(aten.logical_or.default, (made[0], made[1])))
                made.append(graph.call_function(aten.logical_not.default, (made[-1],)))
            for n in made:
                copy_meta(n, base)
                n.meta["partitioner_tag"] = "is_forward"
                set_fake_val(n, fake_mode)
            m = made[-1]
            m.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            m.meta["ac_graph_id"] = 0
            val = m.meta["val"]
            # symbolic sizes stay unspecialized (int() of a SymInt would add a guard and force recompiles)
            n_el = int(val.numel()) if all(isinstance(d, int) for d in val.shape) else None
            m.meta["fqt"] = {"kind": "relu_mask", "op": op, "source": base.name, "bits": 1,
                             "shape": list(val.shape) if n_el is not None else None,
                             "fp32_bytes": None if n_el is None else 4 * n_el, "bytes": n_el, "storage": "bool"}
            masks[key] = m
        with graph.inserting_before(tb):
            w = graph.call_function(aten.where.ScalarOther, (masks[key], tb.args[0], 0.0))
        copy_meta(w, tb)
        set_fake_val(w, fake_mode)
        tb.replace_all_uses_with(w)
        graph.erase_node(tb)
        count += 1
    if count:
        graph.eliminate_dead_code()
        gm.recompile()
    return count


def tag_saves(gm: fx.GraphModule) -> dict[str, int]:
    recompute = 0
    quantizers = [*gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.quantize.default),
                  *gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.quantize_block.default)]
    for n in quantizers:
        if n.meta.get("fqt", {}).get("is_weight"):
            for m in [n, *[u for u in n.users if u.target is operator.getitem]]:
                m.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                m.meta["ac_graph_id"] = 0
            recompute += 1
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default):
        n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        n.meta["ac_graph_id"] = 0
    return {"weight_quantizers_recomputed": recompute, "relu_masks": compress_relu_masks(gm)}
