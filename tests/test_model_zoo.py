"""The zoo is only useful if every model is valid ONNX that onnxruntime really runs."""

from __future__ import annotations

from pathlib import Path

import model_zoo as zoo
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qpasses.core.verification import exact_session


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    # exact_session is quiet: opset11_model's initializers-as-inputs warn by design
    return exact_session(str(model) if isinstance(model, Path) else model)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


@pytest.mark.parametrize("name", sorted(zoo.ALL_MODELS))
def test_model_is_valid_and_runs(name: str) -> None:
    model = zoo.ALL_MODELS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    feeds = zoo.random_feeds(model)
    outputs = _session(model).run(None, feeds)
    assert len(outputs) == len(model.graph.output)
    for out in outputs:
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", sorted(zoo.ALL_MODELS))
def test_factories_are_deterministic(name: str) -> None:
    factory = zoo.ALL_MODELS[name]
    assert factory().SerializeToString() == factory().SerializeToString()


def test_random_feeds_respects_dims_and_dtypes() -> None:
    feeds = zoo.random_feeds(zoo.dynamic_dims(), batch=3)
    assert feeds["input"].shape == (3, 3, zoo.SYMBOLIC_DIM_SIZE, zoo.SYMBOLIC_DIM_SIZE)
    assert feeds["input"].dtype == np.float32
    assert zoo.random_feeds(zoo.constant_node_weights(), batch=3)["input"].shape == (1, 3, 16, 16)
    assert zoo.random_feeds(zoo.float16_model())["input"].dtype == np.float16
    ids = zoo.random_feeds(zoo.int_input_model(), batch=4, seed=1)["ids"]
    assert ids.dtype == np.int64 and ids.shape == (4, 6)
    assert ids.min() >= 0 and ids.max() < zoo.EMBEDDING_ROWS
    a, b = zoo.random_feeds(zoo.conv_bn_relu(), seed=5), zoo.random_feeds(zoo.conv_bn_relu(), seed=5)
    np.testing.assert_array_equal(a["input"], b["input"])


def test_random_feeds_skips_initializers_listed_as_inputs() -> None:
    model = zoo.opset11_model()
    assert len(model.graph.input) > 1
    assert list(zoo.random_feeds(model)) == ["input"]


def test_conv_bn_relu_opsets() -> None:
    for opset in (13, 17):
        model = zoo.conv_bn_relu(opset)
        assert model.opset_import[0].version == opset
        onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in zoo.conv_bn_relu().graph.node]
    assert ops == ["Conv", "BatchNormalization", "Relu"] * 2 + ["GlobalAveragePool", "Flatten", "Gemm"]


def test_constant_node_weights_has_no_initializers() -> None:
    model = zoo.constant_node_weights()
    assert len(model.graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in model.graph.node) == 14


def test_constant_node_weights_matches_initializer_version() -> None:
    base = zoo.conv_bn_relu(opset=13)
    feeds = zoo.random_feeds(zoo.constant_node_weights())
    expected = _session(base).run(None, feeds)[0]
    actual = _session(zoo.constant_node_weights()).run(None, feeds)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_optional_empty_inputs_shape() -> None:
    nodes = {n.op_type: n for n in zoo.optional_empty_inputs().graph.node}
    assert list(nodes["Resize"].input)[1] == ""
    assert list(nodes["Clip"].input)[1] == ""
    assert len(nodes["Conv"].input) == 2


def test_mul_same_input_shape() -> None:
    nodes = {n.op_type: n for n in zoo.mul_same_input().graph.node}
    assert nodes["Mul"].input[0] == nodes["Mul"].input[1]
    assert nodes["Add"].input[0] == nodes["Add"].input[1]


def test_if_outer_scope_both_branches_run() -> None:
    model = zoo.if_outer_scope()
    sess = _session(model)
    x = np.abs(zoo.random_feeds(model)["input"])
    pos = sess.run(None, {"input": x})[0]
    neg = sess.run(None, {"input": -x})[0]
    assert pos.shape == neg.shape == (1, 8)
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in if_node.attribute}
    assert len(branches["then_branch"].initializer) == 1
    assert any(n.op_type == "Constant" for n in branches["else_branch"].node)
    outer = {t.name for t in model.graph.initializer}
    for branch in branches.values():
        inputs = {i for n in branch.node for i in n.input}
        assert "shared.weight" in inputs and "shared.weight" in outer
        assert "hidden" in inputs  # activation produced in the outer graph


def test_loop_body_captures_outer_tensors() -> None:
    model = zoo.loop_model()
    body = next(n for n in model.graph.node if n.op_type == "Loop").attribute[0].g
    inputs = {i for n in body.node for i in n.input}
    assert {"loop.weight", "offset"} <= inputs
    assert not {t.name for t in body.initializer}


def test_local_function_present() -> None:
    model = zoo.local_function()
    assert [f.name for f in model.functions] == ["LinearAct"]
    assert {n.domain for n in model.graph.node} == {zoo.LOCAL_DOMAIN}


def test_external_data(tmp_path: Path) -> None:
    path = zoo.external_data(tmp_path)
    assert path.exists() and (tmp_path / "model.onnx.data").exists()
    onnx.checker.check_model(str(path), full_check=True)
    skeleton = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    out = _session(path).run(None, zoo.random_feeds(skeleton))[0]
    expected = _session(zoo.conv_bn_relu()).run(None, zoo.random_feeds(skeleton))[0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_opsets() -> None:
    def opset(m: onnx.ModelProto) -> int:
        return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))

    assert opset(zoo.opset11_model()) == 11
    assert opset(zoo.opset12_model()) == 12
    assert opset(zoo.clip_relu6_inputs()) == 13
    assert opset(zoo.clip_relu6_attrs()) == 10


def test_clip_forms() -> None:
    clip_in = next(n for n in zoo.clip_relu6_inputs().graph.node if n.op_type == "Clip")
    assert len(clip_in.input) == 3 and not clip_in.attribute
    clip_attr = next(n for n in zoo.clip_relu6_attrs().graph.node if n.op_type == "Clip")
    assert {a.name: a.f for a in clip_attr.attribute} == {"min": 0.0, "max": 6.0}
    for model in (zoo.clip_relu6_inputs(), zoo.clip_relu6_attrs()):
        out = _session(model).run(None, {"input": 10 * zoo.random_feeds(model)["input"]})[0]
        assert out.min() >= 0.0 and out.max() <= 6.0


def test_conv_group_attrs() -> None:
    convs = [n for n in zoo.conv_no_group_attr().graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), None) for n in convs]
    assert groups == [None, 8, None]


def test_already_quantized_has_qdq() -> None:
    ops = [n.op_type for n in zoo.already_quantized().graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 3
    w = next(t for t in zoo.already_quantized().graph.initializer if t.name == "conv.weight_quantized")
    assert numpy_helper.to_array(w).dtype == np.int8


def test_metadata_rich_fields() -> None:
    model = zoo.metadata_rich()
    assert model.doc_string and model.graph.doc_string
    assert {p.key for p in model.metadata_props} == {"author", "license", "task"}
    assert all(n.doc_string for n in model.graph.node)
    assert len(model.graph.value_info) >= 4
    assert [o.name for o in model.graph.output] == ["rnn_out", "feat", "conv_out"]
    kinds = {a.type for n in _all_nodes(model.graph) for a in n.attribute}
    A = onnx.AttributeProto
    assert {A.FLOAT, A.INT, A.STRING, A.TENSOR, A.FLOATS, A.INTS, A.STRINGS} <= kinds
    names = [o.name for o in _session(model).get_outputs()]
    assert names == ["rnn_out", "feat", "conv_out"]
