"""FX helpers shared by the graph passes (`fqtc.passes`) and the codegen pass (`fqtc.codegen.lower`): copying the
meta of the op a new node serves, fake values for new nodes, node order. As Inductor's ``torch/_inductor/fx_utils.py``,
this module knows nothing of fqt's sites or quantizers, so both layers can import it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map_only

__all__ = ["call_node", "copy_meta", "graph_fake_mode", "node_order", "set_fake_val"]

# Meta keys copied onto nodes a pass creates, so partitioners and tracebacks see them as part of the same op.
_COPY_META = ("partitioner_tag", "seq_nr", "nn_module_stack", "fwd_nn_module_stack", "source_fn_stack",
              "fwd_source_fn_stack", "stack_trace", "autograd_backward", "original_aten")


def copy_meta(dst: fx.Node, src: fx.Node) -> None:
    for k in _COPY_META:
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def graph_fake_mode(graph: fx.Graph):
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def set_fake_val(node: fx.Node, fake_mode) -> None:
    """Compute ``node.meta['val']`` from its inputs' fake values (keeps the passes' invariant)."""
    args, kwargs = tree_map_only(fx.Node, lambda n: n.meta["val"], (node.args, node.kwargs))
    if node.target is operator.getitem:
        node.meta["val"] = args[0][args[1]]
        return
    if fake_mode is None:
        raise RuntimeError("fqt: no fake mode found on the graph's placeholders; cannot keep node.meta['val'] valid")
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def call_node(graph: fx.Graph, fake_mode, target, args: tuple, meta_from: fx.Node,
              kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, with ``meta_from``'s partitioner meta
    (`copy_meta`) and a valid fake value (`set_fake_val`): the passes' invariant for every node they create."""
    n = graph.call_function(target, args, kwargs or {})
    copy_meta(n, meta_from)
    set_fake_val(n, fake_mode)
    return n


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}
