"""Pass 4: decide what backward reads — int8 forward codes, never fp32 activations, never a second weight copy.

After `rewrite`, backward GEMMs already consume the forward activation's int8 codes and scale (they are outputs of
forward ``fqt::quantize`` nodes), so the partitioner saves int8 + scale instead of the fp32 activation. Weight
quantizers are tagged ``CheckpointPolicy.MUST_RECOMPUTE``: the partitioner re-runs them in backward from the
parameter (which is alive anyway) instead of saving an int8 copy of every weight. The ``fqt::step`` node is
``MUST_SAVE``: recomputing it would draw a new step and break the forward/backward pairing of random streams.

Before::  quantize(W, ...)            # saved for backward as int8 by the partitioner
After::   quantize(W, ...)            # meta["recompute"] = MUST_RECOMPUTE -> recomputed in backward

Elementwise backward ops (e.g. ReLU's ``threshold_backward``) may still save fp32 tensors; those are not GEMM
operands and are reported by inspect's memory figures.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy


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
    return {"weight_quantizers_recomputed": recompute}
