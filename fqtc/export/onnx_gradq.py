"""ONNX translations of the data-dependent gradient quantizers: AQ / AQ top-k (``fqt::grad_quantize``) and BHQ
(``fqt::bhq``), each mirroring its reference in `fqtc.quant.gradq` step by step.

Both choose something from the gradient's values at run time (AQ: which groups to keep; BHQ: how to pair rows
into Householder blocks). ONNX expresses that with static shapes: sorts are ``TopK`` over all G groups (ONNX
orders equal keys by index, i.e. a stable sort, as ``torch.sort(stable=True)``), cumulative sums ``CumSum``, and
data-dependent set sizes become masks over all G positions instead of slices. The scalar decisions use float64
as the reference does. Randomness comes from the same counter-based stream as every exported SR op
(``com.fqt::CounterUniform``, ``sr="counter"``) or ``RandomUniformLike`` (``sr="random"``).
"""

from __future__ import annotations

from typing import Any, Sequence

from fqtc.export import _common
from fqtc.quant import gradq as _gradq
from fqtc.quant.rng import GOLDEN, mix32_int


def _c(value: float | int | Sequence, dtype: int, shape: Sequence[int] | None = None):
    import onnx

    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    return _common._op().Constant(value=onnx.helper.make_tensor("c", dtype, [] if shape is None else list(shape), vals))


def _ints(v: Sequence[int]):
    return _common._op().Constant(value_ints=[int(x) for x in v])


def _shape_of(x, what: str) -> list[int]:
    shape = _common._static_shape(x)
    if shape is None:
        raise NotImplementedError(f"fqtc.export_onnx: {what} needs a static input shape")
    return shape


def _uniform(like, seed: int, stream: int, step):
    """U[0, 1) per element of ``like`` (float): the counter stream (seed, step, stream) or RandomUniformLike."""
    import onnx

    o = _common
    if o._SR_MODE[0] == "counter":
        key = _c(mix32_int(seed ^ GOLDEN), onnx.TensorProto.UINT32)
        return o._fqt_opset().CounterUniform(like, o._step_key(key, step, stream))
    return o._op().RandomUniformLike(like, dtype=onnx.TensorProto.FLOAT)


def _group_stats(x, dims: Sequence[int], g: int):
    """Per group (row of `fqtc.quant.gradq.to_groups`, flattened to [G]): amax|x| and "has a non-finite value"."""
    import onnx

    op = _common._op()
    axes = _ints(dims)
    amax = op.Reshape(op.ReduceMax(op.Abs(x), axes, keepdims=1), _ints([g]))
    bad = op.Cast(op.Or(op.IsNaN(x), op.IsInf(x)), to=onnx.TensorProto.FLOAT)
    nonfinite = op.Cast(op.Reshape(op.ReduceMax(bad, axes, keepdims=1), _ints([g])), to=onnx.TensorProto.BOOL)
    return amax, nonfinite


def _sort_desc(v, n: int):
    """(values, indices) of a stable descending sort of a 1-D tensor of static length n."""
    op = _common._op()
    return op.TopK(v, _ints([n]), axis=0, largest=1, sorted=1)


# -- AQ (fqtc.quant.gradq.aq) ---------------------------------------------------------------------------------------
def _inclusion_probabilities(r64, m, g: int):
    """`fqtc.quant.gradq.inclusion_probabilities` (water-filling) on float64 ranges ``r64`` [G], budget ``m``."""
    import onnx

    op = _common._op()
    f64 = onnx.TensorProto.DOUBLE
    zero, one = _c(0.0, f64), _c(1.0, f64)
    pos = op.Greater(r64, zero)
    nz = op.ReduceSum(op.Cast(pos, to=f64), keepdims=0)
    rs, idx = _sort_desc(r64, g)
    suffix = op.CumSum(rs, _c(0, onnx.TensorProto.INT64), reverse=1)  # suffix[j] = sum(rs[j:])
    j = _c([float(i) for i in range(g)], f64, [g])
    c = op.Div(op.Sub(m, j), op.Where(op.Greater(suffix, zero), suffix, one))
    ok = op.And(op.And(op.LessOrEqual(op.Mul(c, rs), _c(1.0 + 1e-12, f64)), op.Greater(suffix, zero)), op.Less(j, m))
    j0 = op.ArgMax(op.Cast(ok, to=onnx.TensorProto.INT32), axis=0, keepdims=0)  # the first ok position
    p_sorted = op.Min(op.Where(op.Less(j, op.Cast(j0, to=f64)), one, op.Mul(op.Gather(c, j0, axis=0), rs)), one)
    p = op.ScatterElements(_c([0.0] * g, f64, [g]), idx, p_sorted, axis=0)  # p[idx] = p_sorted
    p = op.Where(op.GreaterOrEqual(m, nz), op.Cast(pos, to=f64), p)
    return op.Where(op.LessOrEqual(m, zero), _c([0.0] * g, f64, [g]), p)


def aq(x, quantizer: str, bits: int, reduce_dims: Sequence[int], rounding: str, seed: int, stream: int, step):
    """fqt::grad_quantize with ``aq`` / ``aq_topk`` -> (int8 codes, keepdim scale), as `fqtc.quant.gradq.aq`."""
    import onnx

    o = _common
    op = o._op()
    shape = _shape_of(x, f"fqt::grad_quantize ({quantizer})")
    bits, seed, stream = int(bits), int(seed), int(stream)
    dims = _gradq._norm_dims(reduce_dims, len(shape))
    _, _, g, e = _gradq._group_perm(shape, dims)
    if g == 0 or e == 0:
        raise NotImplementedError(f"fqtc.export_onnx: fqt::grad_quantize ({quantizer}) of an empty tensor {shape}")
    f64, i64 = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    k = _gradq.aq_keep_bits(bits)
    m = g * bits / k
    amax, nonfinite = _group_stats(x, dims, g)
    finite = op.Not(nonfinite)
    r64 = op.Cast(op.Where(finite, amax, _c(0.0, onnx.TensorProto.FLOAT)), to=f64)
    n_bad = op.Cast(op.ReduceSum(op.Cast(nonfinite, to=i64), keepdims=0), to=f64)
    m_finite = op.Max(op.Sub(_c(m, f64), n_bad), _c(0.0, f64))
    zeros = _c([0.0] * g, f64, [g])
    if quantizer == "aq":
        p = op.Where(finite, _inclusion_probabilities(r64, m_finite, g), _c(1.0, f64))
        # systematic sampling: one draw from the keep stream, element 0 (`_keep_stream`)
        scalar = _c(0.0, onnx.TensorProto.FLOAT)
        u = op.Cast(_uniform(scalar, seed, _gradq._keep_stream(stream), step), to=f64)
        cum = op.CumSum(p, _c(0, i64))
        prev = op.Concat(_c([0.0], f64, [1]), op.Slice(cum, _ints([0]), _ints([g - 1]), _ints([0])), axis=0)
        keep = op.Greater(op.Sub(op.Floor(op.Sub(cum, u)), op.Floor(op.Sub(prev, u))), _c(0.0, f64))
        weight = op.Where(keep, op.Div(_c(1.0, f64), op.Max(p, _c(1e-300, f64))), zeros)
    elif quantizer == "aq_topk":
        nz = op.ReduceSum(op.Cast(op.Greater(r64, _c(0.0, f64)), to=f64), keepdims=0)
        count = op.Min(op.Round(m_finite), nz)  # Python's round: half to even, as Round
        _, order = _sort_desc(r64, g)
        j = _c([float(i) for i in range(g)], f64, [g])
        kept_sorted = op.Cast(op.Less(j, count), to=f64)
        keep = op.Cast(op.ScatterElements(zeros, order, kept_sorted, axis=0), to=onnx.TensorProto.BOOL)
        keep = op.Or(keep, nonfinite)
        weight = op.Cast(keep, to=f64)
    else:
        raise NotImplementedError(f"fqtc.export_onnx: fqt::grad_quantize quantizer {quantizer!r} is not AQ")
    # kept groups: k-bit codes over the groups with SR from `stream` (gradq._codes), reweighted by 1/p in the scale
    codes, base = o._group_codes(x, k, dims, rounding, seed, stream, step)
    scale_shape = [1 if d in dims else s for d, s in enumerate(shape)]
    keep_b = op.Reshape(keep, _ints(scale_shape))  # (G,) in row-major order of the kept dims = from_groups
    codes = op.Where(keep_b, codes, _c(0, onnx.TensorProto.INT8))
    w = op.Reshape(op.Cast(weight, to=onnx.TensorProto.FLOAT), _ints(scale_shape))
    return codes, op.Where(keep_b, op.Mul(base, w), _c(1.0, onnx.TensorProto.FLOAT))


# -- BHQ (fqtc.quant.gradq.bhq_transform / bhq_apply / bhq_invert) -------------------------------------------------
def _householder_max(k64):
    """`fqtc.quant.gradq.householder_max` elementwise on float64 group sizes."""
    import onnx

    op = _common._op()
    f64 = onnx.TensorProto.DOUBLE
    one = _c(1.0, f64)
    sq = op.Sqrt(k64)
    big = op.Greater(k64, one)
    a = op.Div(one, op.Where(big, op.Sub(k64, sq), one))
    h = op.Max(op.Max(op.Div(one, sq), op.Abs(op.Sub(one, a))),
               op.Where(op.GreaterOrEqual(k64, _c(3.0, f64)), a, _c(0.0, f64)))
    return op.Where(big, h, one)


def _transform(x2, n: int):
    """`bhq_transform` on the [n, E] group matrix: (order, group) int64 [n], (v, d) float32 [n]."""
    import onnx

    op = _common._op()
    f32, f64, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    zero64, one64 = _c(0.0, f64), _c(1.0, f64)
    lam = op.ReduceMax(op.Abs(x2), _ints([1]), keepdims=0)
    bad = op.ReduceMax(op.Cast(op.Or(op.IsNaN(x2), op.IsInf(x2)), to=f32), keepdims=0)
    identity = op.Or(op.Greater(bad, _c(0.0, f32)),
                     op.Not(op.Greater(op.ReduceMax(lam, keepdims=0), _c(0.0, f32))))
    vals, rank = _sort_desc(op.Cast(lam, to=f64), n)
    # step 2: smallest z >= 1 with z * vals[n-z-1] >= sum(vals[:n-z])
    prefix = op.CumSum(vals, _c(0, i64))
    at = _c([n - z - 1 for z in range(1, n)], i64, [n - 1])
    zs = _c([float(z) for z in range(1, n)], f64, [n - 1])
    cond = op.GreaterOrEqual(op.Mul(zs, op.Gather(vals, at, axis=0)), op.Gather(prefix, at, axis=0))
    n_small = op.Add(op.ArgMax(op.Cast(cond, to=onnx.TensorProto.INT32), axis=0, keepdims=0), _c(1, i64))
    n_large = op.Sub(_c(n, i64), n_small)
    # step 3: cumulative rounding of each large row's share of the small rows (rows i >= n_large masked out)
    pos = _c(list(range(n)), i64, [n])
    large = op.Less(pos, n_large)
    vals_large = op.Where(large, vals, zero64)
    share = op.Div(op.Mul(op.Cast(n_small, to=f64), vals_large), op.ReduceSum(vals_large, keepdims=0))
    ends = op.Clip(op.Cast(op.Round(op.CumSum(share, _c(0, i64))), to=i64), _c(0, i64), n_small)
    ends = op.Where(op.Equal(pos, op.Sub(n_large, _c(1, i64))), n_small, ends)
    starts = op.Concat(_c([0], i64, [1]), op.Slice(ends, _ints([0]), _ints([n - 1]), _ints([0])), axis=0)
    sizes = op.Sub(op.Add(ends, _c(1, i64)), starts)
    # rank position p: a large row (p < n_large) is group p; small row p - n_large joins searchsorted(ends, ., right)
    small_pos = op.Sub(pos, n_large)
    le = op.And(op.LessOrEqual(op.Unsqueeze(ends, _ints([0])), op.Unsqueeze(small_pos, _ints([1]))),
                op.Unsqueeze(large, _ints([0])))
    small_group = op.ReduceSum(op.Cast(le, to=i64), _ints([1]), keepdims=0)
    pos_group = op.Where(large, pos, small_group)
    sort_key = op.Add(op.Mul(pos_group, _c(2, i64)), op.Cast(op.Not(large), to=i64))
    _, grouped = op.TopK(sort_key, _ints([n]), axis=0, largest=0, sorted=1)  # stable ascending
    order = op.Gather(rank, grouped, axis=0)
    group = op.Gather(pos_group, grouped, axis=0)
    first = op.Gather(large, grouped, axis=0)
    # step 4: Householder vectors
    k = op.Cast(op.Gather(sizes, group, axis=0), to=f64)
    rk = op.Div(one64, op.Sqrt(k))
    norm = op.Sqrt(op.Max(op.Sub(_c(2.0, f64), op.Mul(_c(2.0, f64), rk)), zero64))
    kbig = op.Greater(k, one64)
    v = op.Where(kbig, op.Div(op.Sub(rk, op.Cast(first, to=f64)), op.Where(kbig, norm, one64)), zero64)
    # step 5: diagonal scaling per group
    lam2_pos = op.Min(op.Add(n_large, starts), _c(n - 1, i64))
    multi = op.Greater(sizes, _c(1, i64))
    lam2 = op.Where(multi, op.Gather(vals, lam2_pos, axis=0), zero64)
    lam2 = op.Max(lam2, op.Mul(vals, _c(2.0 ** -20, f64)))
    kg = op.Cast(sizes, to=f64)
    third = _c(-1.0 / 3.0, f64)
    s1 = op.Pow(op.Div(vals, op.Sqrt(kg)), third)
    s2 = op.Pow(op.Div(op.Mul(lam2, _householder_max(kg)), op.Max(op.Sub(kg, one64), one64)), third)
    # torch's pow(x, -2) is 1 / (x * x)
    nrm = op.Sqrt(op.Add(op.Div(one64, op.Mul(s1, s1)), op.Div(one64, op.Mul(s2, s2))))
    s1 = op.Where(multi, op.Mul(s1, nrm), one64)
    s2 = op.Where(multi, op.Mul(s2, nrm), one64)
    d = op.Where(first, op.Gather(s1, group, axis=0), op.Gather(s2, group, axis=0))
    # a zero tensor or a non-finite one gets the identity
    order = op.Where(identity, pos, order)
    group = op.Where(identity, pos, group)
    v = op.Where(identity, _c(0.0, f32), op.Cast(v, to=f32))
    d = op.Where(identity, _c(1.0, f32), op.Cast(d, to=f32))
    return order, group, v, d


def _reflect(z, group, v, n: int, e: int):
    """`gradq._reflect`: z - 2 v (v^T z) per group; the per-group sums as ScatterElements(add), in row order."""
    import onnx

    op = _common._op()
    vc = op.Unsqueeze(v, _ints([1]))
    idx = op.Expand(op.Unsqueeze(group, _ints([1])), _ints([n, e]))
    w = op.ScatterElements(op.ConstantOfShape(_ints([n, e])), idx, op.Mul(vc, z), axis=0, reduction="add")
    return op.Sub(z, op.Mul(op.Mul(_c(2.0, onnx.TensorProto.FLOAT), vc), op.Gather(w, group, axis=0)))


def _scatter_rows(z, order, n: int, e: int):
    """out[order] = z for a permutation ``order``."""
    op = _common._op()
    idx = op.Expand(op.Unsqueeze(order, _ints([1])), _ints([n, e]))
    return op.ScatterElements(op.ConstantOfShape(_ints([n, e])), idx, z, axis=0)


def _groups(shape: list[int], reduce_dims: Sequence[int], what: str):
    """(to_groups, from_groups, dims, n, e) for ``shape`` grouped by ``reduce_dims`` (`fqtc.quant.gradq.to_groups`)."""
    op = _common._op()
    dims = _gradq._norm_dims(reduce_dims, len(shape))
    perm, inv, n, e = _gradq._group_perm(shape, dims)
    if n == 0 or e == 0:
        raise NotImplementedError(f"fqtc.export_onnx: {what} of an empty tensor {shape}")
    permuted = [shape[p] for p in perm]

    def to_groups(t):
        return op.Reshape(op.Transpose(t, perm=perm), _ints([n, e]))

    def from_groups(t):
        return op.Transpose(op.Reshape(t, _ints(permuted)), perm=inv)

    return to_groups, from_groups, dims, n, e


def _bhq_quantize(x, bits: int, reduce_dims: Sequence[int], rounding: str, seed: int, stream: int, step, what: str):
    """`fqtc.quant.gradq.bhq`: (codes, scale) of ``T x`` and the transform (order, group, v, d)."""
    import onnx

    op = _common._op()
    shape = _shape_of(x, what)
    to_groups, from_groups, dims, n, e = _groups(shape, reduce_dims, what)
    x2 = to_groups(op.Cast(x, to=onnx.TensorProto.FLOAT))
    if n < 2:  # a single row: the identity transform
        pos = _c([0], onnx.TensorProto.INT64, [1])
        order, group, v, d = pos, pos, _c([0.0], onnx.TensorProto.FLOAT, [1]), _c([1.0], onnx.TensorProto.FLOAT, [1])
    else:
        order, group, v, d = _transform(x2, n)
    dc = op.Unsqueeze(d, _ints([1]))
    # bhq_apply: rows in grouped order, scaled by D, reflected, scattered back to x's layout
    y = from_groups(_scatter_rows(_reflect(op.Mul(op.Gather(x2, order, axis=0), dc), group, v, n, e), order, n, e))
    codes, scale = _common._group_codes(y, int(bits), dims, rounding, int(seed), int(stream), step)
    return codes, scale, order, group, v, d


def _bhq_invert(y, order, group, v, d, reduce_dims: Sequence[int], what: str, shape: list[int] | None = None):
    """`fqtc.quant.gradq.bhq_invert`: D^-1 H y on the rows of ``y`` (``shape``: y's, when y is an intermediate)."""
    import onnx

    op = _common._op()
    shape = _shape_of(y, what) if shape is None else shape
    to_groups, from_groups, _, n, e = _groups(shape, reduce_dims, what)
    y2 = to_groups(op.Cast(y, to=onnx.TensorProto.FLOAT))
    z = op.Div(_reflect(op.Gather(y2, order, axis=0), group, v, n, e), op.Unsqueeze(d, _ints([1])))
    return from_groups(_scatter_rows(z, order, n, e))


def bhq(x, bits: int, reduce_dims: Sequence[int], rounding: str, seed: int, stream: int, step, amax=None) -> Any:
    """fqt::bhq -> T^-1 Q(T x) in fp32, as `fqtc.quant.gradq.bhq` + `bhq_dequantize`."""
    import onnx

    _common._no_given_amax("fqt::bhq", amax)
    op = _common._op()
    codes, scale, order, group, v, d = _bhq_quantize(x, bits, reduce_dims, rounding, seed, stream, step, "fqt::bhq")
    deq = op.Mul(op.Cast(codes, to=onnx.TensorProto.FLOAT), scale)
    return _bhq_invert(deq, order, group, v, d, reduce_dims, "fqt::bhq", _shape_of(x, "fqt::bhq"))


def bhq_quantize(x, bits: int, reduce_dims: Sequence[int], rounding: str, seed: int, stream: int, step,
                 amax=None) -> Any:
    """fqt::bhq_quantize -> (codes, scale, order, group, v, d), as `fqtc.quant.gradq.bhq`."""
    _common._no_given_amax("fqt::bhq_quantize", amax)
    return _bhq_quantize(x, bits, reduce_dims, rounding, seed, stream, step, "fqt::bhq_quantize")


def bhq_invert(y, order, group, v, d, reduce_dims: Sequence[int]) -> Any:
    """fqt::bhq_invert -> T^-1 y, as `fqtc.quant.gradq.bhq_invert`."""
    return _bhq_invert(y, order, group, v, d, reduce_dims, "fqt::bhq_invert")


__all__ = ["aq", "bhq", "bhq_invert", "bhq_quantize"]
