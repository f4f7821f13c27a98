"""Guard the shipped digits models and data that the quantization tests rely on.

Why: every end-to-end test uses these files; if a rebuild (tools/build_digits_models.py)
or a stray edit breaks them, fail here with a clear message instead of downstream.
No torch: the library and its tests must run without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qpasses.core.verification import exact_session

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL_FILES = ["digits_cnn.onnx", "digits_cnn_relu6.onnx", "digits_cnn_residual.onnx"]
DATA_FILES = {"digits_calib.npz": 256, "digits_test.npz": 360}
MIN_ACCURACY = 0.9


def load_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (input, labels) from one shipped .npz."""
    with np.load(MODELS / name) as data:
        return data["input"], data["labels"]


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_checks_and_interface(name: str) -> None:
    """The model is valid ONNX with the documented opset, I/O names and shapes."""
    model = onnx.load(MODELS / name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input"
    assert out.name == "logits"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 1, 16, 16]
    assert out_dims == ["batch", 10]
    names = [n.name for n in model.graph.node]
    assert all(names), "every node must be named"
    assert len(set(names)) == len(names), "node names must be unique"


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_accuracy(name: str) -> None:
    """Each model runs in onnxruntime (CPU) and classifies the test split well."""
    x, labels = load_split("digits_test.npz")
    sess = exact_session(str(MODELS / name))
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (len(x), 10)
    acc = float((logits.argmax(axis=1) == labels).mean())
    assert acc > MIN_ACCURACY, f"{name}: test top-1 {acc:.4f}"


@pytest.mark.parametrize(("name", "n"), DATA_FILES.items())
def test_data_files(name: str, n: int) -> None:
    """The .npz files hold exactly `input` float32 [N,1,16,16] in [0,1] and int64 labels."""
    with np.load(MODELS / name) as data:
        assert sorted(data.files) == ["input", "labels"]
    x, labels = load_split(name)
    assert x.dtype == np.float32
    assert x.shape == (n, 1, 16, 16)
    assert labels.dtype == np.int64
    assert labels.shape == (n,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_default_model_has_bn_and_depthwise() -> None:
    """digits_cnn keeps unfused BN nodes and a depthwise conv (group == channels)."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") >= 1
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    depthwise = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = inits[node.input[1]]  # [out, in/group, kh, kw]
        if group > 1 and weight.shape[1] == 1 and weight.shape[0] == group:
            depthwise.append(node.name)
    assert depthwise, "expected a depthwise Conv (group == channels)"
