"""Triton kernels for the gradient quantizers of `fqtc.quant.gradq` bit-exact with the references (docs/kernels.md).

- PTQ / PSQ / SCQ (`fqtc.quant.gradq.grad_quantize` with ``ptq``/``psq``/``scq``): the uniform quantize kernels of
  `fqtc.codegen.quantize` with the gradient non-finite policy (a NaN group keeps a NaN scale, codes 0).
- BHQ (``fqt::bhq``: ``T^-1 Q(T x)`` dequantized): one fused kernel per Householder group applies the transform
  ``T = H D`` to the group's rows, quantizes each transformed row (per-row scale, SR), dequantizes, applies
  ``T^-1 = D^-1 H`` and writes the result rows; no intermediate tensor touches memory. The transform's
  construction (`fqtc.quant.gradq.bhq_transform`: sort the G row ranges, split, pair, closed-form D) is O(G log G)
  work on G scalars and stays in torch; the row ranges themselves come from ``x``'s producer when the codegen pass
  supplies them (``amax``), so the kernel is the only reader of ``x``. The group reductions ``w = sum_p v_p z_p``
  are accumulated in position order, the order of the reference's ``index_add_``, so the fp32 sums are identical.

AQ (range-proportional group sampling) keeps the reference path; its per-group sampling is host-side logic and
the CUDA implementation counts it as a fallback (`fqtc.codegen.impls.FALLBACKS`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fqtc.codegen import quantize as _kq
from fqtc.codegen import tl_numerics as tn
from fqtc.quant import gradq as _gradq
from fqtc.quant.rng import GOLDEN, mix32_int
from fqtc.quant.uniform import qmax_for

KERNEL_QUANTIZERS = ("ptq", "psq", "scq")
MAX_BHQ_ROW = 8192  # a BHQ program holds one full row (E elements) of the group in registers


def grad_quantize(x: torch.Tensor, quantizer: str, bits: int, reduce_dims: Sequence[int], rounding: str = "stochastic",
                  seed: int = 0, step: torch.Tensor | int = 0, stream: int = 0,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of `fqtc.quant.gradq.grad_quantize` for PTQ/PSQ/SCQ, on the quantize kernels (``amax``: the
    group abs-max from ``x``'s producer, then ``x`` is read once)."""
    if quantizer not in KERNEL_QUANTIZERS:
        raise ValueError(f"grad_quantize kernel covers {KERNEL_QUANTIZERS}, got {quantizer!r}")
    dims = list(range(x.dim())) if quantizer == "ptq" else list(reduce_dims)
    codes, scale = _kq.quantize(x, bits, dims, rounding, seed=seed, step=step, stream=stream, amax=amax)
    return codes, scale.contiguous()


@triton.jit
def _bhq_row(x_ptr, row, cols, cmask, E, d):
    x = tl.load(x_ptr + row * E + cols, mask=cmask, other=0.0).to(tl.float32)
    return x * d


@triton.jit
def _bhq_quant_row(t, v, w, row, cols, cmask, E, qmax, key, STOCHASTIC: tl.constexpr):
    """Transformed row ``z = t - 2 v w``, its per-row scale and dequantized codes ``q * s``."""
    z = t - (2.0 * v) * w
    s = tn.group_scale(tn.nan_absmax(tl.where(cmask, z, 0.0), 0), qmax)
    q = tn.round_codes(tl.math.div_rn(z, s), qmax, row * E + cols, key, STOCHASTIC)
    return q * s


@triton.jit
def _bhq_kernel(
    x_ptr, out_ptr, order_ptr, start_ptr, v_ptr, d_ptr, step_ptr, E, qmax, key0, stream,
    STOCHASTIC: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program per Householder group: positions start[g] .. start[g+1]-1 of the grouped order."""
    g = tl.program_id(0)
    p0 = tl.load(start_ptr + g)
    p1 = tl.load(start_ptr + g + 1)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    key = tn.stream_key(key0, step_ptr, stream) if STOCHASTIC else 0
    # pass 1: w = sum_p v_p (d_p x_p), in position order (the reference's index_add_ order)
    w = tl.zeros((BLOCK_E,), tl.float32)
    for p in range(p0, p1):
        row = tl.load(order_ptr + p)
        w = w + tl.load(v_ptr + p) * _bhq_row(x_ptr, row, cols, cmask, E, tl.load(d_ptr + p))
    # pass 2: quantize each transformed row, accumulate the inverse reflection's w2 = sum_p v_p y_p
    w2 = tl.zeros((BLOCK_E,), tl.float32)
    for p in range(p0, p1):
        row = tl.load(order_ptr + p)
        v = tl.load(v_ptr + p)
        y = _bhq_quant_row(_bhq_row(x_ptr, row, cols, cmask, E, tl.load(d_ptr + p)), v, w, row, cols, cmask, E,
                           qmax, key, STOCHASTIC)
        w2 = w2 + v * y
    # pass 3: recompute y (same draws: same element index) and write D^-1 (y - 2 v w2)
    for p in range(p0, p1):
        row = tl.load(order_ptr + p)
        v = tl.load(v_ptr + p)
        d = tl.load(d_ptr + p)
        y = _bhq_quant_row(_bhq_row(x_ptr, row, cols, cmask, E, d), v, w, row, cols, cmask, E, qmax, key,
                           STOCHASTIC)
        o = tl.math.div_rn(y - (2.0 * v) * w2, tl.zeros_like(y) + d)
        tl.store(out_ptr + row * E + cols, o, mask=cmask)


def bhq_supported(shape: Sequence[int], reduce_dims: Sequence[int]) -> str | None:
    """None when the BHQ kernel covers (shape, reduce_dims), else the reason."""
    try:
        kind, _, C = _kq.layout_of(tuple(shape), reduce_dims)
    except NotImplementedError as e:
        return str(e)
    if kind != "row" or len(shape) < 2:
        return f"BHQ kernel needs rows = the groups of a trailing reduce_dims, got reduce_dims={list(reduce_dims)}"
    if C > MAX_BHQ_ROW:
        return f"BHQ kernel holds a full row in registers: row length {C} > MAX_BHQ_ROW={MAX_BHQ_ROW}"
    return None


def bhq(x: torch.Tensor, bits: int, reduce_dims: Sequence[int], rounding: str = "stochastic", seed: int = 0,
        step: torch.Tensor | int = 0, stream: int = 0, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``fqt::bhq``: ``bhq_dequantize(bhq(x, ...))`` of `fqtc.quant.gradq`, the per-element work in one kernel.

    ``amax``: the rows' abs-max from ``x``'s producer (keepdim over ``reduce_dims``). With it the transform is
    built from G scalars and ``x`` is read once, by the kernel; without it the rows' ranges cost one more read."""
    why = bhq_supported(x.shape, reduce_dims)
    if why:
        raise ValueError(why)
    xc = x.contiguous()
    aux = _gradq.bhq_transform(xc, reduce_dims, amax)
    G = aux["order"].numel()
    E = xc.numel() // max(G, 1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if xc.numel() == 0:
        return out
    group = aux["group"]
    n_groups = int(group.max()) + 1
    starts = torch.zeros(n_groups + 1, dtype=torch.int64, device=x.device)
    starts[1:] = torch.cumsum(torch.bincount(group, minlength=n_groups), 0)  # groups are contiguous runs
    step_t = torch.as_tensor(step, dtype=torch.int64, device=x.device).reshape(())
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; allowed: nearest, stochastic")
    _bhq_kernel[(n_groups,)](
        xc, out, aux["order"].to(torch.int64).contiguous(), starts, aux["v"].float().contiguous(),
        aux["d"].float().contiguous(), step_t, E, qmax_for(bits), mix32_int(seed ^ GOLDEN), stream & 0xFFFFFFFF,
        STOCHASTIC=rounding == "stochastic", BLOCK_E=max(2, triton.next_power_of_2(E)), num_warps=4,
        enable_fp_fusion=False)
    return out
