"""One ModelProto whose weights are replaced in place: "the model quantized so far".

SeqMSE, AdaRound and AdaScale capture a layer's input from the model whose earlier layers already
carry their chosen (quantized or learned) weights; editing one proto's tensors in place avoids a
lowering per layer. Weights live in initializers or in ``Constant`` nodes' ``value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qpasses.core.errors import PassError


@dataclass
class SwappedWeights:
    model: onnx.ModelProto
    _where: dict[str, onnx.TensorProto] = field(init=False)

    def __post_init__(self) -> None:
        self._where = {t.name: t for t in self.model.graph.initializer}
        for node in self.model.graph.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self._where.setdefault(node.output[0], a.t)

    def set(self, name: str, array: np.ndarray) -> None:
        proto = self._where.get(name)
        if proto is None:  # pragma: no cover - plan weights are initializers or Constant values
            raise PassError(f"weight '{name}' not found in the model")
        proto.CopyFrom(numpy_helper.from_array(np.asarray(array, np.float32), name=proto.name))
