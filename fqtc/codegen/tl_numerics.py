"""Triton device functions that reproduce fqtc's reference numerics bit for bit.

Each function mirrors one reference in `fqtc.quant` and is written so that the Triton interpreter (CPU, numpy) and
CUDA compute identical bits:

- `mix32` / `stream_key` / `uniform01` mirror `fqtc.quant.rng.mix32` / `stream_key` / `uniform_from_index`:
  the lowbias32 hash in ``tl.uint32`` arithmetic, which wraps mod 2^32 exactly like the reference's masked int64
  arithmetic (design invariant: "the CPU path and the Triton kernels agree bit for bit").
- `quant_scale` mirrors `fqtc.quant.uniform.absmax_scale`: ``amax / qmax`` as a correctly rounded division
  (``tl.math.div_rn``; plain ``/`` may lower to an approximate reciprocal on GPUs), and scale 1 for a zero group.
- `round_half_even` mirrors ``torch.round``. ``libdevice.rint`` has no interpreter implementation, so rounding is
  emulated exactly from ``floor``: ``d = y - floor(y)`` is exact in fp32 for every representable ``y`` (Sterbenz),
  and ties go to the even neighbour.
- `round_codes` mirrors `fqtc.quant.uniform.round_codes` (nearest or ``floor(y + u)``, then clamp).

Kernels that use these also launch with ``enable_fp_fusion=False`` so the compiler does not contract the
epilogue's ``acc * sa * sb + bias`` into an FMA, which would round differently from the reference's separate ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fqtc.quant.rng import GOLDEN, M1, M2  # noqa: F401  (documented: the same constants, spelled below)

# The constants must be literals inside @triton.jit functions; these asserts keep them tied to fqtc.quant.rng.
assert (GOLDEN, M1, M2) == (0x9E3779B9, 0x7FEB352D, 0x846CA68B)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (`fqtc.quant.rng.mix32`)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def stream_key(key0, step_ptr, stream):
    """`fqtc.quant.rng.stream_key` with the step read on the device (no host sync).

    ``key0`` is ``mix32_int(seed ^ GOLDEN)`` computed on the host; ``step_ptr`` points at the 0-d int64 step.
    """
    step = tl.load(step_ptr)
    # tl.cast, not .to(): Triton specializes an int argument equal to 1 into a constexpr, which has no .to()
    k = tl.cast(tl.cast(key0, tl.int64), tl.uint32)
    k = mix32(k ^ (step & 0xFFFFFFFF).to(tl.uint32))
    k = mix32(k ^ ((step >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return mix32(k ^ tl.cast(tl.cast(stream, tl.int64), tl.uint32))


@triton.jit
def uniform01(index, key):
    """U[0,1) fp32 draws for int64 element indices (`fqtc.quant.rng.uniform_from_index`)."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h = mix32(lo ^ key)
    h = mix32(h ^ hi ^ 0x9E3779B9)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def quant_scale(amax, qmax):
    """``amax / qmax`` correctly rounded; 1 where ``amax == 0`` (`fqtc.quant.uniform.absmax_scale`)."""
    s = tl.math.div_rn(amax, tl.zeros_like(amax) + qmax)
    return tl.where(amax > 0, s, 1.0)


@triton.jit
def round_half_even(y):
    """``torch.round`` (round half to even) from ``floor`` only: exact for every fp32 ``y``."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def round_codes(y, qmax, index, key, STOCHASTIC: tl.constexpr):
    """Integer-valued fp32 codes in [-qmax, qmax] (`fqtc.quant.uniform.round_codes`); +-inf clamps to +-qmax.

    A NaN code (a non-finite group) becomes 0, as in `fqtc.quant.uniform.round_codes`."""
    if STOCHASTIC:
        q = tl.floor(y + uniform01(index, key))
    else:
        q = round_half_even(y)
    return tl.where(q != q, 0.0, tl.minimum(tl.maximum(q, -qmax), qmax))


@triton.jit
def nan_absmax(x, axis: tl.constexpr):
    """max |x| along ``axis``, NaN when any element is NaN (torch ``amax`` propagates NaN; GPU ``max`` drops it)."""
    m = tl.max(tl.abs(x), axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), m)


@triton.jit
def max_nan(a, b):
    """Elementwise max that propagates NaN from either side on every backend."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


@triton.jit
def group_scale(amax, qmax):
    """Scale from a NaN-propagating amax (`fqtc.quant.uniform.absmax_scale`, the one non-finite policy of every
    quantizer): a zero group gets 1, a NaN group keeps a NaN scale (``NaN > 0`` is false, so `quant_scale` alone
    would give 1), an Inf group an Inf scale."""
    return tl.where(amax != amax, amax, quant_scale(amax, qmax))


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16 with round-half-to-even on the bit pattern (``tensor.to(torch.bfloat16)``; NaN payloads aside).

    The interpreter's own fp32->bf16 cast truncates, so the rounding is spelled out in uint32 arithmetic, which is
    exact on both backends."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def pack_int4_pairs(q, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pack a (BLOCK_R, BLOCK_C) tile of int codes in [-7, 7] two per byte along columns (even column -> low
    nibble), the layout of `fqtc.codegen.reference.pack_int4`."""
    qi = q.to(tl.int32)
    lo, hi = tl.split(tl.reshape(qi, (BLOCK_R, BLOCK_C // 2, 2)))
    return ((lo & 0xF) | (hi << 4)).to(tl.int8)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
