"""What tests read off a lowered QDQ model: which tensors it quantizes, its output SQNR vs FP32."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from qpasses.core import verification
from qpasses.data.evaluation import sqnr_db


def quantized_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors a QuantizeLinear reads (weights and activations)."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def output_sqnr(
    fp32: onnx.ModelProto, model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], output: int = 0
) -> float:
    """SQNR of ``model``'s ``output``-th output vs ``fp32``'s over ``feeds``, both with exact semantics."""
    feeds = list(feeds)
    ref = np.concatenate([verification.exact_session(fp32).run(None, dict(f))[output].ravel() for f in feeds])
    got = np.concatenate([verification.exact_session(model).run(None, dict(f))[output].ravel() for f in feeds])
    return sqnr_db(ref, got)
