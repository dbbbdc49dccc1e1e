"""Randomized Hadamard rotation of a GEMM's reduction dimension (pure tensor functions).

A pretrained transformer's activations carry outlier channels 10-100x larger than the rest; with one scale per
token (or per tensor) those channels set the step and the other channels round to a few levels. A GEMM
``y = x W^T`` reduces over ``K``; for any orthogonal ``R``, ``(x R)(W R)^T = x W^T``. With ``R = D H`` (``D`` a
diagonal of random signs, ``H`` a normalized Hadamard matrix applied blockwise over ``K``) every rotated channel is
a signed average of ``b`` original ones, so an outlier's energy spreads over its block and the per-token range
shrinks toward the typical channel's: QuaRot (Ashkboos et al., 2024) and HALO (Ashkboos et al., 2025) quantize after
this rotation, and NVIDIA's NVFP4 training recipe applies a random Hadamard transform to the ``grad_weight``
inputs for the same reason (../shared/papers.md).

``H_b`` (Sylvester's construction, ``b`` a power of two) is symmetric and ``H_b H_b = I`` once divided by
``sqrt(b)``, so the inverse of ``x -> (x * d) H`` is ``y -> (y H) * d``. The signs ``d`` come from fqtc's
counter-based generator keyed by (seed, stream): the same signs in every process and on every step, shared by both
operands of one GEMM site. Rotation and its inverse are float computations (``|error| <= ~1e-6`` relative in
fp32); the integer GEMM then runs on the codes of the rotated operands unchanged.
"""

from __future__ import annotations

import functools
import math

import torch

from fqtc.quant.rng import uniform_like

MIN_BLOCK, MAX_BLOCK = 16, 256


def check_block(block: int) -> int:
    """``block`` as a valid rotation block size (a power of two in [MIN_BLOCK, MAX_BLOCK]) or a clear error."""
    if isinstance(block, bool) or not isinstance(block, int) or not MIN_BLOCK <= block <= MAX_BLOCK \
            or block & (block - 1):
        raise ValueError(f"rotation block size must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}")
    return block


def rotation_block(k: int, block: int) -> int | None:
    """The block a rotation of a ``k``-long dimension uses: the largest power of two dividing ``k``, at most
    ``block``; None when that is below `MIN_BLOCK` (e.g. ``k`` odd), where the dimension is left unrotated."""
    check_block(block)
    b = k & -k if k > 0 else 0  # largest power of two dividing k
    b = min(b, block)
    return b if b >= MIN_BLOCK else None


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(b)).float()


def hadamard(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized ``b x b`` Hadamard matrix (symmetric, orthonormal), fp32."""
    check_block(b)
    return _hadamard_cpu(b).to(device)


def random_signs(k: int, seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``k`` fp32 signs (+1/-1), a pure function of (seed, stream)."""
    u = uniform_like(torch.empty(k, device=device), seed=seed, step=0, stream=stream)
    return torch.where(u < 0.5, -1.0, 1.0)


def rotate(x: torch.Tensor, dim: int, block: int, seed: int, stream: int, inverse: bool = False) -> torch.Tensor:
    """``x`` rotated along ``dim`` by ``D H_block`` (blockwise), or by its inverse ``H_block D`` with ``inverse``.

    ``x.shape[dim]`` must be a multiple of ``block``. Returns fp32 (NaN/Inf spread within their block, as any
    rotation of a non-finite vector does)."""
    check_block(block)
    k = x.shape[dim]
    if k % block:
        raise ValueError(f"rotation along a dimension of size {k}: not a multiple of the block size {block}")
    return rotate_with(x, dim, random_signs(k, seed, stream, x.device), hadamard(block, x.device), inverse)


def rotate_with(x: torch.Tensor, dim: int, signs: torch.Tensor, h: torch.Tensor, inverse: bool = False
                ) -> torch.Tensor:
    """`rotate` with its constants given: ``signs`` (`random_signs` of the dimension) and ``h`` (`hadamard` of the
    block). The compiled CPU graphs pass them as constants computed once (fqtc/codegen/inductor_cpu.py)."""
    xm = x.float().movedim(dim, -1)
    k, block = xm.shape[-1], h.shape[0]
    if not inverse:
        xm = xm * signs
    y = (xm.reshape(*xm.shape[:-1], k // block, block) @ h).reshape(xm.shape)
    if inverse:
        y = y * signs
    return y.movedim(-1, dim)
