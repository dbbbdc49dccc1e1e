"""Symmetric uniform quantizers with deterministic and stochastic rounding (pure tensor functions).

A b-bit code lies in [-(2^(b-1)-1), 2^(b-1)-1] and is stored in int8; the scale is ``amax / qmax`` over the
elements that share it (``reduce_dims``), kept with ``keepdim=True`` so it broadcasts against the codes and can
follow them through transposes. Stochastic rounding ``floor(x/s + u)``, ``u ~ U[0,1)`` from `fqtc.quant.rng`, is
unbiased: E[s*q] = x, with per-element variance s^2 f(1-f) <= s^2/4 (f the fractional part of x/s).

Numerics notes (kernels must match them bit for bit): ``x / s`` is a true IEEE division (not a multiply by the
reciprocal); nearest rounding is round-half-to-even (``torch.round``); a zero-range group gets scale 1.

Non-finite input is never hidden: a group holding a NaN gets a NaN scale, a group holding an Inf (and no NaN) an Inf
scale, and their codes are 0 (a NaN code has no int8 value: casting it is undefined behaviour). Dequantizing such a
group gives NaN, so a diverged forward or an overflowed gradient stays visible to the loss, to a loss scaler and to
the user instead of becoming finite garbage. Every quantizer (`fqtc.quant.gradq` too) and every kernel
(`fqtc.codegen.tl_numerics.group_scale`) shares this policy.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fqtc.quant.rng import uniform_like, uniform_like_key


def crest_factor(x: torch.Tensor) -> float | None:
    """``max|x| / rms(x)`` of a float tensor (None for an empty or all-zero one). 8-bit per-tensor quantization of
    ``x`` has an SQNR of about ``10 log10(3 * 127^2 / crest^2)`` dB: 41 dB at a crest factor of 4, 23 dB at 24
    (option ``layout="auto"`` decides from it, fqtc/passes/layout.py)."""
    if x.numel() == 0 or not x.is_floating_point():
        return None
    xf = x.detach().float()
    rms = xf.pow(2).mean().sqrt().item()
    if not rms > 0 or not math.isfinite(rms):
        return None
    return xf.abs().max().item() / rms


def qmax_for(bits: int) -> int:
    if not (1 <= bits <= 8):
        raise ValueError(f"bits must be 1..8 for int8 storage, got {bits}")
    return (1 << (bits - 1)) - 1 if bits > 1 else 1


def group_amax(x: torch.Tensor, reduce_dims: Sequence[int]) -> torch.Tensor:
    """fp32 keepdim abs-max of ``x`` over ``reduce_dims`` (NaN and Inf propagate): the statistic a scale is made of.

    The codegen pass computes this same reduction as ``aten.amax(aten.abs(x))`` next to ``x``'s producer, where
    Inductor fuses it into the producer's kernel, and hands it to the quantizer (docs/kernels.md, "Statistics from
    the producer"). A group with no element (an empty batch) has abs-max 0, so its scale is 1 as for an all-zero
    group (``amax`` itself rejects a zero-size reduction)."""
    xf = x.float()
    dims = _norm_dims(reduce_dims, x.dim())
    if any(x.shape[d] == 0 for d in dims):
        return xf.new_zeros([1 if i in dims else s for i, s in enumerate(x.shape)])
    return xf.abs().amax(dim=dims, keepdim=True) if dims else xf.abs()


def scale_from_amax(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 scale ``amax/qmax`` from a group abs-max: groups whose amax is 0 get scale 1, a NaN amax gives a NaN
    scale and an Inf amax an Inf scale (the module's non-finite policy)."""
    amax = amax.float()
    scale = amax / qmax_for(bits)
    # amax != amax: isnan as a comparison, which Inductor vectorizes
    return torch.where(amax > 0, scale, torch.where(amax != amax, amax, torch.ones_like(scale)))


def absmax_scale(x: torch.Tensor, bits: int, reduce_dims: Sequence[int]) -> torch.Tensor:
    """fp32 scale ``amax/qmax`` over ``reduce_dims`` (keepdim); groups whose amax is 0 get scale 1, groups holding a
    NaN get NaN and groups holding an Inf get Inf (the module's non-finite policy)."""
    return scale_from_amax(group_amax(x, reduce_dims), bits)


def check_amax(amax: torch.Tensor, x: torch.Tensor, reduce_dims: Sequence[int]) -> torch.Tensor:
    """``amax`` as the fp32 keepdim group statistic of ``x`` over ``reduce_dims``; a clear error for a wrong shape."""
    dims = set(_norm_dims(reduce_dims, x.dim()))
    want = [1 if i in dims else s for i, s in enumerate(x.shape)]
    if list(amax.shape) != want:
        if amax.numel() == 1 and len(dims) == x.dim():
            return amax.float().reshape(want)
        raise ValueError(f"amax has shape {list(amax.shape)}; quantizing a {list(x.shape)} tensor over "
                         f"reduce_dims={list(reduce_dims)} needs the keepdim group abs-max of shape {want} "
                         f"(x.abs().amax(reduce_dims, keepdim=True))")
    return amax.float()


def to_int8_codes(q: torch.Tensor) -> torch.Tensor:
    """`round_codes`'s integer-valued, clamped, NaN-free fp32 codes as int8."""
    return q.to(torch.int8)


# The rounding tail of a quantizer, real-valued codes -> int8 codes: ``rounder(y, qmax, rounding, key)`` must equal
# ``to_int8_codes(round_codes(y, qmax, rounding, key=key))`` bit for bit (the compiled CPU graphs pass one op that
# Inductor lowers to a single loop body, docs/kernels.md "CPU graphs under Inductor")
Rounder = Callable[[torch.Tensor, int, str, "torch.Tensor | None"], torch.Tensor]


def round_codes(
    y: torch.Tensor, qmax: int, rounding: str, *, seed: int = 0, step: torch.Tensor | int = 0, stream: int = 0,
    key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round real-valued codes ``y`` to integers in [-qmax, qmax] (still float32). ``key``: the precomputed
    `fqtc.quant.rng.stream_key` of (seed, step, stream), when the caller has it.

    A NaN in ``y`` (a non-finite group) gives the code 0, because casting NaN to an integer is undefined."""
    y = torch.where(y == y, y, torch.zeros_like(y))  # y == y is false exactly for NaN (a vectorizable isnan)
    if rounding == "nearest":
        q = torch.round(y)
    elif rounding == "stochastic":
        u = uniform_like(y, seed=seed, step=step, stream=stream) if key is None else uniform_like_key(y, key)
        q = torch.floor(y + u)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; allowed: nearest, stochastic")
    return q.clamp(-qmax, qmax)  # out of place: Inductor fuses it (an in-place op would stay an extern call)


def quantize(
    x: torch.Tensor,
    bits: int,
    reduce_dims: Sequence[int],
    rounding: str = "nearest",
    *,
    seed: int = 0,
    step: torch.Tensor | int = 0,
    stream: int = 0,
    amax: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    rounder: Rounder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to int8 codes and an fp32 keepdim scale shared over ``reduce_dims``.

    ``reduce_dims`` = all dims gives a per-tensor scale; ``[-1]`` one scale per row (token/sample); ``[0]`` on a
    2-D tensor one scale per column (channel). ``amax``: the keepdim group abs-max (`group_amax`) when the caller
    already has it (the codegen pass computes it in ``x``'s producer); the scale is made from it as given and codes
    beyond ``±qmax`` saturate, so with the exact abs-max the result equals ``amax=None`` bit for bit. ``key``: the
    precomputed `fqtc.quant.rng.stream_key` (same bits as computing it from seed, step and stream); ``rounder``:
    the rounding tail (`Rounder`), used where it has what it needs (nearest rounding, or a ``key``).
    """
    if amax is None:
        scale = absmax_scale(x, bits, reduce_dims)
    else:
        scale = scale_from_amax(check_amax(amax, x, reduce_dims), bits)
    return round_to_int8(x.float() / scale, qmax_for(bits), rounding, seed=seed, step=step, stream=stream, key=key,
                         rounder=rounder), scale


def round_to_int8(
    y: torch.Tensor, qmax: int, rounding: str, *, seed: int = 0, step: torch.Tensor | int = 0, stream: int = 0,
    key: torch.Tensor | None = None, rounder: Rounder | None = None,
) -> torch.Tensor:
    """int8 codes of real-valued codes ``y``: `round_codes` then `to_int8_codes`, or ``rounder`` (`Rounder`, the
    same bits) where it has what it needs (nearest rounding, or a ``key``)."""
    if rounder is not None and (rounding == "nearest" or key is not None):
        return rounder(y, qmax, rounding, key)
    return to_int8_codes(round_codes(y, qmax, rounding, seed=seed, step=step, stream=stream, key=key))


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


def _norm_dims(dims: Sequence[int], ndim: int) -> list[int]:
    return sorted({d % ndim for d in dims}) if ndim else []
