"""Triton quantize kernels: per-tensor / per-row / per-column scales, nearest or stochastic rounding, int8 or packed
int4 codes. Reference: `fqtc.quant.uniform.quantize` (and `fqtc.codegen.reference.pack_int4` for the packed form).

Every layout the reference accepts through a contiguous 2-D view is covered: ``reduce_dims`` a suffix of the dims
(per row of ``(prod(lead), prod(reduced))``), a prefix (per column) or all dims (per tensor). The element index
that keys stochastic rounding is the row-major index of ``x``, as in `fqtc.quant.rng.uniform_like`.

Traffic (docs/kernels.md): per-row reads ``x`` once when a whole row fits one tile (``C <= MAX_BLOCK``), else twice
(amax sweep, then quantize); per-column likewise when the whole column fits one tile; per-tensor is two kernels
(partial amax over ``x``, then quantize), so ``x`` is read twice. Given the group abs-max (``amax``: the
statistic the codegen pass computes in ``x``'s producer) every layout reads ``x`` once. Writes: codes (1 B, or
0.5 B packed) + scales.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fqtc.codegen import tl_numerics as tn
from fqtc.quant.rng import GOLDEN, mix32_int
from fqtc.quant.uniform import check_amax, qmax_for

# Tuning constants. A program holds TILE_ELEMS fp32 values in registers: 8192 / (4 warps * 32 lanes) = 64 values
# per thread, the register budget Liger-Kernel's row kernels use; MAX_BLOCK bounds the single-tile (read-once)
# path for rows/columns. Interpreter cost grows with the number of programs, so big tiles also keep tests fast.
TILE_ELEMS = 8192
MAX_BLOCK = 8192
AMAX_BLOCK = 4096  # elements per program of the per-tensor partial-amax pass
NUM_WARPS = 4


@triton.jit
def _amax_partial_kernel(x_ptr, part_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tn.nan_absmax(x, 0))


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, amax_ptr, step_ptr,
    R, C, qmax, key0, stream,
    AMAX_GIVEN: tl.constexpr, PER_TENSOR: tl.constexpr, STOCHASTIC: tl.constexpr, PACK_INT4: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One scale per row of the contiguous (R, C) view (or one per tensor: ``PER_TENSOR``, amax given); a program
    owns BLOCK_R full rows. ``AMAX_GIVEN``: the group abs-max comes from ``amax_ptr`` (the producer's statistic or
    the partial-amax pass) and ``x`` is read once."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    key = tn.stream_key(key0, step_ptr, stream) if STOCHASTIC else 0
    cols0 = tl.arange(0, BLOCK_C)
    if AMAX_GIVEN:
        amax = tl.load(amax_ptr + (rows * 0 if PER_TENSOR else rows), mask=rmask, other=0.0)
    elif SINGLE:
        m0 = rmask[:, None] & (cols0[None, :] < C)
        x0 = tl.load(x_ptr + rows64[:, None] * C + cols0[None, :], mask=m0, other=0.0).to(tl.float32)
        amax = tn.nan_absmax(x0, 1)
    else:
        amax = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            m = rmask[:, None] & (cols[None, :] < C)
            xt = tl.load(x_ptr + rows64[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tn.max_nan(amax, tn.nan_absmax(xt, 1))
    scale = tn.group_scale(amax, qmax)
    if PER_TENSOR:
        tl.store(s_ptr + rows * 0, scale, mask=rmask & (rows == 0))
    else:
        tl.store(s_ptr + rows, scale, mask=rmask)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        m = rmask[:, None] & (cols[None, :] < C)
        idx = rows64[:, None] * C + cols[None, :]
        if SINGLE and not AMAX_GIVEN:
            xt = x0
        else:
            xt = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        q = tn.round_codes(tl.math.div_rn(xt, scale[:, None]), qmax, idx, key, STOCHASTIC)
        if PACK_INT4:
            half = c0 // 2 + tl.arange(0, BLOCK_C // 2)
            pm = rmask[:, None] & (half[None, :] < C // 2)
            tl.store(q_ptr + rows64[:, None] * (C // 2) + half[None, :],
                     tn.pack_int4_pairs(q, BLOCK_R, BLOCK_C), mask=pm)
        else:
            tl.store(q_ptr + idx, q.to(tl.int8), mask=m)


@triton.jit
def _quantize_cols_kernel(
    x_ptr, q_ptr, s_ptr, amax_ptr, step_ptr,
    R, C, qmax, key0, stream,
    AMAX_GIVEN: tl.constexpr, STOCHASTIC: tl.constexpr, PACK_INT4: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One scale per column of the contiguous (R, C) view; a program owns BLOCK_C full columns. ``AMAX_GIVEN``:
    the column abs-max comes from ``amax_ptr`` and ``x`` is read once."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    key = tn.stream_key(key0, step_ptr, stream) if STOCHASTIC else 0
    rows0 = tl.arange(0, BLOCK_R)
    if AMAX_GIVEN:
        amax = tl.load(amax_ptr + cols, mask=cmask, other=0.0)
    elif SINGLE:
        m0 = (rows0[:, None] < R) & cmask[None, :]
        x0 = tl.load(x_ptr + rows0.to(tl.int64)[:, None] * C + cols[None, :], mask=m0, other=0.0).to(tl.float32)
        amax = tn.nan_absmax(x0, 0)
    else:
        amax = tl.zeros((BLOCK_C,), tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = (r0 + rows0).to(tl.int64)
            m = (rows[:, None] < R) & cmask[None, :]
            xt = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tn.max_nan(amax, tn.nan_absmax(xt, 0))
    scale = tn.group_scale(amax, qmax)
    tl.store(s_ptr + cols, scale, mask=cmask)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + rows0).to(tl.int64)
        m = (rows[:, None] < R) & cmask[None, :]
        idx = rows[:, None] * C + cols[None, :]
        if SINGLE and not AMAX_GIVEN:
            xt = x0
        else:
            xt = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        q = tn.round_codes(tl.math.div_rn(xt, scale[None, :]), qmax, idx, key, STOCHASTIC)
        if PACK_INT4:
            half = pid * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
            pm = (rows[:, None] < R) & (half[None, :] < C // 2)
            tl.store(q_ptr + rows[:, None] * (C // 2) + half[None, :],
                     tn.pack_int4_pairs(q, BLOCK_R, BLOCK_C), mask=pm)
        else:
            tl.store(q_ptr + idx, q.to(tl.int8), mask=m)


def _pow2(n: int, lo: int = 2, hi: int | None = None) -> int:
    hi = MAX_BLOCK if hi is None else hi  # read at call time: tests shrink it to exercise the two-sweep path
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def layout_of(shape: Sequence[int], reduce_dims: Sequence[int]) -> tuple[str, int, int]:
    """How the kernels see ``x``: (``"tensor"`` | ``"row"`` | ``"col"``, R, C) of its contiguous 2-D view.

    Raises ``NotImplementedError`` for a reduction set that is neither a prefix nor a suffix of the dims (no 2-D
    view of a contiguous tensor groups those elements; permute ``x`` first).
    """
    n = len(shape)
    dims = sorted({d % n for d in reduce_dims}) if n else []
    numel = 1
    for s in shape:
        numel *= int(s)
    if n == 0 or dims == list(range(n)):
        last = int(shape[-1]) if n else 1
        return "tensor", numel // max(last, 1) if last else 0, last
    if dims == list(range(n - len(dims), n)):  # suffix (empty suffix: one scale per element)
        d = n - len(dims)
        lead = 1
        for s in shape[:d]:
            lead *= int(s)
        return "row", lead, numel // lead if lead else 0
    if dims == list(range(len(dims))):
        d = len(dims)
        lead = 1
        for s in shape[:d]:
            lead *= int(s)
        return "col", lead, numel // lead if lead else 0
    raise NotImplementedError(
        f"fqtc.codegen.quantize: reduce_dims={list(reduce_dims)} on shape {list(shape)} is not a prefix or suffix of "
        "the dims; the kernel needs a 2-D view. Permute the tensor so the reduced dims are leading or trailing.")


def col_block(R: int, C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the per-column kernel for an (R, C) view."""
    block_c = _pow2(C, hi=min(128, MAX_BLOCK))  # contiguous columns: 128 wide for coalesced loads
    return _pow2(R, hi=max(2, TILE_ELEMS // block_c)), block_c


def reads_twice(shape: Sequence[int], reduce_dims: Sequence[int]) -> bool:
    """True when the quantize kernel, left to compute its own statistic, reads ``x`` twice: per tensor (the
    partial-amax pass), rows longer than ``MAX_BLOCK``, columns taller than one tile. The codegen pass then
    supplies the group abs-max from ``x``'s producer instead (``amax``)."""
    kind, R, C = layout_of(shape, reduce_dims)
    if kind == "tensor":
        return R * C > 1
    if kind == "row":
        return C > _pow2(C)
    return R > col_block(R, C)[0]


def quantize(
    x: torch.Tensor,
    bits: int,
    reduce_dims: Sequence[int],
    rounding: str = "nearest",
    *,
    seed: int = 0,
    step: torch.Tensor | int = 0,
    stream: int = 0,
    pack_int4: bool = False,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fqtc.quant.uniform.quantize` (same arguments, same bits).

    ``amax``: the keepdim group abs-max (`fqtc.quant.uniform.group_amax`) from ``x``'s producer; the kernel then
    reads ``x`` exactly once for every layout (no partial-amax pass, no amax sweep).

    With ``pack_int4=True`` (``bits <= 4``, even last dim) the codes come back packed two per byte along the last
    dim, even index in the low nibble: ``fqtc.codegen.reference.pack_int4(reference_codes)``. Non-finite
    groups follow `fqtc.quant.uniform`'s policy: NaN (or Inf) scale, zero codes.
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; allowed: nearest, stochastic")
    qmax = qmax_for(bits)
    shape = tuple(x.shape)
    kind, R, C = layout_of(shape, reduce_dims)
    n = len(shape)
    dims = {d % n for d in reduce_dims} if n else set()
    sshape = tuple(1 if (i in dims or kind == "tensor") else s for i, s in enumerate(shape))
    if pack_int4:
        if bits > 4:
            raise ValueError(f"pack_int4 needs bits <= 4, got bits={bits}; use int8 codes for wider codes")
        if n == 0 or shape[-1] % 2:
            raise ValueError(f"pack_int4 packs pairs along the last dim; shape {list(shape)} has an odd last dim")
    if amax is not None:
        amax = check_amax(amax, x, list(range(n)) if kind == "tensor" else reduce_dims).contiguous().reshape(-1)
    xc = x.contiguous()
    codes = torch.empty((*shape[:-1], shape[-1] // 2) if pack_int4 else shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(sshape, dtype=torch.float32, device=x.device)
    if xc.numel() == 0:
        return codes, scale.fill_(1.0)
    step_t = torch.as_tensor(step, dtype=torch.int64, device=x.device).reshape(())
    key0 = mix32_int(seed ^ GOLDEN)
    sr = rounding == "stochastic"
    stream &= 0xFFFFFFFF
    if kind == "col":
        block_r, block_c = col_block(R, C)
        _quantize_cols_kernel[(triton.cdiv(C, block_c),)](
            xc, codes, scale, scale if amax is None else amax, step_t, R, C, qmax, key0, stream,
            AMAX_GIVEN=amax is not None, STOCHASTIC=sr, PACK_INT4=pack_int4, SINGLE=R <= block_r, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=NUM_WARPS, enable_fp_fusion=False)
        return codes, scale
    given = amax is not None
    if kind == "tensor" and not given:
        numel = xc.numel()
        nprog = triton.cdiv(numel, AMAX_BLOCK)
        part = torch.empty(nprog, dtype=torch.float32, device=x.device)
        _amax_partial_kernel[(nprog,)](xc, part, numel, BLOCK=_pow2(numel, hi=AMAX_BLOCK), num_warps=NUM_WARPS)
        amax = part.amax().reshape(1)  # nprog floats: a negligible second stage (amax propagates NaN)
    block_c = _pow2(C)
    block_r = _pow2(R, lo=1, hi=max(1, TILE_ELEMS // block_c))
    _quantize_rows_kernel[(triton.cdiv(R, block_r),)](
        xc, codes, scale, scale if amax is None else amax, step_t, R, C, qmax, key0, stream,
        AMAX_GIVEN=given or kind == "tensor", PER_TENSOR=kind == "tensor", STOCHASTIC=sr, PACK_INT4=pack_int4,
        SINGLE=C <= block_c, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return codes, scale
