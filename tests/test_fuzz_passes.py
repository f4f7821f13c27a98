"""Property: every pass that claims to preserve FP32 semantics does, on random graphs.

For each registered pass with ``preserves_semantics = True`` (read from the registry, so new passes
are fuzzed too), with random options: run it through ``PassManager(verify="none")`` on a random
graph (``fuzz_graphs.graphs()``), then

- it does not crash (a ``QPassesError`` is not acceptable either: every drawn graph is valid FP32);
- the model it leaves passes ``onnx.checker`` (full check) and keeps the graph's interface;
- onnxruntime (exact session) gives the same outputs before and after, to a relative 1e-4 of each
  output's largest magnitude, on random feeds at two scales (the larger one drives Relu6/Clip into
  saturation).

Documented approximations are not compared but counted: a pass result with ``exact=False`` (CLE's
Relu6 -> Relu) and CLE's high-bias absorption through a Relu (or into a zero-padded layer when
``absorb_into_padded`` is on), recognised from its remarks. ``test_cle_without_approximations_is_exact``
checks CLE with both turned off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import pytest
from fuzz_graphs import (
    STATS,
    FuzzGraph,
    fuzz_settings,
    fuzz_stats,  # noqa: F401  (autouse: cases and time per property)
    graphs,
    random_feeds,
    relative_error,
)
from hypothesis import given
from hypothesis import strategies as st

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.pass_manager import Instrumentation, PassManager
from qpasses.core.verification import exact_session
from qpasses.passes import default_registry

REGISTRY = default_registry()
# Random data makes the calibration outlier and runtime parity warnings expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SEMANTIC_PASSES = sorted(name for name, cls in REGISTRY.passes.items() if cls.preserves_semantics)
RTOL = 1e-4


def _option_strategies(name: str, model: onnx.ModelProto) -> dict[str, st.SearchStrategy[Any]]:
    """Random options for the passes that have them; the rest run with their defaults."""
    if name == "cle":
        return {
            "iterations": st.sampled_from([0, 1, 2, 100]),
            "tolerance": st.sampled_from([1e-4, 1e-2]),
            "high_bias_absorption": st.booleans(),
            "absorb_into_padded": st.booleans(),
            "relu6_to_relu": st.booleans(),
        }
    if name == "upgrade-opset":
        return {"opset": st.sampled_from([11, 13, 17, 21])}
    if name == "keep-data-independent-float":
        return {"fold": st.booleans()}
    if name == "keep-decomposed-blocks-float":
        return {"fuse": st.booleans()}
    if name == "keep-mixed-ranges-float":
        return {"act_bw": st.sampled_from([8, 16]), "batches": st.integers(1, 2), "batch_size": st.integers(1, 4)}
    if name == "keep-float":
        names = sorted({o for n in model.graph.node for o in n.output} | {"input"})
        return {"tensors": st.lists(st.sampled_from(names), max_size=3).map("|".join), "with_readers": st.booleans()}
    if name == "runtime-parity":
        return {"batches": st.integers(1, 2), "batch_size": st.integers(1, 4)}
    return {}


def _options(draw: st.DrawFn, name: str, model: onnx.ModelProto) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(REGISTRY.passes[name].Options)}
    return {k: draw(s) for k, s in _option_strategies(name, model).items() if k in known}


class _Results(Instrumentation):
    """Keeps each pass's ``PassResult`` (the pass manager's report has the remarks, not ``exact``)."""

    def __init__(self) -> None:
        self.results: list[tuple[Pass, PassResult]] = []

    def after_pass(self, p: Pass, graph: graph_ir.Graph, ctx: PassContext, result: PassResult) -> None:
        self.results.append((p, result))


def approximations(p: Pass, result: PassResult) -> list[str]:
    """The documented approximations a pass applied this time (empty: it must be exact)."""
    found = [] if result.exact else ["exact=False"]
    for r in result.remarks:
        if r.kind == "applied" and r.message.startswith("absorbed high bias"):
            if "through Relu" in r.reason:
                found.append("high-bias absorption through a Relu")
            elif getattr(p.options, "absorb_into_padded", False):
                found.append("high-bias absorption with absorb_into_padded")
    return found


def run_passes(model: onnx.ModelProto, passes: list[Pass], calib_seed: int = 1) -> tuple[onnx.ModelProto, list[str]]:
    """The model after ``passes`` and the approximations they reported."""
    graph = graph_ir.load(model)
    ctx = PassContext(calibration_data=random_feeds(model, calib_seed, count=3))
    results = _Results()
    PassManager(passes, verify="none", instrumentations=[results]).run(graph, ctx)
    approx = [a for p, r in results.results for a in approximations(p, r)]
    return graph.to_onnx(), approx


def check_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, what: str) -> None:
    onnx.checker.check_model(after, full_check=True)
    interface = lambda m: (
        [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}],
        [o.name for o in m.graph.output],
    )
    assert interface(after) == interface(before), f"{what} changed the graph interface"
    ref_session, got_session = exact_session(before), exact_session(after)
    names = [o.name for o in before.graph.output]
    for seed, scale in ((7, 1.0), (8, 4.0)):
        feeds = random_feeds(before, seed, scale=scale)[0]
        ref = dict(zip(names, ref_session.run(names, feeds), strict=True))
        got = dict(zip(names, got_session.run(names, feeds), strict=True))
        for name in names:
            err = relative_error(ref[name], got[name])
            assert err <= RTOL, f"{what}: output {name!r} (feeds x{scale}) relative error {err:.3g} > {RTOL:g}"


@pytest.mark.parametrize("name", SEMANTIC_PASSES)
@fuzz_settings(50)
@given(g=graphs(), data=st.data())
def test_pass_preserves_fp32_semantics(name: str, g: FuzzGraph, data: st.DataObject) -> None:
    options = _options(data.draw, name, g.model)
    p = REGISTRY.create_pass(name, **options)
    after, approx = run_passes(g.model, [p])
    if approx:
        STATS.case("approximate, not compared")
        return
    STATS.case()
    check_same_outputs(g.model, after, f"pass {name}{options or ''}")


@fuzz_settings(150)
@given(g=graphs(), data=st.data())
def test_semantic_pipelines_preserve_fp32_semantics(g: FuzzGraph, data: st.DataObject) -> None:
    """Random sequences of the semantic passes (each sees what the previous ones left), sometimes to a
    fixed point."""
    names = data.draw(st.lists(st.sampled_from(SEMANTIC_PASSES), min_size=2, max_size=5), label="pipeline")
    passes = [REGISTRY.create_pass(n, **_options(data.draw, n, g.model)) for n in names]
    after, approx = run_passes(g.model, passes)
    if approx:
        STATS.case("approximate, not compared")
        return
    STATS.case()
    check_same_outputs(g.model, after, f"pipeline {passes}")


@fuzz_settings(150)
@given(g=graphs(), iterations=st.sampled_from([1, 2, 100]))
def test_cle_without_approximations_is_exact(g: FuzzGraph, iterations: int) -> None:
    """CLE with Relu6 -> Relu and high-bias absorption off claims an exact rewrite: it must be one,
    and report ``exact=True``."""
    p = REGISTRY.create_pass("cle", iterations=iterations, high_bias_absorption=False, relu6_to_relu=False)
    after, approx = run_passes(g.model, [p])
    assert not approx, approx
    STATS.case("equalized" if any(r.kind == "applied" for r in p.remarks.remarks) else None)
    check_same_outputs(g.model, after, f"cle(iterations={iterations})")


@fuzz_settings(100)
@given(g=graphs(), data=st.data())
def test_fold_batchnorm_then_cle_idempotent(g: FuzzGraph, data: st.DataObject) -> None:
    """fold-batchnorm and CLE (exact options) reach a fixed point: a second run changes no output and
    no weight beyond float rounding."""
    passes = [
        REGISTRY.create_pass("fold-batchnorm"),
        REGISTRY.create_pass("cle", high_bias_absorption=False, relu6_to_relu=False),
    ]
    once, _ = run_passes(g.model, passes)
    again = [
        REGISTRY.create_pass("fold-batchnorm"),
        REGISTRY.create_pass("cle", high_bias_absorption=False, relu6_to_relu=False),
    ]
    twice, _ = run_passes(once, again)
    STATS.case()
    check_same_outputs(once, twice, "second fold-batchnorm + cle")
    w1 = {t.name: onnx.numpy_helper.to_array(t) for t in once.graph.initializer}
    w2 = {t.name: onnx.numpy_helper.to_array(t) for t in twice.graph.initializer}
    for name in set(w1) & set(w2):
        if w1[name].dtype.kind == "f" and w1[name].shape == w2[name].shape and w1[name].size:
            scale = max(float(np.abs(w1[name]).max()), 1e-6)
            assert float(np.abs(w1[name] - w2[name]).max()) <= 1e-3 * scale, f"second CLE moved {name}"
