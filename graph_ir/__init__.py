"""graph_ir: a networkx-based IR for ONNX models with a lossless round trip.

g = graph_ir.load("model.onnx")
for op in g.ops: ...
graph_ir.save(g, "out.onnx")
"""

from graph_ir.elements import Op, Tensor
from graph_ir.graph import Graph
from graph_ir.onnx_bridge import from_onnx, load, read_model, save, to_onnx

__all__ = ["Graph", "Op", "Tensor", "from_onnx", "load", "read_model", "save", "to_onnx"]
