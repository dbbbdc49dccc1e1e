"""Pass 0: recognize latent-weight parameters and hand their integer codes to the GEMM rewrite.

A `fqtc.optim.LatentWeight` parameter reaches the AOT joint graph flattened into its inner tensors (placeholders
``q``, ``r``, ``s``, ``mu``) followed by one ``fqt::lwq_dequantize`` node, the latent float weight. This pass runs
before `sites` and, for every such node whose inputs are graph inputs:

- adds it to the weight nodes (so `sites` calls its GEMM operand ``weight``, and `assign` gives it the weight spec);
- sets ``node.meta["fqt_int"] = {"codes", "scale", "bits", "reduce_dims"}``: the stored integer weight (int8
  placeholder ``q``, or an ``fqt::lwq_unpack`` node for int4 storage) and its per-row keepdim scale placeholder
  ``s``. `rewrite._insert_quantize` reuses them for every GEMM whose weight spec has the same bits and per-row
  ``reduce_dims`` -- the default ``output`` spec (W bits, ``channel``, nearest) -- so the integer weight goes
  straight into ``fqt::qgemm`` with no dequantize -> requantize round trip. Other specs (e.g. the per-tensor
  weight of ``grad_input``, whose reduction runs over output channels) quantize the latent weight as usual;
- tags the dequantize (and unpack) nodes ``MUST_RECOMPUTE`` so the partitioner never saves an fp32 copy of a
  latent weight for backward.

Before::

    q, r, s, mu = placeholders
    w   = fqt.lwq_dequantize(q, r, s, mu, [C, D], 8, 4)
    out = aten.addmm(b, x, aten.t(w))

After this pass (graph unchanged for W8; W4 adds ``codes = fqt.lwq_unpack(q, [C, D], 4)``)::

    w.meta["fqt_int"] = {"codes": q, "scale": s, "bits": 8, "reduce_dims": [1]}
    w.meta["fqt"] = {"kind": "latent_weight", "wbits": 8, "lbits": 4, ...}

and after `rewrite`: ``qgemm(x8, sx, aten.t(q), aten.t(s), b)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from fqtc.fx_utils import copy_meta, graph_fake_mode, set_fake_val

LWQ_DEQUANTIZE = torch.ops.fqt.lwq_dequantize.default
LWQ_UNPACK = torch.ops.fqt.lwq_unpack.default


def _is_input(n: object) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


def mark_latent_weights(gm: fx.GraphModule) -> set[fx.Node]:
    """Mark every latent-weight dequantize node of ``gm``; return them (to be added to the weight nodes)."""
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    found: set[fx.Node] = set()
    changed = False
    # AOT may decode one parameter several times (e.g. once for a convolution, again for its backward): keep the
    # first node per argument tuple so every GEMM of a site sees the same weight node (sites link by node identity)
    first: dict[tuple, fx.Node] = {}
    for n in list(graph.find_nodes(op="call_function", target=LWQ_DEQUANTIZE)):
        key = (tuple(n.args[:4]), tuple(n.args[4]), n.args[5], n.args[6])
        if key in first:
            n.replace_all_uses_with(first[key])
            graph.erase_node(n)
            changed = True
        else:
            first[key] = n
    for n in list(graph.find_nodes(op="call_function", target=LWQ_DEQUANTIZE)):
        q, r, s, mu, shape, wbits, lbits = n.args
        if not all(_is_input(x) for x in (q, r, s, mu)):
            n.meta["fqt"] = {"kind": "latent_weight", "status": "not_recognized",
                             "reason": "inputs are not graph inputs (not a LatentWeight parameter)"}
            continue
        codes = q
        if wbits <= 4:  # packed int4: unpack once to int8 codes for the GEMM
            with graph.inserting_after(n):
                codes = graph.call_function(LWQ_UNPACK, (q, list(shape), wbits))
            copy_meta(codes, n)
            set_fake_val(codes, fake_mode)
            codes.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            codes.meta["ac_graph_id"] = 0
            changed = True
        n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        n.meta["ac_graph_id"] = 0
        ndim = len(shape)
        n.meta["fqt_int"] = {"codes": codes, "scale": s, "bits": int(wbits), "reduce_dims": list(range(1, ndim))}
        n.meta["fqt"] = {
            "kind": "latent_weight", "status": "recognized", "wbits": int(wbits), "lbits": int(lbits),
            "shape": list(shape), "codes": codes.name, "scale": s.name, "inputs": [x.name for x in (q, r, s, mu)],
        }
        found.add(n)
    if changed:
        graph.lint()
        gm.recompile()
    return found


def flat_param_mask(example_inputs: list, is_param: list[bool]) -> list[bool]:
    """Per AOT graph input (after flattening tensor subclasses): is it a weight placeholder?

    A traceable wrapper subclass (a `LatentWeight`) reaches the graph as its inner tensors, one placeholder each;
    none of them is the weight itself -- `mark_latent_weights` marks the dequantized node instead.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def leaves(x: object) -> int:
        if not is_traceable_wrapper_subclass(x):
            return 1
        attrs, _ = x.__tensor_flatten__()
        return sum(leaves(getattr(x, a)) for a in attrs)

    out: list[bool] = []
    for x, p in zip(example_inputs, is_param):
        out.extend([False] * leaves(x) if is_traceable_wrapper_subclass(x) else [p])
    return out
