"""A model without graph outputs is a user error, raised before quantization starts.

Regression: ``quantize`` exited 0 on a graph without outputs, printed "quantized 9 activations" and
wrote a 0-node model onnxruntime cannot load. Truth: onnxruntime itself (it refuses the model).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.errors import QPassesError
from qpasses.core.model_checks import ModelCheckError, check_quantizable
from qpasses.core.verification import exact_session
from qpasses.quantize import quantize_model


def _model(outputs: list[str]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds() -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(i).standard_normal((1, 3, 6, 6)).astype(np.float32)} for i in range(2)]


def test_no_outputs_is_a_user_error_for_models_and_graphs() -> None:
    model = _model([])
    for candidate in (model, graph_ir.load(model)):
        with pytest.raises(ModelCheckError, match="'convnet' has no graph outputs"):
            check_quantizable(candidate)
    with pytest.raises(QPassesError, match=r"^net\.onnx has no graph outputs"):
        check_quantizable(model, "net.onnx")


def test_output_nothing_produces_is_a_user_error() -> None:
    model = _model(["r", "ghost"])
    with pytest.raises(ModelCheckError, match="'ghost'"):
        check_quantizable(model)
    with pytest.raises(Exception):  # noqa: B017 - the independent truth: onnxruntime refuses it too
        exact_session(model)


def test_valid_models_pass() -> None:
    model = _model(["r"])
    check_quantizable(model)
    check_quantizable(graph_ir.load(model))
    exact_session(model)  # and onnxruntime agrees


def test_quantize_refuses_a_model_without_outputs() -> None:
    with pytest.raises(ModelCheckError, match="no graph outputs"):
        quantize_model(_model([]), _feeds(), progress=False)
