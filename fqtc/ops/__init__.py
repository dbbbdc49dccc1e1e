"""fqt custom ops: the only door from compiled graphs into fqtc's numerics and kernels.

Each submodule registers one family of ``torch.library`` custom ops (schema, fake impl, reference impl calling
`fqtc.quant`); `fqtc.codegen` registers CUDA kernels for the same ops. Graphs use the OpOverloads
(``torch.ops.fqt.<name>.default``).

- `fqtc.ops.core`: ``fqt::step``, ``fqt::quantize``, ``fqt::qgemm``
"""

from fqtc.ops.core import dequantize, get_step, qgemm, quantize, set_step, step

__all__ = ["dequantize", "get_step", "qgemm", "quantize", "set_step", "step"]
