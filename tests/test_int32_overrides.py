"""INT32 overrides: DequantizeLinear -> Cast(INT32) -> op -> Cast(FLOAT) -> QuantizeLinear, and the refusals.

Inputs are integers in [0, 255] holding both ends, so the calibrated 8-bit encodings of a and b
have scale exactly 1: the Add then sees the exact integers, and the only error left is c's own
quantization step (the truth is the FP32 model in onnxruntime).
"""

from __future__ import annotations

import numpy as np
import pytest
from mixed_precision_models import data_path, int32_model, integer_feeds, op_counts, run, three_convs, write_json
from onnx import TensorProto, numpy_helper

from qpasses.core.errors import QPassesError
from qpasses.quantize import quantize_model

Q, DQ = "QuantizeLinear", "DequantizeLinear"
INT32_ALL = {"activation_encodings": {n: [{"bitwidth": 32, "dtype": "int"}] for n in "abc"}, "param_encodings": {}}


def _quantize(model, tmp_path, overrides, **kwargs):
    path = write_json(tmp_path / "int32.json", overrides)
    return quantize_model(model, integer_feeds(4), overrides=path, progress=False, **kwargs)


def _casts(model) -> list[int]:
    return [next(a.i for a in n.attribute if a.name == "to") for n in model.graph.node if n.op_type == "Cast"]


def test_add_runs_in_int32_between_quantized_ops(tmp_path):
    result = _quantize(int32_model(), tmp_path, INT32_ALL)
    model = result.model
    # The spec's rewrite around the Add, quantized Relus on both sides.
    assert data_path(model, "x") == [Q, DQ, "Relu", Q, DQ, "Cast", "Add", "Cast", Q, DQ, "Relu", Q, DQ]
    assert data_path(model, "y")[:6] == [Q, DQ, "Relu", Q, DQ, "Cast"]
    assert sorted(_casts(model)) == [TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT32]
    add = next(n for n in model.graph.node if n.op_type == "Add")
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    assert types.get(add.output[0], TensorProto.INT32) == TensorProto.INT32
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale = {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == Q}
    assert scale["a"] == scale["b"] == 1.0  # integers pass DQ -> Cast unchanged
    feeds = integer_feeds(1, seed=5)[0]
    expected = run(int32_model(), feeds)
    got = run(model, feeds)
    assert np.abs(got - expected).max() <= scale["c"] / 2 + 1e-4


def test_chained_int32_ops_stay_int32_between_them(tmp_path):
    overrides = {"activation_encodings": {n: [{"bitwidth": 32, "dtype": "int"}] for n in "abcd"}, "param_encodings": {}}
    model = _quantize(int32_model(chain=True), tmp_path, overrides).model
    assert data_path(model, "x") == [Q, DQ, "Relu", Q, DQ, "Cast", "Add", "Relu", "Cast", Q, DQ, "Relu", Q, DQ]
    assert op_counts(model)["Cast"] == 3
    feeds = integer_feeds(1, seed=6)[0]
    assert np.abs(run(model, feeds) - run(int32_model(chain=True), feeds)).max() <= 1.0 + 1e-4


def test_op_with_weights_is_refused(tmp_path):
    overrides = {
        "activation_encodings": {n: [{"bitwidth": 32, "dtype": "int"}] for n in ("conv1_1", "conv2_1")},
        "param_encodings": {},
    }
    path = write_json(tmp_path / "w.json", overrides)
    with pytest.raises(QPassesError, match=r"conv2 \(Conv\).*weights or bias"):
        quantize_model(three_convs(), None, overrides=path, progress=False)


def test_partly_overridden_op_is_refused(tmp_path):
    overrides = {"activation_encodings": {n: [{"bitwidth": 32, "dtype": "int"}] for n in "ac"}, "param_encodings": {}}
    with pytest.raises(QPassesError, match=r"add \(Add\).*partly overridden, b not INT32"):
        _quantize(int32_model(), tmp_path, overrides)


def test_target_without_int32_kernel_is_refused(tmp_path):
    with pytest.raises(QPassesError, match=r"add \(Add\).*target hta cannot run Add in INT32"):
        _quantize(int32_model(), tmp_path, INT32_ALL, target="hta")
    assert _quantize(int32_model(), tmp_path, INT32_ALL, target="ort").model is not None
