"""apply-overrides must invalidate the cached QuantPlan when it changes precisions.

Regression: ``apply-overrides{path=...},encode-weights`` encoded a weight the overrides pin to
float32, because apply-overrides computed the plan first (to find shared tensors) and then set
precisions without telling the analysis cache. Truth: a fresh QuantPlan of the annotated graph,
and the overrides file itself (a float32 weight has no encoding).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.core.pipeline import build_passes, parse_pipeline
from qpasses.passes import default_registry
from qpasses.quant.plan import QuantPlan


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc.weight"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _overrides(tmp_path: Path) -> str:
    doc = {
        "version": "0.6.1",
        "activation_encodings": {},
        "param_encodings": {"conv.weight": [{"bitwidth": 32, "dtype": "float"}]},
    }
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_float32_weight_override_is_not_encoded_by_a_later_pass(tmp_path: Path) -> None:
    graph = graph_ir.load(_model())
    ctx = PassContext()
    passes = build_passes(
        parse_pipeline(f"apply-overrides{{path={_overrides(tmp_path)}}},encode-weights"), default_registry()
    )
    PassManager(passes, verify="checker").run(graph, ctx)
    weight = graph.tensors["conv.weight"]
    assert weight.precision is not None and weight.precision.dtype == "float"
    assert weight.encoding is None, "encode-weights used a QuantPlan computed before the float32 override"
    assert graph.tensors["fc.weight"].encoding is not None  # the other weight is still encoded
    # The plan the context now hands out is the one a fresh analysis computes.
    cached = ctx.get(QuantPlan, graph).plan
    fresh = QuantPlan(graph, PassContext()).plan
    assert list(cached.weights) == list(fresh.weights) == ["fc.weight"]


def test_plan_is_kept_when_nothing_changes_precision(tmp_path: Path) -> None:
    """Range overrides do not change the plan: it must not be recomputed for them (nor the graph touched)."""
    doc = {"activation_encodings": {"r": [{"bitwidth": 8, "min": 0.0, "max": 4.0}]}, "param_encodings": {}}
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(doc))
    graph = graph_ir.load(_model())
    ctx = PassContext()
    plan = ctx.get(QuantPlan, graph)
    version = graph.version
    PassManager([default_registry().create_pass("apply-overrides", path=str(path))], verify="none").run(graph, ctx)
    assert graph.version == version and ctx.get(QuantPlan, graph) is plan
    assert graph.tensors["r"].meta["encoding_source"] == "override"
