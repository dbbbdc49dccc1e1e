"""An independent oracle for the numerics every other test leans on: the uniform quantizer (nearest and
stochastic rounding) and the counter-based generator, written from their specification in NumPy uint32 / float32
arithmetic, with no fqtc code. fqtc.quant.uniform.quantize must match it bit for bit.

Specification (docs/gradient_quantizers.md, fqtc/quant/rng.py): ``lowbias32(x)`` = xorshift 16, multiply by
0x7feb352d, xorshift 15, multiply by 0x846ca68b, xorshift 16 (mod 2**32); the stream key of (seed, step, stream)
chains ``lowbias32`` over ``seed ^ 0x9e3779b9`` and the low and high words of the step and the stream; the draw of
element ``i`` (row-major index) is ``lowbias32(lowbias32(i_lo ^ key) ^ i_hi ^ 0x9e3779b9) >> 8`` times 2**-24. A
group's scale is ``amax / qmax`` (1 for an all-zero group); codes are ``clamp(rint(x / scale))`` (nearest, ties to
even) or ``clamp(floor(x / scale + u))`` (stochastic), in float32, with ``qmax = 2**(bits-1) - 1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqtc.quant import uniform

M32 = np.uint64(0xFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    return x ^ (x >> np.uint64(16))


def _key(seed: int, step: int, stream: int) -> np.uint64:
    k = _mix(np.array([seed ^ 0x9E3779B9], dtype=np.uint64))
    for word in (step & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF, stream & 0xFFFFFFFF):
        k = _mix(k ^ np.uint64(word))
    return k[0]


def _uniform(n: int, seed: int, step: int, stream: int) -> np.ndarray:
    i = np.arange(n, dtype=np.uint64)
    h = _mix((i & M32) ^ _key(seed, step, stream))
    h = _mix(h ^ (i >> np.uint64(32)) ^ np.uint64(0x9E3779B9))
    return ((h >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)).astype(np.float32)


def _oracle(x: np.ndarray, bits: int, reduce_dims: tuple[int, ...], rounding: str, seed: int, step: int,
            stream: int) -> tuple[np.ndarray, np.ndarray]:
    qmax = np.float32(2 ** (bits - 1) - 1)
    amax = np.abs(x).max(axis=reduce_dims, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / qmax, np.float32(1.0)).astype(np.float32)
    y = (x / scale).astype(np.float32)
    if rounding == "nearest":
        q = np.rint(y)
    else:
        q = np.floor((y + _uniform(x.size, seed, step, stream).reshape(x.shape)).astype(np.float32))
    return np.clip(q, -qmax, qmax).astype(np.int8), scale


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("reduce_dims", [(0, 1), (1,), (0,)], ids=["tensor", "row", "column"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantizer_matches_an_independent_numpy_oracle(bits, reduce_dims, rounding):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(37, 53, generator=g) * torch.logspace(-3, 2, 53)
    x[3] = 0.0  # an all-zero row (scale 1)
    # a row whose scale is exactly 1/8 (amax = qmax/8), holding exact ties y = k + 1/2 for nearest rounding
    qmax = 2 ** (bits - 1) - 1
    x[5] = 0.0
    x[5, :6] = torch.tensor([qmax, 0.5, -0.5, 1.5, -1.5, -2.5]) * 0.125
    seed, step, stream = 12345, (7 << 32) + 3, 0xDEADBEEF
    codes, scale = uniform.quantize(x, bits, list(reduce_dims), rounding, seed=seed, step=step, stream=stream)
    want_codes, want_scale = _oracle(x.numpy(), bits, reduce_dims, rounding, seed, step, stream)
    assert np.array_equal(scale.numpy(), want_scale)
    assert np.array_equal(codes.numpy(), want_codes), int((codes.numpy() != want_codes).sum())


def test_uniform_draws_match_the_oracle_past_32_bit_indices():
    from fqtc.quant.rng import stream_key, uniform_from_index

    idx = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5], dtype=torch.int64)
    got = uniform_from_index(idx, stream_key(3, 9, 11)).numpy()
    i = idx.numpy().astype(np.uint64)
    h = _mix((i & M32) ^ _key(3, 9, 11))
    h = _mix(h ^ (i >> np.uint64(32)) ^ np.uint64(0x9E3779B9))
    want = (h >> np.uint64(8)).astype(np.float32) * np.float32(2.0 ** -24)
    assert np.array_equal(got, want)
