"""ONNX translations of the latent-weight (LWQ) ops and the optimizer-step ("update") graph.

Training graphs of a `fqtc.prepare`'d model read latent weights through ``fqt::lwq_unpack`` (int4 integer codes)
and ``fqt::lwq_dequantize`` (the latent float weight ``s*(q + r)``); both translate to standard ops below.

The update graph is one optimizer step of a `fqtc.optim` optimizer (`fqtc.optim.base.LatentOptimizer.step`)
written as a pure function of the stored tensors: `update_graph` traces it with ``make_fx`` into an FX graph of
ATen ops (the finiteness check, the step counters, the plain parameters' SGD/AdamW math) and one
``fqt::lwq_step`` per latent parameter. ``fqt::lwq_step`` is the functional form of ``fqt::lwq_update`` (which
mutates its inputs, and an ONNX graph cannot): its reference implementation runs ``fqt::lwq_update`` on copies,
so the exported graph is compared with the very op the optimizer runs. Its translation (`_lwq_step`) mirrors
``fqt::lwq_update`` (`fqtc.quant.lwq` decode -> `fqtc.ops.lwq.optimizer_math` -> importance-level re-selection ->
scale refresh -> `encode_latent`) one to one, with the residual's stochastic rounding drawn like every other
exported SR op (``com.fqt::CounterUniform`` keyed by seed, step and the parameter's stream for ``sr="counter"``,
``RandomUniformLike`` for ``sr="random"``).

Inputs and outputs of the update graph (docs/inspect_export.md):

- per latent parameter ``<p>``: ``lwq.<p>.q``, ``lwq.<p>.r``, ``lwq.<p>.s``, ``lwq.<p>.mu`` (the `LatentWeight`
  inner tensors); per plain parameter: ``param.<p>``;
- per parameter: ``grad.<p>`` (fp32, the parameter's shape), ``state.<p>.step`` (int64, the step count before this
  step) and ``state.<p>.buffers.<i>`` (``optimizer.state[p]["buffers"]``: momentum / Adam moments, fp32 or
  8-bit codes + fp32 block absmax);
- outputs: ``<input>.new`` for every input but the gradients, ``stats.<p>`` per latent parameter (the op's
  ``[mean |dw|/s, saturated fraction]``) and ``found_inf`` (a non-finite gradient leaves every tensor unchanged).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import Tensor

import fqtc.ops  # noqa: F401  (registers fqt::lwq_update)
from fqtc.export import _common
from fqtc.ops import lwq as _ops
from fqtc.quant import lwq as _lwq
from fqtc.quant.rng import GOLDEN, mix32_int

__all__ = ["LWQ_TRANSLATIONS", "lwq_step", "update_graph"]


# -- the functional update op -------------------------------------------------------------------------------------
@torch.library.custom_op("fqt::lwq_step", mutates_args=())
def lwq_step(
    q: Tensor, r: Tensor, s: Tensor, mu: Tensor, grad: Tensor, states: list[Tensor], kind: str, hparams: list[float],
    shape: list[int], wbits: int, lbits: int, seed: int, stream: int, step: Tensor, skip: Tensor, refresh: bool,
    mu_interval: int, mu_thresholds: list[float] | None = None,
) -> list[Tensor]:
    """``fqt::lwq_update`` without mutation: ``[q', r', s', mu', stats, *states']`` (same arguments)."""
    q2, r2, s2, mu2 = q.clone(), r.clone(), s.clone(), mu.clone()
    st2 = [t.clone() for t in states]
    stats = torch.ops.fqt.lwq_update.default(q2, r2, s2, mu2, grad, st2, kind, hparams, shape, wbits, lbits, seed,
                                             stream, step, skip, refresh, mu_interval, None, mu_thresholds)
    return [q2, r2, s2, mu2, stats, *st2]


@lwq_step.register_fake
def _(q, r, s, mu, grad, states, kind, hparams, shape, wbits, lbits, seed, stream, step, skip, refresh, mu_interval,
      mu_thresholds=None):
    return [torch.empty_like(q), torch.empty_like(r), torch.empty_like(s), torch.empty_like(mu),
            q.new_empty(2, dtype=torch.float32), *[torch.empty_like(t) for t in states]]


# -- onnxscript helpers ---------------------------------------------------------------------------------------------
def _c(value: float | int | Sequence, dtype: int, shape: Sequence[int] | None = None):
    """A Constant of an ONNX data type (scalar unless ``shape``)."""
    import onnx

    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    return _common._op().Constant(value=onnx.helper.make_tensor("c", dtype, [] if shape is None else list(shape),
                                                                vals))


def _f32(v: float):
    import onnx

    return _c(float(v), onnx.TensorProto.FLOAT)


def _i64(v: int):
    import onnx

    return _c(int(v), onnx.TensorProto.INT64)


def _ints(v: Sequence[int]):
    return _common._op().Constant(value_ints=[int(x) for x in v])


def load_codes(stored, bits: int, shape: Sequence[int]):
    """`fqtc.quant.lwq.load_codes`: int8 codes of ``shape`` (int4: low nibble first, two's complement)."""
    import onnx

    op = _common._op()
    if bits > 4:
        return op.Reshape(stored, _ints(shape))
    n = math.prod(shape)
    i32 = onnx.TensorProto.INT32
    p = op.Cast(stored, to=i32)
    hi = op.Div(p, _c(16, i32))  # p in [0, 255]: integer division is the shift
    lo = op.Sub(p, op.Mul(hi, _c(16, i32)))
    nib = op.Reshape(op.Concat(op.Unsqueeze(lo, _ints([1])), op.Unsqueeze(hi, _ints([1])), axis=1), _ints([-1]))
    if 2 * ((n + 1) // 2) != n:
        nib = op.Slice(nib, _ints([0]), _ints([n]), _ints([0]))
    signed = op.Where(op.GreaterOrEqual(nib, _c(8, i32)), op.Sub(nib, _c(16, i32)), nib)
    return op.Reshape(op.Cast(signed, to=onnx.TensorProto.INT8), _ints(shape))


def store_codes(codes, bits: int, n: int):
    """`fqtc.quant.lwq.store_codes`: int8 codes as they are (bits > 4) or packed two per uint8 (low nibble first)."""
    import onnx

    op = _common._op()
    if bits > 4:
        return codes
    i32 = onnx.TensorProto.INT32
    c = op.Reshape(op.Cast(codes, to=i32), _ints([-1]))
    nib = op.Where(op.Less(c, _c(0, i32)), op.Add(c, _c(16, i32)), c)  # x & 0xF of a code in [-8, 7]
    if n % 2:
        nib = op.Concat(nib, _c([0], i32, [1]), axis=0)
    pairs = op.Reshape(nib, _ints([-1, 2]))
    lo = op.Squeeze(op.Slice(pairs, _ints([0]), _ints([1]), _ints([1])), _ints([1]))
    hi = op.Squeeze(op.Slice(pairs, _ints([1]), _ints([2]), _ints([1])), _ints([1]))
    return op.Cast(op.Add(lo, op.Mul(hi, _c(16, i32))), to=onnx.TensorProto.UINT8)


def _levels(lbits: int, mu):
    """The polyline codebook of importance level ``mu`` (int64 0-d value): a row of the [4, M+1] level table."""
    import onnx

    m_max = _lwq.residual_max(lbits)
    table = [float(v) for mu_i in range(len(_lwq.POLYLINE_KNOTS)) for v in _lwq.polyline_levels(lbits, mu_i).tolist()]
    t = _c(table, onnx.TensorProto.FLOAT, [len(_lwq.POLYLINE_KNOTS), m_max + 1])
    return _common._op().Gather(t, mu, axis=0)


def decode(qc, rc, s, lbits: int, levels):
    """`fqtc.quant.lwq.decode`: ``s * (q + sign(rc) * levels[min(|rc|, M)])``."""
    import onnx

    op = _common._op()
    f32 = onnx.TensorProto.FLOAT
    idx = op.Min(op.Abs(op.Cast(rc, to=onnx.TensorProto.INT64)), _i64(_lwq.residual_max(lbits)))
    r = op.Mul(op.Sign(op.Cast(rc, to=f32)), op.Gather(levels, idx, axis=0))
    return op.Mul(s, op.Add(op.Cast(qc, to=f32), r))


def _lwq_unpack(q, shape, wbits):
    return load_codes(q, int(wbits), [int(d) for d in shape])


def _lwq_dequantize(q, r, s, mu, shape, wbits, lbits):
    import onnx

    shape = [int(d) for d in shape]
    mu64 = _common._op().Cast(mu, to=onnx.TensorProto.INT64)
    return decode(load_codes(q, int(wbits), shape), load_codes(r, int(lbits), shape), s, int(lbits),
                  _levels(int(lbits), mu64))


# -- optimizer states and math (fqtc.ops.lwq) ------------------------------------------------------------------------
def _blocks(x, n: int):
    """`fqtc.quant.lwq._blocks`: the flat tensor zero-padded to whole `STATE_BLOCK`s, as [blocks, STATE_BLOCK]."""
    import onnx

    op = _common._op()
    flat = op.Reshape(x, _ints([-1]))
    pad = (-n) % _lwq.STATE_BLOCK
    if pad:
        flat = op.Concat(flat, _c([0.0] * pad, onnx.TensorProto.FLOAT, [pad]), axis=0)
    return op.Reshape(flat, _ints([-1, _lwq.STATE_BLOCK]))


def dequantize_state(codes, amax, shape: Sequence[int], signed: bool):
    """`fqtc.quant.lwq.dequantize_state`: ``sign(c) * (|c| / levels)^2 * amax`` per block."""
    import onnx

    op = _common._op()
    n = math.prod(shape)
    c = _blocks(op.Cast(codes, to=onnx.TensorProto.FLOAT), n)
    y = op.Div(op.Abs(c), _f32(127.0 if signed else 255.0))
    x = op.Mul(op.Mul(op.Sign(c), op.Mul(y, y)), op.Reshape(amax, _ints([-1, 1])))  # torch's pow(., 2) is y*y
    x = op.Slice(op.Reshape(x, _ints([-1])), _ints([0]), _ints([n]), _ints([0]))
    return op.Reshape(x, _ints(shape))


def quantize_state(x, n: int, signed: bool):
    """`fqtc.quant.lwq.quantize_state`: (int8/uint8 codes [n], fp32 absmax per block)."""
    import onnx

    op = _common._op()
    xb = _blocks(x, n)
    amax = op.ReduceMax(op.Abs(xb), _ints([1]), keepdims=1)
    safe = op.Where(op.Greater(amax, _f32(0.0)), amax, _f32(1.0))
    c = op.Round(op.Mul(_f32(127.0 if signed else 255.0), op.Sqrt(op.Div(op.Abs(xb), safe))))
    codes = op.Cast(op.Mul(op.Sign(xb), c), to=onnx.TensorProto.INT8) if signed else \
        op.Cast(c, to=onnx.TensorProto.UINT8)
    codes = op.Slice(op.Reshape(codes, _ints([-1])), _ints([0]), _ints([n]), _ints([0]))
    return codes, op.Reshape(amax, _ints([-1]))


def _load_states(states: Sequence[Any], shape: Sequence[int]) -> tuple[list[Any], bool]:
    """`fqtc.ops.lwq._load_states`: float state values, and whether the storage is 8-bit."""
    if not states or _dtype(states[0]) in (None, "FLOAT"):
        return list(states), False
    out = []
    for i in range(0, len(states), 2):
        signed = _dtype(states[i]) == "INT8"
        x = dequantize_state(states[i], states[i + 1], shape, signed)
        if not signed:  # Adam's second moment is stored as sqrt(v)
            x = _common._op().Mul(x, x)
        out.append(x)
    return out, True


def _store_states(values: Sequence[Any], eight_bit: bool, kinds: Sequence[bool], n: int) -> list[Any]:
    """`fqtc.ops.lwq._store_states` as values: fp32 as they are, 8-bit as (codes, absmax) pairs."""
    if not eight_bit:
        return list(values)
    out = []
    for v, signed in zip(values, kinds):
        out.extend(quantize_state(v if signed else _common._op().Sqrt(v), n, signed))
    return out


def _dtype(v: Any) -> str | None:
    dt = getattr(v, "dtype", None)
    name = getattr(dt, "name", None)
    return str(name) if name is not None else None


def optimizer_math(kind: str, p, g, st: Sequence[Any], hp: Sequence[float], step):
    """`fqtc.ops.lwq.optimizer_math` (the same float ops in the same order; Python floats become fp32 constants as
    torch casts scalars to the tensor's dtype). ``step`` is the int64 step value."""
    import onnx

    op = _common._op()
    step = op.Cast(step, to=onnx.TensorProto.FLOAT)
    if kind == "sgd":
        lr, momentum, dampening, wd, nesterov = hp
        if wd != 0:
            g = op.Add(g, op.Mul(_f32(wd), p))
        if momentum != 0:
            buf = op.Where(op.LessOrEqual(step, _f32(1.0)), g,
                           op.Add(op.Mul(_f32(momentum), st[0]), op.Mul(_f32(1 - dampening), g)))
            g = op.Add(g, op.Mul(_f32(momentum), buf)) if nesterov else buf
            return op.Sub(p, op.Mul(_f32(lr), g)), [buf]
        return op.Sub(p, op.Mul(_f32(lr), g)), []
    if kind == "adamw":
        lr, b1, b2, eps, wd = hp
        f64 = onnx.TensorProto.DOUBLE
        p = op.Mul(p, _f32(1 - lr * wd))
        m = op.Add(op.Mul(st[0], _f32(b1)), op.Mul(_f32(1 - b1), g))
        v = op.Add(op.Mul(st[1], _f32(b2)), op.Mul(op.Mul(_f32(1 - b2), g), g))
        bc1 = op.Sub(_f32(1.0), op.Pow(_f32(b1), step))
        bc2 = op.Sub(_f32(1.0), op.Pow(_f32(b2), step))
        denom = op.Add(op.Div(op.Cast(op.Sqrt(op.Cast(v, to=f64)), to=onnx.TensorProto.FLOAT),
                              op.Cast(op.Sqrt(op.Cast(bc2, to=f64)), to=onnx.TensorProto.FLOAT)), _f32(eps))
        return op.Sub(p, op.Div(op.Mul(op.Div(_f32(lr), bc1), m), denom)), [m, v]
    raise NotImplementedError(f"fqtc.export_onnx: fqt::lwq_step optimizer kind {kind!r} has no ONNX translation "
                              "(translated: sgd, adamw)")


# -- encode (fqtc.quant.lwq.encode_latent) ---------------------------------------------------------------------------
def _uniform(t, seed: int, stream: int, step):
    """U[0, 1) per element of ``t`` from the same stream as
    `fqtc.quant.rng.uniform_like(t, seed=seed, step=step, stream=stream)` (``sr="counter"``) or the runtime's
    generator (``sr="random"``)."""
    import onnx

    o = _common
    op = o._op()
    if o._SR_MODE[0] == "counter":
        key = _c(mix32_int(seed ^ GOLDEN), onnx.TensorProto.UINT32)
        return o._fqt_opset().CounterUniform(t, o._step_key(key, step, stream))
    return op.RandomUniformLike(t, dtype=onnx.TensorProto.FLOAT)


def encode_residual(r, lbits: int, levels, u):
    """`fqtc.quant.lwq.encode_residual`: searchsorted as a count of levels <= |r|, then SR between neighbours."""
    import onnx

    op = _common._op()
    i64 = onnx.TensorProto.INT64
    m_max = _lwq.residual_max(lbits)
    mag = op.Min(op.Abs(r), _f32(0.5))
    below = op.Cast(op.LessOrEqual(levels, op.Unsqueeze(mag, _ints([-1]))), to=i64)
    k = op.Clip(op.Sub(op.ReduceSum(below, _ints([-1]), keepdims=0), _i64(1)), _i64(0), _i64(m_max - 1))
    lo = op.Gather(levels, k, axis=0)
    hi = op.Gather(levels, op.Add(k, _i64(1)), axis=0)
    p = op.Div(op.Sub(mag, lo), op.Sub(hi, lo))
    m = op.Add(k, op.Cast(op.Less(u, p), to=i64))
    return op.Mul(op.Sign(r), op.Cast(m, to=onnx.TensorProto.FLOAT))


def encode(t, wbits: int, lbits: int, levels, u):
    """`fqtc.quant.lwq.encode`: (int8 q, int8 residual codes, saturated mask)."""
    import onnx

    op = _common._op()
    qmax = float(_lwq.weight_qmax(wbits))
    m_max = float(_lwq.residual_max(lbits))
    qf = op.Round(t)
    sat = op.Greater(op.Abs(qf), _f32(qmax))
    qf = op.Clip(qf, _f32(-qmax), _f32(qmax))
    r = op.Clip(op.Sub(t, qf), _f32(-0.5), _f32(0.5))
    code = encode_residual(r, lbits, levels, u)
    carry = op.GreaterOrEqual(code, _f32(m_max))
    can = op.And(carry, op.Less(qf, _f32(qmax)))
    clipped = op.And(carry, op.Not(can))
    qf = op.Where(can, op.Add(qf, _f32(1.0)), qf)
    code = op.Where(can, _f32(-m_max), code)
    code = op.Where(clipped, _f32(m_max - 1), code)
    sat = op.Or(sat, clipped)
    i8 = onnx.TensorProto.INT8
    return op.Cast(qf, to=i8), op.Cast(code, to=i8), sat


def _lwq_step(q, r, s, mu, grad, states, kind, hparams, shape, wbits, lbits, seed, stream, step, skip, refresh,
              mu_interval, mu_thresholds=None):
    """fqt::lwq_step = fqt::lwq_update (fqtc/ops/lwq.py) in standard ops, line by line."""
    import onnx

    op = _common._op()
    shape = [int(d) for d in shape]
    wbits, lbits, seed, stream, mu_interval = int(wbits), int(lbits), int(seed), int(stream), int(mu_interval)
    hp = [float(h) for h in hparams]
    n = math.prod(shape)
    f32, f64, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    states = list(states)
    # decode
    mu_old = op.Cast(mu, to=i64)
    w = decode(load_codes(q, wbits, shape), load_codes(r, lbits, shape), s, lbits, _levels(lbits, mu_old))
    st, eight_bit = _load_states(states, shape)
    signed = [_dtype(states[i]) == "INT8" for i in range(0, len(states), 2)] if eight_bit else []
    w_new, st_new = optimizer_math(kind, w, op.Reshape(grad, _ints(shape)), st, hp, step)
    delta = op.Abs(op.Sub(w_new, w))
    mean_rel = op.ReduceMean(op.Div(delta, s), keepdims=0)
    # importance level: re-selected at step 1 and every mu_interval steps from rho = mean(s) / mean|dw|
    mu_new = mu_old
    if mu_interval > 0:
        md = op.Cast(op.ReduceMean(delta, keepdims=0), to=f64)
        rho = op.Where(op.Greater(md, _c(0.0, f64)), op.Div(op.Cast(op.ReduceMean(s, keepdims=0), to=f64), md),
                       _c(float("inf"), f64))
        rho = op.Div(op.Mul(rho, _c(8.0, f64)), _c(float(_lwq.residual_max(lbits)), f64))  # select_mu
        sel = op.Constant(value_int=0)
        for thr in (_lwq.MU_THRESHOLDS if mu_thresholds is None else mu_thresholds):
            sel = op.Add(sel, op.Cast(op.Greater(rho, _c(thr, f64)), to=i64))
        now = op.Or(op.Equal(step, _i64(1)), op.Equal(op.Mod(step, _i64(mu_interval)), _i64(0)))
        mu_new = op.Where(now, sel, mu_old)
    # encode_latent: scale refresh, then the dual quantizer with the residual's SR stream
    s_new = s
    if refresh:
        dims = _lwq.row_dims(len(shape))
        t_abs = op.Abs(op.Div(w_new, s))
        t_amax = op.ReduceMax(t_abs, _ints(dims), keepdims=1) if dims else t_abs
        qmax = _lwq.weight_qmax(wbits)
        s_new = op.Where(op.Greater(t_amax, _f32(qmax - 0.5)),
                         op.Div(op.Mul(s, t_amax), _f32(_lwq.DEFAULT_HEADROOM * qmax)), s)
    t = op.Div(w_new, s_new)
    qn, rn, sat = encode(t, wbits, lbits, _levels(lbits, mu_new), _uniform(t, seed, stream, step))
    stats = op.Concat(op.Reshape(mean_rel, _ints([1])),
                      op.Reshape(op.ReduceMean(op.Cast(sat, to=f32), keepdims=0), _ints([1])), axis=0)
    new = [op.Reshape(store_codes(qn, wbits, n), _ints(_static(q))), store_codes(rn, lbits, n), s_new,
           op.Cast(mu_new, to=onnx.TensorProto.UINT8), stats]
    new += _store_states(st_new, eight_bit, signed, n)
    # skip (a non-finite gradient anywhere): every tensor unchanged, zero statistics
    old = [q, r, s, mu, op.ConstantOfShape(_ints([2]))] + states
    return [op.Where(skip, o, v) for o, v in zip(old, new)]


def _static(v: Any) -> list[int]:
    shape = _common._static_shape(v)
    if shape is None:
        raise NotImplementedError("fqtc.export_onnx: fqt::lwq_step needs static shapes")
    return shape


LWQ_TRANSLATIONS = {
    torch.ops.fqt.lwq_unpack.default: _lwq_unpack,
    torch.ops.fqt.lwq_dequantize.default: _lwq_dequantize,
    torch.ops.fqt.lwq_step.default: _lwq_step,
}


# -- the update graph -------------------------------------------------------------------------------------------------
def _store_plain(states: Sequence[Tensor], values: Sequence[Tensor]) -> list[Tensor]:
    """`fqtc.ops.lwq._store_states` without mutation (8-bit: `quantize_state` pairs, Adam's v as sqrt(v))."""
    if not states or states[0].dtype == torch.float32:
        return [v.to(torch.float32) for v in values]
    out: list[Tensor] = []
    for j, i in enumerate(range(0, len(states), 2)):
        signed = states[i].dtype == torch.int8
        out.extend(_lwq.quantize_state(values[j] if signed else torch.sqrt(values[j]), signed=signed))
    return out


def update_graph(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
                 ) -> tuple[fx.GraphModule, list[Tensor], list[str], list[str]]:
    """The optimizer step of ``optimizer`` (a `fqtc.optim` optimizer) as an FX graph for export.

    Returns ``(graph module, example inputs, input names, output names)`` (module docstring). The example inputs
    are the optimizer's current tensors (fresh zero states and step 0 for a parameter it has not stepped yet) and
    each parameter's ``.grad`` (zeros where it has none); nothing of the optimizer or the model is modified.
    Parameters are named by their path in ``model`` (``p<i>`` for one the model does not own). Every parameter of
    the optimizer takes part: the graph expects a gradient for each (``opt.step()`` skips one whose ``.grad`` is
    None).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from fqtc.optim.base import LatentOptimizer
    from fqtc.optim.latent import LatentWeight

    if not isinstance(optimizer, LatentOptimizer):
        raise TypeError(f"fqtc.export_onnx: optimizer must be a fqtc.optim optimizer (SGD, AdamW), got "
                        f"{type(optimizer).__name__}; torch.optim optimizers cannot update latent weights")
    fqn = {id(p): n for n, p in (model.named_parameters() if model is not None else [])}
    entries: list[dict[str, Any]] = []
    inputs: list[Tensor] = []
    names: list[str] = []
    out_names: list[str] = []
    k = 0
    for group in optimizer.param_groups:
        hp = optimizer._hparams(group)
        for p in group["params"]:
            name = fqn.get(id(p), f"p{k}")
            k += 1
            state = optimizer.state.get(p, {})
            step = state.get("step", torch.zeros((), dtype=torch.int64))
            bufs = state.get("buffers") or _ops.state_tensors(optimizer.kind, hp, list(p.shape), group["state_bits"])
            latent = isinstance(p, LatentWeight)
            own = [p.q, p.r, p.s, p.mu] if latent else [p.detach()]
            own_names = [f"lwq.{name}.{a}" for a in "qrs"] + [f"lwq.{name}.mu"] if latent else [f"param.{name}"]
            grad = p.grad if p.grad is not None else torch.zeros(p.shape, dtype=torch.float32)
            e = {"latent": latent, "start": len(inputs), "n_own": len(own), "n_bufs": len(bufs), "hp": hp,
                 "group": group, "shape": list(p.shape)}
            if latent:
                e.update(wbits=p.wbits, lbits=p.lbits, stream=p.stream)
            entries.append(e)
            inputs += [*own, grad.detach().float(), step, *bufs]
            names += [*own_names, f"grad.{name}", f"state.{name}.step",
                      *[f"state.{name}.buffers.{i}" for i in range(len(bufs))]]
            out_names += [f"{n}.new" for n in own_names] + [f"state.{name}.step.new"]
            out_names += [f"state.{name}.buffers.{i}.new" for i in range(len(bufs))]
            if latent:
                out_names.append(f"stats.{name}")
    out_names.append("found_inf")
    kind = optimizer.kind

    def step_fn(*flat: Tensor) -> tuple[Tensor, ...]:
        # LatentOptimizer.step, functional: one finiteness flag over all gradients skips the whole step
        parts = [flat[e["start"]: e["start"] + e["n_own"] + 2 + e["n_bufs"]] for e in entries]
        grads = [pt[e["n_own"]] for pt, e in zip(parts, entries)]
        found_inf = torch.stack([~torch.isfinite(g).all() for g in grads]).any()
        keep = (~found_inf).to(torch.int64)
        outs: list[Tensor] = []
        for pt, e in zip(parts, entries):
            own, grad, step, bufs = pt[: e["n_own"]], pt[e["n_own"]], pt[e["n_own"] + 1], list(pt[e["n_own"] + 2:])
            step = step + keep
            group = e["group"]
            if e["latent"]:
                res = torch.ops.fqt.lwq_step.default(
                    *own, grad, bufs, kind, e["hp"], e["shape"], e["wbits"], e["lbits"], group["seed"], e["stream"],
                    step, found_inf, group["refresh"], group["mu_interval"], group.get("mu_thresholds"))
                outs += [*res[:4], step, *res[5:], res[4]]
            else:
                p = own[0]
                st = _ops._load_states(kind, bufs, e["shape"])
                new_p, new_st = _ops.optimizer_math(kind, p.float(), grad, st, e["hp"], step.clamp(min=1))
                new_bufs = _store_plain(bufs, new_st)
                outs += [torch.where(found_inf, p, new_p), step]
                outs += [torch.where(found_inf, b, nb) for b, nb in zip(bufs, new_bufs)]
        return (*outs, found_inf)

    with torch.no_grad():
        gm = make_fx(step_fn)(*[t.detach().clone() for t in inputs])
    return gm, [t.detach().clone() for t in inputs], names, out_names
