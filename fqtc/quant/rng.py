"""Counter-based random numbers for stochastic rounding.

A uniform draw is a pure function of (seed, step, stream, element index): no generator state, so the same seed
replays the same bits on every run, and a Triton kernel computing the same hash in uint32 arithmetic produces
identical numbers (design invariant "SR draws from a counter-based generator keyed by (seed, step, node, element)").

The mixing function is the ``lowbias32`` integer hash (two xor-shift-multiply rounds, constants 0x7feb352d and
0x846ca68b). Torch has no uint32 arithmetic, so the reference computes in int64 and masks to 32 bits; the
multiplication is split into 16-bit halves so no intermediate exceeds 2^49 (no signed overflow).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
M1 = 0x7FEB352D
M2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 hash of int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, M1)
    x = x ^ (x >> 15)
    x = _mul32(x, M2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (host-side key derivation)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= x >> 15
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, step: torch.Tensor | int, stream: int) -> torch.Tensor:
    """The 32-bit key of one (seed, step, stream) triple, as a 0-d int64 tensor.

    ``step`` may be a tensor (the graph's step counter) so the key is computed on the device without a sync.
    """
    k = torch.as_tensor(mix32_int(seed ^ GOLDEN), dtype=torch.int64)
    step_t = torch.as_tensor(step, dtype=torch.int64)
    if isinstance(step, torch.Tensor):
        k = k.to(step.device)
    k = mix32(k ^ (step_t & MASK32))
    k = mix32(k ^ ((step_t >> 32) & MASK32))
    return mix32(k ^ (stream & MASK32))


def stream_key_int(seed: int, step: int, stream: int) -> int:
    """`stream_key` on Python ints (the same 32-bit key), for callers that hold the step on the host."""
    return stream_keys_int(seed, step, [stream])[0]


def stream_keys_int(seed: int, step: int, streams: list[int]) -> list[int]:
    """`stream_key_int` of several streams: the (seed, step) part of the hash is computed once."""
    k = mix32_int(seed ^ GOLDEN)
    k = mix32_int(k ^ (step & MASK32))
    k = mix32_int(k ^ ((step >> 32) & MASK32))
    return [mix32_int(k ^ (s & MASK32)) for s in streams]


def uniform_from_index(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """U[0, 1) float32 draws for int64 element indices under ``key`` (24 random bits: exact in fp32)."""
    h = mix32((index & MASK32) ^ key)
    h = mix32(h ^ ((index >> 32) & MASK32) ^ GOLDEN)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


# -- fast path: the same hash in int32 arithmetic ------------------------------------------------------------------
# The int64 reference above needs ~20 full-tensor int64 passes per hash (the split multiply). In int32, a multiply
# wraps mod 2^32 exactly as uint32 does (two's complement), and a logical right shift is an arithmetic shift masked
# to the low bits, so the same lowbias32 costs 9 int32 passes: 1.8 ms vs 4.6 ms for 256x1024 draws on the
# 2-core dev machine (2.5x). tests/quant/test_uniform.py checks
# both paths agree bit for bit.
def _i32(v: int) -> int:
    v &= MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


M1_I32, M2_I32, GOLDEN_I32 = _i32(M1), _i32(M2), _i32(GOLDEN)


def mix32_i32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors holding uint32 bit patterns (wrapping arithmetic)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * M1_I32
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * M2_I32
    return x ^ ((x >> 16) & 0xFFFF)


def uniform_like(x: torch.Tensor, *, seed: int, step: torch.Tensor | int, stream: int,
                 offset: int = 0) -> torch.Tensor:
    """One U[0, 1) draw per element of ``x`` (row-major element index plus ``offset``), keyed by (seed, step,
    stream). ``offset`` places ``x`` inside a larger tensor: a shard starting at element ``offset`` draws what the
    whole tensor draws there (sharded latent weights, docs/distributed.md)."""
    return uniform_like_key(x, stream_key(seed, step, stream), offset)


def uniform_like_key(x: torch.Tensor, key: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """`uniform_like` from a precomputed `stream_key` (0-d int64): a compiled graph computes the key once per
    quantizer instead of once per vector of elements (fqtc/codegen/inductor_cpu.py)."""
    key = key.to(x.device)
    n = x.numel()
    if offset < 0:
        raise ValueError(f"uniform_like: element offset must be >= 0, got {offset}")
    if n + offset >= (1 << 31):
        idx = torch.arange(offset, offset + n, device=x.device, dtype=torch.int64).view(x.shape)
        return uniform_from_index(idx, key)
    key32 = (((key + (1 << 31)) & MASK32) - (1 << 31)).to(torch.int32)
    idx = torch.arange(offset, offset + n, device=x.device, dtype=torch.int32).view(x.shape)
    h = mix32_i32(idx ^ key32)
    h = mix32_i32(h ^ GOLDEN_I32)  # the high index word is 0 below 2^31 elements
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)
