"""The one packing of signed 4-bit codes: two codes per byte in row-major order, element ``2i`` in the low nibble
and ``2i+1`` in the high nibble (the layout the Triton int4 GEMM prologue unpacks with ``(p << 4) >> 4`` and
``p >> 4``, docs/kernels.md; latent-weight storage packs its flattened codes the same way, docs/latent_weights.md)."""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7] ``[..., n]`` -> uint8 ``[..., ceil(n/2)]``, pairs along the last dim; an odd ``n``
    pads the last high nibble with 0 (`unpack_int4` with ``n`` drops it). Pack a flattened tensor for a flat
    layout."""
    if codes.dim() == 0:
        codes = codes.reshape(1)
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    if c.shape[-1] % 2:
        c = torch.cat([c, c.new_zeros(*c.shape[:-1], 1)], dim=-1)
    nib = c & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (or the same bytes as int8) ``[..., m]`` -> int8 codes ``[..., 2m]``, cut to
    ``n`` along the last dim when given."""
    p = (packed.view(torch.uint8) if packed.dtype == torch.int8 else packed).to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).flatten(-2)
    if n is not None:
        nib = nib[..., :n]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
