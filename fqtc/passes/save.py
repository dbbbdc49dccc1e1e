"""Pass 4: decide what backward reads — int8 forward codes, never fp32 activations, never a second weight copy.

After `rewrite`, backward GEMMs already consume the forward activation's int8 codes and scale (they are outputs of
forward ``fqt::quantize`` nodes), so the partitioner saves int8 + scale instead of the fp32 activation. Weight
quantizers are tagged ``CheckpointPolicy.MUST_RECOMPUTE``: the partitioner re-runs them in backward from the
parameter (which is alive anyway) instead of saving an int8 copy of every weight. The ``fqt::step`` node is
``MUST_SAVE``: recomputing it would draw a new step and break the forward/backward pairing of random streams.

Before::  quantize(W, ...)            # saved for backward as int8 by the partitioner
After::   quantize(W, ...)            # meta["recompute"] = MUST_RECOMPUTE -> recomputed in backward

ReLU's backward (``threshold_backward(g, y, 0)``) would keep the fp32 ReLU output alive only to read its sign: it
is rewritten to ``where(mask, g, 0)`` with the bool ``mask = y > 0`` computed in forward (1 byte per element,
exact). Other elementwise backward ops (GELU, norms) still save what they need in fp32; inspect's memory figures
report them.

Before::  y = relu(x) ... threshold_backward(g, detach(y), 0)        # saves fp32 y
After::   y = relu(x); m = gt(y, 0) ... where(m, g, 0.0)              # saves bool m
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from fqtc.passes.common import copy_meta, graph_fake_mode, set_fake_val, strip_operand

aten = torch.ops.aten


def _is_forward(n: fx.Node) -> bool:
    return n.op == "placeholder" or n.meta.get("partitioner_tag", "is_forward") == "is_forward"


def compress_relu_masks(gm: fx.GraphModule) -> int:
    """threshold_backward(g, y, t) -> where(y > t, g, 0) with the bool mask computed (and saved) in forward."""
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    masks: dict[tuple[fx.Node, float], fx.Node] = {}
    count = 0
    for tb in list(graph.find_nodes(op="call_function", target=aten.threshold_backward.default)):
        grad, y, thr = tb.args
        base, _ = strip_operand(y)
        if not _is_forward(base) or not isinstance(thr, (int, float)):
            continue
        key = (base, float(thr))
        if key not in masks:
            with graph.inserting_after(base):
                m = graph.call_function(aten.gt.Scalar, (base, thr))
            copy_meta(m, base)
            m.meta["partitioner_tag"] = "is_forward"
            m.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            m.meta["ac_graph_id"] = 0
            set_fake_val(m, fake_mode)
            masks[key] = m
        with graph.inserting_before(tb):
            w = graph.call_function(aten.where.ScalarOther, (masks[key], grad, 0.0))
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
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.quantize.default):
        if n.meta.get("fqt", {}).get("is_weight"):
            for m in [n, *[u for u in n.users if u.target is operator.getitem]]:
                m.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                m.meta["ac_graph_id"] = 0
            recompute += 1
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default):
        n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        n.meta["ac_graph_id"] = 0
    return {"weight_quantizers_recomputed": recompute, "relu_masks": compress_relu_masks(gm)}
