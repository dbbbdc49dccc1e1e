"""Triton integer GEMM ``int8 x int8 -> int32`` with scales, bias and the output cast in the epilogue, optionally
with the activation quantization fused into the prologue and a requantization of the output fused into the
epilogue. References: `fqtc.quant.gemm.scaled_gemm`, `fqtc.quant.uniform.quantize`,
`fqtc.codegen.reference.qgemm_requant`.

One kernel, specialised by constexpr flags:

- ``A_MODE=0``: ``a`` holds int8 codes with a per-row (or per-tensor) scale: the plain `scaled_gemm`.
- ``A_MODE=1``: ``a`` is fp32/fp16/bf16 with a per-tensor amax computed beforehand (by ``a``'s producer, or a
  partial-amax pass when none is given); the prologue quantizes each tile in registers (nearest or stochastic)
  before ``tl.dot``.
- ``A_MODE=2``: ``a`` is floating point with one scale per row (token): each program first sweeps its
  ``BLOCK_M x K`` row slab for the row amax, then quantizes tiles in the main loop. The slab is the one the main
  loop reads next, so under the GEMM traffic model (each operand fetched from DRAM once, re-reads served by L2;
  docs/kernels.md) the sweep adds L2 traffic only.
- ``A_MODE=3``: as 2, with the row amax given (the producer's statistic): no sweep.
- ``REQUANT=1``: the epilogue quantizes the output rows (one scale per row, nearest or stochastic) and writes int8
  codes + scales for the next GEMM; needs the whole row in one tile (``N <= MAX_REQUANT_N``).

The prologue writes the activation codes and scales (the programs of the first N-tile column only) because the
backward ``grad_weight`` GEMM reads them; the fused op therefore returns them.

Epilogue order matches the reference exactly: ``((acc_fp32 * sa) * sb) + bias`` then the cast, launched with
``enable_fp_fusion=False`` so no FMA contraction changes the rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from fqtc.codegen import tl_numerics as tn
from fqtc.codegen.tuning import BucketTuner, autotune_enabled, bucket
from fqtc.quant.gemm import scale_along_k
from fqtc.quant.rng import GOLDEN, mix32_int
from fqtc.quant.uniform import check_amax, qmax_for

# Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), the default of each shape class:
# - large: 128x128x64, 4 stages, 8 warps: the Triton matmul tutorial's int8 configs for H100-class GPUs;
# - small M (decode / tiny batches): 64x128x64 keeps more programs in flight;
# - the interpreter uses 64^3 tiles: 6x faster than 32^3 at n=128 in the measurements of docs/kernels.md.
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "large": (128, 128, 64, 4, 8),
    "small_m": (64, 128, 64, 4, 4),
    "interpreter": (64, 64, 64, 1, 4),
}
# Candidates timed once per shape bucket on CUDA (`fqtc.codegen.tuning`), the class default first: wider N or M
# tiles for large GEMMs (more reuse per loaded tile), narrower ones for small M (more programs in flight).
CANDIDATES: dict[str, list[tuple[int, int, int, int, int]]] = {
    "large": [CONFIGS["large"], (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8),
              (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
    "small_m": [CONFIGS["small_m"], (32, 128, 64, 4, 4), (16, 128, 128, 4, 4), (64, 64, 128, 4, 4),
                (64, 256, 64, 3, 8)],
}
TUNER = BucketTuner(enabled=autotune_enabled())
GROUP_M = 8  # programs along M that share a B column panel in L2 (grouped ordering, Triton matmul tutorial)
MAX_REQUANT_N = 256  # requantizing epilogue: the whole output row must be one tile (registers: 128 x 256 fp32)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def shape_class(M: int) -> str:
    """The tile-config class of a GEMM with M rows (`CONFIGS`, `CANDIDATES`)."""
    return "small_m" if triton.next_power_of_2(max(1, M)) <= 64 else "large"


@triton.jit
def _qgemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, qa_ptr, qsa_ptr, rq_ptr, rqs_ptr, step_ptr,
    M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_sab, s_sam, s_sbb, s_sbn, s_cb, s_cm, s_cn, s_ob, s_om, s_on,
    a_qmax, a_key0, a_stream, o_qmax, o_key0, o_stream,
    A_MODE: tl.constexpr, A_SR: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_OUT: tl.constexpr,
    REQUANT: tl.constexpr, O_SR: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP programs along M walk the same B panel so it stays in L2
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
    a_base = a_ptr + bid * s_ab + rm64[:, None] * s_am
    b_base = b_ptr + bid * s_bb + rn[None, :].to(tl.int64) * s_bn

    # -- prologue: the scale of A's rows -------------------------------------------------------------------------
    a_key = tn.stream_key(a_key0, step_ptr, a_stream) if A_SR else 0
    if A_MODE == 0:
        sa = tl.load(sa_ptr + bid * s_sab + rm64 * s_sam, mask=mmask, other=1.0)
    elif A_MODE == 1:
        sa = tn.group_scale(tl.load(sa_ptr + rm * 0), a_qmax)
        tl.store(qsa_ptr + rm * 0, sa, mask=(rm + pid + bid.to(tl.int32)) == 0)  # one program writes it
    elif A_MODE == 3:
        sa = tn.group_scale(tl.load(sa_ptr + bid * M + rm64, mask=mmask, other=0.0), a_qmax)
        tl.store(qsa_ptr + bid * M + rm64, sa, mask=mmask & ((rm * 0 + pid_n) == 0))
    else:
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            at = tl.load(a_base + rk[None, :] * s_ak, mask=mmask[:, None] & (rk[None, :] < K), other=0.0)
            amax = tn.max_nan(amax, tn.nan_absmax(at.to(tl.float32), 1))
        sa = tn.group_scale(amax, a_qmax)
        tl.store(qsa_ptr + bid * M + rm64, sa, mask=mmask & ((rm * 0 + pid_n) == 0))

    # -- main loop: int8 x int8 -> int32 on tensor cores ----------------------------------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        kmask = rk < K
        am = mmask[:, None] & kmask[None, :]
        a = tl.load(a_base + rk[None, :] * s_ak, mask=am, other=0)
        if A_MODE != 0:
            idx = bid * M * K + rm64[:, None] * K + rk[None, :]
            q = tn.round_codes(tl.math.div_rn(a.to(tl.float32), sa[:, None]), a_qmax, idx, a_key, A_SR)
            a = q.to(tl.int8)
            tl.store(qa_ptr + idx, a, mask=am & ((rk[None, :] * 0 + pid_n) == 0))
        b = tl.load(b_base + rk[:, None].to(tl.int64) * s_bk, mask=kmask[:, None] & nmask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # -- epilogue: scales, bias, cast, optional requantization ----------------------------------------------------
    sb = tl.load(sb_ptr + bid * s_sbb + rn.to(tl.int64) * s_sbn, mask=nmask, other=1.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + bid * s_cb + rm64[:, None] * s_cm + rn[None, :].to(tl.int64) * s_cn, mask=omask,
                       other=0.0)
        out = out + bias.to(tl.float32)
    if OUT_BF16:
        out = tn.to_bf16_rne(out)
    else:
        out = out.to(out_ptr.dtype.element_ty)
    if STORE_OUT:
        tl.store(out_ptr + bid * s_ob + rm64[:, None] * s_om + rn[None, :].to(tl.int64) * s_on, out, mask=omask)
    if REQUANT:
        o = tl.where(omask, out.to(tl.float32), 0.0)
        so = tn.group_scale(tn.nan_absmax(o, 1), o_qmax)
        o_key = tn.stream_key(o_key0, step_ptr, o_stream) if O_SR else 0
        oidx = bid * M * N + rm64[:, None] * N + rn[None, :]
        q = tn.round_codes(tl.math.div_rn(o, so[:, None]), o_qmax, oidx, o_key, O_SR)
        tl.store(rq_ptr + oidx, q.to(tl.int8), mask=omask)
        tl.store(rqs_ptr + bid * M + rm64, so, mask=mmask)


@dataclass(frozen=True)
class Requant:
    """Requantize the GEMM output in the epilogue: one scale per output row (``reduce_dims=[-1]``)."""

    bits: int
    rounding: str = "stochastic"
    seed: int = 0
    stream: int = 0


def _batched(t: torch.Tensor, batch: tuple[int, ...], rows: int, cols: int) -> torch.Tensor:
    """``t`` broadcast to (B, rows, cols) as a strided view (stride 0 on broadcast dims, copy only if needed)."""
    t = t.reshape(1, 1) if t.dim() == 0 else t
    e = torch.broadcast_to(t, (*batch, rows, cols))
    if len(batch) == 1:
        return e
    if len(batch) == 0:
        return e.unsqueeze(0)
    nb = 1
    for s in batch:
        nb *= s
    return e.reshape(nb, rows, cols)


def _sr_args(rounding: str, seed: int, stream: int) -> tuple[bool, int, int]:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; allowed: nearest, stochastic")
    return rounding == "stochastic", mix32_int(seed ^ GOLDEN), stream & 0xFFFFFFFF


def _launch(a, a_mode, sa, b, sb, bias, out_dtype, *, a_bits=8, a_rounding="nearest", a_seed=0, a_stream=0,
            step=None, requant: Requant | None = None, store_out: bool = True):
    if b.dtype != torch.int8:
        raise TypeError(f"the GEMM kernel's B operand must hold int8 codes, got {b.dtype}")
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"GEMM operands need >= 2 dims, got {list(a.shape)} and {list(b.shape)}")
    M, K = a.shape[-2:]
    K2, N = b.shape[-2:]
    if K != K2:
        raise ValueError(f"GEMM inner dims differ: a {list(a.shape)} @ b {list(b.shape)}")
    batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    if a_mode != 0 and tuple(a.shape[:-2]) != batch:
        raise ValueError("the quantizing prologue needs `a` to carry the full batch shape (codes are written per a)")
    out_shape = (*batch, M, N)
    if bias is not None and tuple(torch.broadcast_shapes(out_shape, bias.shape)) != out_shape:
        raise ValueError(f"bias {list(bias.shape)} would broadcast the GEMM output {list(out_shape)} to more dims")
    nb = 1
    for s in batch:
        nb *= s
    dev = a.device
    a3, b3 = _batched(a, batch, M, K), _batched(b, batch, K, N)
    sb3 = _batched(sb, batch, 1, N)
    out = torch.empty(out_shape, dtype=out_dtype, device=dev)
    o3 = out.view(nb, M, N) if out.numel() else out.reshape(nb, M, N)
    step_t = torch.as_tensor(0 if step is None else step, dtype=torch.int64, device=dev).reshape(())
    a_sr, a_key0, a_stream = _sr_args(a_rounding, a_seed, a_stream)
    a_qmax = qmax_for(a_bits)
    qa = qsa = None
    if a_mode == 0:
        sa3 = _batched(sa, batch, M, 1)
        sa_ptr, s_sab, s_sam = sa3, sa3.stride(0), sa3.stride(1)
    else:
        qa = torch.empty(a.shape, dtype=torch.int8, device=dev)
        qsa = torch.empty((*a.shape[:-1], 1) if a_mode in (2, 3) else (1,) * a.dim(), dtype=torch.float32,
                          device=dev)
        # mode 1: the 1-element amax; 3: the (batch*M) row amax; 2: unused
        sa_ptr, s_sab, s_sam = (sa if sa is not None else out), 0, 0
    if requant is not None:
        if N > MAX_REQUANT_N:
            raise ValueError(f"requantizing epilogue needs the whole output row in one tile: N={N} > "
                             f"MAX_REQUANT_N={MAX_REQUANT_N}; quantize the output with fqtc.codegen.quantize instead")
        o_sr, o_key0, o_stream = _sr_args(requant.rounding, requant.seed, requant.stream)
        o_qmax = qmax_for(requant.bits)
        rq = torch.empty(out_shape, dtype=torch.int8, device=dev)
        rqs = torch.empty((*out_shape[:-1], 1), dtype=torch.float32, device=dev)
    else:
        o_sr, o_key0, o_stream, o_qmax, rq, rqs = False, 0, 0, 1, out, out
    c3 = _batched(bias, batch, M, N) if bias is not None else o3

    def launch(cfg: tuple[int, int, int, int, int]) -> None:
        bm, bn, bk, stages, warps = cfg
        if requant is not None:
            bn = max(16, triton.next_power_of_2(N))  # the whole output row in one tile
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), nb)
        _qgemm_kernel[grid](
            a3, b3, sa_ptr, sb3, c3, o3, qa if qa is not None else out, qsa if qsa is not None else out, rq, rqs,
            step_t, M, N, K,
            a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
            s_sab, s_sam, sb3.stride(0), sb3.stride(2), c3.stride(0), c3.stride(1), c3.stride(2),
            o3.stride(0), o3.stride(1), o3.stride(2),
            a_qmax, a_key0, a_stream, o_qmax, o_key0, o_stream,
            A_MODE=a_mode, A_SR=a_sr, HAS_BIAS=bias is not None, STORE_OUT=store_out,
            REQUANT=requant is not None, O_SR=o_sr,
            OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M,
            num_warps=warps, num_stages=stages, enable_fp_fusion=False)

    if nb and M and N:
        if _interpreting():
            cfg = CONFIGS["interpreter"]
        else:  # the bucket's tuned config: timed at its first launch, reused for every shape of the bucket
            cls = shape_class(M)
            key = (cls, bucket(M, N, K), a_mode, requant is not None, bias is not None, out_dtype, a.dtype)
            cfg = TUNER.pick(key, CANDIDATES[cls], launch)
        launch(cfg)
    return out, qa, qsa, (rq, rqs) if requant is not None else None


def scaled_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32, requant: Requant | None = None, step: torch.Tensor | int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of `fqtc.quant.gemm.scaled_gemm` for int8 codes with scales constant along K.

    With ``requant`` it returns ``(out, codes, scale)`` like `fqtc.codegen.reference.qgemm_requant` with
    ``reduce_dims=[-1]``.
    """
    if a.dtype != torch.int8 or a_scale is None or b_scale is None or scale_along_k(a_scale, b_scale):
        raise ValueError("the Triton GEMM takes int8 codes for both operands with scales constant along K; "
                         "use fqtc.quant.gemm.scaled_gemm for float operands or scales along K")
    out, _, _, rq = _launch(a, 0, a_scale, b, b_scale, bias, out_dtype, step=step, requant=requant)
    return out if rq is None else (out, *rq)


def qgemm_fused_quant(
    a: torch.Tensor, bits: int, reduce_dims: Sequence[int], rounding: str, seed: int, stream: int,
    step: torch.Tensor | int, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32, requant: Requant | None = None, amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Quantize the floating-point activation ``a`` inside the GEMM prologue: ``(out, a_codes, a_scale)``, equal
    to ``codes, s = quantize(a, bits, reduce_dims, ..., amax)`` then ``scaled_gemm(codes, s, b, b_scale, bias)``.

    ``reduce_dims`` must be per-tensor (all dims) or per-row (``[-1]``). ``amax``: the keepdim group abs-max from
    ``a``'s producer (the codegen pass supplies it per tensor, and per row when ``a``'s producer is an Inductor
    kernel); without it a per-tensor scale costs one extra read of
    ``a`` (the partial-amax pass) and a per-row scale an amax sweep of the row slab (from L2 while the slabs of a
    wave fit there). With ``requant`` two more outputs follow: the output's codes and scales.
    A row (or tensor) holding a NaN keeps a NaN scale and zero codes (`fqtc.quant.uniform`'s non-finite policy).
    """
    n = a.dim()
    dims = sorted({d % n for d in reduce_dims})
    if dims == list(range(n)):
        mode = 1
    elif dims == [n - 1]:
        mode = 2
    else:
        raise ValueError(f"the quantizing prologue supports per-tensor or per-row (reduce_dims=[-1]) scales, got "
                         f"reduce_dims={list(reduce_dims)} on a {n}-d input; quantize separately for other layouts")
    if amax is not None:
        amax = check_amax(amax, a, list(reduce_dims)).contiguous().reshape(-1)
        mode = 1 if mode == 1 else 3
    elif mode == 1:
        from fqtc.codegen.quantize import AMAX_BLOCK, _amax_partial_kernel, _pow2

        ac = a.contiguous()
        nprog = max(1, triton.cdiv(ac.numel(), AMAX_BLOCK))
        part = torch.zeros(nprog, dtype=torch.float32, device=a.device)
        if ac.numel():
            _amax_partial_kernel[(nprog,)](ac, part, ac.numel(), BLOCK=_pow2(ac.numel(), hi=AMAX_BLOCK))
        amax = part.amax().reshape(1)
    else:
        amax = None
    out, qa, qsa, rq = _launch(a, mode, amax, b, b_scale, bias, out_dtype, a_bits=bits, a_rounding=rounding,
                               a_seed=seed, a_stream=stream, step=step, requant=requant)
    return (out, qa, qsa) if rq is None else (out, qa, qsa, *rq)
