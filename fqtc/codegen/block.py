"""Triton kernels for block scaling: twins of `fqtc.quant.block.quantize_block` and `fqtc.quant.block.block_gemm`
(docs/kernels.md, "Block scaling"), bit for bit.

- `_quantize_block_kernel` mirrors `quantize_block`: ``x`` is viewed as a contiguous ``(B, R, C)`` array whose
  blocked dims are ``C`` (1 x b groups along the last dim), ``R`` (groups along an earlier dim, one scale per block
  of ``b`` rows of each column) or both (b x b tiles of the last two dims). A program owns whole blocks along the
  blocked dims, so each block's abs-max is a reduction in registers (``tl_numerics.nan_absmax``: NaN propagates as
  in ``block_amax``; masked-out elements load as 0, the zero padding of ``block_amax``), its scale is
  ``tl_numerics.group_scale`` (``amax / qmax`` correctly rounded, 1 for an all-zero block, NaN/Inf kept: the
  conventions of `fqtc.quant.uniform.scale_from_amax`), and the codes are ``round_codes(div_rn(x, scale))`` with
  the counter-based stream keyed by the element's row-major index in the whole tensor (`fqtc.quant.rng`).
- `_block_gemm_kernel` mirrors `block_gemm`'s integer path: one program per output tile, a K loop that steps one
  scale block (``BLOCK_K = block``) at a time: the exact int32 ``tl.dot`` of the block (the last, ragged block
  masked to 0, which adds nothing), then ``acc = acc + p.to(fp32) * (sa[:, None] * sb[None, :])`` in the
  reference's operation order (the scale outer product first), then ``+ bias`` and the cast. ``p`` converts to
  fp32 exactly (``|p| <= 256 * 128^2 < 2^24``). Launched with ``enable_fp_fusion=False`` so the compiler does not
  contract ``p * s + acc`` into an FMA, which would round once where the reference rounds twice.

What the launchers do not cover (`quantize_block_unsupported`, `block_gemm_unsupported`) the op implementations in
`fqtc.codegen.impls` run on the reference instead, counted and warned.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fqtc.codegen import tl_numerics as tn
from fqtc.codegen.gemm import GROUP_M, _batched, _interpreting, shape_class
from fqtc.quant import block as _block
from fqtc.quant.rng import GOLDEN, mix32_int
from fqtc.quant.uniform import qmax_for

# Quantize: a program holds at most TILE_ELEMS fp32 values at once (the register budget of
# `fqtc.codegen.quantize.TILE_ELEMS`). b x b tiles larger than that (b = 128, 256) are swept in chunks of
# TILE_ELEMS // b rows twice: abs-max first, then the codes (the second sweep re-reads the tile from L1/L2).
TILE_ELEMS = 8192
NUM_WARPS = 4

# GEMM tiles (BLOCK_M, BLOCK_N, num_warps) per shape class of `fqtc.codegen.gemm`; BLOCK_K is the scale block.
# Pipeline stages are chosen so (BLOCK_M + BLOCK_N) * block * stages int8 bytes stay within SMEM_BUDGET.
GEMM_CONFIGS: dict[str, tuple[int, int, int]] = {
    "large": (128, 128, 8),
    "small_m": (64, 128, 4),
    "interpreter": (64, 64, 4),
}
SMEM_BUDGET = 128 * 1024
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- quantize_block ------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_block_kernel(
    x_ptr, q_ptr, s_ptr, step_ptr,
    R, C, SR, SC, n_r, n_c, qmax, key0, stream,
    GROUP_R: tl.constexpr, PER_TILE: tl.constexpr, STOCHASTIC: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SUB_R: tl.constexpr,
):
    """Codes and compact scales of the contiguous ``(B, R, C)`` view; the scale array is ``(B, SR, SC)``.

    ``GROUP_R == 1``: 1 x ``BLOCK_C`` groups along C, one scale per row of the ``(BLOCK_R, BLOCK_C)`` tile.
    ``GROUP_R > 1``: the tile's ``BLOCK_R == GROUP_R`` rows are one block: one scale per column (groups along R),
    or with ``PER_TILE`` (``BLOCK_C`` is the block too) one scale for the whole b x b tile. Rows are
    swept ``SUB_R`` at a time; ``SINGLE`` (``SUB_R == BLOCK_R``) keeps the tile in registers between the abs-max
    and the codes."""
    pid = tl.program_id(0)
    pid_c = pid % n_c
    rest = pid // n_c
    pid_r = rest % n_r
    bid = (rest // n_r).to(tl.int64)
    key = tn.stream_key(key0, step_ptr, stream) if STOCHASTIC else 0
    x_base = bid * R * C
    s_base = bid * SR * SC
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sub = tl.arange(0, SUB_R)
    if GROUP_R == 1:
        rows = (pid_r * BLOCK_R + sub).to(tl.int64)
        rmask = rows < R
        m = rmask[:, None] & cmask[None, :]
        idx = x_base + rows[:, None] * C + cols[None, :]
        xt = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        scale = tn.group_scale(tn.nan_absmax(xt, 1), qmax)
        tl.store(s_ptr + s_base + rows * SC + pid_c, scale, mask=rmask)
        q = tn.round_codes(tl.math.div_rn(xt, scale[:, None]), qmax, idx, key, STOCHASTIC)
        tl.store(q_ptr + idx, q.to(tl.int8), mask=m)
    else:
        # abs-max per column of the block's rows (NaN-propagating; padding rows/columns load as 0)
        if SINGLE:
            rows = (pid_r * BLOCK_R + sub).to(tl.int64)
            m0 = (rows[:, None] < R) & cmask[None, :]
            x0 = tl.load(x_ptr + x_base + rows[:, None] * C + cols[None, :], mask=m0, other=0.0).to(tl.float32)
            amax = tn.nan_absmax(x0, 0)
        else:
            amax = tl.zeros((BLOCK_C,), tl.float32)
            for r0 in range(0, BLOCK_R, SUB_R):
                rows = (pid_r * BLOCK_R + r0 + sub).to(tl.int64)
                m = (rows[:, None] < R) & cmask[None, :]
                xt = tl.load(x_ptr + x_base + rows[:, None] * C + cols[None, :], mask=m, other=0.0)
                amax = tn.max_nan(amax, tn.nan_absmax(xt.to(tl.float32), 0))
        if PER_TILE:  # b x b tile: one scale
            scale2 = tn.group_scale(tn.nan_absmax(amax, 0), qmax)
            tl.store(s_ptr + s_base + pid_r.to(tl.int64) * SC + pid_c, scale2)
        else:  # groups along R: one scale per column
            scale = tn.group_scale(amax, qmax)
            tl.store(s_ptr + s_base + pid_r.to(tl.int64) * SC + cols, scale, mask=cmask)
            scale2 = scale[None, :]
        for r0 in range(0, BLOCK_R, SUB_R):
            rows = (pid_r * BLOCK_R + r0 + sub).to(tl.int64)
            m = (rows[:, None] < R) & cmask[None, :]
            idx = x_base + rows[:, None] * C + cols[None, :]
            if SINGLE:
                xt = x0
            else:
                xt = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
            q = tn.round_codes(tl.math.div_rn(xt, scale2), qmax, idx, key, STOCHASTIC)
            tl.store(q_ptr + idx, q.to(tl.int8), mask=m)


def _pow2(n: int, hi: int) -> int:
    return max(1, min(hi, triton.next_power_of_2(max(1, n))))


def block_view(shape: Sequence[int], dims: Sequence[int]) -> tuple[str, int, int, int]:
    """How the quantize kernel sees ``x``: (``"cols"`` | ``"rows"`` | ``"tiles"``, B, R, C) of its contiguous
    ``(B, R, C)`` view, blocked along C (groups along the last dim), R (groups along an earlier dim) or both (tiles
    of the last two dims).

    Raises ``NotImplementedError`` for tiles over two dims that are not the last two (no 3-D view of a contiguous
    tensor holds those blocks) and for a 0-d tensor."""
    n = len(shape)
    if n == 0:
        raise NotImplementedError("fqtc.codegen.block: a 0-d tensor has no dim to block")
    ds = _block._dims(dims, n)

    def prod(ss: Sequence[int]) -> int:
        p = 1
        for s in ss:
            p *= int(s)
        return p

    if len(ds) == 1:
        d = ds[0]
        if d == n - 1:
            return "cols", 1, prod(shape[:-1]), int(shape[-1])
        return "rows", prod(shape[:d]), int(shape[d]), prod(shape[d + 1:])
    if ds == [n - 2, n - 1]:
        return "tiles", prod(shape[:-2]), int(shape[-2]), int(shape[-1])
    raise NotImplementedError(
        f"fqtc.codegen.block: b x b tiles over dims {list(dims)} of a {n}-d tensor; the kernel tiles the last two "
        "dims only (permute the tensor so the tiled dims are trailing)")


def quantize_block_unsupported(x: torch.Tensor, dims: Sequence[int]) -> str | None:
    """Why the quantize kernel cannot take ``x`` blocked over ``dims``, else None."""
    try:
        block_view(tuple(x.shape), dims)
    except NotImplementedError as e:
        return str(e)
    if not x.dtype.is_floating_point:
        return f"input dtype {x.dtype} is not floating point"
    return None


def quantize_block(
    x: torch.Tensor,
    bits: int,
    dims: Sequence[int],
    block: int = _block.DEFAULT_BLOCK,
    rounding: str = "nearest",
    *,
    seed: int = 0,
    step: torch.Tensor | int = 0,
    stream: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fqtc.quant.block.quantize_block` (same arguments, same bits): int8 codes of ``x`` and the
    compact fp32 scale of its blocks (``fqtc.quant.block.scale_shape``)."""
    _block.check_block(block)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; allowed: nearest, stochastic")
    qmax = qmax_for(bits)
    shape = tuple(x.shape)
    kind, B, R, C = block_view(shape, dims)
    xc = x.contiguous()
    codes = torch.empty(shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(_block.scale_shape(shape, dims, block), dtype=torch.float32, device=x.device)
    if xc.numel() == 0:
        return codes, scale.fill_(1.0)
    if kind == "cols":  # 1 x b groups along C: BLOCK_R rows of one group each
        group_r, block_c = 1, block
        block_r = _pow2(R, TILE_ELEMS // block)
        sub_r = block_r
        SR, SC = R, triton.cdiv(C, block)
    elif kind == "rows":  # groups of b rows along R, BLOCK_C columns
        group_r, block_r = block, block
        block_c = _pow2(C, max(1, TILE_ELEMS // block))
        sub_r = block
        SR, SC = triton.cdiv(R, block), C
    else:  # b x b tiles
        group_r, block_r, block_c = block, block, block
        sub_r = max(1, min(block, TILE_ELEMS // block))  # read at call time: tests shrink TILE_ELEMS
        SR, SC = triton.cdiv(R, block), triton.cdiv(C, block)
    n_r, n_c = triton.cdiv(R, block_r), triton.cdiv(C, block_c)
    step_t = torch.as_tensor(step, dtype=torch.int64, device=x.device).reshape(())
    _quantize_block_kernel[(B * n_r * n_c,)](
        xc, codes, scale, step_t, R, C, SR, SC, n_r, n_c, qmax, mix32_int(seed ^ GOLDEN), stream & 0xFFFFFFFF,
        GROUP_R=group_r, PER_TILE=kind == "tiles", STOCHASTIC=rounding == "stochastic", SINGLE=sub_r == block_r,
        BLOCK_R=block_r, BLOCK_C=block_c, SUB_R=sub_r, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return codes, scale


# -- block_gemm ----------------------------------------------------------------------------------------------------
@triton.jit
def _block_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr,
    M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_sab, s_sam, s_sak, s_sbb, s_sbk, s_sbn, s_cb, s_cm, s_cn,
    s_ob, s_om, s_on,
    SA_ROW_DIV: tl.constexpr, SB_COL_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """``out = sum_j P_j * (sa_j (x) sb_j) + bias`` over K-blocks ``j`` in order (`fqtc.quant.block.block_gemm`).

    ``sa`` row ``r`` is scale row ``r // SA_ROW_DIV`` (1: per row or broadcast by stride 0; ``block``: b x b
    tiles), block ``j`` its column ``j`` (stride 0 when constant along K); ``sb`` likewise by columns."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering (as `fqtc.codegen.gemm`): GROUP programs along M walk the same B panel so it stays in L2
    width = GROUP * num_n
    first_m = (pid // width) * GROUP
    gsize = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_base = a_ptr + bid * s_ab + rm64[:, None] * s_am
    b_base = b_ptr + bid * s_bb + rn64[None, :] * s_bn
    sa_base = sa_ptr + bid * s_sab + (rm64 // SA_ROW_DIV) * s_sam
    sb_base = sb_ptr + bid * s_sbb + (rn64 // SB_COL_DIV) * s_sbn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.cdiv(K, BLOCK_K)):
        rk = j * BLOCK_K + rk0
        kmask = rk < K  # the ragged last block: masked codes are 0 and add nothing to P_j
        a = tl.load(a_base + rk[None, :].to(tl.int64) * s_ak, mask=mmask[:, None] & kmask[None, :], other=0)
        b = tl.load(b_base + rk[:, None].to(tl.int64) * s_bk, mask=kmask[:, None] & nmask[None, :], other=0)
        p = tl.dot(a, b, out_dtype=tl.int32)  # exact: |P_j| <= 256 * 128^2
        sa = tl.load(sa_base + j * s_sak, mask=mmask, other=1.0)
        sb = tl.load(sb_base + j * s_sbk, mask=nmask, other=1.0)
        acc = acc + p.to(tl.float32) * (sa[:, None] * sb[None, :])

    omask = mmask[:, None] & nmask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + bid * s_cb + rm64[:, None] * s_cm + rn64[None, :] * s_cn, mask=omask, other=0.0)
        acc = acc + bias.to(tl.float32)
    if OUT_BF16:
        out = tn.to_bf16_rne(acc)
    else:
        out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + bid * s_ob + rm64[:, None] * s_om + rn64[None, :] * s_on, out, mask=omask)


def _side_div(n: int, rows: int, block: int) -> int | None:
    """Row divisor of a scale with ``n`` entries along a GEMM dim of ``rows`` (`fqtc.quant.block._row_scale`):
    1 per row or broadcast (``n`` in (1, rows)), ``block`` per tile, None for any other count."""
    if n in (1, rows):
        return 1
    return block if n == triton.cdiv(rows, block) else None


def block_gemm_unsupported(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor,
                           b_scale: torch.Tensor | None, block: int, bias: torch.Tensor | None,
                           out_dtype: torch.dtype) -> str | None:
    """Why the block GEMM kernel cannot take these arguments, else None. The reference's dequantized-float form
    (`fqtc.quant.block.block_form`) is never a kernel case; neither are scale shapes the reference rejects."""
    why = _block.block_form(a, a_scale, b, b_scale, block)
    if why:
        return why
    if block not in _block.BLOCK_SIZES:
        return f"block size {block!r} is not one of {_block.BLOCK_SIZES}"
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        return f"operands {list(a.shape)} @ {list(b.shape)} are not a (batched) matrix product"
    if a_scale.dim() < 2 or b_scale.dim() < 2:
        return "a scale has fewer than 2 dims (the reference indexes both scale dims)"
    M, N = a.shape[-2], b.shape[-1]
    if _side_div(a_scale.shape[-2], M, block) is None or _side_div(b_scale.shape[-1], N, block) is None:
        return "a scale is neither per row/column, per tile nor broadcast along M or N"
    try:
        batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        for s in (a_scale, b_scale):
            if tuple(torch.broadcast_shapes(batch, s.shape[:-2])) != batch:
                return "a scale has batch dims the operands lack"
    except RuntimeError as e:
        return f"batch dims do not broadcast: {e}"
    if bias is not None:
        out_shape = (*batch, M, N)
        try:
            if tuple(torch.broadcast_shapes(out_shape, bias.shape)) != out_shape:
                return "bias broadcasts the output to more dims"
        except RuntimeError as e:
            return f"bias does not broadcast to the output: {e}"
    if out_dtype not in OUT_DTYPES:
        return f"output dtype {out_dtype} (the kernel writes fp32, fp16 or bf16)"
    return None


def block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton twin of `fqtc.quant.block.block_gemm` for int8 codes with block (or K-constant) scales.

    ``a`` [..., M, K], ``b`` [..., K, N] int8 (strided and broadcast batch dims allowed); ``a_scale``
    [..., M | ceil(M/block) | 1, ceil(K/block) | 1], ``b_scale`` [..., ceil(K/block) | 1, N | ceil(N/block) | 1].
    """
    why = block_gemm_unsupported(a, a_scale, b, b_scale, block, bias, out_dtype)
    if why:
        raise ValueError(f"the Triton block GEMM does not cover these arguments ({why}); use "
                         "fqtc.quant.block.block_gemm")
    M, K = a.shape[-2:]
    N = b.shape[-1]
    batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    nb = 1
    for s in batch:
        nb *= s
    dev = a.device
    a3, b3 = _batched(a, batch, M, K), _batched(b, batch, K, N)
    sa3 = _batched(a_scale, batch, *a_scale.shape[-2:])
    sb3 = _batched(b_scale, batch, *b_scale.shape[-2:])
    out = torch.empty((*batch, M, N), dtype=out_dtype, device=dev)
    o3 = out.view(nb, M, N) if out.numel() else out.reshape(nb, M, N)
    c3 = _batched(bias, batch, M, N) if bias is not None else o3
    # a size-1 scale dim is broadcast: stride 0, whatever stride the tensor reports for it
    s_sam = 0 if sa3.shape[1] == 1 else sa3.stride(1)
    s_sak = 0 if sa3.shape[2] == 1 else sa3.stride(2)
    s_sbk = 0 if sb3.shape[1] == 1 else sb3.stride(1)
    s_sbn = 0 if sb3.shape[2] == 1 else sb3.stride(2)
    if not (nb and M and N):
        return out
    if _interpreting():
        bm, bn, warps = GEMM_CONFIGS["interpreter"]
        stages = 1
    else:
        bm, bn, warps = GEMM_CONFIGS[shape_class(M)]
        stages = max(2, min(4, SMEM_BUDGET // ((bm + bn) * block)))
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), nb)
    _block_gemm_kernel[grid](
        a3, b3, sa3, sb3, c3, o3, M, N, K,
        a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
        sa3.stride(0), s_sam, s_sak, sb3.stride(0), s_sbk, s_sbn, c3.stride(0), c3.stride(1), c3.stride(2),
        o3.stride(0), o3.stride(1), o3.stride(2),
        SA_ROW_DIV=_side_div(a_scale.shape[-2], M, block), SB_COL_DIV=_side_div(b_scale.shape[-1], N, block),
        HAS_BIAS=bias is not None, OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block,
        GROUP=GROUP_M, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out
