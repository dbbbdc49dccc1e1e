"""Export of fqt-quantized training graphs (`fqtc.export.onnx`: ONNX opset 21 with the ``com.fqt`` domain)."""

from fqtc.export.onnx import export_onnx

__all__ = ["export_onnx"]
