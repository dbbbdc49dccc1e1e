"""Block scaling: one scale per block of ``block`` consecutive elements along a GEMM's reduction dim (pure tensor
functions; docs/options.md, "Block scaling").

Per-tensor and per-row scales let one outlier set the step of thousands of elements. Microscaling formats (OCP MX,
NVIDIA's NVFP4 recipe) give every short run of elements along the reduction dim its own scale instead, and the
integer GEMM accumulates each K-block exactly in int32 before applying that block's scales. Two layouts:

- **1 x b groups** (``dims`` = one dim, the reduction dim): for an operand read by one GEMM (a gradient);
- **b x b tiles** (``dims`` = two dims): for an operand read by two GEMMs that reduce over different dims (a weight
  in ``output`` and ``grad_input``, the saved forward input in ``output`` and ``grad_weight``): one quantization,
  whose scales are constant along each GEMM's reduction blocks either way.

A scale tensor is *compact*: the operand's shape with each blocked dim ``d`` of size ``n`` replaced by
``ceil(n / block)`` (a last partial block has its own scale). Scales follow the uniform quantizer's conventions
(`fqtc.quant.uniform`: ``amax / qmax``, scale 1 for an all-zero block, NaN/Inf propagate) and the codes its
rounding (the same counter-based stream, keyed by the element index of the whole tensor).

`block_gemm` defines the product's numerics, which the CPU path and the Triton kernel reproduce bit for bit: per
K-block ``j`` the exact int32 product ``P_j = a[..., :, Kj] @ b[..., Kj, :]``, then in fp32, in block order,
``acc = acc + P_j * (sa_j * sb_j)`` (the scale outer product first), then ``+ bias`` and the cast.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fqtc.quant.gemm import int_gemm
from fqtc.quant.uniform import Rounder, qmax_for, round_to_int8, scale_from_amax

# Block sizes along K: powers of two (a Triton tile is one K-block; tl.dot needs K >= 16).
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_BLOCK = 32


def check_block(block: int) -> int:
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))} (elements per scale along "
                         f"the reduction dim), got {block!r}")
    return block


def _dims(dims: Sequence[int], ndim: int) -> list[int]:
    out = sorted({d % ndim for d in dims})
    if not 1 <= len(out) <= 2:
        raise ValueError(f"block scaling blocks one dim (1 x b groups) or two (b x b tiles), got dims {list(dims)}")
    return out


def scale_shape(shape: Sequence[int], dims: Sequence[int], block: int) -> list[int]:
    """The compact scale's shape: ``shape`` with each blocked dim divided by ``block`` (rounded up)."""
    ds = _dims(dims, len(shape))
    return [-(-s // block) if i in ds else s for i, s in enumerate(shape)]


def _repeat(scale: torch.Tensor, dim: int, n: int, block: int) -> torch.Tensor:
    """``scale`` repeated ``block`` times along ``dim`` and cut to ``n`` entries: element ``i`` reads entry
    ``i // block``, an index gather. The index is a truncating division (equal to floor for these non-negative
    indices): with torch 2.13, Inductor miscompiled the floor-division and ``repeat_interleave`` forms of this gather
    when the scale had one entry along another dim (tests/passes/test_block.py checks Inductor bit for bit)."""
    idx = torch.div(torch.arange(n, device=scale.device), block, rounding_mode="trunc")
    return scale.index_select(dim % scale.dim(), idx)


def expand_scale(scale: torch.Tensor, shape: Sequence[int], dims: Sequence[int], block: int) -> torch.Tensor:
    """A compact scale repeated to ``shape`` (each element gets its block's scale)."""
    for d in _dims(dims, len(shape)):
        if scale.shape[d] != shape[d]:
            scale = _repeat(scale, d, shape[d], block)
    return scale


def block_amax(x: torch.Tensor, dims: Sequence[int], block: int) -> torch.Tensor:
    """fp32 abs-max of every block (compact shape); NaN and Inf propagate, an empty block has abs-max 0."""
    ds = _dims(dims, x.dim())
    xf = x.float().abs()
    pad: list[int] = []
    for d in reversed(range(x.dim())):  # F.pad lists the last dim first
        pad += [0, (-x.shape[d]) % block if d in ds else 0]
    if any(pad):
        xf = F.pad(xf, pad)  # zeros never raise an abs-max
    shape: list[int] = []
    red: list[int] = []
    for i, s in enumerate(xf.shape):
        if i in ds:
            shape += [s // block, block]
            red.append(len(shape) - 1)
        else:
            shape.append(s)
    xb = xf.reshape(shape)
    if xb.numel() == 0:
        return xb.new_zeros([s for i, s in enumerate(shape) if i not in red])
    return xb.amax(dim=red)


def quantize_block(
    x: torch.Tensor,
    bits: int,
    dims: Sequence[int],
    block: int = DEFAULT_BLOCK,
    rounding: str = "nearest",
    *,
    seed: int = 0,
    step: torch.Tensor | int = 0,
    stream: int = 0,
    key: torch.Tensor | None = None,
    rounder: Rounder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x`` and the compact fp32 scale of its blocks over ``dims`` (module docstring); ``key`` and
    ``rounder`` as in `fqtc.quant.uniform.quantize`."""
    check_block(block)
    scale = scale_from_amax(block_amax(x, dims, block), bits)
    full = expand_scale(scale, x.shape, dims, block)
    return round_to_int8(x.float() / full, qmax_for(bits), rounding, seed=seed, step=step, stream=stream, key=key,
                         rounder=rounder), scale


def dequantize_block(codes: torch.Tensor, scale: torch.Tensor, dims: Sequence[int], block: int) -> torch.Tensor:
    return codes.float() * expand_scale(scale, codes.shape, dims, block)


def _row_scale(scale: torch.Tensor, rows: int, dim: int, block: int) -> torch.Tensor:
    """Expand a GEMM-side scale's non-reduction dim (tiles hold ``ceil(rows/block)`` there) to ``rows``."""
    n = scale.shape[dim]
    if n in (1, rows):
        return scale
    if n != -(-rows // block):
        raise ValueError(f"block_gemm: a scale with {n} entries along a dim of {rows} rows is neither per row "
                         f"nor per tile of {block}")
    return _repeat(scale, dim, rows, block)


def _at_least_2d(scale: torch.Tensor | None) -> torch.Tensor | None:
    """A scale with fewer than two dims as the matrix-shaped scale it broadcasts as (``s`` -> [1, 1], [N] -> [1, N])."""
    if scale is None or scale.dim() >= 2:
        return scale
    return scale.reshape((1,) * (2 - scale.dim()) + tuple(scale.shape))


def block_form(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor | None,
               block: int) -> str | None:
    """None when `block_gemm` runs the blocked integer GEMM on these operands, else why it multiplies dequantized
    floats instead (a float operand, or a scale varying inside a K-block)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a_scale is None or b_scale is None:
        return "an operand is not int8 codes with a scale (a partially quantized GEMM)"
    a_scale, b_scale = _at_least_2d(a_scale), _at_least_2d(b_scale)
    kb = -(-a.shape[-1] // block)
    if (a_scale.dim() and a_scale.shape[-1] not in (1, kb)) or (b_scale.dim() > 1 and b_scale.shape[-2] not in (1, kb)):
        return "a scale varies inside a K-block"
    return None


def block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    block: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = int_gemm,
) -> torch.Tensor:
    """``(a_scale * a) @ (b_scale * b) + bias`` with block scales (module docstring for the numerics).

    ``gemm``: the exact int32 product of one K-block (`fqtc.quant.gemm.int_gemm`; the Inductor lowering passes the
    graph op of the batched case, fqtc/codegen/inductor_cpu.py).

    ``a`` [..., M, K] and ``b`` [..., K, N] int8; ``a_scale`` [..., M | ceil(M/block) | 1, ceil(K/block) | 1],
    ``b_scale`` [..., ceil(K/block) | 1, N | ceil(N/block) | 1]: block scales along K (groups or tiles), or the
    keepdim scale of a non-blocked operand (constant along K). Other forms (`block_form`) multiply the dequantized
    operands in fp32."""
    check_block(block)
    a_scale, b_scale = _at_least_2d(a_scale), _at_least_2d(b_scale)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if block_form(a, a_scale, b, b_scale, block) is not None:
        a_hp = a.float() if a_scale is None else a.float() * _expand_k(_row_scale(a_scale, m, -2, block), k, -1,
                                                                         block)
        b_hp = b.float() if b_scale is None else b.float() * _expand_k(_row_scale(b_scale, n, -1, block), k, -2,
                                                                         block)
        out = torch.matmul(a_hp, b_hp)
        return (out + bias.float() if bias is not None else out).to(out_dtype)
    sa = _row_scale(a_scale, m, -2, block)  # [..., M | 1, KB | 1]
    sb = _row_scale(b_scale, n, -1, block)  # [..., KB | 1, N | 1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    acc = torch.zeros(*batch, m, n, dtype=torch.float32, device=a.device)
    for j in range(-(-k // block)):
        k0, k1 = j * block, min(k, (j + 1) * block)
        p = gemm(a[..., k0:k1], b[..., k0:k1, :])
        s = sa.narrow(-1, j if sa.shape[-1] > 1 else 0, 1) * sb.narrow(-2, j if sb.shape[-2] > 1 else 0, 1)
        acc = acc + p.float() * s
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def _expand_k(scale: torch.Tensor, k: int, dim: int, block: int) -> torch.Tensor:
    n = scale.shape[dim]
    if n in (1, k):
        return scale
    return _repeat(scale, dim, k, block)
