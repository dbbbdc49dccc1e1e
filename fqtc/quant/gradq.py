"""Gradient quantizers: PTQ, PSQ, SCQ, BHQ (statistical-framework paper) and AQ (1-bit FQT paper).

Pure tensor functions, no graph code. Each quantizer maps a gradient ``x`` (the ``grad_output`` of a GEMM) to a
`GradQuant` ``(codes, scale, aux)`` and has a dequantization; with stochastic rounding each is **unbiased**,
E[dequant(quant(x))] = x, which makes the FQT gradient an unbiased estimator of the QAT gradient (Chen et al.,
NeurIPS 2020, Sec. 3). Every quantizer also gives an elementwise upper bound of its variance
(``*_variance_bound``), used by the tests and the variance benchmark.

Groups. A quantizer works on *groups*: the slices of ``x`` that share one scale, given like
`fqtc.quant.uniform.quantize` by ``reduce_dims`` (the dims a scale is shared over). For an ``N x C`` gradient,
``reduce_dims=[-1]`` makes one group per row (sample/token), ``[0]`` one group per column (output channel), all
dims one group (per tensor). Scales are fp32 and keepdim, so they broadcast against the codes and factor out of an
integer GEMM whenever they are constant along its reduction axis.

Randomness. Stochastic rounding draws from the counter-based generator `fqtc.quant.rng` keyed by (seed, step,
stream) and the element's row-major index in ``x``'s layout, through `fqtc.quant.uniform.round_codes`; AQ's group
sampling draws one extra number from a derived stream (`_keep_stream`).

Non-finite input. A group holding Inf/NaN gets a NaN or Inf scale and zero codes, so its dequantized values are
NaN: non-finite gradients propagate (a loss scaler sees them) instead of being silently clipped. Finite input never
produces NaN: all-zero groups get scale 1 and zero codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from fqtc.quant.rng import mix32_int, stream_key, uniform_from_index
from fqtc.quant.uniform import absmax_scale, check_amax, group_amax, qmax_for, round_to_int8, scale_from_amax

GRAD_QUANTIZERS: tuple[str, ...] = ("ptq", "psq", "scq", "bhq", "aq", "aq_topk")
AQ_KEEP_BITS = 4  # bits per kept element in AQ (official 1-bit FQT code: 4 bits, keep 1/4 of the groups)
SCALE_BITS = 32  # bits counted per stored scale (fp32) in AQ's budget


class GradQuant(NamedTuple):
    """A quantized gradient.

    Attributes:
        codes: int8 codes with ``x``'s shape (BHQ: codes of the transformed gradient ``T x``).
        scale: fp32 keepdim scale, one per group; ``codes * scale`` is the (transformed) dequantized value.
        aux: quantizer-specific tensors (BHQ: the transform; AQ: keep mask, inclusion probabilities, bits).
    """

    codes: Tensor
    scale: Tensor
    aux: dict[str, Tensor]


# -- group views -----------------------------------------------------------------------------------------------
def _norm_dims(reduce_dims: Sequence[int], ndim: int) -> list[int]:
    return sorted({d % ndim for d in reduce_dims}) if ndim else []


def _group_perm(shape: Sequence[int], reduce_dims: Sequence[int]) -> tuple[list[int], list[int], int, int]:
    """(permutation putting group dims first, its inverse, number of groups G, elements per group E)."""
    nd = len(shape)
    red = _norm_dims(reduce_dims, nd)
    keep = [d for d in range(nd) if d not in red]
    perm = keep + red
    inv = [0] * nd
    for i, p in enumerate(perm):
        inv[p] = i
    g = math.prod(shape[d] for d in keep)
    e = math.prod(shape[d] for d in red)
    return perm, inv, g, e


def to_groups(x: Tensor, reduce_dims: Sequence[int]) -> Tensor:
    """``x`` as a ``(G, E)`` matrix: one row per group of elements sharing a scale."""
    perm, _, g, e = _group_perm(x.shape, reduce_dims)
    return x.permute(perm).reshape(g, e)


def from_groups(y: Tensor, shape: Sequence[int], reduce_dims: Sequence[int]) -> Tensor:
    """Inverse of `to_groups`: a ``(G, E)`` matrix back to ``shape``."""
    perm, inv, _, _ = _group_perm(shape, reduce_dims)
    return y.reshape([shape[p] for p in perm]).permute(inv)


def _scale_shape(shape: Sequence[int], reduce_dims: Sequence[int]) -> list[int]:
    red = set(_norm_dims(reduce_dims, len(shape)))
    return [1 if d in red else s for d, s in enumerate(shape)]


def group_scale(x: Tensor, bits: int, reduce_dims: Sequence[int]) -> Tensor:
    """fp32 keepdim scale ``amax / qmax`` per group: `fqtc.quant.uniform.absmax_scale` (all-zero groups get 1,
    non-finite groups keep NaN/Inf so that a loss scaler sees them)."""
    return absmax_scale(x, bits, reduce_dims)


def _codes(y: Tensor, bits: int, rounding: str, seed: int, step: Tensor | int, stream: int) -> Tensor:
    return round_to_int8(y, qmax_for(bits), rounding, seed=seed, step=step, stream=stream)


def _uniform(x, bits, reduce_dims, rounding, seed, step, stream, amax=None) -> GradQuant:
    # amax: the keepdim group abs-max computed by the caller (the producer's statistic, docs/kernels.md)
    if amax is None:
        scale = group_scale(x, bits, reduce_dims)
    else:
        scale = scale_from_amax(check_amax(amax, x, reduce_dims), bits)
    return GradQuant(_codes(x.float() / scale, bits, rounding, seed, step, stream), scale, {})


def dequantize(q: GradQuant) -> Tensor:
    """``codes * scale`` (PTQ, PSQ, SCQ, AQ). BHQ needs `bhq_dequantize` (its inverse transform)."""
    return q.codes.float() * q.scale


def sr_variance(x: Tensor, scale: Tensor) -> Tensor:
    """Exact per-element variance of SR of ``x`` on the grid of ``scale``: s^2 f (1 - f), f = frac(x/s)."""
    y = x.float() / scale
    f = y - torch.floor(y)
    return (scale * scale * f * (1 - f)).expand_as(y)


# -- PTQ / PSQ / SCQ ------------------------------------------------------------------------------------------------
def ptq(x: Tensor, bits: int, rounding: str = "stochastic", seed: int = 0, step: Tensor | int = 0,
        stream: int = 0, amax: Tensor | None = None) -> GradQuant:
    """Per-tensor quantizer: one scale ``s = max|x| / (2^(b-1)-1)`` for the whole gradient.

    Variance bound: Var = sum_e s^2 f_e (1 - f_e) <= numel * s^2 / 4. It explodes when a few rows (samples) carry
    most of the gradient: every row pays the largest row's step.
    """
    return _uniform(x, bits, list(range(x.dim())), rounding, seed, step, stream, amax)


def psq(x: Tensor, bits: int, reduce_dims: Sequence[int] = (-1,), rounding: str = "stochastic", seed: int = 0,
        step: Tensor | int = 0, stream: int = 0, amax: Tensor | None = None) -> GradQuant:
    """Per-sample quantizer: one scale per group (default: per row of an ``N x C`` gradient, i.e. per sample).
    ``bits=1``: the two-level form, `psq_two_level`.

    Variance bound: Var <= sum_i E * s_i^2 / 4 with ``s_i = max|x_i| / (2^(b-1)-1)`` per group i of E elements,
    i.e. E/(4B^2) * sum_i R_i^2 instead of PTQ's numel/(4B^2) * max_i R_i^2.
    """
    if two_level("psq", bits):
        return psq_two_level(x, reduce_dims, rounding, seed, step, stream, amax)
    return _uniform(x, bits, reduce_dims, rounding, seed, step, stream, amax)


def two_level(quantizer: str, bits: int) -> bool:
    """True for the quantizer/bits pair that runs `psq_two_level` (PSQ at one bit): its codes are -1/+1, not the
    uniform grid's, so kernels and exports that quantize on that grid must not take it."""
    return quantizer == "psq" and bits == 1


def psq_two_level(x: Tensor, reduce_dims: Sequence[int] = (-1,), rounding: str = "stochastic", seed: int = 0,
                  step: Tensor | int = 0, stream: int = 0, amax: Tensor | None = None) -> GradQuant:
    """PSQ at one bit: two levels per group, ``±s`` with ``s = max|x_i|``, codes ``-1``/``+1``.

    The symmetric uniform grid has no two-level form (``qmax_for(1)`` gives three levels, -1/0/+1), so the 1-bit
    per-sample quantizer the 1-bit FQT paper compares AQ against (../shared/papers.md, section 2) rounds
    ``u = (x/s + 1)/2`` in [0, 1] to {0, 1} and maps it to ``2u - 1``: with SR, ``P(+1) = (1 + x/s)/2`` and
    ``E[s * code] = x`` (unbiased); nearest rounding gives the sign. The draws are `round_to_int8`'s (the same
    counter stream as every SR in fqtc). Variance: ``s^2 (1 - (x/s)^2) <= s^2`` per element.
    An all-zero group has codes 0 and scale 1; a non-finite group codes 0 and a NaN/Inf scale (the module's policy).
    ``aux["levels"]`` is 2, so `variance_bound` uses the two-level step."""
    amax = group_amax(x, reduce_dims) if amax is None else check_amax(amax, x, reduce_dims).float()
    a = scale_from_amax(amax, 2)  # qmax_for(2) = 1: the scale is the group abs-max itself (1 for all-zero groups)
    u = (x.float() / a + 1.0) * 0.5
    bit = round_to_int8(u, 1, rounding, seed=seed, step=step, stream=stream)  # 0 or 1 (u in [0, 1])
    finite = (amax > 0) & (amax < math.inf)  # all-zero and non-finite groups keep zero codes
    codes = torch.where(finite, bit * 2 - 1, torch.zeros_like(bit)).to(torch.int8)
    return GradQuant(codes, a, {"levels": torch.tensor(2)})


def scq_reduce_dims(role: str, ndim: int) -> list[int]:
    """SCQ grouping (1-bit FQT paper): samples (rows) for ``grad_input``, output channels (columns) for
    ``grad_weight`` — in both cases the scales are constant along the GEMM's reduction axis."""
    if role == "grad_input":
        return [ndim - 1]
    if role == "grad_weight":
        return list(range(ndim - 1))
    raise ValueError(f"scq: role must be 'grad_input' or 'grad_weight', got {role!r}")


def scq(x: Tensor, bits: int, role: str, rounding: str = "stochastic", seed: int = 0, step: Tensor | int = 0,
        stream: int = 0) -> GradQuant:
    """Sample-channel joint quantizer: per-sample scales for ``grad_input``, per-channel for ``grad_weight``.

    Variance bound: as PSQ over the role's groups, Var <= sum_i E * s_i^2 / 4.
    """
    return _uniform(x, bits, scq_reduce_dims(role, x.dim()), rounding, seed, step, stream)


def uniform_variance_bound(x: Tensor, q: GradQuant) -> Tensor:
    """Elementwise variance of PTQ/PSQ/SCQ under SR given the scales used: s^2 f(1-f) <= s^2/4 (exact, not a
    worst case; a non-finite group yields NaN)."""
    return sr_variance(x, q.scale)


# -- BHQ -----------------------------------------------------------------------------------------------------------
def householder_max(k: int) -> float:
    """max |H_k[i, j]| of the reflection mapping e_1 onto 1/sqrt(k) (closed form of its three entry values)."""
    if k <= 1:
        return 1.0
    a = 1.0 / (k - math.sqrt(k))  # H[i, j] = delta_ij - a for i, j >= 2; H[0, j] = H[j, 0] = 1/sqrt(k)
    return max(1.0 / math.sqrt(k), abs(1.0 - a), a if k >= 3 else 0.0)


def bhq_transform(x: Tensor, reduce_dims: Sequence[int] = (-1,), amax: Tensor | None = None) -> dict[str, Tensor]:
    """Build the block-Householder transform T = H_k D per group of rows (StatQuant's construction, papers.md).

    Rows are the groups of ``reduce_dims`` (default: samples). With ``lam`` the rows' ranges (``max|x_i|``: fqtc's
    quantizer is symmetric, the official one uses max - min):

    1. rank rows by ``lam`` descending;
    2. split: the small set grows from the bottom while ``#small * lam_next / sum(remaining) < 1``;
    3. large row i gets a run of small rows proportional to ``lam_i / sum(lam_large)`` (cumulative rounding);
    4. within a group of size k, ``H_k = I - 2 v v^T`` with v the unit vector along ``1/sqrt(k) - e_1``: it maps the
       large row evenly onto all k rows; H_k is symmetric and orthogonal;
    5. diagonal D: large row ``s1 = (lam_1/sqrt(k))^(-1/3)``, small rows ``s2 = (lam_2 max|H_k| / (k-1))^(-1/3)``
       (lam_2: the group's largest small row), normalized so ``||(1/s1, 1/s2)|| = 1``.

    Returns ``aux``: ``order`` (G,) row index at each position of the grouped order, ``group`` (G,) group id per
    position, ``v`` (G,) Householder vector entries, ``d`` (G,) diagonal entries. A zero tensor, a single row or a
    non-finite input gets the identity (a non-finite row would spread through the reflection into its group).

    ``amax``: the rows' ranges as the keepdim group abs-max, when the caller has them (the codegen pass computes
    them in ``x``'s producer, docs/kernels.md); then the construction reads only these G scalars, never ``x``.
    A row range is non-finite exactly when its row is (abs-max propagates NaN and Inf).
    """
    x2 = to_groups(x.float(), reduce_dims)
    n = x2.shape[0]
    dev = x2.device
    ident = {"order": torch.arange(n, device=dev), "group": torch.arange(n, device=dev),
             "v": torch.zeros(n, device=dev), "d": torch.ones(n, device=dev)}
    if amax is not None:
        lam = to_groups(check_amax(amax, x, reduce_dims), reduce_dims).reshape(n)
    else:
        lam = x2.abs().amax(dim=1) if x2.shape[1] else torch.zeros(n, device=dev)
    if n < 2 or not bool(torch.isfinite(lam).all()) or not bool((lam > 0).any()):
        return ident
    lam64 = lam.double()
    vals, rank = torch.sort(lam64, descending=True, stable=True)
    # step 2: smallest z >= 1 with z * vals[n-z-1] >= sum(vals[:n-z]); z = n-1 always qualifies (vals[0] > 0)
    prefix = torch.cumsum(vals, 0)  # prefix[m-1] = sum(vals[:m])
    z = torch.arange(1, n, device=dev, dtype=torch.float64)
    zi = torch.arange(1, n, device=dev)
    cond = z * vals[n - zi - 1] >= prefix[n - zi - 1]
    n_small = int(zi[cond][0])
    n_large = n - n_small
    # step 3: cumulative rounding of each large row's share of the small rows
    share = n_small * vals[:n_large] / vals[:n_large].sum()
    ends = torch.round(torch.cumsum(share, 0)).long().clamp_(0, n_small)
    ends[-1] = n_small
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    sizes = 1 + ends - starts  # group size k per large row
    # grouped order: large row i, then its small rows (rank positions n_large + starts[i] ... n_large + ends[i] - 1)
    small_pos = torch.arange(n_small, device=dev)
    small_group = torch.searchsorted(ends, small_pos, right=True)
    pos_group = torch.cat([torch.arange(n_large, device=dev), small_group])
    pos_first = torch.cat([torch.ones(n_large, dtype=torch.bool, device=dev),
                           torch.zeros(n_small, dtype=torch.bool, device=dev)])
    sort_key = pos_group * 2 + (~pos_first).long()  # large row first within its group, small rows keep rank order
    grouped = torch.sort(sort_key, stable=True).indices
    order = rank[grouped]
    group = pos_group[grouped]
    first = pos_first[grouped]
    k = sizes[group].double()
    # step 4: v = (1/sqrt(k) - e_1) / ||.||, ||1/sqrt(k) - e_1||^2 = 2 - 2/sqrt(k); k = 1 -> v = 0 (H = I)
    rk = 1.0 / torch.sqrt(k)
    norm = torch.sqrt(torch.clamp(2.0 - 2.0 * rk, min=0.0))
    v = torch.where(k > 1, (rk - first.double()) / torch.where(k > 1, norm, torch.ones_like(norm)),
                    torch.zeros_like(k))
    # step 5: diagonal scaling per group
    lam1 = vals[:n_large]
    lam2_pos = (n_large + starts).clamp(max=n - 1)
    lam2 = torch.where(sizes > 1, vals[lam2_pos], torch.zeros_like(lam1))
    lam2 = torch.maximum(lam2, lam1 * 2.0 ** -20)  # zero small rows: keep D finite (any positive s2 is exact)
    hmax = torch.tensor([householder_max(int(s)) for s in sizes.tolist()], dtype=torch.float64, device=dev)
    kg = sizes.double()
    s1 = (lam1 / torch.sqrt(kg)) ** (-1.0 / 3.0)
    s2 = (lam2 * hmax / torch.clamp(kg - 1, min=1.0)) ** (-1.0 / 3.0)
    nrm = torch.sqrt(s1 ** -2 + s2 ** -2)
    s1 = torch.where(sizes > 1, s1 * nrm, torch.ones_like(s1))
    s2 = torch.where(sizes > 1, s2 * nrm, torch.ones_like(s2))
    d = torch.where(first, s1[group], s2[group])
    return {"order": order, "group": group, "v": v.float(), "d": d.float()}


def _reflect(z: Tensor, group: Tensor, v: Tensor) -> Tensor:
    """H z for the block-diagonal H in grouped order, as rank-1 updates: z - 2 v (v^T z) per group, O(G E)."""
    w = torch.zeros(int(group.max()) + 1 if group.numel() else 0, z.shape[1], dtype=z.dtype, device=z.device)
    w.index_add_(0, group, v[:, None] * z)
    return z - 2.0 * v[:, None] * w[group]


def bhq_apply(x: Tensor, aux: dict[str, Tensor], reduce_dims: Sequence[int] = (-1,)) -> Tensor:
    """T x: rows gathered into grouped order, scaled by D, reflected; row p of the result lands on row order[p]."""
    x2 = to_groups(x.float(), reduce_dims)
    z = _reflect(x2[aux["order"]] * aux["d"][:, None], aux["group"], aux["v"])
    out = torch.empty_like(x2)
    out[aux["order"]] = z
    return from_groups(out, x.shape, reduce_dims)


def bhq_invert(y: Tensor, aux: dict[str, Tensor], reduce_dims: Sequence[int] = (-1,)) -> Tensor:
    """T^-1 y = D^-1 H y (H is its own inverse)."""
    y2 = to_groups(y.float(), reduce_dims)
    z = _reflect(y2[aux["order"]], aux["group"], aux["v"]) / aux["d"][:, None]
    out = torch.empty_like(y2)
    out[aux["order"]] = z
    return from_groups(out, y.shape, reduce_dims)


def bhq(x: Tensor, bits: int, reduce_dims: Sequence[int] = (-1,), rounding: str = "stochastic", seed: int = 0,
        step: Tensor | int = 0, stream: int = 0, amax: Tensor | None = None) -> GradQuant:
    """Block Householder quantizer: codes and per-row scales of ``T x``; ``bhq_dequantize`` returns
    ``T^-1 Q(T x)``, unbiased because T is linear and Q is.

    Variance bound (per element of row a, group g, before the inverse the transformed row r has SR variance
    sigma_r^2 <= E s_r^2/4): Var(xhat_a) <= (1/d_a^2) sum_{r in g} H_ar^2 sigma_r^2 (see `bhq_variance_bound`).
    With one dominant row of range lam_1 spread over k rows this is about lam_1^2/k per element instead of PSQ's
    lam_1^2: the gain grows with the number of small rows a large row is paired with.
    """
    aux = bhq_transform(x, reduce_dims, amax)
    q = _uniform(bhq_apply(x, aux, reduce_dims), bits, reduce_dims, rounding, seed, step, stream)
    return GradQuant(q.codes, q.scale, aux)


def bhq_dequantize(q: GradQuant, reduce_dims: Sequence[int] = (-1,)) -> Tensor:
    return bhq_invert(q.codes.float() * q.scale, q.aux, reduce_dims)


def bhq_variance_bound(x: Tensor, q: GradQuant, reduce_dims: Sequence[int] = (-1,)) -> Tensor:
    """Elementwise variance of ``bhq_dequantize(q)`` (exact for SR given the transform).

    Var(xhat_{a,e}) = (1/d_a^2) sum_r H_ar^2 var_{r,e}, H_ar = delta_ar - 2 v_a v_r, so with the per-element SR
    variances var_{r,e} of the transformed tensor: (var_a - 4 v_a^2 var_a + 4 v_a^2 sum_r v_r^2 var_r) / d_a^2.
    """
    aux = q.aux
    y = bhq_apply(x, aux, reduce_dims)
    var = to_groups(sr_variance(y, q.scale), reduce_dims)[aux["order"]]
    v, d, group = aux["v"][:, None], aux["d"][:, None], aux["group"]
    acc = torch.zeros(int(group.max()) + 1, var.shape[1], dtype=var.dtype, device=var.device)
    acc.index_add_(0, group, v * v * var)
    out_g = (var - 4 * v * v * var + 4 * v * v * acc[group]) / (d * d)
    out = torch.empty_like(out_g)
    out[aux["order"]] = out_g
    return from_groups(out, x.shape, reduce_dims)


# -- AQ ------------------------------------------------------------------------------------------------------------
def _keep_stream(stream: int) -> int:
    return mix32_int(stream ^ 0x68E31DA4)


def aq_keep_bits(bits: int) -> int:
    """Bits per kept element: `AQ_KEEP_BITS` for an average below it, else ``bits`` (every group kept)."""
    return AQ_KEEP_BITS if bits < AQ_KEEP_BITS else bits


def inclusion_probabilities(r: Tensor, m: float) -> Tensor:
    """p_i = min(1, c r_i) with c chosen so sum p_i = m (water-filling); groups with r_i = 0 get p_i = 0.

    Proportional to the range: the variance-minimizing choice for a budget of m kept groups (up to the cap).
    """
    r = r.double()
    nz = int((r > 0).sum())
    if m <= 0:  # no budget left (e.g. non-finite groups, always kept, used it up)
        return torch.zeros_like(r)
    if m >= nz:
        return (r > 0).double()
    rs, idx = torch.sort(r, descending=True)
    suffix = torch.flip(torch.cumsum(torch.flip(rs, [0]), 0), [0])  # suffix[j] = sum(rs[j:])
    j = torch.arange(r.numel(), device=r.device, dtype=torch.float64)
    c = (m - j) / torch.where(suffix > 0, suffix, torch.ones_like(suffix))
    ok = (c * rs <= 1.0 + 1e-12) & (suffix > 0) & (j < m)
    j0 = int(torch.nonzero(ok)[0])
    p_sorted = torch.where(j < j0, torch.ones_like(rs), c[j0] * rs).clamp_(max=1.0)
    p = torch.empty_like(p_sorted)
    p[idx] = p_sorted
    return p


def aq(x: Tensor, bits: int, reduce_dims: Sequence[int] = (-1,), rounding: str = "stochastic", seed: int = 0,
       step: Tensor | int = 0, stream: int = 0, sampling: str = "proportional") -> GradQuant:
    """Average-bit quantizer: keep about ``bits / k`` of the groups at k = `aq_keep_bits` bits, drop the rest.

    ``sampling="proportional"`` (default, unbiased): group i is kept with probability p_i proportional to its range
    (`inclusion_probabilities`, expected count m = G * bits / k) by systematic sampling (one uniform draw: each
    group is kept with probability exactly p_i, and the count is floor(m) or ceil(m), so the budget holds on every
    call, not only on average); a kept group is quantized per group with SR and reweighted by 1/p_i, folded into
    its scale. ``sampling="topk"``: the official code's deterministic top-m groups by range, no reweighting
    (biased).

    Variance bound (proportional): Var(xhat_{i,e}) <= (1 - p_i)/p_i * x_{i,e}^2 + s_i^2 / (4 p_i) for p_i > 0, and
    0 for p_i = 0 (then x_i = 0), with s_i = max|x_i| / (2^(k-1)-1) (`aq_variance_bound`).

    Bits (`aq_bits`): k bits per kept element + `SCALE_BITS` per kept group + 1 keep-mask bit per group; on average
    ``bits + (SCALE_BITS * m + G) / numel`` per element.
    """
    if sampling not in ("proportional", "topk"):
        raise ValueError(f"aq: sampling must be 'proportional' or 'topk', got {sampling!r}")
    k = aq_keep_bits(bits)
    x2 = to_groups(x.float(), reduce_dims)
    g = x2.shape[0]
    m = g * bits / k
    amax = x2.abs().amax(dim=1) if x2.shape[1] else torch.zeros(g, device=x.device)
    finite = torch.isfinite(x2).all(dim=1)
    r = torch.where(finite, amax, torch.zeros_like(amax))
    m_finite = max(0.0, m - float((~finite).sum()))
    if sampling == "proportional":
        p = inclusion_probabilities(r, m_finite)
        p = torch.where(finite, p, torch.ones_like(p))  # non-finite groups are kept so they propagate
        u = uniform_from_index(torch.zeros((), dtype=torch.int64, device=x.device),
                               stream_key(seed, step, _keep_stream(stream)).to(x.device)).double()
        cum = torch.cumsum(p, 0)
        keep = (torch.floor(cum - u) - torch.floor(torch.cat([cum.new_zeros(1), cum[:-1]]) - u)) > 0
        weight = torch.where(keep, 1.0 / p.clamp(min=1e-300), torch.zeros_like(p))
    else:
        count = min(int(round(m_finite)), int((r > 0).sum()))
        keep = torch.zeros(g, dtype=torch.bool, device=x.device)
        keep[torch.sort(r, descending=True, stable=True).indices[:count]] = True
        keep |= ~finite
        p = keep.double()
        weight = keep.double()
    base = group_scale(x, k, reduce_dims)
    codes = _codes(x.float() / base, k, rounding, seed, step, stream)
    keep_b = from_groups(keep[:, None], _scale_shape(x.shape, reduce_dims), reduce_dims)
    codes = torch.where(keep_b, codes, torch.zeros_like(codes))
    w = from_groups(weight.float()[:, None], _scale_shape(x.shape, reduce_dims), reduce_dims)
    scale = torch.where(keep_b, base * w, torch.ones_like(base))  # dropped groups: zero codes, scale 1
    aux = {"keep": keep, "p": p, "keep_bits": torch.tensor(k), "avg_bits": torch.tensor(float(bits))}
    return GradQuant(codes, scale, aux)


def aq_variance_bound(x: Tensor, q: GradQuant, reduce_dims: Sequence[int] = (-1,)) -> Tensor:
    """Elementwise variance of proportional AQ: (1 - p)/p * x^2 + s^2 f(1-f)/p <= (1 - p)/p * x^2 + s^2/(4 p)."""
    k = int(q.aux["keep_bits"])
    p = from_groups(q.aux["p"].float()[:, None], _scale_shape(x.shape, reduce_dims), reduce_dims)
    sr = sr_variance(x, group_scale(x, k, reduce_dims))  # exact SR variance of a kept group, <= s^2/4
    xf = x.float()
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, (1 - p) / safe * xf * xf + sr / safe, torch.zeros_like(xf))


def aq_bits(q: GradQuant) -> dict[str, float]:
    """Honest bit count of one AQ result: codes of kept groups + their scales + the keep mask."""
    keep = q.aux["keep"]
    g = keep.numel()
    e = q.codes.numel() // max(g, 1)
    kept = int(keep.sum())
    k = int(q.aux["keep_bits"])
    total = kept * e * k + kept * SCALE_BITS + g
    return {"code_bits": kept * e * k, "scale_bits": kept * SCALE_BITS, "mask_bits": g, "kept_groups": kept,
            "groups": g, "bits_per_element": total / max(q.codes.numel(), 1)}


# -- dispatch ------------------------------------------------------------------------------------------------------
AMAX_QUANTIZERS = ("ptq", "psq", "scq", "bhq")  # quantizers built on a group abs-max a caller can supply


def grad_quantize(x: Tensor, quantizer: str, bits: int, reduce_dims: Sequence[int], rounding: str = "stochastic",
                  seed: int = 0, step: Tensor | int = 0, stream: int = 0, amax: Tensor | None = None) -> GradQuant:
    """Run a named gradient quantizer over the groups of ``reduce_dims`` (the lowering chooses them per role).

    ``amax``: the keepdim group abs-max of ``x`` (per tensor for PTQ, over ``reduce_dims`` otherwise) computed by
    the caller, for the quantizers in `AMAX_QUANTIZERS`."""
    if amax is not None and quantizer not in AMAX_QUANTIZERS:
        raise ValueError(f"gradient quantizer {quantizer!r} does not take a precomputed amax (its scale is not one "
                         f"group abs-max); only {', '.join(AMAX_QUANTIZERS)} do: pass amax=None")
    if quantizer == "ptq":
        return ptq(x, bits, rounding, seed, step, stream, amax)
    if quantizer == "psq":
        return psq(x, bits, reduce_dims, rounding, seed, step, stream, amax)
    if quantizer == "scq":
        return _uniform(x, bits, reduce_dims, rounding, seed, step, stream, amax)
    if quantizer == "aq":
        return aq(x, bits, reduce_dims, rounding, seed, step, stream)
    if quantizer == "aq_topk":
        return aq(x, bits, reduce_dims, rounding, seed, step, stream, sampling="topk")
    if quantizer == "bhq":
        return bhq(x, bits, reduce_dims, rounding, seed, step, stream, amax)
    raise ValueError(f"unknown gradient quantizer {quantizer!r}; allowed: {', '.join(GRAD_QUANTIZERS)}")


def grad_dequantize(q: GradQuant, quantizer: str, reduce_dims: Sequence[int]) -> Tensor:
    return bhq_dequantize(q, reduce_dims) if quantizer == "bhq" else dequantize(q)


def variance_bound(x: Tensor, q: GradQuant, quantizer: str, reduce_dims: Sequence[int]) -> Tensor:
    """Elementwise variance bound of a quantizer's result (AQ top-k is biased: its bound is not defined)."""
    if quantizer == "psq" and "levels" in q.aux:  # SR on the grid of step 2s through -s: sr_variance of x + s
        return sr_variance(x.float() + q.scale, 2 * q.scale)
    if quantizer in ("ptq", "psq", "scq"):
        return uniform_variance_bound(x, q)
    if quantizer == "bhq":
        return bhq_variance_bound(x, q, reduce_dims)
    if quantizer == "aq":
        return aq_variance_bound(x, q, reduce_dims)
    raise ValueError(f"no variance bound for {quantizer!r} (aq_topk is biased)")
