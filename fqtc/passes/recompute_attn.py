"""Attention probabilities recomputed in backward instead of saved (a joint-graph pass run by `save_act`).

P = softmax(Q K^T) is the largest activation of an attention layer. Its backward readers (the softmax backward and
P's quantizer for the dV GEMM) can re-run the chain from the int8 codes of Q and K that the dQ / dK GEMMs save
anyway, as FlashAttention does (Dao et al. 2022, sec. 3.1), so P is not saved at all.

Before::  p = softmax(qgemm(q8, k8t) * c) ... softmax_backward(g, p)            # saves fp32 p
After::   same graph, the chain tagged MUST_RECOMPUTE: backward re-runs qgemm -> softmax from the saved codes
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from fqtc.passes.common import IDENTITIES, backward_readers, fake_nbytes, is_forward

aten = torch.ops.aten
fqt = torch.ops.fqt


_SOFTMAX = (aten._softmax.default, aten._safe_softmax.default)
# ops the scores -> softmax chain may hold and backward may re-run: GEMMs on saved codes, views, pointwise math,
# and the (data-independent) causal-mask construction
_RECOMPUTABLE = {
    fqt.qgemm.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.clone.default, aten.transpose.int, aten.t.default, aten.permute.default, aten.mul.Tensor, aten.mul.Scalar,
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.div.Tensor, aten.div.Scalar, aten.where.self,
    aten.scalar_tensor.default, aten.ones.default, aten.zeros.default, aten.full.default, aten.tril.default,
    aten.triu.default, aten.logical_not.default, aten.masked_fill.Scalar, aten.unsqueeze.default,
    aten.squeeze.dim, aten.slice.Tensor, aten.arange.default, aten.arange.start, aten.ge.Tensor, aten.le.Tensor,
    aten.eq.Tensor, aten._to_copy.default, aten.detach.default, aten.alias.default, *_SOFTMAX,
}
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
          aten.clone.default, aten.transpose.int, aten.t.default, aten.permute.default, aten.detach.default,
          aten.alias.default)


def _saved_anyway(n: fx.Node) -> bool:
    """Is ``n`` a graph input, the step, or quantizer output (codes/scale) that backward reads anyway?"""
    if n.op == "placeholder" or n.target == fqt.step.default:
        return True
    if n.target is operator.getitem and n.args[0].target == fqt.quantize.default:
        return any(not is_forward(u) for u in n.users) or (n.args[0].meta.get("fqt") or {}).get("is_weight")
    return False


def _recompute_chain(s: fx.Node, limit: int = 64) -> set[fx.Node] | None:
    """The forward nodes between ``s`` and tensors backward holds anyway (int8 codes of Q and K), if they are all
    cheap to re-run (`_RECOMPUTABLE`), else None."""
    chain: set[fx.Node] = set()
    stack = [s]
    while stack:
        n = stack.pop()
        if n in chain or _saved_anyway(n):
            continue
        if n.op != "call_function" or n.target not in _RECOMPUTABLE or not is_forward(n) or len(chain) >= limit:
            return None
        chain.add(n)
        stack.extend(n.all_input_nodes)
    return chain if any(n.target == fqt.qgemm.default for n in chain) else None


def recompute_attention_probs(gm: fx.GraphModule) -> int:
    """Attention probabilities P = softmax(Q K^T) are saved by no one: backward re-runs the chain from the int8
    codes of Q and K (which the dQ / dK GEMMs save anyway), as FlashAttention does (Dao et al. 2022, sec. 3.1:
    recompute the attention matrix in backward instead of storing it), and re-quantizes P for the dV GEMM. The
    re-run uses the same codes, ops and stochastic-rounding key, so backward sees exactly the forward's P: the
    softmax backward and dV are as exact as with P saved in fp32, at the cost of one more Q K^T product. Returns
    the number of softmax nodes handled; the others fall back to `quantize_saved_activations`."""
    graph = gm.graph
    count = 0
    for s in [n for t in _SOFTMAX for n in graph.find_nodes(op="call_function", target=t)]:
        if not is_forward(s):
            continue
        readers = backward_readers(s)
        # P's own consumers in backward: the softmax backward, and P's quantizer(s) through views
        consumers: set[fx.Node] = set()
        stack = [s]
        ok = True
        while stack and ok:
            n = stack.pop()
            for u in n.users:
                if not is_forward(u):
                    ok = ok and (u.target == aten._softmax_backward_data.default and u.args[1] is n
                                 or u.target in IDENTITIES)
                elif u.target in _VIEWS:
                    consumers.add(u)
                    stack.append(u)
                elif u.target == fqt.quantize.default:
                    consumers.add(u)
                    consumers.update(g for g in u.users if g.target is operator.getitem)
        if not ok or not any(r.target == aten._softmax_backward_data.default for r, _ in readers):
            continue
        chain = _recompute_chain(s)
        if chain is None:
            continue
        for n in chain | consumers:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = 0
        val = s.meta["val"]
        s.meta["fqt"] = {"kind": "saved_activation", "op": "softmax", "bits": 0, "rounding": "-",
                         "storage": "recomputed in backward from the Q/K codes", "base": s.name,
                         "shape": [d if isinstance(d, int) else str(d) for d in val.shape],
                         "fp32_bytes": fake_nbytes(val), "bytes": 0}
        count += 1
    return count
