"""Integer GEMM with scales in the epilogue: the reference every GEMM kernel is tested against.

``int_gemm(a, b)`` computes the exact int32 product of int8 codes. On CPU it runs as fp32 GEMM on the codes in
K-chunks of at most 1024: every partial sum is an integer below 1024*127^2 < 2^24, so fp32 is exact, and it runs
at fp32 speed (``torch._int_mm`` is 50-100x slower than fp32 on AVX2 CPUs, docs/architecture.md).
"""

from __future__ import annotations

import torch

K_CHUNK = 1024  # 1024 * 127 * 127 = 16,516,096 < 2**24: exact partial sums in fp32


def int_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b`` for int8 codes (2-D ``mm`` or 3-D batched)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_gemm expects int8 codes, got {a.dtype} and {b.dtype}")
    k = a.shape[-1]
    if k <= K_CHUNK:
        return torch.matmul(a.float(), b.float()).to(torch.int32)
    acc = None
    for k0 in range(0, k, K_CHUNK):
        part = torch.matmul(a[..., k0 : k0 + K_CHUNK].float(), b[..., k0 : k0 + K_CHUNK, :].float()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def scale_along_k(a_scale: torch.Tensor | None, b_scale: torch.Tensor | None) -> bool:
    """True when a scale varies along the reduction axis, so scales cannot sit in the epilogue."""
    return (a_scale is not None and a_scale.dim() > 0 and a_scale.shape[-1] != 1) or (
        b_scale is not None and b_scale.dim() > 1 and b_scale.shape[-2] != 1
    )


def not_integer_reason(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor,
                       b_scale: torch.Tensor | None) -> str | None:
    """Why ``scaled_gemm(a, a_scale, b, b_scale)`` multiplies dequantized floats instead of running the exact
    integer GEMM with scales in the epilogue, or None when it runs the integer GEMM. The one test every consumer
    uses (the reference below, the CUDA implementations, the codegen pass on fake values)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return "an operand is not int8 codes (a partially quantized GEMM)"
    if a_scale is None or b_scale is None:
        return "an operand has no scale (full-precision operand)"
    if scale_along_k(a_scale, b_scale):
        return "a scale varies along the reduction axis (no epilogue scaling possible)"
    return None


def scaled_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a_scale*a) @ (b_scale*b) + bias`` for int8 codes or float operands.

    Both operands int8 with scales constant along K: exact integer GEMM, then ``acc * a_scale * b_scale`` in fp32
    (the epilogue). Otherwise (a float operand, or a scale along K) the dequantized operands are multiplied in
    fp32: the same mathematical product of the quantized values, without an integer GEMM.
    """
    if not_integer_reason(a, a_scale, b, b_scale) is None:
        out = int_gemm(a, b).float() * a_scale * b_scale
    else:
        a_hp = a.float() if a_scale is None else a.float() * a_scale
        b_hp = b.float() if b_scale is None else b.float() * b_scale
        out = torch.matmul(a_hp, b_hp)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
