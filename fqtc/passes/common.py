"""Helpers shared by the passes: operand stripping, GEMM discovery, module paths, stream ids, quantizer insertion.

The FX helpers the codegen pass needs too (meta copying, fake values, node order) live in `fqtc.fx_utils`.
"""

from __future__ import annotations

import operator
import re
import zlib
from typing import Any, Iterable

import torch
import torch.fx as fx

from fqtc.fx_utils import copy_meta, set_fake_val
from fqtc.passes.records import GemmRecord, full_precision_record

aten = torch.ops.aten
fqt = torch.ops.fqt

GEMM_TARGETS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
# Transpose-like views are replayed on the int8 codes and on the keepdim scales. detach/alias carry no data
# change and are dropped. Reshaping views are *not* stripped: a view of a strided base may not be expressible on
# the codes' layout (CPU flash-attention outputs, docs/architecture.md), so the view node itself is quantized.
TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)
IDENTITIES = (aten.detach.default, aten.alias.default)
# GEMM-like ops the linear rewrite does not handle: left in full precision and reported, never silently.
# (2-D convolutions are rewritten by passes/conv.py, which records the convolutions it keeps in FP itself.)
UNSUPPORTED_GEMMS = {
    aten.baddbmm.default: "baddbmm is not rewritten yet (kept in full precision)",
    aten._scaled_dot_product_flash_attention_for_cpu.default: "fused attention is not rewritten yet",
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: "fused attention is not rewritten yet",
}


def strip_operand(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk through transposes/identities to the base node. Returns (base, transposes to replay, base-first)."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in TRANSPOSES + IDENTITIES:
        if node.target in TRANSPOSES:
            chain.append(node)
        node = node.args[0]
    chain.reverse()
    return node, chain


_L_PREFIX = re.compile(r"^L\['[^']*'\]\.?")
_GETATTR = re.compile(r"getattr\(([^,]+),\s*'([^']+)'\)")


def clean_module_path(path: str) -> str:
    """``"L['self'].layers[0].fc1"`` -> ``"layers.0.fc1"`` (Dynamo's nn_module_stack spelling to an FQN)."""
    prev = None
    while prev != path:
        prev = path
        path = _GETATTR.sub(r"\1.\2", path)
    path = _L_PREFIX.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, module class name) of the innermost module a node came from; ("", "") if none."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return clean_module_path(str(path)), name.rsplit(".", 1)[-1]


def stable_stream(*parts: Any) -> int:
    """A stable 32-bit stream id for the random stream of one quantizer (crc32: identical in every process)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0xFFFFFFFF


def tensor_shape(node: Any) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return [int(s) if not isinstance(s, torch.SymInt) else str(s) for s in val.shape] if isinstance(
        val, torch.Tensor) else None


def find_gemms(graph: fx.Graph) -> Iterable[fx.Node]:
    for target in GEMM_TARGETS:
        yield from graph.find_nodes(op="call_function", target=target)


# Non-GEMM ops stay in full precision by design (docs/supported.md): they do no multiply-accumulate over a
# reduction axis, or need FP range (exp, rsqrt). Matched on the aten op name, first match wins.
FP_OP_CATEGORIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("gemm", ("mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "convolution_backward", "linear",
              "_scaled_dot_product"),
     "GEMM-like op left in full precision: see its node.meta['fqt'] record for the reason"),
    ("normalization", ("native_batch_norm", "_native_batch_norm_legit", "native_layer_norm", "native_group_norm",
                       "_batch_norm", "batch_norm"),
     "normalization: per-channel/per-token statistics and rsqrt need FP range (not a GEMM)"),
    ("softmax", ("_softmax", "_safe_softmax", "_log_softmax", "softmax", "log_softmax"),
     "softmax: exponentials and a normalizing sum in FP (not a GEMM)"),
    ("embedding", ("embedding",), "embedding: a row gather / scatter-add, no multiply-accumulate"),
    ("pooling", ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"),
     "pooling: max or mean over a window, no weights"),
    ("loss", ("nll_loss", "mse_loss", "cross_entropy", "binary_cross_entropy"), "loss: FP reduction"),
    ("reduction", ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "cumsum", "prod"),
     "reduction (bias gradients, global pooling, statistics) in FP"),
    ("layout", ("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "clone", "contiguous",
                "squeeze", "unsqueeze", "slice", "select", "split", "split_with_sizes", "cat", "stack", "alias",
                "detach", "as_strided", "unbind", "index", "_to_copy", "copy", "copy_", "new_zeros", "zeros",
                "ones", "full", "empty", "arange", "scalar_tensor", "zeros_like", "ones_like", "full_like",
                "empty_like", "lift_fresh_copy", "sym_size", "sym_numel", "sym_stride", "constant_pad_nd",
                "slice_scatter", "select_scatter", "gather", "scatter", "index_put", "masked_fill", "where",
                "tril", "triu", "fill", "repeat", "flip", "roll"),
     "data movement / layout, no arithmetic on values"),
)


def fp_ops(graph: fx.Graph) -> list[dict[str, str]]:
    """Every compute node left in full precision with its category and reason (``elementwise`` by default).

    fqt ops, getitems and the graph's placeholders/outputs are not listed. A node in category ``gemm`` is a GEMM
    the passes did not rewrite: its ``node.meta["fqt"]`` record says why.
    """
    out = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        ns = getattr(n.target, "namespace", None)
        if ns == "fqt":
            continue
        name = getattr(getattr(n.target, "_schema", None), "name", str(n.target)).split("::")[-1]
        category, reason = "elementwise", "elementwise: per-element arithmetic in FP (not a GEMM)"
        for cat, prefixes, why in FP_OP_CATEGORIES:
            by_prefix = cat not in ("layout", "gemm", "reduction") and any(name.startswith(p) for p in prefixes)
            if name in prefixes or by_prefix:
                category, reason = cat, why
                break
        if category == "gemm" and n.meta.get("fqt", {}).get("reason"):
            reason = n.meta["fqt"]["reason"]
        out.append({"node": n.name, "op": name, "category": category, "reason": reason})
    return out


def is_forward(node: fx.Node) -> bool:
    """Is ``node`` on the forward side of the joint graph (a placeholder, or tagged/defaulting to ``is_forward``)?
    The test the save passes use to decide what forward computes and saves for backward."""
    return node.op == "placeholder" or node.meta.get("partitioner_tag", "is_forward") == "is_forward"


def is_backward(node: fx.Node) -> bool:
    """Is ``node`` part of the joint graph's backward (AOTAutograd's partitioner tag / autograd flag)?"""
    return node.meta.get("partitioner_tag") == "is_backward" or bool(node.meta.get("autograd_backward"))


def get_or_insert_step(graph: fx.Graph, fake_mode, device: torch.device) -> fx.Node:
    """The graph's single ``fqt::step`` node (one per graph, right after the placeholders), created on first use.

    Every quantizer of a graph keys its stochastic rounding on this node's output, so the GEMM and conv rewrites
    must share it (passes/README.md, "Stochastic rounding").
    """
    existing = graph.find_nodes(op="call_function", target=fqt.step.default)
    if existing:
        return existing[0]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
    with graph.inserting_after(anchor):
        step = graph.call_function(fqt.step.default, (device,))
    step.meta["partitioner_tag"] = "is_forward"
    step.meta["fqt"] = {"kind": "step"}
    set_fake_val(step, fake_mode)
    return step


def insert_quantizer(graph: fx.Graph, fake_mode, target: Any, args: tuple, before: fx.Node,
                     record: dict) -> tuple[fx.Node, fx.Node]:
    """Insert a (codes, scale) quantizer op ``target(*args)`` and its two getitems right before ``before``.

    The new nodes take ``before``'s partitioner tag / seq_nr (they serve that GEMM) and valid fake values;
    ``record`` becomes the quantizer node's ``meta["fqt"]``. Returns the (codes, scale) getitem nodes.
    """
    with graph.inserting_before(before):
        qn = graph.call_function(target, args)
        codes = graph.call_function(operator.getitem, (qn, 0))
        scale = graph.call_function(operator.getitem, (qn, 1))
    for n in (qn, codes, scale):
        copy_meta(n, before)
        set_fake_val(n, fake_mode)
    qn.meta["fqt"] = record
    return codes, scale


def fp_record(n: fx.Node, reason: str, role: str | None = None) -> GemmRecord:
    """Record (``n.meta["fqt"]``) of a GEMM-like node left in full precision, with the reason: inspect lists it."""
    module, mtype = module_of(n)
    if role is None:
        role = "grad_input/grad_weight" if is_backward(n) else "output"
    rec = full_precision_record(site=module or n.name, module=module, module_type=mtype, role=role,
                                op=str(n.target).replace("aten.", "").replace(".default", ""), node=n.name,
                                reason=reason, shapes={"out": tensor_shape(n)})
    n.meta["fqt"] = rec
    return rec


def backward_readers(src: fx.Node) -> list[tuple[fx.Node, int]]:
    """(backward node, arg index) pairs reading ``src`` directly or through detach/alias chains."""
    out, frontier = [], [src]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in IDENTITIES:
                frontier.append(u)
                continue
            if is_forward(u):
                continue
            idx = [i for i, a in enumerate(u.args) if a is n]
            out.append((u, idx[0] if idx else -1))
    return out


def static_shape(val: object) -> bool:
    """Is ``val`` a tensor (fake value) whose every size is a plain int?"""
    return isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.shape)


def fake_nbytes(val: object) -> int | None:
    """Bytes of a fake value; None for a symbolic shape (``int()`` of a SymInt would specialize the graph)."""
    return int(val.numel()) * val.element_size() if static_shape(val) else None
