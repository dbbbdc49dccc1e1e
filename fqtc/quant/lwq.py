"""Latent weight quantization (LWQ): the residual codec, its codebooks and the 8-bit optimizer-state codec.

Pure tensor functions, no graph code (papers.md section 3, Fei et al., TPAMI 2025). A latent weight is stored as

    w = s * (q + r)        q: integer weight (int8, or int4 packed two per byte), the value the GEMMs use
                           r: residual in units of the integer step, r in [-1/2, 1/2), coded in L bits (2..8)
                           s: fp32 scale per row (output channel), kept with keepdim shape [C, 1, ...]

**Dual quantizer.** ``q = round(w/s)`` (round to nearest: the integer weight changes exactly when the latent
crosses a grid midpoint) and the residual ``r = w/s - q`` is coded by a stochastic non-uniform quantizer:
with magnitude levels ``0 = l_0 < l_1 < ... < l_M = 1/2`` (M = 2^(L-1)), ``|r|`` in ``[l_k, l_{k+1}]`` rounds to
``l_{k+1}`` with probability ``(|r| - l_k) / (l_{k+1} - l_k)``, so ``E[decode] = r`` exactly: updates far below
one integer step still move the weight in expectation (no frozen weights). Codes are signed L-bit integers in
``[-M, M-1]``; level ``+1/2`` is stored as a carry, ``(q + 1, -M)``, which represents the same value exactly
(the authors' code stores it as -7/16, a biased step; papers.md "defects not to copy").

**Codebooks.** `polyline_levels` is the paper's three-segment polyline (knots code M/4 <-> b1, M/2 <-> b2,
M <-> 1/2; table in papers.md), selected per tensor by the importance level ``mu`` in 0..3. `optimal_levels` is
the codebook it approximates, on our reading of the paper: residuals close to +-1/2 are about to flip the integer
weight, so give them more weight, ``w(S) = exp(3*lam*S)``; the level density minimizing the weighted stochastic
rounding variance ``integral w(S) (S - l_k)(l_{k+1} - S) dS`` is, at high resolution, proportional to
``w^(1/3)`` (Panter-Dite / Bennett), i.e. the companding curve ``S(m) = ln(1 + (m/M)(e^(lam/2) - 1)) / lam``.
Fitting ``lam`` so that ``S(M/2) = b2`` reproduces the table's other knot ``b1`` to within 0.005 (tests/quant/
test_lwq.py), which is why we believe this is the curve the polyline approximates.

**Importance level.** ``mu`` is chosen from ``rho = (grid step) / (typical per-step update)``: mu = 1, 2, 3 for
rho above three thresholds, else 0. The paper's are 16.2, 36.5, 75.8 (`PAPER_MU_THRESHOLDS`; the authors' code can
never reach mu = 3, ours can); fqtc's default, `MU_THRESHOLDS` = 250, 500, 1000, keeps the paper's doubling ladder
but starts it at updates 15x smaller, because with int4 weights the coarse-centre codebooks lost to the uniform one
at rho ~ 400 and won at rho >= 1000 (benchmarks/README.md, "Choosing the importance level").
For L != 4 bits, rho is scaled by 8/M first (the last segment's step is 2^-mu / (2M)).

**Scale refresh.** A row whose latent weight would round to +-qmax gets a new scale ``amax / (headroom * qmax)``
before encoding, so integer codes never sit saturated at +-qmax (feasibility.md section 4: without it codes
saturate and the error grows to 1.77 LSB). Saturated codes would otherwise be clipped, and a clipped residual
drifts; with the refresh the clip never fires (tests measure the saturation rate).

**Optimizer states in 8 bits** (`quantize_state`): block-wise (``STATE_BLOCK`` elements share an fp32 absmax)
with square-root companding, ``code = round(127 * sign(x) * sqrt(|x| / absmax))``, which keeps relative precision
for small values like bitsandbytes' dynamic code. Adam's second moment is stored as sqrt(v) (the authors' LLM
code stores m and sqrt(v) in 8 bits), unsigned, 255 levels.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from fqtc.quant import int4 as _int4
from fqtc.quant.rng import uniform_like

# papers.md section 3: (b1, b2) knots of the three-segment polyline per importance level mu
POLYLINE_KNOTS: dict[int, tuple[float, float]] = {
    0: (0.125, 0.25),
    1: (0.26663, 0.375),
    2: (0.37272, 0.4375),
    3: (0.43306, 0.46875),
}
# rho thresholds for mu = 1, 2, 3 (papers.md section 3, "importance guidance")
PAPER_MU_THRESHOLDS: tuple[float, float, float] = (16.2, 36.5, 75.8)
# fqtc's default: the paper's doubling ladder moved to updates 15x smaller, measured on int4 fine-tuning
# (benchmarks/README.md, "Choosing the importance level"): coarse-centre codebooks (mu >= 2) help once updates are
# below ~1/1000 of an integer step and hurt at ~1/400, where the paper's thresholds already pick mu = 3.
MU_THRESHOLDS: tuple[float, float, float] = (250.0, 500.0, 1000.0)
# Named rules accepted by the optimizers' ``mu_rule``.
MU_RULES: dict[str, tuple[float, float, float]] = {"fqtc": MU_THRESHOLDS, "paper": PAPER_MU_THRESHOLDS}
# A refreshed row's largest latent weight sits at headroom * qmax: room to grow before the next refresh.
DEFAULT_HEADROOM = 0.9
# Elements per fp32 absmax of an 8-bit optimizer state: 4/256 = 0.016 bytes/param of scales.
STATE_BLOCK = 256


# -- integer weight ---------------------------------------------------------------------------------------------
def weight_qmax(bits: int) -> int:
    """Largest integer-weight code of ``bits`` (4 or 8: the storage formats)."""
    if bits not in (4, 8):
        raise ValueError(f"LWQ integer weights are int8 or int4 (packed two per byte), got W{bits}; use W8 or W4")
    return (1 << (bits - 1)) - 1


def residual_max(lbits: int) -> int:
    """M = 2^(L-1): residual codes lie in [-M, M-1], code magnitude M is the level 1/2."""
    if isinstance(lbits, bool) or not isinstance(lbits, int) or not (2 <= lbits <= 8):
        raise ValueError(f"LWQ residual bits must be an integer from 2 to 8 (the L in 'W8A8G8L4'), got {lbits!r}")
    return 1 << (lbits - 1)


# -- codebooks --------------------------------------------------------------------------------------------------
def _check_mu(mu: int) -> None:
    if mu not in POLYLINE_KNOTS:
        raise ValueError(f"LWQ importance level mu must be 0..3, got {mu!r}")


@lru_cache(maxsize=None)
def _polyline(lbits: int, mu: int) -> tuple[float, ...]:
    m_max = residual_max(lbits)
    _check_mu(mu)
    b1, b2 = POLYLINE_KNOTS[mu]
    # knots (code, level); for L = 2 the first knot (code M/4 = 1/2) does not exist and is skipped
    knots = [(0.0, 0.0), (m_max / 4, b1), (m_max / 2, b2), (float(m_max), 0.5)]
    knots = [(c, v) for c, v in knots if c == int(c)]
    out = []
    for m in range(m_max + 1):
        for (c0, v0), (c1, v1) in zip(knots, knots[1:]):
            if c0 <= m <= c1:
                out.append(v0 + (v1 - v0) * (m - c0) / (c1 - c0))
                break
    return tuple(out)


def polyline_levels(lbits: int, mu: int) -> torch.Tensor:
    """Magnitude levels l_0..l_M (float32, l_0 = 0, l_M = 1/2) of the three-segment polyline codebook."""
    return torch.tensor(_polyline(lbits, mu), dtype=torch.float32)


@lru_cache(maxsize=None)
def importance_lambda(mu: int) -> float:
    """lam of the importance weight exp(3*lam*S) whose optimal codebook passes through the knot (M/2, b2)."""
    _check_mu(mu)
    b2 = POLYLINE_KNOTS[mu][1]
    if mu == 0:
        return 0.0

    def mid(lam: float) -> float:
        return math.log(1 + 0.5 * (math.exp(lam / 2) - 1)) / lam

    lo, hi = 1e-6, 400.0
    for _ in range(200):  # mid(lam) increases with lam: bisection
        m = 0.5 * (lo + hi)
        lo, hi = (m, hi) if mid(m) < b2 else (lo, m)
    return 0.5 * (lo + hi)


def optimal_levels(lbits: int, mu: int) -> torch.Tensor:
    """Levels of the high-resolution optimal codebook for importance ``exp(3*lam*S)`` (module docstring)."""
    m_max = residual_max(lbits)
    lam = importance_lambda(mu)
    if lam == 0.0:
        vals = [0.5 * m / m_max for m in range(m_max + 1)]
    else:
        vals = [math.log(1 + (m / m_max) * (math.exp(lam / 2) - 1)) / lam for m in range(m_max + 1)]
    vals[-1] = 0.5
    return torch.tensor(vals, dtype=torch.float32)


def weighted_sr_variance(levels: torch.Tensor, mu: int, n: int = 20000) -> float:
    """The objective the optimal codebook minimizes: mean over S in [0, 1/2] of exp(3 lam S) * SR variance."""
    lam = importance_lambda(mu)
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 0.5
    lv = levels.double()
    k = (torch.searchsorted(lv, x, right=True) - 1).clamp(0, len(lv) - 2)
    var = (x - lv[k]) * (lv[k + 1] - x)
    return float((torch.exp(3 * lam * x) * var).mean())


def mu_thresholds(rule: str | Sequence[float]) -> tuple[float, float, float]:
    """The rho thresholds of an importance-level rule: ``"fqtc"`` (default, `MU_THRESHOLDS`), ``"paper"``
    (`PAPER_MU_THRESHOLDS`) or three increasing positive numbers (rho above the k-th selects mu = k)."""
    if isinstance(rule, str):
        if rule not in MU_RULES:
            raise ValueError(f"unknown importance-level rule {rule!r}: use one of {sorted(MU_RULES)} or three "
                             "increasing positive rho thresholds, e.g. (250, 500, 1000)")
        return MU_RULES[rule]
    try:
        t = tuple(float(x) for x in rule)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3 or not all(math.isfinite(x) and x > 0 for x in t) or not t[0] < t[1] < t[2]:
        raise ValueError(f"importance-level thresholds must be three increasing positive finite numbers (rho above "
                         f"the k-th selects mu = k), got {rule!r}")
    return t  # type: ignore[return-value]


def select_mu(rho: float, lbits: int = 4, thresholds: Sequence[float] | None = None) -> int:
    """Importance level from rho = grid step / typical per-step update: the number of ``thresholds`` rho exceeds
    (None: fqtc's `MU_THRESHOLDS`; `PAPER_MU_THRESHOLDS` for the paper's); 0 for no update."""
    if not math.isfinite(rho):
        return 3 if rho > 0 else 0
    rho = rho * 8.0 / residual_max(lbits)
    return sum(rho > t for t in (MU_THRESHOLDS if thresholds is None else thresholds))


# -- packing: flattened codes, two per byte (fqtc.quant.int4) ----------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes in [-8, 7] (any shape) -> uint8 [ceil(n/2)]: `fqtc.quant.int4.pack_int4` of the flattened
    codes (element 2i in the low nibble, 2i+1 high; an odd size pads the last high nibble with 0)."""
    return _int4.pack_int4(codes.reshape(-1))


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(n/2)] -> int8 [n] signed 4-bit codes (inverse of `pack_int4`)."""
    return _int4.unpack_int4(packed, numel)


def store_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage of signed codes: packed uint8 for bits <= 4, int8 of the same shape otherwise."""
    return pack_int4(codes) if bits <= 4 else codes.to(torch.int8)


def load_codes(stored: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """int8 codes of ``shape`` from their storage (inverse of `store_codes`)."""
    if bits <= 4:
        return unpack_int4(stored, math.prod(shape)).view(*shape)
    return stored.view(*shape)


def stored_numel(shape: Sequence[int], bits: int) -> int:
    n = math.prod(shape)
    return (n + 1) // 2 if bits <= 4 else n


# -- scales -----------------------------------------------------------------------------------------------------
def row_dims(ndim: int) -> list[int]:
    """Dims reduced by a per-row (per output channel) scale: all but the first."""
    return list(range(1, ndim))


def init_scale(w: torch.Tensor, wbits: int, headroom: float = DEFAULT_HEADROOM) -> torch.Tensor:
    """Per-row scale ``amax / (headroom * qmax)`` (keepdim); all-zero rows get the smallest positive normal scale
    times qmax so they still encode exactly 0 and can grow."""
    dims = row_dims(w.dim())
    amax = w.float().abs().amax(dim=dims, keepdim=True) if dims else w.float().abs()
    s = amax / (headroom * weight_qmax(wbits))
    return torch.where(amax > 0, s, torch.full_like(s, 1e-8))


def refresh_scale(t_over_s_amax: torch.Tensor, s: torch.Tensor, wbits: int,
                  headroom: float = DEFAULT_HEADROOM) -> torch.Tensor:
    """New per-row scale: rows whose largest ``|w/s|`` would round to +-qmax grow to ``amax / (headroom*qmax)``."""
    qmax = weight_qmax(wbits)
    grow = t_over_s_amax > qmax - 0.5
    return torch.where(grow, s * t_over_s_amax / (headroom * qmax), s)


# -- encode / decode --------------------------------------------------------------------------------------------
def decode(q: torch.Tensor, rcode: torch.Tensor, s: torch.Tensor, lbits: int, mu: int) -> torch.Tensor:
    """Latent float weight ``s * (q + r)`` from int8 integer codes, int8 residual codes and the scale."""
    levels = polyline_levels(lbits, mu).to(q.device)
    m_max = residual_max(lbits)
    rc = rcode.to(torch.int64)
    r = torch.sign(rc).float() * levels[rc.abs().clamp(max=m_max)]
    return s * (q.float() + r)


def encode_residual(r: torch.Tensor, lbits: int, mu: int, u: torch.Tensor) -> torch.Tensor:
    """Stochastic non-uniform rounding of residuals r in [-1/2, 1/2] to signed codes in [-M, M] (float32).

    ``u`` ~ U[0, 1) per element (counter-based, `fqtc.quant.rng`). Unbiased: E[level(code)] = r.
    """
    levels = polyline_levels(lbits, mu).to(r.device)
    m_max = residual_max(lbits)
    mag = r.abs().clamp(max=0.5)
    k = (torch.searchsorted(levels, mag.contiguous(), right=True) - 1).clamp(0, m_max - 1)
    lo, hi = levels[k], levels[k + 1]
    p = (mag - lo) / (hi - lo)
    m = k + (u < p).to(torch.int64)
    return torch.sign(r) * m.float()


def encode(t: torch.Tensor, wbits: int, lbits: int, mu: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    """Dual quantizer on ``t = w / s``: (int8 integer codes, int8 residual codes, saturated mask).

    q = round(t) (half to even), r = t - q coded by `encode_residual`; a residual code of +M carries into q
    (``(q+1, -M)``, the same value). Values beyond the integer range are clipped: q = +-qmax and the residual is
    the clipped remainder; the returned mask marks them (the scale refresh keeps it empty).
    """
    qmax = weight_qmax(wbits)
    m_max = residual_max(lbits)
    tf = t.float()
    qf = torch.round(tf)
    sat = qf.abs() > qmax
    qf = qf.clamp(-qmax, qmax)
    r = (tf - qf).clamp(-0.5, 0.5)
    code = encode_residual(r, lbits, mu, u)
    carry = code >= m_max
    can = carry & (qf < qmax)
    qf = torch.where(can, qf + 1, qf)
    code = torch.where(can, torch.full_like(code, -m_max), code)
    code = torch.where(carry & ~can, torch.full_like(code, m_max - 1), code)  # clipped at the top
    sat = sat | (carry & ~can)
    return qf.to(torch.int8), code.to(torch.int8), sat


def encode_latent(w: torch.Tensor, s: torch.Tensor, wbits: int, lbits: int, mu: int, seed: int,
                  step: torch.Tensor | int, stream: int, refresh: bool = True,
                  headroom: float = DEFAULT_HEADROOM, index_offset: int = 0,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode a latent float weight: (int8 q, int8 residual codes, new scale, saturated mask).

    The stochastic rounding stream is keyed by (seed, step, stream) and the element index; ``index_offset`` is the
    index of ``w``'s first element in the whole parameter when ``w`` is a row shard of it, so every shard draws
    what the unsharded parameter draws for the same elements.
    """
    s_new = s
    if refresh:
        dims = row_dims(w.dim())
        t_amax = (w.float() / s).abs().amax(dim=dims, keepdim=True) if dims else (w.float() / s).abs()
        s_new = refresh_scale(t_amax, s, wbits, headroom)
    t = w.float() / s_new
    u = uniform_like(t, seed=seed, step=step, stream=stream, offset=index_offset)
    q, code, sat = encode(t, wbits, lbits, mu, u)
    return q, code, s_new, sat


# -- optimizer states in 8 bits -----------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block), pad


def quantize_state(x: torch.Tensor, signed: bool = True, block: int = STATE_BLOCK) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """8-bit block-wise square-root-companded codes of an optimizer state: (int8/uint8 codes [n], fp32 absmax)."""
    xb, pad = _blocks(x, block)
    amax = xb.abs().amax(dim=1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    levels = 127.0 if signed else 255.0
    # sqrt correctly rounded (float64, rounded once): torch's CPU fp32 sqrt is not on every code path
    c = torch.round(levels * (xb.abs() / safe).double().sqrt().float())
    if signed:
        codes = (torch.sign(xb) * c).to(torch.int8)
    else:
        codes = c.to(torch.uint8)
    codes = codes.reshape(-1)
    return (codes[: codes.numel() - pad] if pad else codes), amax.reshape(-1)


def dequantize_state(codes: torch.Tensor, amax: torch.Tensor, shape: Sequence[int],
                     block: int = STATE_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_state` (float32 of ``shape``)."""
    signed = codes.dtype == torch.int8
    levels = 127.0 if signed else 255.0
    c = codes.float()
    n = c.numel()
    pad = (-n) % block
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.view(-1, block)
    x = torch.sign(c) * (c.abs() / levels) ** 2 * amax.view(-1, 1)
    return x.reshape(-1)[:n].view(*shape)
