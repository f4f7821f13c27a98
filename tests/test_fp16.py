"""FP16 mode: ``--float-bw 16`` without calibration data converts the whole model to float16.

Truth: the FP32 models in onnxruntime on the shipped test split (accuracy within 0.5 points),
the stored initializer types, and the model interface (still float32 in and out).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from conftest import MODELS
from mixed_precision_models import run
from onnx import TensorProto

from qpasses.cli import main
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model

TEST = np.load(MODELS / "digits_test.npz")
MODEL_FILES = ["digits_cnn.onnx", "digits_cnn_relu6.onnx", "digits_cnn_residual.onnx"]


def _accuracy(model: onnx.ModelProto) -> float:
    return float((run(model, {"input": TEST["input"]}).argmax(axis=1) == TEST["labels"]).mean())


@pytest.mark.parametrize("name", MODEL_FILES)
def test_whole_model_in_fp16_keeps_accuracy_and_interface(name):
    fp32 = onnx.load(MODELS / name)
    result = quantize_model(MODELS / name, None, QuantConfig(float_bw=16), progress=False)
    model = result.model
    assert all(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer if t.data_type != TensorProto.INT64)
    weights = [t for t in model.graph.initializer if t.name.endswith(("weight", "bias"))]
    assert weights, "the folded conv/gemm weights are stored"
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    ops = [n.op_type for n in model.graph.node]
    assert ops[0] == "Cast" and ops[-1] == "Cast" and ops.count("Cast") == 2  # only at the interface
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    logits = run(model, {"input": TEST["input"][:64]})
    reference = run(fp32, {"input": TEST["input"][:64]})
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference, atol=0.02 * np.abs(reference).max())
    assert abs(_accuracy(model) - _accuracy(fp32)) <= 0.005


def test_cli_float_bw_16_without_calibration_writes_fp16_model(tmp_path, capsys):
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(MODELS / "digits_cnn.onnx", model)
    shutil.copy(MODELS / "digits_calib.npz", tmp_path / "digits_calib.npz")  # not used: --float-bw means no calibration
    assert main(["quantize", str(model), "--float-bw", "16", "-o", str(tmp_path / "out"), "-q"]) == 0
    assert "using calibration data" not in capsys.readouterr().out
    out = onnx.load(tmp_path / "out" / "model.qdq.onnx")
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    inits = {t.name: t.data_type for t in out.graph.initializer}
    assert inits[conv.input[1]] == TensorProto.FLOAT16
    assert abs(_accuracy(out) - _accuracy(onnx.load(MODELS / "digits_cnn.onnx"))) <= 0.005
