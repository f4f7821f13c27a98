"""The pass contract's data channels: analyses keyed on what they read, declared preserved sets,
declared uses, typed artifacts, and the IR as a leaf package."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from graph_ir import Graph
from qpasses.core.analyses import Analysis, Shapes, TopologicalOrder
from qpasses.core.artifacts import Artifacts
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.pass_manager import PassManager
from qpasses.passes import default_registry
from qpasses.passes.quantize.apply_overrides import Overrides
from qpasses.quant.encodings_file import EncodingsFile, PrecisionOverride
from qpasses.quant.plan import QuantPlan
from qpasses.quant.precision_type import Precision
from qpasses.quant.range_search import from_min_max


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_precision_change_invalidates_the_plan_but_not_structural_analyses() -> None:
    g = graph_ir.load(_model())
    ctx = PassContext()
    plan, shapes = ctx.get(QuantPlan, g), ctx.get(Shapes, g)
    assert "r" in plan.plan.activations
    version = g.version
    g.tensors["r"].precision = Precision("float", 32)  # no touch(): the annotation itself is tracked
    assert g.version == version
    assert ctx.get(Shapes, g) is shapes
    fresh = ctx.get(QuantPlan, g)
    assert fresh is not plan and "r" not in fresh.plan.activations
    g.tensors["r"].encoding = from_min_max(0.0, 1.0, 8)  # encodings are not read by the plan
    assert ctx.get(QuantPlan, g) is fresh


class _RenameOutput(Pass):
    """Edits the graph (a new Identity after the output) and says which analyses survive."""

    name = "test-rename-output"
    keep: tuple[type[Analysis], ...] | None = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        out = graph.outputs[0]
        new = graph.unique_name(f"{out}_id")
        graph.add_op("Identity", [out], [new], name=graph.unique_name("id"))
        graph.outputs[0] = new
        graph.touch()
        return self.result(True, preserves=self.keep)


@pytest.mark.parametrize("keep", [None, (Shapes,)])
def test_a_modified_graph_preserves_only_what_the_pass_says(keep: tuple[type[Analysis], ...] | None) -> None:
    g = graph_ir.load(_model())
    ctx = PassContext()
    shapes, order = ctx.get(Shapes, g), ctx.get(TopologicalOrder, g)
    p = _RenameOutput()
    p.keep = keep
    PassManager([p], verify="none").run(g, ctx)
    assert ctx.analyses.cached(TopologicalOrder, g) is False
    assert (ctx.get(Shapes, g) is shapes) == (keep is not None)
    assert ctx.get(TopologicalOrder, g) is not order


class _ReadsPlan(Pass):
    name = "test-reads-plan"
    uses = (QuantPlan,)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.was_cached = ctx.analyses.cached(QuantPlan, graph)
        return self.result(False)


def test_declared_uses_are_computed_before_the_pass_and_timed_apart() -> None:
    g = graph_ir.load(_model())
    ctx = PassContext()
    p = _ReadsPlan()
    report = PassManager([p], verify="none").run(g, ctx)
    assert p.was_cached
    assert report.records[0].analysis_seconds > 0.0
    assert ctx.analyses.computed >= 2  # QuantPlan and the Shapes it reads


@dataclass
class _Means:
    values: list[float]


def test_artifacts_are_typed_and_name_what_is_missing() -> None:
    store = Artifacts()
    assert store.get(_Means) is None
    with pytest.raises(KeyError, match="no _Means artifact"):
        store[_Means]
    store.put(_Means([1.0]))
    assert store[_Means].values == [1.0] and _Means in store
    assert store.setdefault(EncodingsFile) is store[EncodingsFile]
    assert store.pop(_Means) is not None and _Means not in store


def test_apply_overrides_takes_an_encodings_file_object() -> None:
    g = graph_ir.load(_model())
    ctx = PassContext()
    overrides = EncodingsFile(
        activations={"r": from_min_max(0.0, 4.0, 8)}, params={"w": PrecisionOverride(32, "float")}
    )
    ctx.artifacts.put(Overrides(overrides))
    PassManager([default_registry().create_pass("apply-overrides")], verify="none").run(g, ctx)
    assert g.tensors["r"].encoding.max[0] == pytest.approx(4.0, rel=0.01)
    assert Precision.of(g.tensors["w"].precision) == Precision("float", 32)
    assert "w" not in ctx.get(QuantPlan, g).plan.weights  # the plan follows the override without a touch()


def test_the_ir_imports_nothing_from_qpasses() -> None:
    code = (
        "import sys, graph_ir, graph_ir.graphsurgeon_bridge; "
        "print(sorted(m for m in sys.modules if m.startswith('qpasses')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_no_top_level_targets_module_is_installed() -> None:
    import qpasses.targets

    assert qpasses.targets.BUILTIN_TARGETS
    with pytest.raises(ModuleNotFoundError):
        __import__("targets")


def test_amp_searches_the_graph_quantize_lowers() -> None:
    """AMP's graph comes from the default pipeline's structural stage: local functions are inlined as
    quantize inlines them (AMP used to restate the stage without inline-functions)."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).parent))
    from model_zoo import local_function

    from qpasses.amp.preparation import prepare_graph
    from qpasses.quantize import quantize_model

    model = local_function()
    assert model.functions
    amp_graph = prepare_graph(model)
    lowered = quantize_model(model, None, progress=False, runtime_check=False)
    amp_ops = sorted(op.op_type for op in amp_graph.ops)
    assert all(op.domain in ("", "ai.onnx") for op in amp_graph.ops)
    assert amp_ops == sorted(
        op.op_type for op in lowered.graph.ops if op.op_type not in ("QuantizeLinear", "DequantizeLinear")
    )


def test_op_slots_are_edited_only_through_the_graph() -> None:
    g = graph_ir.load(_model())
    conv = g.op("conv")
    assert conv.inputs == ["x", "w"] and isinstance(conv.inputs, list)
    for edit in (
        lambda: conv.inputs.__setitem__(0, "y"),
        lambda: conv.inputs.append("b"),
        lambda: conv.outputs.extend(["z"]),
        lambda: conv.inputs.__delitem__(1),
    ):
        with pytest.raises(TypeError, match="Graph.set_input"):
            edit()
    with pytest.raises(AttributeError):
        conv.inputs = ["y"]  # type: ignore[misc]
    g.add_initializer("b", np.zeros(4, np.float32))
    g.set_input(conv, 2, "b")
    assert conv.inputs == ["x", "w", "b"] and g.consumers("b") == [conv]
    g.truncate_inputs(conv, 2)
    assert conv.inputs == ["x", "w"] and g.consumers("b") == []
