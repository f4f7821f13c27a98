"""Bridges to other IRs that carry qpasses annotations (onnx_ir: onnxscript / the PyTorch exporter)."""
