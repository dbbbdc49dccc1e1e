"""Pass 5b: every activation the backward of a non-GEMM op reads is saved in 8 bits (or as packed mask bits).

After `save` the GEMMs' backward already reads int8 codes; what is left in fp32 are the tensors the backward
formulas of the elementwise and normalization ops read. This pass quantizes each of them in forward with
``fqt::quantize`` (8 bits, a scale per row / channel), tags codes and scale ``CheckpointPolicy.MUST_SAVE`` so the
partitioner saves those instead of the fp32 tensor, and dequantizes (``codes.float() * scale``) in backward right
before the backward op. ReLU / ReLU6 masks (`save.compress_relu_masks`) are then folded into the sign bit of the
int8 codes the next GEMM saves anyway, or else packed 8 per byte.

Before::  y = gelu(x) ...                               gelu_backward(g, x)          # saves fp32 x
After::   y = gelu(x); q = quantize(x, 8, [-1], ...) ... gelu_backward(g, q[0].float() * q[1])   # int8 + row scales

| backward op | saved value | scale | rounding | transform |
|---|---|---|---|---|
| ``native_batch_norm_backward`` (train) | input - batch mean | per channel | nearest | mean 0 in backward |
| ``native_batch_norm_backward`` (eval) | input | per channel | nearest | |
| ``native_layer_norm_backward`` | input - row mean | per row (token) | nearest | mean 0 in backward |
| ``gelu_backward``, ``silu_backward`` | input | per row | nearest | |
| ``tanh_backward``, ``sigmoid_backward`` | output | per row | nearest | |
| ``_softmax_backward_data`` | output P | per row (softmax dim) | stochastic | |
| ``_log_softmax_backward_data`` | exp(output) = P | per row (softmax dim) | stochastic | ``g - P * sum(g)`` |
| ``threshold_backward`` (ReLU), ``hardtanh_backward`` (ReLU6) | bool mask | - | exact | sign bit / 8 per byte |

**Rounding.** Stochastic rounding makes ``E[dequant(quant(v))] = v`` (`fqtc.quant.uniform`), which makes a
gradient unbiased only where it is linear in the saved value: ``log_softmax``'s ``g - P * sum(g)`` is linear in P;
softmax's ``P * (g - sum(g * P))`` is linear up to the diagonal term ``P_i^2 g_i``, whose bias is the rounding
variance ``<= s^2/4`` (negligible). The other formulas are nonlinear in the saved value (GELU'(x), SiLU'(x),
``1 - y^2``, ``y (1 - y)``, the normalizations' ``x_hat * mean(g x_hat)``), so stochastic rounding would not remove
their bias and would double the error variance (uniform noise ``s^2/6`` on average vs ``s^2/12`` for nearest,
Croci et al., "Stochastic rounding: implementation, error analysis and applications", R. Soc. Open Sci. 2022):
they round to nearest.

**Centering.** BatchNorm / LayerNorm backward read their input only through ``x_hat = (x - mean) * rstd``. The
pass quantizes ``x - mean`` (one subtraction in forward) and hands the backward op a zero mean: the quantization
step then scales with the spread of the group, not with its offset (a channel with mean 5 and std 1 quantized
uncentered would lose ~2.5 bits), and LayerNorm's per-token mean no longer has to be saved.

**Error statement (8 bits, symmetric, scale ``s = amax/127`` per group).** Each saved value ``v`` is replaced by
``v + e`` with ``|e| <= s/2`` (nearest) or ``|e| < s``, ``E[e] = 0`` (stochastic); relative to the group's abs-max
the error is at most ``1/254`` (nearest). Measured gradient SQNR of this one quantizer against the same compiled
model with the tensor kept fp32 (option ``save_fp``), tests/passes/test_saved_activations.py, minimum over input and
weight gradients: BatchNorm 44 dB, LayerNorm 47 dB, GELU 42 dB, SiLU 45 dB, tanh 46 dB, sigmoid 47 dB, softmax
31 dB, log_softmax 44 dB (docs/saved_activations.md has the table and the tested floors). Attention softmaxes whose
input is re-computable from saved Q/K codes are not saved at all (`recompute_attention_probs`, exact). Masks are
exact. Non-finite values are never hidden: a group holding a NaN / Inf gets a NaN / Inf scale
(`fqtc.quant.uniform`) so its dequantized values, and the
gradients computed from them, are NaN.

**Masks.** A ReLU mask is 1 bit of information. When the activation the next GEMM quantizes is the ReLU/ReLU6
output itself, its int8 codes are non-negative (the output is >= 0) and the code's sign bit is free: the pass saves
``where(mask, codes, ~codes)`` and backward decodes ``mask = e >= 0``, ``codes = where(mask, e, ~e)`` (exact for
every code in [0, 127]), so the mask costs 0 bytes. Otherwise the mask is packed 8 per byte (``uint8``).

Option ``save_fp`` (`fqtc.config.FQTConfig`) keeps chosen kinds in fp32 (debugging; the SQNR tests use it as the
reference). With ``bits="fp"`` (no quantized activations) the pass quantizes nothing, so the FP path stays exact.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from fqtc.config import SAVE_FP_KINDS, FQTConfig
from fqtc.fx_utils import call_node, graph_fake_mode, node_order
from fqtc.passes.common import (
    IDENTITIES,
    backward_readers,
    fake_nbytes,
    get_or_insert_step,
    is_forward,
    module_of,
    stable_stream,
    static_shape,
)
from fqtc.passes.recompute_attn import recompute_attention_probs

aten = torch.ops.aten
fqt = torch.ops.fqt

SAVED_BITS = 8


@dataclass(frozen=True)
class _Handler:
    kind: str
    arg: int  # index of the saved fp32 tensor among the backward op's args
    rounding: str
    reduce_dims: Callable[[fx.Node, int], list[int]]  # (backward node, ndim) -> dims sharing one scale


def _rows(bn: fx.Node, ndim: int) -> list[int]:
    """One scale per row of the feature (last) dim; per (sample, channel) plane for conv feature maps."""
    if ndim <= 1:
        return list(range(ndim))
    return list(range(2, ndim)) if ndim >= 4 else [ndim - 1]


def _softmax_dim(bn: fx.Node, ndim: int) -> list[int]:
    return [bn.args[2] % ndim] if ndim else []


def _ln_dims(bn: fx.Node, ndim: int) -> list[int]:
    return list(range(ndim - len(bn.args[2]), ndim))


def _bn_dims(bn: fx.Node, ndim: int) -> list[int]:
    return [d for d in range(ndim) if d != 1]


HANDLERS: dict[object, _Handler] = {
    aten.native_batch_norm_backward.default: _Handler("batch_norm", 1, "nearest", _bn_dims),
    aten.native_layer_norm_backward.default: _Handler("layer_norm", 1, "nearest", _ln_dims),
    aten.gelu_backward.default: _Handler("gelu", 1, "nearest", _rows),
    aten.silu_backward.default: _Handler("silu", 1, "nearest", _rows),
    aten.tanh_backward.default: _Handler("tanh", 1, "nearest", _rows),
    aten.sigmoid_backward.default: _Handler("sigmoid", 1, "nearest", _rows),
    aten._softmax_backward_data.default: _Handler("softmax", 1, "stochastic", _softmax_dim),
    aten._log_softmax_backward_data.default: _Handler("log_softmax", 1, "stochastic", _softmax_dim),
}


def _strip_identities(n: fx.Node) -> fx.Node:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in IDENTITIES:
        n = n.args[0]
    return n


def _call(graph: fx.Graph, fake_mode, target, args: tuple, meta_from: fx.Node, kwargs: dict | None = None,
          forward: bool | None = None) -> fx.Node:
    n = call_node(graph, fake_mode, target, args, meta_from, kwargs)
    if forward is not None:
        n.meta["partitioner_tag"] = "is_forward" if forward else "is_backward"
    return n


def _must_save(n: fx.Node) -> None:
    n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    n.meta["ac_graph_id"] = 0


def save_fp_kinds(config: FQTConfig) -> frozenset[str]:
    """The kinds option ``save_fp`` keeps in fp32 ("all" expanded)."""
    kinds = config.save_fp
    return frozenset(SAVE_FP_KINDS) if "all" in kinds else frozenset(kinds)


def quantize_saved_activations(gm: fx.GraphModule, config: FQTConfig, any_quantized: bool = True) -> dict[str, int]:
    """Rewrite the joint graph so the backward ops in `HANDLERS` read 8-bit codes saved in forward, then fold or
    pack the ReLU masks. Returns counters ``saved_activations_8bit``, ``relu_masks_in_codes``,
    ``relu_masks_packed``. Every new quantizer's ``meta["fqt"]`` is a record of kind ``saved_activation``
    (op, bits, rounding, reduce_dims, base, shape, fp32_bytes, bytes) that `fqtc.inspect` reports.

    ``any_quantized=False`` (the graph has GEMMs and every one is kept in full precision, e.g. ``keep_fp`` of every
    role or a ``"*": "fp"`` rule) leaves the saved activations in fp32 too: a graph whose every GEMM is in full
    precision is the FP path, which must equal eager (docs/architecture.md). Masks are still compacted (exact)."""
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    keep = save_fp_kinds(config)
    count = recomputed = 0
    if config.bits.activation is not None and any_quantized:
        if "softmax" not in keep:
            recomputed = recompute_attention_probs(gm)
        count = _quantize(gm, fake_mode, config, keep)
    folded, packed = _compact_masks(gm, fake_mode)
    if count or folded or packed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return {"saved_activations_8bit": count, "attention_probs_recomputed": recomputed, "relu_masks_in_codes": folded,
            "relu_masks_packed": packed}


def _quantize(gm: fx.GraphModule, fake_mode, config: FQTConfig, keep: frozenset[str]) -> int:
    graph = gm.graph
    groups: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    for n in list(graph.nodes):
        h = HANDLERS.get(n.target) if n.op == "call_function" else None
        if h is None or h.kind in keep or is_forward(n):
            continue
        src = _strip_identities(n.args[h.arg])
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        # only activations produced in forward (graph inputs are alive anyway) in fp32
        if src.op == "placeholder" or not is_forward(src) or not isinstance(val, torch.Tensor) \
                or val.dtype != torch.float32 or not static_shape(val):
            continue
        perm = _dense_order(val)
        if perm is not None and not val.permute(perm).is_contiguous():
            continue  # overlapping or sliced storage: no layout-preserving way back from contiguous codes
        if h.kind == "log_softmax" and (n.args[3] != torch.float32 or n.args[0].meta["val"].dtype != torch.float32):
            continue
        groups.setdefault((src, h.kind), []).append(n)
    step = None
    count = 0
    for (src, kind), bnodes in groups.items():
        handled = set(bnodes)
        # a backward reader this pass does not rewrite keeps the fp32 tensor alive: quantizing would add bytes
        if any(u not in handled for u, _ in backward_readers(src)):
            continue
        h = HANDLERS[bnodes[0].target]
        if h.kind in ("batch_norm", "layer_norm") and any(not _same_stats(b, bnodes[0], h.kind) for b in bnodes):
            continue
        if step is None:
            step = get_or_insert_step(graph, fake_mode, src.meta["val"].device)
        _rewrite_group(graph, fake_mode, config, step, src, h, bnodes)
        count += 1
    return count


def _dense_order(val: torch.Tensor) -> list[int] | None:
    """None for a contiguous tensor; else the dim order (outermost first) in which it is contiguous."""
    if val.is_contiguous():
        return None
    perm = sorted(range(val.dim()), key=lambda d: (-val.stride(d), -val.shape[d]))
    return perm


def _same_stats(a: fx.Node, b: fx.Node, kind: str) -> bool:
    idx = (3, 4) if kind == "layer_norm" else (5, 6, 7)
    return all(a.args[i] is b.args[i] for i in idx)


def _centering(bn: fx.Node, kind: str) -> tuple[fx.Node | None, fx.Node | None, int | None]:
    """(mean node, stats node used for the zero mean in backward, mean arg index) of a normalization to center."""
    if kind == "layer_norm":
        return bn.args[3], bn.args[4], 3
    if kind == "batch_norm" and bn.args[7] is True and isinstance(bn.args[5], fx.Node):
        return bn.args[5], bn.args[6], 5
    return None, None, None


def _rewrite_group(graph: fx.Graph, fake_mode, config: FQTConfig, step: fx.Node, src: fx.Node, h: _Handler,
                   bnodes: list[fx.Node]) -> None:
    bn0 = bnodes[0]
    val = src.meta["val"]
    ndim = val.dim()
    dims = h.reduce_dims(bn0, ndim)
    perm = _dense_order(val)
    qdims = dims if perm is None else sorted(perm.index(d) for d in dims)
    mean, stat, mean_idx = _centering(bn0, h.kind)
    if mean is not None and not (is_forward(mean) and is_forward(stat)):
        mean = None
    module, _ = module_of(src)
    stream = stable_stream("saved_activation", h.kind, module, src.name)
    order = node_order(graph)
    anchor = src if mean is None or order[src] > order[mean] else mean
    # inserting_before(anchor.next) keeps the new nodes in creation order (inserting_after would reverse them)
    with graph.inserting_before(anchor.next):
        x = src
        if h.kind == "log_softmax":  # save P = exp(log P): backward g - P * sum(g) is linear in P
            x = _call(graph, fake_mode, aten.exp.default, (src,), src, forward=True)
        elif mean is not None:
            m = mean
            if h.kind == "batch_norm":  # (C,) -> (1, C, 1, ...) against (N, C, ...)
                m = _call(graph, fake_mode, aten.view.default, (mean, [1, -1] + [1] * (ndim - 2)), src,
                          forward=True)
            x = _call(graph, fake_mode, aten.sub.Tensor, (src, m), src, forward=True)
        if perm is not None:  # quantize a contiguous view: the op's fake codes are contiguous, so must the real be
            x = _call(graph, fake_mode, aten.permute.default, (x, perm), src, forward=True)
        q = _call(graph, fake_mode, fqt.quantize.default,
                  (x, SAVED_BITS, qdims, h.rounding, config.seed, stream, step), src, forward=True)
        codes = _call(graph, fake_mode, operator.getitem, (q, 0), src, forward=True)
        scale = _call(graph, fake_mode, operator.getitem, (q, 1), src, forward=True)
    for n in (codes, scale):
        _must_save(n)
    q.meta["fqt"] = {
        "kind": "saved_activation", "op": h.kind, "bits": SAVED_BITS, "rounding": h.rounding, "reduce_dims": dims,
        "base": src.name, "backward": [b.name for b in bnodes], "module": module, "stream": stream,
        "centered": mean is not None, "shape": list(val.shape), "fp32_bytes": fake_nbytes(val),
        "bytes": fake_nbytes(codes.meta["val"]) + fake_nbytes(scale.meta["val"]),
    }
    first = min(bnodes, key=lambda b: node_order(graph)[b])
    with graph.inserting_before(first):
        f = _call(graph, fake_mode, aten._to_copy.default, (codes,), first, {"dtype": torch.float32},
                  forward=False)
        deq = _call(graph, fake_mode, aten.mul.Tensor, (f, scale), first, forward=False)
        if perm is not None:  # back to the fp32 tensor's own strides, which the backward graph was traced with
            inv = [perm.index(d) for d in range(ndim)]
            deq = _call(graph, fake_mode, aten.permute.default, (deq, inv), first, forward=False)
        zero = None
        if mean is not None:
            zero = _call(graph, fake_mode, aten.zeros_like.default, (stat,), first, forward=False)
    for bn in bnodes:
        if h.kind == "log_softmax":
            g, dim = bn.args[0], bn.args[2]
            with graph.inserting_before(bn):
                s = _call(graph, fake_mode, aten.sum.dim_IntList, (g, [dim], True), bn)
                p_s = _call(graph, fake_mode, aten.mul.Tensor, (deq, s), bn)
                out = _call(graph, fake_mode, aten.sub.Tensor, (g, p_s), bn)
            bn.replace_all_uses_with(out)
            graph.erase_node(bn)
            continue
        args = list(bn.args)
        args[h.arg] = deq
        if zero is not None:
            args[mean_idx] = zero
        bn.args = tuple(args)


# -- masks ---------------------------------------------------------------------------------------------------------
_NONNEG = (aten.relu.default,)


def _nonnegative(n: fx.Node) -> bool:
    """Is ``n``'s output >= 0 (or NaN) by construction, so its int8 codes never use the sign bit?"""
    if n.op != "call_function":
        return False
    if n.target in _NONNEG:
        return True
    if n.target in (aten.hardtanh.default, aten.clamp.default) and len(n.args) > 1:
        lo = n.args[1]
        return isinstance(lo, (int, float)) and lo >= 0
    return False


def _foldable_codes(src: fx.Node, mask_val: torch.Tensor, used: set[fx.Node]) -> fx.Node | None:
    """Forward int8 codes of a non-negative tensor computed from ``src`` (itself or its ReLU/ReLU6) that backward
    reads and whose forward views do not reach backward; None if there is none."""
    bases = [src] + [u for u in src.users if u.op == "call_function"]
    for b in bases:
        if not _nonnegative(b):
            continue
        for q in b.users:
            if q.target != fqt.quantize.default or q.args[0] is not b or not is_forward(q) or q.args[1] > 8:
                continue
            codes = [u for u in q.users if u.target is operator.getitem and u.args[1] == 0]
            if len(codes) != 1 or codes[0] in used:
                continue
            c = codes[0]
            if tuple(c.meta["val"].shape) != tuple(mask_val.shape):
                continue
            bw = [u for u in c.users if not is_forward(u)]
            fw_views_to_bw = any(not is_forward(w) for u in c.users if is_forward(u) for w in u.users)
            if bw and not fw_views_to_bw:
                return c
    return None


def _compact_masks(gm: fx.GraphModule, fake_mode) -> tuple[int, int]:
    graph = gm.graph
    folded = packed = 0
    used: set[fx.Node] = set()
    by_name = {n.name: n for n in graph.nodes}
    masks = [n for n in graph.nodes if (n.meta.get("fqt") or {}).get("kind") == "relu_mask"]
    for m in masks:
        bw_users = [u for u in m.users if not is_forward(u)]
        val = m.meta.get("val")
        if not bw_users or any(is_forward(u) for u in m.users) or not static_shape(val):
            continue
        c = _foldable_codes(by_name[m.meta["fqt"]["source"]], val, used)
        if c is not None:
            _fold_into_codes(graph, fake_mode, m, c, bw_users)
            used.add(c)
            folded += 1
        elif val.numel() >= 8:
            _pack_bits(graph, fake_mode, m, bw_users)
            packed += 1
    return folded, packed


def _fold_into_codes(graph: fx.Graph, fake_mode, m: fx.Node, c: fx.Node, mask_users: list[fx.Node]) -> None:
    order = node_order(graph)
    fw_users = [u for u in c.users if is_forward(u)]
    anchor = max([m, c, *fw_users], key=lambda n: order[n])  # after the forward GEMM: keeps quantize->qgemm fusable
    code_users = [u for u in c.users if not is_forward(u)]
    # ~c == -1 - c in two's complement; the encode and decode run on float32 values (exact for |v| <= 128): int8
    # compares, selects and bitwise ops vectorize poorly in Inductor's C++ backend (torch 2.13: about 10x slower
    # per element than the same ops on float32), and the float forms fuse into the quantizer's loop
    f32 = {"dtype": torch.float32}
    with graph.inserting_before(anchor.next):
        cf = _call(graph, fake_mode, aten._to_copy.default, (c,), c, f32, forward=True)
        ncf = _call(graph, fake_mode, aten.rsub.Scalar, (cf, -1.0), c, forward=True)
        ef = _call(graph, fake_mode, aten.where.self, (m, cf, ncf), c, forward=True)
        e = _call(graph, fake_mode, aten._to_copy.default, (ef,), c, {"dtype": torch.int8}, forward=True)
    _must_save(e)
    m.meta.pop("recompute", None)
    m.meta.pop("ac_graph_id", None)
    m.meta["fqt"].update(storage="sign bit of int8 codes", codes=c.name, encoded=e.name, bytes=0)
    e.meta["fqt"] = {"kind": "mask_codes", "mask": m.name, "codes": c.name}
    first = min(mask_users + code_users, key=lambda n: node_order(graph)[n])
    with graph.inserting_before(first):
        ef2 = _call(graph, fake_mode, aten._to_copy.default, (e,), first, f32, forward=False)
        m2 = _call(graph, fake_mode, aten.ge.Scalar, (ef2, 0), first, forward=False)
        nef = _call(graph, fake_mode, aten.rsub.Scalar, (ef2, -1.0), first, forward=False)
        cf2 = _call(graph, fake_mode, aten.where.self, (m2, ef2, nef), first, forward=False)
        c2 = _call(graph, fake_mode, aten._to_copy.default, (cf2,), first, {"dtype": torch.int8}, forward=False)
    c2.meta["fqt"] = {"kind": "codes_decode", "codes": c.name}
    for u in mask_users:
        u.replace_input_with(m, m2)
    for u in code_users:
        u.replace_input_with(c, c2)


def _powers(graph: fx.Graph, fake_mode, meta_from: fx.Node, dev: torch.device, forward: bool, base: float,
            ndim: int, first: int = 0) -> fx.Node:
    """``base**first, ..., base**(first+7)`` (float32, shape ``(8, 1, ..., 1)`` of ``ndim`` dims): exact powers of
    two."""
    k = _call(graph, fake_mode, aten.arange.start, (first, first + 8), meta_from,
              {"dtype": torch.float32, "device": dev}, forward=forward)
    p = _call(graph, fake_mode, aten.pow.Scalar, (base, k), meta_from, forward=forward)
    return _call(graph, fake_mode, aten.view.default, (p, [8] + [1] * (ndim - 1)), meta_from, forward=forward)


def _plane_shape(shape: list[int]) -> tuple[list[int], int]:
    """The packed layout of a mask of ``shape``: planes ``[8, P/8, *shape[j:]]`` for the shortest prefix
    ``P = prod(shape[:j])`` divisible by 8, so a loop over the mask's own shape finds its byte by splitting only
    the outer (prefix) index; else the flat mask padded to ``[8, ceil(numel/8)]``. Returns (planes, pad)."""
    p = 1
    for j, d in enumerate(shape):
        p *= d
        if p % 8 == 0:
            return [8, p // 8, *shape[j + 1:]], 0
    numel = p
    rows = -(-numel // 8)
    return [8, rows], 8 * rows - numel


def _pack_bits(graph: fx.Graph, fake_mode, m: fx.Node, mask_users: list[fx.Node]) -> None:
    """Planar packing (`_plane_shape`): bit k of a byte holds plane k, so both directions are contiguous,
    vectorizable loops (an interleaved layout, bit k of byte j = element ``8j + k``, makes Inductor's C++ backend
    emit scalar loops over an inner dim of 8 or gathers). Both run in float32 arithmetic, exact for these integers
    (0..255, powers of two): Inductor vectorizes float32 far better than uint8/int32 bit operations, and ONNX has
    Mul/ReduceSum/Floor for every step (fqtc.export.onnx)."""
    val = m.meta["val"]
    shape, numel, dev = list(val.shape), int(val.numel()), val.device
    planes, pad = _plane_shape(shape)
    nd = len(planes)
    with graph.inserting_before(m.next):
        f32 = _call(graph, fake_mode, aten._to_copy.default, (m,), m, {"dtype": torch.float32}, forward=True)
        if pad:
            f32 = _call(graph, fake_mode, aten.view.default, (f32, [-1]), m, forward=True)
            f32 = _call(graph, fake_mode, aten.constant_pad_nd.default, (f32, [0, pad], 0.0), m, forward=True)
        f32 = _call(graph, fake_mode, aten.view.default, (f32, planes), m, forward=True)
        w = _powers(graph, fake_mode, m, dev, True, 2.0, nd)
        # the bits are disjoint, so the sum of bit * 2**k is their bitwise OR
        total = _call(graph, fake_mode, aten.sum.dim_IntList, (_call(graph, fake_mode, aten.mul.Tensor, (f32, w), m,
                                                                      forward=True), [0], False), m, forward=True)
        p = _call(graph, fake_mode, aten._to_copy.default, (total,), m, {"dtype": torch.uint8}, forward=True)
    _must_save(p)
    m.meta.pop("recompute", None)
    m.meta.pop("ac_graph_id", None)
    m.meta["fqt"].update(storage="packed 8 per byte", packed=p.name, bytes=fake_nbytes(p.meta["val"]))
    p.meta["fqt"] = {"kind": "mask_packed", "mask": m.name}
    first = min(mask_users, key=lambda n: node_order(graph)[n])
    with graph.inserting_before(first):
        pf = _call(graph, fake_mode, aten._to_copy.default, (p,), first, {"dtype": torch.float32}, forward=False)
        pf = _call(graph, fake_mode, aten.unsqueeze.default, (pf, 0), first, forward=False)
        # bit k = floor(b / 2**k) - 2 * floor(b / 2**(k+1)); multiplying by 2**-k is exact
        lo = _call(graph, fake_mode, aten.floor.default, (_call(graph, fake_mode, aten.mul.Tensor, (
            pf, _powers(graph, fake_mode, first, dev, False, 0.5, nd)), first, forward=False),), first, forward=False)
        hi = _call(graph, fake_mode, aten.floor.default, (_call(graph, fake_mode, aten.mul.Tensor, (
            pf, _powers(graph, fake_mode, first, dev, False, 0.5, nd, 1)), first, forward=False),), first,
            forward=False)
        bit = _call(graph, fake_mode, aten.sub.Tensor, (lo, _call(graph, fake_mode, aten.mul.Tensor, (hi, 2.0), first,
                                                                  forward=False)), first, forward=False)
        f = _call(graph, fake_mode, aten.ne.Scalar, (bit, 0), first, forward=False)
        if pad:
            f = _call(graph, fake_mode, aten.view.default, (f, [-1]), first, forward=False)
            f = _call(graph, fake_mode, aten.slice.Tensor, (f, 0, 0, numel), first, forward=False)
        m2 = _call(graph, fake_mode, aten.view.default, (f, shape), first, forward=False)
    for u in mask_users:
        u.replace_input_with(m, m2)
