"""fqt custom ops: the only door from compiled graphs into fqtc's numerics and kernels.

Each submodule registers one family of ``torch.library`` custom ops (schema, fake impl, reference impl calling
`fqtc.quant`); `fqtc.codegen` registers CUDA kernels for the same ops. Graphs use the OpOverloads
(``torch.ops.fqt.<name>.default``).

- `fqtc.ops.stepcounter`: ``fqt::step`` and the per-model stochastic-rounding step counters
- `fqtc.ops.core`: ``fqt::stream_key``, ``fqt::quantize``, ``fqt::qgemm``
- `fqtc.ops.block`: ``fqt::quantize_block``, ``fqt::block_gemm`` (block scaling)
- `fqtc.ops.conv`: ``fqt::qconv2d``, ``fqt::qconv2d_input``, ``fqt::qconv2d_weight`` (convolution sites)
- `fqtc.ops.grad`: ``fqt::grad_quantize``, ``fqt::bhq``, ``fqt::bhq_quantize``, ``fqt::bhq_invert`` (gradient
  quantizers PTQ/PSQ/SCQ/BHQ/AQ)
- `fqtc.ops.lwq`: ``fqt::lwq_dequantize``, ``fqt::lwq_unpack``, ``fqt::lwq_update`` (latent weights)
- `fqtc.ops.observe`: ``fqt::observe`` (per-step SQNR logging of the sites option ``log_sqnr`` names)
- `fqtc.ops.fused`: ``fqt::qgemm_fused_quant``, ``fqt::qgemm_fused_grad_quant`` (quantization fused into the
  GEMM prologue, docs/kernels.md)
"""

from fqtc.ops import (
    block,  # noqa: F401  (registers fqt::quantize_block, fqt::block_gemm: block scaling)
    conv,  # noqa: F401  (registers fqt::qconv2d, fqt::qconv2d_input, fqt::qconv2d_weight)
    fused,  # noqa: F401  (registers fqt::qgemm_fused_quant: codegen fusion)
    grad,  # noqa: F401  (registers fqt::grad_quantize, fqt::bhq: gradient quantizers)
    lwq,  # noqa: F401  (registers the fqt::lwq_* ops)
    observe,  # noqa: F401  (registers fqt::observe: option log_sqnr)
)
from fqtc.ops.core import dequantize, qgemm, quantize
from fqtc.ops.stepcounter import get_step, set_step, step

__all__ = ["dequantize", "get_step", "qgemm", "quantize", "set_step", "step"]
