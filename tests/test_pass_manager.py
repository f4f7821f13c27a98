"""Pass manager contract: ordering, analyses caching/invalidation, verification, hooks, registry, pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import model_zoo
import pytest

import graph_ir
from qpasses.core.analyses import Analysis, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import InternalError, PassError, PipelineError, QPassesError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.pass_manager import DumpAfter, PassManager
from qpasses.core.pipeline import build_passes, load_pipeline_file, parse_pipeline
from qpasses.core.registry import Registry
from qpasses.passes import default_registry


class CountingAnalysis(Analysis):
    computed = 0

    def compute(self, graph, ctx):
        CountingAnalysis.computed += 1
        self.n = len(graph)


class AddNeg(Pass):
    """Inserts a Neg before the last op (always changes the outputs)."""

    name = "add-neg"
    uses = (CountingAnalysis,)

    def run(self, graph, ctx):
        ctx.get(CountingAnalysis, graph)
        graph.insert_op_on_edge(graph.producer(graph.outputs[0]).inputs[0], "Neg")
        self.remarks.applied("added a neg")
        return self.result(True)


class NoOp(Pass):
    name = "noop"
    uses = (CountingAnalysis,)

    def run(self, graph, ctx):
        ctx.get(CountingAnalysis, graph)
        return self.result(False)


class Preserving(AddNeg):
    name = "preserving"
    preserves = (CountingAnalysis,)


class Breaks(Pass):
    name = "breaks"

    def run(self, graph, ctx):
        op = graph.ops[0]
        op.op_type = "NoSuchOp"
        graph.touch()
        return self.result(True)


class ClaimsEquivalence(AddNeg):
    name = "claims-equivalence"
    preserves_semantics = True


class WithOptions(Pass):
    name = "with-options"

    @dataclass
    class Options:
        iterations: int = 1
        scale: float = 1.0
        enabled: bool = True
        mode: str = "a"

    def run(self, graph, ctx):
        return PassResult(False)


def _graph():
    return graph_ir.from_onnx(model_zoo.conv_bn_relu())


def test_analysis_cached_until_modified():
    CountingAnalysis.computed = 0
    g, ctx = _graph(), PassContext()
    PassManager([NoOp(), NoOp()]).run(g, ctx)
    assert CountingAnalysis.computed == 1
    PassManager([AddNeg(), NoOp()]).run(g, ctx)
    assert CountingAnalysis.computed == 2  # AddNeg reused the cache, NoOp recomputed after the edit


def test_preserved_analysis_survives():
    CountingAnalysis.computed = 0
    g, ctx = _graph(), PassContext()
    PassManager([Preserving(), NoOp()]).run(g, ctx)
    assert CountingAnalysis.computed == 1


def test_builtin_topological_analysis_invalidated():
    g, ctx = _graph(), PassContext()
    a = ctx.get(TopologicalOrder, g)
    assert ctx.get(TopologicalOrder, g) is a
    g.insert_op_on_edge(g.inputs[0], "Identity")
    assert ctx.get(TopologicalOrder, g) is not a


def test_report_has_timing_and_remarks():
    report = PassManager([AddNeg(), NoOp()]).run(_graph())
    assert [r.name for r in report.records] == ["add-neg", "noop"]
    assert report.records[0].modified and not report.records[1].modified
    assert all(r.seconds >= 0 for r in report.records)
    assert [str(r) for r in report.remarks] == ["applied  add-neg: added a neg"]
    assert "add-neg" in report.format()


def test_fixed_point_stops_when_unchanged():
    report = PassManager([NoOp()], fixed_point=True).run(_graph())
    assert len(report.records) == 1


def test_fixed_point_bounded():
    report = PassManager([AddNeg()], fixed_point=True, max_iterations=3).run(_graph())
    assert len(report.records) == 3


def test_checker_verification_names_pass_as_an_internal_error():
    """A pass that leaves an invalid model is a bug in qpasses, never the user's input error."""
    with pytest.raises(InternalError, match="internal error in pass 'breaks'.*after pass 'breaks'") as err:
        PassManager([Breaks()], verify="checker").run(_graph())
    assert not isinstance(err.value, QPassesError) and err.value.pass_name == "breaks"


def test_numeric_verification_catches_semantic_change():
    # Negating the last op's input changes every output.
    g = _graph()
    with pytest.raises(InternalError, match="claims-equivalence"):
        PassManager([ClaimsEquivalence()], verify="numeric").run(g)


def test_numeric_verification_passes_for_true_equivalence():
    from qpasses.passes.cleanup.identity_elimination import IdentityElimination

    g = _graph()
    g.insert_op_on_edge(g.inputs[0], "Identity")
    report = PassManager([IdentityElimination()], verify="numeric").run(g)
    assert report.modified


def test_error_names_previous_passes():
    class Crash(Pass):
        name = "crash"

        def run(self, graph, ctx):
            raise RuntimeError("boom")

    with pytest.raises(InternalError, match=r"internal error in pass 'crash' \(after noop\).*boom"):
        PassManager([NoOp(), Crash()]).run(_graph())


def test_dump_after(tmp_path):
    PassManager([NoOp(), AddNeg()], instrumentations=[DumpAfter(tmp_path, ("add-neg",))]).run(_graph())
    assert [p.name for p in tmp_path.iterdir()] == ["02-add-neg.onnx"]


def test_options_coercion_and_errors():
    p = WithOptions(iterations="3", scale="0.5", enabled="false")
    assert (p.options.iterations, p.options.scale, p.options.enabled) == (3, 0.5, False)
    with pytest.raises(PassError, match="no option 'bogus'"):
        WithOptions(bogus=1)
    with pytest.raises(PassError, match="bad value 'x' for option 'iterations'"):
        WithOptions(iterations="x")
    with pytest.raises(PassError, match="option 'enabled'"):
        WithOptions(enabled="maybe")


def test_pipeline_text():
    specs = parse_pipeline("dce, with-options{iterations=3,scale=2.5} ,noop")
    assert [s.name for s in specs] == ["dce", "with-options", "noop"]
    assert specs[1].options == {"iterations": "3", "scale": "2.5"}
    assert parse_pipeline("") == []
    with pytest.raises(PipelineError):
        parse_pipeline("cle{iterations=3")
    with pytest.raises(PipelineError):
        parse_pipeline("cle{iterations}")


def test_pipeline_files(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(
        "pipeline:\n  - dce\n  - name: with-options\n    options: {iterations: 2}\n  - with-options: {scale: 3}\n"
    )
    specs = load_pipeline_file(y)
    assert [(s.name, s.options) for s in specs] == [
        ("dce", {}),
        ("with-options", {"iterations": 2}),
        ("with-options", {"scale": 3}),
    ]
    reg = Registry()
    reg.add_pass(WithOptions)
    reg.add_pass(default_registry().pass_class("dce"))
    passes = build_passes(specs, reg)
    assert passes[1].options.iterations == 2
    j = tmp_path / "p.json"
    j.write_text('[{"name": "with-options", "options": {"iterations": "many"}}]')
    with pytest.raises(PassError, match="iterations"):
        build_passes(load_pipeline_file(j), reg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- [unclosed")
    with pytest.raises(PipelineError, match="cannot parse"):
        load_pipeline_file(bad)


def test_registry_unknown_pass_suggests():
    with pytest.raises(PassError, match="did you mean dce"):
        default_registry().pass_class("dcee")


def test_entry_points_are_loaded(monkeypatch):
    import qpasses.core.registry as registry_mod

    class FakeEP:
        def __init__(self, obj):
            self.obj = obj

        def load(self):
            return self.obj

    from qpasses.targets import TargetDescriptor

    npu = TargetDescriptor(name="my-npu", description="third party", needs_quantized=True)

    def fake_entry_points(group):
        return {"qpasses.passes": [FakeEP(WithOptions)], "qpasses.targets": [FakeEP([npu])]}[group]

    monkeypatch.setattr(registry_mod, "entry_points", fake_entry_points)
    reg = default_registry()
    assert reg.pass_class("with-options") is WithOptions
    assert reg.target("my-npu") is npu


def test_package_exports_lazily():
    import qpasses
    from qpasses.quantize import quantize_model

    assert qpasses.quantize_model is quantize_model
    with pytest.raises(AttributeError):
        qpasses.no_such_thing  # noqa: B018


def test_numeric_verification_skipped_for_reported_approximation():
    class Approximate(ClaimsEquivalence):
        name = "approximate"

        def run(self, graph, ctx):
            super().run(graph, ctx)
            return self.result(True, exact=False)

    report = PassManager([Approximate()], verify="numeric").run(_graph())
    assert any(r.kind == "analysis" and "numeric verification skipped" in r.message for r in report.remarks)


def test_cle_numeric_verification_on_shipped_models():
    from pathlib import Path

    from qpasses.passes import default_registry

    reg = default_registry()
    models = Path(__file__).resolve().parent.parent / "models"
    exact = PassManager([reg.create_pass("fold-batchnorm"), reg.create_pass("cle")], verify="numeric")
    exact.run(graph_ir.load(models / "digits_cnn.onnx"))  # raises VerificationError if CLE changed outputs
    relu6 = graph_ir.load(models / "digits_cnn_relu6.onnx")
    report = PassManager([reg.create_pass("cle")], verify="numeric").run(relu6)
    assert any("numeric verification skipped" in r.message for r in report.remarks)


def test_numeric_verification_runs_models_that_need_more_than_two_pixels(capfd: pytest.CaptureFixture[str]) -> None:
    """Symbolic dims of 2 make a 5x5 unpadded Conv fail (PP-OCR's detector fails the same way in its
    pyramid): the check retries at 64 instead of skipping, and onnxruntime's error log stays quiet."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from qpasses.core import verification

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 1, 5, 5)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert verification.assert_equivalent(model, model, "same") == 0.0

    class Unchanged(Pass):  # claims a change, changes nothing: the check compares the same model
        name = "unchanged"
        preserves_semantics = True

        def run(self, graph: graph_ir.Graph, ctx: PassContext) -> PassResult:
            return self.result(True)

    report = PassManager([Unchanged()], verify="numeric").run(graph_ir.from_onnx(model))
    assert not any("numeric verification skipped" in r.message for r in report.remarks)
    assert "E:onnxruntime" not in capfd.readouterr().err


def test_numeric_verification_uses_real_inputs_first() -> None:
    """A model whose Reshape fixes the batch to 3 cannot run on random inputs (dims 2 or 64): with a
    real sample (quantize gives a calibration sample) its passes are verified, not skipped; a pass
    that is exact on random inputs but not on the real sample is caught there."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([3, 4], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["i"], name="identity"),
            helper.make_node("Reshape", ["i", "shape"], ["y"], name="reshape"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    remove = default_registry().create_pass("remove-identity")
    skipped = PassManager([remove], verify="numeric").run(graph_ir.from_onnx(model))
    assert any(r.message == "numeric verification skipped" for r in skipped.remarks)
    real = [{"x": np.ones((3, 4), np.float32)}]
    ctx = PassContext(verification_source=lambda: real)
    verified = PassManager([default_registry().create_pass("remove-identity")], verify="numeric").run(
        graph_ir.from_onnx(model), ctx
    )
    assert not any(r.message == "numeric verification skipped" for r in verified.remarks)

    class ZeroOnes(Pass):  # replaces the input by x - (x == 1): equal wherever no value is exactly 1
        name = "zero-ones"
        preserves_semantics = True

        def run(self, graph: graph_ir.Graph, ctx: PassContext) -> PassResult:
            graph.add_initializer("one", np.array(1.0, np.float32))
            eq = graph.add_op("Equal", ["x", "one"], 1)
            cast = graph.add_op("Cast", [eq.outputs[0]], 1, attributes={"to": TensorProto.FLOAT})
            sub = graph.add_op("Sub", ["x", cast.outputs[0]], 1)
            identity = graph.op("identity")
            graph.set_input(identity, 0, sub.outputs[0])
            return self.result(True)

    with pytest.raises(InternalError, match="changed FP32 output"):
        PassManager([ZeroOnes()], verify="numeric").run(
            graph_ir.from_onnx(model), PassContext(verification_source=lambda: real)
        )


def test_numeric_verification_runs_each_model_of_a_chain_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two exact rewrites in a row: the second is compared with the first's verified outputs (3 runs, not
    4); a non-exact pass in between drops them (its result is run afresh), and a wrong rewrite after a
    chain is still caught against the last verified outputs."""
    from qpasses.core import verification
    from qpasses.passes.cleanup.identity_elimination import IdentityElimination

    runs: list[int] = []
    real_run = verification._quiet_run

    def counted(model, feeds):  # noqa: ANN001, ANN202
        runs.append(1)
        return real_run(model, feeds)

    monkeypatch.setattr(verification, "_quiet_run", counted)

    class AddIdentity(Pass):
        name = "add-identity"
        preserves_semantics = True

        def run(self, graph, ctx):
            graph.insert_op_on_edge(graph.inputs[0], "Identity")
            return self.result(True)

    PassManager([AddIdentity(), IdentityElimination()], verify="numeric").run(_graph())
    assert len(runs) == 3
    runs.clear()
    PassManager([AddIdentity(), AddNeg(), IdentityElimination()], verify="numeric").run(_graph())
    assert len(runs) == 4  # AddNeg changes the outputs: the model after it runs as the next 'before'
    with pytest.raises(InternalError, match="claims-equivalence"):
        PassManager([AddIdentity(), IdentityElimination(), ClaimsEquivalence()], verify="numeric").run(_graph())
