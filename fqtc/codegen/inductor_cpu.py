"""Codegen pass for CPU graphs compiled by Inductor: fqt ops become the aten ops of their reference functions, so
Inductor fuses them into the loops of the ops around them.

An ``fqt::quantize`` left as a custom op is an extern call for Inductor: it reads ``x`` once for the abs-max, then
runs about twenty full-tensor aten passes (the counter-based hash of `fqtc.quant.rng`, division, rounding, clamp,
cast), each a separate read and write of memory. Inlined as aten ops, the same computation is pointwise integer
and float arithmetic plus one reduction: Inductor's C++ backend emits one vectorized loop for the abs-max, fused
into ``x``'s producer where it can, and one loop that hashes the element index, rounds and writes int8 codes
(the element index is a loop variable there, not a tensor; the rounding tail is one ``fqt::round_codes`` node with
its own lowering, `register_round_codes_lowering`). ``fqt::qgemm`` becomes ``aten._int_mm`` (or the exact fp32
emulation, whichever `fqtc.quant.gemm.gemm_path` chose) with its dequantize epilogue ``acc * a_scale * b_scale +
bias`` as pointwise ops that Inductor fuses into the GEMM's consumer; a batched GEMM of large per-head products
keeps its loop of int8 GEMMs as one ``fqt::int_gemm`` op and inlines the same epilogue.

The inlined graph is the reference function traced as it runs (one ``make_fx`` pass over the whole graph, with the
fqt ops' references in the decomposition table beside Inductor's own), so it computes the same bits: IEEE
division, round-half-to-even, the same int32 hash; Inductor compiles with ``-ffp-contract=off`` (no fused
multiply-add) and keeps true division. tests/compile/test_inductor_cpu.py checks codes, scales and GEMM outputs bit
for bit against the eager reference.

Graphs with symbolic shapes (a batch dimension Dynamo made dynamic) are lowered the same way: the references'
size checks become shape guards, as Inductor's own lowerings add them. Each GEMM record's ``codegen`` entry says
which form runs.

Before::  q = fqt.quantize(x, 8, [1], "stochastic", seed, stream, step); x8, sx = q[0], q[1]
          out = fqt.qgemm(x8, sx, w8t, swt, bias, float32)
After::   amax = amax(abs(x), [1]); sx = where(amax > 0, amax / 127, ...); keys = fqt.stream_keys(seed, ..., step)
          x8 = fqt.round_codes(x / sx, 127, "stochastic", keys[i])  # lowered: floor(y + hash(index ^ key)), clamp
          out = _int_mm(x8, w8t).float() * sx * swt + bias
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from fqtc.quant import block as _block
from fqtc.quant import conv as _conv
from fqtc.quant import gemm as _gemm
from fqtc.quant import rng as _rng
from fqtc.quant import rotate as _rotate
from fqtc.quant import uniform as _uniform

fqt = torch.ops.fqt


def _mix32_ops(ops: Any, x: Any) -> Any:
    """`fqtc.quant.rng.mix32_i32` in Inductor's ``ops`` (int32, wrapping multiply): each intermediate is a Python
    value used twice, so the loop body holds every operation once."""
    def c(v: int) -> Any:
        return ops.constant(v, torch.int32)

    x = ops.bitwise_xor(x, ops.bitwise_and(ops.bitwise_right_shift(x, c(16)), c(0xFFFF)))
    x = ops.mul(x, c(_rng.M1_I32))
    x = ops.bitwise_xor(x, ops.bitwise_and(ops.bitwise_right_shift(x, c(15)), c(0x1FFFF)))
    x = ops.mul(x, c(_rng.M2_I32))
    return ops.bitwise_xor(x, ops.bitwise_and(ops.bitwise_right_shift(x, c(16)), c(0xFFFF)))


@functools.cache  # registered once per process
def register_round_codes_lowering() -> None:
    """Lower ``fqt::round_codes`` to one Inductor pointwise loop body computing `fqtc.quant.uniform.round_codes` and
    the int8 cast, with the draws of `fqtc.quant.rng.uniform_like_key`.

    Traced as aten ops, the tail reads ``y`` twice (``where(y == y, y, 0)``) and the hash reads every intermediate
    twice (``x ^ (x >> 16)``). Inductor inlines a pointwise producer at each read: the two lowbias32 rounds expanded
    2^6-fold while it generated code (its CSE removes the copies from the C++, not the Python work: 5.7 s of compile
    time per stochastic quantizer), and ``y`` (the GEMM epilogue, an activation, the division) was stored as fp32
    and read back by a second loop. Here each value is loaded or computed once. Same operations, same order, same
    bits (tests/compile/test_inductor_cpu.py)."""
    from torch._inductor import ir
    from torch._inductor.lowering import register_lowering
    from torch._inductor.virtualized import ops

    @register_lowering(fqt.round_codes.default, type_promotion_kind=None)
    def _lower(y: Any, qmax: int, rounding: str, key: Any = None) -> Any:
        size = list(y.get_size())
        strides = ir.FlexibleLayout.contiguous_strides(size)
        load_y = y.make_loader()
        load_key = key.make_loader() if key is not None else None
        f32 = torch.float32

        def uniform(index: list[Any]) -> Any:  # rng.uniform_like_key below 2^31 elements
            flat = sum((i * st for i, st in zip(index, strides)), 0)
            idx = ops.index_expr(flat, torch.int32)
            k = load_key([])  # int64: wrapped to its int32 bit pattern as the reference does
            k = ops.sub(ops.bitwise_and(ops.add(k, ops.constant(1 << 31, torch.int64)),
                                        ops.constant(_rng.MASK32, torch.int64)),
                        ops.constant(1 << 31, torch.int64))
            h = _mix32_ops(ops, ops.bitwise_xor(idx, ops.to_dtype(k, torch.int32)))
            h = _mix32_ops(ops, ops.bitwise_xor(h, ops.constant(_rng.GOLDEN_I32, torch.int32)))
            bits24 = ops.bitwise_and(ops.bitwise_right_shift(h, ops.constant(8, torch.int32)),
                                     ops.constant(0xFFFFFF, torch.int32))
            return ops.mul(ops.to_dtype(bits24, f32), ops.constant(1.0 / 16777216.0, f32))

        def inner_fn(index: list[Any]) -> Any:
            v = load_y(index)
            v = ops.where(ops.eq(v, v), v, ops.constant(0.0, f32))
            q = ops.floor(ops.add(v, uniform(index))) if rounding == "stochastic" else ops.round(v)
            q = ops.minimum(ops.maximum(q, ops.constant(float(-qmax), f32)), ops.constant(float(qmax), f32))
            return ops.to_dtype(q, torch.int8)

        return ir.Pointwise.create(device=y.get_device(), dtype=torch.int8, inner_fn=inner_fn, ranges=size)


class _NodeTracker(fx.Interpreter):
    """Runs a graph under ``make_fx`` and remembers which node is running, so a decomposition knows its GEMM."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _rounder(x: torch.Tensor) -> _uniform.Rounder | None:
    """A quantizer's rounding tail as one ``fqt::round_codes`` node (lowered by `register_round_codes_lowering`),
    where its element indices fit int32 as the reference's fast hash path needs."""
    return fqt.round_codes.default if x.numel() < (1 << 31) else None


def _decompositions(tracker: _NodeTracker, info: dict[str, Any]) -> dict[Any, Callable]:
    """fqt ops -> their reference functions for CPU tensors (NotImplemented keeps an op as an extern call: another
    device, or a float / partially quantized product, whose reference multiplies dequantized operands)."""
    keys: dict[tuple[int, int], Any] = {}  # (seed, step tensor) -> the graph's one fqt::stream_keys result

    def quantize(x, bits, reduce_dims, rounding, seed, stream, step, amax=None):
        if x.device.type != "cpu":
            return NotImplemented
        # the stream keys of the whole graph from one extern node (`fqt::stream_keys`, made at the first
        # stochastic quantizer): computed once per call, not per quantizer nor in every vector iteration
        key = None
        if rounding == "stochastic":
            streams = info["streams"].get(seed, [])
            if stream in streams and len(streams) > 1:
                if (seed, id(step)) not in keys:
                    keys[(seed, id(step))] = fqt.stream_keys.default(seed, streams, step)
                key = keys[(seed, id(step))][streams.index(stream)]
            else:
                key = fqt.stream_key.default(seed, stream, step)
        info["inlined_quantize"] += 1
        return _uniform.quantize(x, bits, reduce_dims, rounding, seed=seed, step=0, stream=stream, amax=amax, key=key,
                                 rounder=_rounder(x))

    def qgemm(a, a_scale, b, b_scale, bias, out_dtype):
        name = tracker.current.name if tracker.current is not None else "?"
        if a.device.type != "cpu":
            return NotImplemented
        why = None
        if _gemm.not_integer_reason(a, a_scale, b, b_scale) is not None:
            why = "float or partially quantized product"
        if why is not None:
            info["kept_ops"] += 1
            info["codegen"][name] = {"device": "cpu", "kernel": "reference", "fused": False, "reason": why}
            return NotImplemented
        info["inlined_qgemm"] += 1
        path = _gemm.gemm_path(a.shape, b.shape)
        info["codegen"][name] = {"device": "cpu", "kernel": f"inductor:{path}", "fused": True}
        if (a.dim() == 2 and b.dim() == 2) or path == "fp32":
            # aten._int_mm or the exact fp32 emulation (one batched fp32 GEMM for small per-head products), as the
            # reference runs it: the codes' float conversion fuses into the loop that writes them
            return _gemm.scaled_gemm(a, a_scale, b, b_scale, bias, out_dtype)
        # a batched product of larger per-batch GEMMs: the loop of int8 GEMMs stays one extern op, its epilogue is
        # inlined
        return _gemm.dequantize_epilogue(fqt.int_gemm.default(a, b), a_scale, b_scale, bias, out_dtype)

    def conv(role: str, a, sa, b, sb, weight_size, stride, groups):
        """Record a conv GEMM's form: None when it is not an exact integer conv with an inlined epilogue, else the
        two code operands as the accumulator op takes them. On the fp32-emulated path they are float32 code values
        (exact small integers): the int8 -> float32 conversion then fuses into the loop that produces the codes
        instead of running as a separate full-tensor copy inside the op (`fqtc.quant.conv.float_codes`)."""
        name = tracker.current.name if tracker.current is not None else "?"
        if a.device.type != "cpu" or not _conv.integer_operands(role, a, sa, b, sb):
            info["kept_ops"] += 1
            info["codegen"][name] = {"device": a.device.type, "kernel": "reference", "fused": False,
                                     "reason": "float or partially quantized product"}
            return None
        info["inlined_qgemm"] += 1
        path = _conv.conv_path(role, [int(v) for v in weight_size], stride, groups, a.device)
        info["codegen"][name] = {"device": "cpu", "kernel": f"inductor:conv-{path}", "fused": True}
        if path == "fp32":
            return a.to(torch.float32), b.to(torch.float32)
        return a, b

    def qconv2d(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype):
        ops = conv("output", x, x_scale, w, w_scale, w.shape, stride, groups)
        if ops is None:
            return NotImplemented
        acc = fqt.conv2d_acc.default(*ops, stride, padding, dilation, groups)
        return _conv.output_epilogue(acc, x_scale, w_scale, bias, out_dtype)

    def qconv2d_input(g, g_scale, w, w_scale, input_size, stride, padding, dilation, groups, out_dtype):
        ops = conv("grad_input", g, g_scale, w, w_scale, w.shape, stride, groups)
        if ops is None:
            return NotImplemented
        acc = fqt.conv2d_input_acc.default(*ops, input_size, stride, padding, dilation, groups)
        return _conv.input_epilogue(acc, g_scale, w_scale, groups, out_dtype)

    def qconv2d_weight(x, x_scale, g, g_scale, weight_size, stride, padding, dilation, groups, out_dtype):
        ops = conv("grad_weight", x, x_scale, g, g_scale, weight_size, stride, groups)
        if ops is None:
            return NotImplemented
        acc = fqt.conv2d_weight_acc.default(*ops, weight_size, stride, padding, dilation, groups)
        return _conv.weight_epilogue(acc, x_scale, g_scale, weight_size, groups, out_dtype)

    def quantize_block(x, bits, dims, block, rounding, seed, stream, step):
        if x.device.type != "cpu":
            return NotImplemented
        key = fqt.stream_key.default(seed, stream, step) if rounding == "stochastic" else None
        info["inlined_quantize"] += 1
        return _block.quantize_block(x, bits, dims, block, rounding, seed=seed, step=0, stream=stream, key=key,
                                     rounder=_rounder(x))

    def block_gemm(a, a_scale, b, b_scale, block, bias, out_dtype):
        """One int8 GEMM per K-block as in the reference; the block-order fp32 sum of the scaled products is
        pointwise, so Inductor runs it as one loop over the output reading every block's int32 product."""
        name = tracker.current.name if tracker.current is not None else "?"
        if a.device.type != "cpu" or _block.block_form(a, a_scale, b, b_scale, block) is not None:
            info["kept_ops"] += 1
            info["codegen"][name] = {"device": a.device.type, "kernel": "reference", "fused": False,
                                     "reason": "float or partially quantized product"}
            return NotImplemented
        info["inlined_qgemm"] += 1
        info["codegen"][name] = {"device": "cpu", "kernel": f"inductor:block-{info['path']}", "fused": True}
        batched = a.dim() > 2 or b.dim() > 2
        return _block.block_gemm(a, a_scale, b, b_scale, block, bias, out_dtype,
                                 gemm=fqt.int_gemm.default if batched else _gemm.int_gemm)

    def rotate(x, dim, block, seed, stream, inverse):
        """The rotation as aten ops: the sign flip fuses into the loop that produces ``x`` (or, inverse, consumes the
        product), the blockwise Hadamard is one matmul; signs and Hadamard block are constants of the graph."""
        if x.device.type != "cpu":
            return NotImplemented
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # computed once, on real tensors (the Hadamard block is cached)
            signs = _rotate.random_signs(x.shape[dim], seed, stream).tolist()
            h = _rotate.hadamard(block).tolist()
        # torch.tensor of Python data: constants of the traced graph
        return _rotate.rotate_with(x, dim, torch.tensor(signs, dtype=torch.float32),
                                   torch.tensor(h, dtype=torch.float32), inverse)

    return {fqt.quantize.default: quantize, fqt.qgemm.default: qgemm, fqt.quantize_block.default: quantize_block,
            fqt.rotate.default: rotate,
            fqt.block_gemm.default: block_gemm, fqt.qconv2d.default: qconv2d,
            fqt.qconv2d_input.default: qconv2d_input, fqt.qconv2d_weight.default: qconv2d_weight}


def lower_for_inductor(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, Any]]:
    """``gm`` retraced for ``compile_fx_inner``: fqt quantizers and integer GEMMs inlined as the aten ops of their
    references (see module doc), everything else through Inductor's decomposition table, random ops through
    Inductor's ``replace_random`` pass.

    The backend traces the joint graph without Inductor's decompositions, so fqtc's passes see the same graph for
    every compiler (native LayerNorm / BatchNorm / activation backward ops included); this one pass turns the
    partitioned graph into the decomposed form Inductor lowers. Values are traced under the graph's fake mode.
    Returns the new graph and ``{"inlined_quantize", "inlined_qgemm", "kept_ops", "codegen", "path",
    "fallback_random"}``: counts, per GEMM node name the record entry ``{"device", "kernel":
    "inductor:<int_mm|fp32>" or "reference", "fused", "reason"}`` (the backend copies it into the GEMM's record),
    and whether dropout stayed an eager call (compile the graph with Inductor's ``fallback_random``)."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    # decided on real tensors before any tracing (quant/gemm.py)
    info: dict[str, Any] = {"inlined_quantize": 0, "inlined_qgemm": 0, "kept_ops": 0, "codegen": {},
                            "path": _gemm.cpu_gemm_path(), "streams": {}}
    _conv.probe_onednn_conv()  # likewise the conv path (quant/conv.py): a probe inside the trace would be traced
    register_round_codes_lowering()
    for n in gm.graph.find_nodes(op="call_function", target=fqt.quantize.default):
        if len(n.args) > 5 and n.args[3] == "stochastic":  # (x, bits, dims, rounding, seed, stream, step)
            streams = info["streams"].setdefault(n.args[4], [])
            if n.args[5] not in streams:
                streams.append(n.args[5])
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    tracker = _NodeTracker(gm)
    table = {**select_decomp_table(), **_decompositions(tracker, info)}
    # CPU dropout stays aten.native_dropout, run by Inductor as a call to the eager kernel (compile with
    # `fallback_random`): Inductor's own CPU random numbers are generated one element at a time, 188 ms of a 1 s
    # MiniLM training step for its ~10M dropout draws, where the eager kernel draws them vectorized; and the masks
    # come from torch's generator, as in eager mode
    drops = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.native_dropout.default)
    info["fallback_random"] = bool(drops) and all(
        isinstance(v := d.args[0].meta.get("val"), torch.Tensor) and v.device.type == "cpu" for d in drops)
    if info["fallback_random"]:
        table.pop(torch.ops.aten.native_dropout.default, None)
    with fake_mode, enable_python_dispatcher():
        new = make_fx(tracker.run, table, tracing_mode="real")(*vals)
    new.meta.update(gm.meta)
    # other random ops become Inductor's seeded random ops, as its joint-graph passes would do
    with V.set_fake_mode(fake_mode):
        replace_random_passes(new)
    return new, info
