"""Optimizer-step graphs: record every fused latent-weight update of a compiled ``optimizer.step``.

``torch.compile(optimizer.step, backend="fqt")`` with a `fqtc.optim` optimizer gives the backend a graph without
gradients, which AOTAutograd hands to the inference compiler. In it, each `LatentWeight` parameter's update is
one ``fqt::lwq_update`` (functionalized: ``auto_functionalized_v2(fqt.lwq_update, ...)`` followed by ``copy_``
epilogues into the parameter's inner tensors), and plain parameters update with ordinary ATen ops.

This pass runs on that graph (called from the backend's inference compiler) and records on each update node
``node.meta["fqt"] = {"kind": "lwq_update", "optimizer": "sgd"|"adamw", "shape", "wbits", "lbits", "stream"}``.
It does not need to rewrite anything: the fused op is already what the optimizer emits. Matching a plain
``torch.optim`` step (``add_``/``lerp_``/``addcdiv_`` patterns) is not attempted -- those patterns change with
every optimizer and option (feasibility.md section 4a) -- and cannot arise on latent parameters, whose in-place
ATen updates raise (`LatentWeight.__torch_dispatch__`).

Before / after: graph unchanged; ``meta["fqt"]`` set on the ``auto_functionalized_v2`` nodes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

_FUNCTIONALIZED = (torch.ops.higher_order.auto_functionalized_v2, torch.ops.higher_order.auto_functionalized)


def _update_nodes(graph: fx.Graph) -> list[fx.Node]:
    out = []
    for hop in _FUNCTIONALIZED:
        for n in graph.find_nodes(op="call_function", target=hop):
            if n.args and n.args[0] is torch.ops.fqt.lwq_update.default:
                out.append(n)
    out += list(graph.find_nodes(op="call_function", target=torch.ops.fqt.lwq_update.default))
    return out


def mark_optimizer_updates(gm: fx.GraphModule) -> dict[str, int]:
    """Record each ``fqt::lwq_update`` of ``gm`` in its ``meta["fqt"]``. Returns ``{"lwq_updates": count}``."""
    nodes = _update_nodes(gm.graph)
    for n in nodes:
        kw = n.kwargs
        n.meta["fqt"] = {
            "kind": "lwq_update", "optimizer": kw.get("kind"), "shape": list(kw.get("shape", [])),
            "wbits": kw.get("wbits"), "lbits": kw.get("lbits"), "stream": kw.get("stream"),
            "hparams": list(kw.get("hparams", [])),
        }
    return {"lwq_updates": len(nodes)}
