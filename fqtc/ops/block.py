"""Block-scaled ops (`fqtc.quant.block`; docs/options.md, "Block scaling").

- ``fqt::quantize_block(x, bits, dims, block, rounding, seed, stream, step)``: int8 codes and the compact fp32 scale
  of ``x``'s blocks of ``block`` elements along ``dims`` (one dim: 1 x b groups; two: b x b tiles);
- ``fqt::block_gemm(a, a_scale, b, b_scale, block, bias, out_dtype)``: the integer GEMM accumulating each K-block
  in int32 and applying its scales in fp32, in block order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtc.ops.core import fake_gemm_out
from fqtc.quant import block as _block


@torch.library.custom_op("fqt::quantize_block", mutates_args=())
def quantize_block(x: Tensor, bits: int, dims: list[int], block: int, rounding: str, seed: int, stream: int,
                   step: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric uniform quantization with one scale per block (`fqtc.quant.block.quantize_block`)."""
    codes, scale = _block.quantize_block(x, bits, dims, block, rounding, seed=seed, step=step, stream=stream)
    return codes.contiguous(), scale.contiguous()  # the fake impl's layout, whatever the input's strides


@quantize_block.register_fake
def _(x, bits, dims, block, rounding, seed, stream, step):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(_block.scale_shape(x.shape, dims, block), dtype=torch.float32))


@torch.library.custom_op("fqt::block_gemm", mutates_args=())
def block_gemm(a: Tensor, a_scale: Tensor | None, b: Tensor, b_scale: Tensor | None, block: int, bias: Tensor | None,
               out_dtype: torch.dtype) -> Tensor:
    """``(a_scale*a) @ (b_scale*b) + bias`` with block scales along K (`fqtc.quant.block.block_gemm`)."""
    return _block.block_gemm(a, a_scale, b, b_scale, block, bias, out_dtype).contiguous()


@block_gemm.register_fake
def _(a, a_scale, b, b_scale, block, bias, out_dtype):
    return fake_gemm_out(a, b, bias, out_dtype)
