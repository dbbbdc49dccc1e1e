"""Reference functions for kernel features that `fqtc.quant` does not define yet (pure tensor code, no graph code).

- `pack_int4` / `unpack_int4`: the kernels' int8-typed view of `fqtc.quant.int4`'s packing along the last dim.
- `qgemm_requant`: the GEMM-with-requantized-output chain, ``quantize(scaled_gemm(...))``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fqtc.quant import int4 as _int4
from fqtc.quant.gemm import scaled_gemm
from fqtc.quant.uniform import quantize


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """The quantize kernel's packed output: `fqtc.quant.int4.pack_int4` along the last dim (which must be even),
    as int8 bytes."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 packs pairs along the last dim; shape {list(codes.shape)} has an odd last dim")
    return _int4.pack_int4(codes).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4` (`fqtc.quant.int4.unpack_int4`)."""
    return _int4.unpack_int4(packed)


def qgemm_requant(
    a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype, bits: int, reduce_dims: Sequence[int], rounding: str,
    seed: int, step: torch.Tensor | int, stream: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``out = scaled_gemm(...)`` and its codes/scale ``quantize(out, bits, reduce_dims, ...)``: the chain the GEMM
    kernel's requantizing epilogue computes in one pass."""
    out = scaled_gemm(a, a_scale, b, b_scale, bias, out_dtype)
    codes, scale = quantize(out, bits, reduce_dims, rounding, seed=seed, step=step, stream=stream)
    return out, codes, scale
