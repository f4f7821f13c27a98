"""The onnx_ir bridge: onnx_ir -> graph_ir -> onnx_ir is lossless, and annotations cross both ways."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.errors import QPassesError
from qpasses.interop.onnx_ir_bridge import (
    ENCODING_KEY,
    META_KEY,
    PRECISION_KEY,
    OnnxIrMissingError,
    from_onnx_ir,
    to_onnx_ir,
)
from qpasses.quant.encodings import Encoding
from qpasses.quant.precision_type import Precision

ir = pytest.importorskip("onnx_ir")

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = sorted(MODELS.glob("*.onnx"))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(_run(a, feeds), _run(b, feeds), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)  # bit-exact: the same graph, the same weights


def _control_flow_model() -> onnx.ModelProto:
    """MatMul -> If (a subgraph reading an outer initializer, one with its own Constant) -> a local
    function with an attribute reference; value_info, metadata and doc strings to carry."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["h", "B"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 4])],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(-1.5))),
            helper.make_node("Mul", ["h", "c"], ["e"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 4])],
    )
    leaky = helper.make_node("LeakyRelu", ["X"], ["Y"])
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "alpha", "alpha", onnx.AttributeProto.FLOAT
    leaky.attribute.append(ref)
    func = helper.make_function(
        "local", "LeakyScale", ["X"], ["Y"], [leaky], [helper.make_opsetid("", 17)], attributes=["alpha"]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm", doc_string="first layer"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("LeakyScale", ["z"], ["y"], name="act", domain="local", alpha=0.2),
    ]
    graph = helper.make_graph(
        nodes,
        "cf",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w, b],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[func],
        ir_version=10,
        producer_name="test",
        doc_string="control flow",
    )
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_models_round_trip(path: Path) -> None:
    model = ir.load(path)
    graph = from_onnx_ir(model)
    assert graph.to_onnx() == onnx.load(str(path))  # graph_ir sees exactly the file
    back = to_onnx_ir(graph)
    assert ir.serde.serialize_model(back) == ir.serde.serialize_model(model)
    feeds = {"input": np.load(MODELS / "digits_test.npz")["input"][:32]}
    _assert_same_outputs(onnx.load(str(path)), ir.to_proto(back), feeds)


def test_subgraph_function_round_trip() -> None:
    original = _control_flow_model()
    model = ir.from_proto(original)
    graph = from_onnx_ir(model)
    assert graph.to_onnx() == original
    assert [op.op_type for op in graph.ops] == ["MatMul", "If", "LeakyScale"]
    assert graph.tensors["W"].initializer is not None and graph.tensors["h"].shape == (2, 4)
    back = ir.to_proto(to_onnx_ir(graph))
    assert back == ir.to_proto(model)
    assert back.functions[0].name == "LeakyScale" and back.metadata_props[0].key == "author"
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        _assert_same_outputs(original, back, {"x": x, "cond": np.array(cond)})


def test_model_built_with_onnx_ir() -> None:
    """What an onnxscript compiler holds: values named by onnx_ir, numpy-backed weights (not protos)."""
    w = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    weight = ir.Value(name="w", const_value=ir.tensor(w))
    mm = ir.node("MatMul", [x, weight])
    act = ir.node("Gelu", mm.outputs, attributes={"approximate": "tanh"})
    graph = ir.Graph([x], act.outputs, nodes=[mm, act], initializers=[weight], opset_imports={"": 20}, name="g")
    model = ir.Model(graph, ir_version=10)
    lifted = from_onnx_ir(model)
    assert np.array_equal(lifted.tensors["w"].data, w)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)}
    _assert_same_outputs(ir.to_proto(model), lifted.to_onnx(), feeds)
    _assert_same_outputs(ir.to_proto(model), ir.to_proto(to_onnx_ir(lifted)), feeds)


def test_external_data_is_read_in(tmp_path: Path) -> None:
    """onnx_ir keeps external weights in their file; the IR gets the bytes (no base folder to resolve)."""
    original = _control_flow_model()
    copy = onnx.ModelProto.FromString(original.SerializeToString())  # saving with external data edits it
    onnx.save_model(
        copy,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    model = ir.load(tmp_path / "m.onnx")
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    graph = from_onnx_ir(model)
    init = graph.tensors["W"].initializer
    assert init.data_location == TensorProto.DEFAULT and not init.external_data
    assert np.array_equal(graph.tensors["W"].data, numpy_helper.to_array(original.graph.initializer[0]))
    x = np.ones((2, 3), np.float32)
    _assert_same_outputs(original, graph.to_onnx(), {"x": x, "cond": np.array(True)})


def _annotated() -> graph_ir.Graph:
    graph = graph_ir.load(MODELS / "digits_cnn.onnx")
    weight = "features.0.conv.weight"
    graph.tensors["input"].encoding = Encoding(8, (1 / 255,), (0,))
    graph.tensors["input"].precision = Precision("int", 8)
    graph.tensors["input"].meta.update(precision_source="override", encoding_bw=8)
    graph.tensors[weight].encoding = Encoding(
        4, (0.01, 0.02, 0.5, 1e-7, 3.0, 0.1, 0.2, 0.3), (-8,) * 8, symmetric=True, axis=0
    )
    graph.tensors["features.1.act_out"].precision = Precision("float", 16)
    return graph


def _annotations(graph: graph_ir.Graph) -> dict[str, tuple]:
    return {
        t.name: (t.encoding, t.precision, t.meta)
        for t in graph.tensors.values()
        if t.encoding is not None or t.precision is not None or t.meta
    }


def test_annotations_survive_graph_ir_onnx_ir_graph_ir(tmp_path: Path) -> None:
    graph = _annotated()
    expected = _annotations(graph)
    assert len(expected) == 3
    model = to_onnx_ir(graph)
    value = model.graph.initializers["features.0.conv.weight"]
    assert value.meta[ENCODING_KEY] == expected["features.0.conv.weight"][0]
    assert model.graph.inputs[0].metadata_props[PRECISION_KEY] == "int8"
    assert _annotations(from_onnx_ir(model)) == expected  # in memory: the objects in meta
    ir.save(model, tmp_path / "annotated.onnx")  # on disk: the JSON in metadata_props
    back = from_onnx_ir(ir.load(tmp_path / "annotated.onnx"))
    assert _annotations(back) == expected
    # The props became tensor slots: the IR's own lowering is the annotation-free model it started from.
    assert back.to_onnx() == graph.to_onnx()


def test_quantized_model_annotations_cross_both_ways() -> None:
    from qpasses.quantize import quantize_model

    result = quantize_model(
        MODELS / "digits_cnn.onnx",
        MODELS / "digits_calib.npz",
        progress=False,
        runtime_check=False,
        auto_fallback=False,
    )
    expected = _annotations(result.graph)
    assert {"input", "features.0.act_out"} <= {n for n, (e, _, _) in expected.items() if isinstance(e, Encoding)}
    again = from_onnx_ir(ir.from_proto(ir.to_proto(to_onnx_ir(result.graph))))  # via metadata_props only
    assert _annotations(again) == expected
    assert again.to_onnx() == result.model


def test_quantize_onnx_ir_equals_quantize_model() -> None:
    from qpasses.api import quantize_onnx_ir
    from qpasses.quantize import quantize_model

    options = {"progress": False, "runtime_check": False, "auto_fallback": False}
    qmodel, encodings = quantize_onnx_ir(
        ir.load(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_calib.npz"), **options
    )
    reference = quantize_model(MODELS / "digits_cnn.onnx", str(MODELS / "digits_calib.npz"), **options)
    assert from_onnx_ir(qmodel).to_onnx() == reference.model
    feeds = {"input": np.load(MODELS / "digits_test.npz")["input"][:32]}
    _assert_same_outputs(ir.to_proto(qmodel), reference.model, feeds)
    assert encodings.activations == reference.encodings.activations
    assert encodings.params == reference.encodings.params


def test_meta_objects_stay_in_memory() -> None:
    graph = graph_ir.load(MODELS / "digits_cnn.onnx")
    marker = object()
    graph.tensors["input"].meta["owner"] = marker
    value = to_onnx_ir(graph).graph.inputs[0]
    assert value.meta[META_KEY]["owner"] is marker and META_KEY not in value.metadata_props
    assert from_onnx_ir(to_onnx_ir(graph)).tensors["input"].meta["owner"] is marker


def test_bad_annotation_prop_is_a_user_error() -> None:
    model = ir.load(MODELS / "digits_cnn.onnx")
    model.graph.inputs[0].metadata_props[ENCODING_KEY] = '{"bitwidth": 8}'
    with pytest.raises(QPassesError, match="input.*qpasses.encoding"):
        from_onnx_ir(model)
    with pytest.raises(QPassesError, match="onnx_ir.Model"):
        from_onnx_ir(onnx.load(str(MODELS / "digits_cnn.onnx")))  # type: ignore[arg-type]


def test_missing_onnx_ir_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx_ir", None)  # import onnx_ir now raises ImportError
    with pytest.raises(OnnxIrMissingError, match=r"qpasses\[onnx-ir\]") as info:
        to_onnx_ir(graph_ir.load(MODELS / "digits_cnn.onnx"))
    assert isinstance(info.value, QPassesError) and isinstance(info.value, ImportError)
