"""Pure tensor numerics of fqtc: rounding, quantizers, integer GEMM reference. No graph code lives here."""

from fqtc.quant.gemm import int_gemm, scaled_gemm
from fqtc.quant.rng import stream_key, uniform_like
from fqtc.quant.uniform import absmax_scale, dequantize, qmax_for, quantize

__all__ = [
    "absmax_scale", "dequantize", "int_gemm", "qmax_for", "quantize", "scaled_gemm", "stream_key", "uniform_like",
]
