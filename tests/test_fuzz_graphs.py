"""The fuzz graph generator itself: every drawn model is valid and the numpy reference agrees with it.

Checks the tools the other ``test_fuzz_*`` properties rely on: ``fuzz_graphs.graphs()`` only draws
models that pass ``onnx.checker`` (full check: the declared output shapes are the inferred ones) and
run in onnxruntime; ``build(spec)`` rebuilds the identical model from its printed spec; and
``FuzzReference`` (float64 numpy, no qpasses code) computes the FP32 outputs onnxruntime computes.
"""

from __future__ import annotations

import numpy as np
import onnx
from fuzz_graphs import (
    STATS,
    FuzzGraph,
    FuzzReference,
    build,
    fuzz_settings,
    fuzz_stats,  # noqa: F401  (autouse: cases and time per property)
    graphs,
    random_feeds,
    relative_error,
)
from hypothesis import given

from qpasses.core.verification import exact_session


@fuzz_settings(300)
@given(g=graphs())
def test_generated_graphs_are_valid_and_match_the_reference(g: FuzzGraph) -> None:
    onnx.checker.check_model(g.model, full_check=True)
    assert build(g.spec).SerializeToString() == g.model.SerializeToString(), "build(spec) is not deterministic"
    names = [o.name for o in g.model.graph.output]
    for seed, scale in ((0, 1.0), (1, 4.0)):
        feeds = random_feeds(g.model, seed, scale=scale)[0]
        got = dict(zip(names, exact_session(g.model).run(names, feeds), strict=True))
        ref = FuzzReference(g.model).run(feeds)
        for name in names:
            assert np.all(np.isfinite(got[name])), f"{name}: onnxruntime output is not finite"
            err = relative_error(ref[name], got[name])
            assert err <= 1e-4, f"{name}: reference vs onnxruntime relative error {err:.3g}"
    for step in g.spec.steps:
        STATS.note(step.op)
    STATS.case()
