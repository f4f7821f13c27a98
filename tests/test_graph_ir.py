"""IR round trip and editing: outputs must be bit-identical, models must stay valid."""

from __future__ import annotations

import hashlib
from pathlib import Path

import model_zoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.errors import GraphError, ModelLoadError
from qpasses.core.verification import exact_session

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = sorted(MODELS.glob("*.onnx"))


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return exact_session(model).run(None, feeds)


def _assert_bit_identical(model: onnx.ModelProto) -> onnx.ModelProto:
    out = graph_ir.from_onnx(model).to_onnx()
    onnx.checker.check_model(out, full_check=True)
    feeds = model_zoo.random_feeds(model)
    for a, b in zip(_run(model, feeds), _run(out, feeds), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    return out


@pytest.mark.parametrize("name", sorted(model_zoo.ALL_MODELS))
def test_round_trip_generated(name):
    model = model_zoo.ALL_MODELS[name]()
    before = model.SerializeToString()
    out = _assert_bit_identical(model)
    assert model.SerializeToString() == before, "loading must not modify the caller's ModelProto"
    # Everything except node order (kept, since the input is sorted) is preserved verbatim.
    assert out.SerializeToString() == before


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_round_trip_shipped(path):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = onnx.load(str(path))
    out = _assert_bit_identical(model)
    assert out.SerializeToString() == model.SerializeToString()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_round_trip_external_data(tmp_path):
    path = model_zoo.external_data(tmp_path / "src")
    g = graph_ir.load(path)
    out_path = graph_ir.save(g, tmp_path / "out" / "model.onnx", external_data=True)
    assert (out_path.parent / "model.onnx.data").exists()
    assert not [p for p in out_path.parent.iterdir() if p.name.startswith(".")], "no temp files left"
    ref = onnx.load(str(path))
    got = onnx.load(str(out_path))
    feeds = model_zoo.random_feeds(ref)
    for a, b in zip(_run(ref, feeds), _run(got, feeds), strict=True):
        assert a.tobytes() == b.tobytes()
    onnx.checker.check_model(str(out_path), full_check=True)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    g = graph_ir.from_onnx(model_zoo.conv_bn_relu())
    target = tmp_path / "m.onnx"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError):
        graph_ir.save(g, target)
    assert list(tmp_path.iterdir()) == []


def test_mul_same_input_keeps_both_edges():
    g = graph_ir.from_onnx(model_zoo.mul_same_input())
    mul = next(op for op in g.ops if op.op_type == "Mul")
    assert mul.inputs[0] == mul.inputs[1]
    x = mul.inputs[0]
    assert [(op.name, slot) for op, slot in g.uses(x) if op is mul] == [(mul.name, 0), (mul.name, 1)]
    producer = g.producer(x)
    if producer is not None:
        assert g.nx.number_of_edges(producer.id, mul.id) == 2


def test_constant_node_weights_look_like_initializers():
    g = graph_ir.from_onnx(model_zoo.constant_node_weights())
    conv = next(op for op in g.ops if op.op_type == "Conv")
    w = g.tensors[conv.inputs[1]]
    assert w.initializer is None and w.is_constant
    ref = next(n for n in model_zoo.constant_node_weights().graph.node if n.output[0] == conv.inputs[1])
    np.testing.assert_array_equal(w.data, numpy_helper.to_array(ref.attribute[0].t))
    w.set_data(w.data * 2)
    assert g.producer(w.name).op_type == "Constant"
    np.testing.assert_array_equal(w.data, numpy_helper.to_array(ref.attribute[0].t) * 2)


def test_optional_empty_slots_survive():
    model = model_zoo.optional_empty_inputs()
    g = graph_ir.from_onnx(model)
    assert any("" in op.inputs for op in g.ops)
    for a, b in zip(model.graph.node, g.to_onnx().graph.node, strict=True):
        assert list(a.input) == list(b.input)


def _small_model(**graph_kw) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    nodes = [
        helper.make_node("Add", ["x", "w"], ["h"], name="add"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes, "g", [x], [y], [w], **graph_kw)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _assert_serialized_round_trip(model: onnx.ModelProto) -> graph_ir.Graph:
    g = graph_ir.from_onnx(model)
    assert g.to_onnx().SerializeToString() == model.SerializeToString()
    return g


def test_value_info_of_graph_output_survives():
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = _assert_serialized_round_trip(_small_model(value_info=[h, y]))
    g.tensor("y").set_type(TensorProto.FLOAT16, [2, 3])  # an edited output: its stale entry is dropped
    assert [vi.name for vi in g.to_onnx().graph.value_info] == ["h"]


def test_explicit_empty_node_domain_survives():
    model = _small_model()
    model.graph.node[0].domain = ""  # proto2: set, so serialized
    assert model.graph.node[0].HasField("domain") and not model.graph.node[1].HasField("domain")
    g = _assert_serialized_round_trip(model)
    g.ops[0].domain = "com.microsoft"  # a pass's domain wins over the kept ''
    assert g.to_onnx().graph.node[0].domain == "com.microsoft"


def test_value_info_of_initializer_survives():
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3])
    g = _assert_serialized_round_trip(_small_model(value_info=[w, h]))
    g.tensor("w").set_data(np.ones((3, 2), np.float32))  # a replaced initializer: its stale entry is dropped
    assert [vi.name for vi in g.to_onnx().graph.value_info] == ["h"]


def test_if_capture_is_a_use_and_blocks_dead_code_removal():
    g = graph_ir.from_onnx(model_zoo.if_outer_scope())
    if_op = next(op for op in g.ops if op.op_type == "If")
    assert if_op.captures, "outer-scope tensors read by the branches are recorded"
    for name in if_op.captures:
        assert any(op is if_op and slot < 0 for op, slot in g.uses(name))
    assert g.remove_dead_ops() == 0
    _assert_bit_identical(g.to_onnx())


def test_replace_all_uses_renames_inside_subgraph_without_touching_source():
    model = model_zoo.if_outer_scope()
    before = model.SerializeToString()
    g = graph_ir.from_onnx(model)
    if_op = next(op for op in g.ops if op.op_type == "If")
    captured = next(n for n in if_op.captures if g.producer(n) is not None or n in g.inputs)
    ident = g.insert_op_on_edge(captured, "Identity")
    assert ident.outputs[0] in if_op.captures and captured not in if_op.captures
    assert model.SerializeToString() == before
    out = g.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    feeds = model_zoo.random_feeds(model)
    for a, b in zip(_run(model, feeds), _run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def _chain_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Neg", ["a"], ["b"], name="n1"),
        helper.make_node("Sigmoid", ["a"], ["dead"], name="dead1"),
        helper.make_node("Abs", ["dead"], ["dead2"], name="dead2"),
        helper.make_node("Relu", ["b"], ["y"], name="r2"),
    ]
    return helper.make_model(
        helper.make_graph(nodes, "chain", [x], [y]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    )


def test_producer_consumers_and_dead_code():
    g = graph_ir.from_onnx(_chain_model())
    assert g.producer("a").name == "r1"
    assert sorted(op.name for op in g.consumers("a")) == ["dead1", "n1"]
    assert g.remove_dead_ops() == 2
    assert [op.name for op in g.ops] == ["r1", "n1", "r2"]
    assert "dead" not in g.tensors


def test_topological_order_is_cached_and_invalidated():
    g = graph_ir.from_onnx(_chain_model())
    first = g.topological_order()
    assert g.topological_order() is first
    g.insert_op_on_edge("a", "Identity")
    second = g.topological_order()
    assert second is not first
    pos = {op.name: i for i, op in enumerate(second)}
    ident = next(op for op in second if op.op_type == "Identity")
    assert pos["r1"] < pos[ident.name] < pos["n1"]


def test_insert_on_edge_keeps_graph_output_name():
    g = graph_ir.from_onnx(_chain_model())
    g.insert_op_on_edge("y", "Identity")
    assert g.outputs == ["y"]
    onnx.checker.check_model(g.to_onnx(), full_check=True)


def test_replace_all_uses_and_set_input():
    g = graph_ir.from_onnx(_chain_model())
    g.replace_all_uses("a", "x")
    assert g.uses("a") == []
    assert g.op("n1").inputs == ["x"]
    assert g.producer("a").name == "r1"
    g.set_input(g.op("n1"), 0, "a")
    assert [op.name for op, _ in g.uses("a")] == ["n1"]
    assert g.nx.has_edge(g.op("r1").id, g.op("n1").id)
    assert not g.nx.has_edge(g.op("r1").id, g.op("n1").id, key=1)


def test_cycle_is_reported():
    g = graph_ir.from_onnx(_chain_model())
    g.set_input(g.op("r1"), 0, "b")
    with pytest.raises(GraphError, match="cycle"):
        g.topological_order()


def test_unknown_tensor_and_duplicate_producer():
    g = graph_ir.from_onnx(_chain_model())
    with pytest.raises(GraphError, match="unknown tensor 'nope'"):
        g.tensor("nope")
    with pytest.raises(GraphError, match="already has producer"):
        g.add_op("Relu", ["x"], ["a"])


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        graph_ir.load(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    with pytest.raises(ModelLoadError):
        graph_ir.load(bad)


def test_graphsurgeon_bridge_round_trip():
    from graph_ir.graphsurgeon_bridge import from_graphsurgeon, to_graphsurgeon

    model = model_zoo.conv_bn_relu()
    g = graph_ir.from_onnx(model)
    back = from_graphsurgeon(to_graphsurgeon(g), template=g).to_onnx()
    onnx.checker.check_model(back, full_check=True)
    feeds = model_zoo.random_feeds(model)
    for a, b in zip(_run(model, feeds), _run(back, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_opset_and_metadata():
    model = model_zoo.metadata_rich()
    g = graph_ir.from_onnx(model)
    assert g.opset() == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out = g.to_onnx()
    assert out.metadata_props == model.metadata_props
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]


def test_rename_tensor_everywhere():
    model = model_zoo.if_outer_scope()
    g = graph_ir.from_onnx(model)
    if_op = next(op for op in g.ops if op.op_type == "If")
    name = next(n for n in if_op.captures if g.producer(n) is not None)
    g.rename_tensor(name, "renamed")
    assert "renamed" in if_op.captures and name not in g.tensors
    assert g.producer("renamed") is not None
    assert any(op is if_op for op, _ in g.uses("renamed"))
    out = g.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    feeds = model_zoo.random_feeds(model)
    for a, b in zip(_run(model, feeds), _run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    g2 = graph_ir.from_onnx(_chain_model())
    g2.rename_tensor("y", "y2")
    assert g2.outputs == ["y2"]
    with pytest.raises(GraphError):
        g2.rename_tensor("x", "x2")


def test_set_output_hands_a_tensor_over_to_another_producer():
    g = graph_ir.from_onnx(_chain_model())
    r2 = g.op("r2")
    g.set_output(r2, 0, "y_pre")
    assert g.producer("y") is None and g.outputs == ["y"]
    g.add_op("Neg", ["y_pre"], ["y"], name="neg")
    assert g.producer("y").name == "neg" and g.producer("y_pre") is r2
    assert [op.name for op in g.ops][-2:] == ["r2", "neg"]
    with pytest.raises(GraphError, match="already has producer"):
        g.set_output(g.op("r1"), 0, "y")
    onnx.checker.check_model(g.to_onnx(), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(g.to_onnx(), {"x": x})[0], -np.maximum(-np.maximum(x, 0), 0))


def test_constant_data_and_static_shape() -> None:
    """constant_data returns a constant's array and refuses an activation (a pass's wrong assumption is a
    qpasses bug, not the user's); static_shape is the shape only when every dim is a known int."""
    from qpasses.core.errors import InternalError

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
            [numpy_helper.from_array(w, "w")],
        )
    )
    graph = graph_ir.load(model)
    np.testing.assert_array_equal(graph.tensors["w"].constant_data(), w)
    assert graph.tensors["w"].static_shape == (2, 3)
    assert graph.tensors["x"].shape == ("batch", 2) and graph.tensors["x"].static_shape is None
    with pytest.raises(InternalError, match="'x' was taken for a constant"):
        graph.tensors["x"].constant_data()
