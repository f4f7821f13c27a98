"""AdaRound's held-out batches: learned or nearest rounding is chosen on data the learning never saw.

Why: on few calibration samples the learned rounding can fit the learning batches and lose on new
data; comparing it with rounding to nearest on those same batches always favours it. The pass holds
out a fraction of the calibration batches (``holdout``), learns on the rest, and per layer keeps
whichever of the learned and the nearest rounding reconstructs the layer output better on the
held-out batches. These tests make one layer overfit on purpose (the learning batches all lie along
one input direction, the held-out one does not) and check that the held-out choice keeps nearest
there while the old choice (``holdout=0``) keeps the overfitted rounding; that the learned rounding
is kept where it generalizes; that the held-out batches never reach a learning step; and that a bad
fraction is a one-line error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_manager import PassManager
from qpasses.passes import default_registry
from qpasses.passes.quantize.adaround import AdaRoundResults
from qpasses.quant.encodings import fake_quantize

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason='needs torch: pip install "qpasses[learn]"'
)

REGISTRY = default_registry()
IN, OUT = 16, 8
FAST = {"iterations": 300, "lr": 5e-2, "progress": False, "threads": 1, "weight_bw": 4}


def matmul_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """y = x @ W, one learnable layer; W is 16x8 with each column on a grid of step s (its min -8 s, its max
    7 s: the 4-bit min-max grid) plus 0.3 s on the other 14 rows, so rounding to nearest errs by -0.3 s on each."""
    rng = np.random.default_rng(0)
    steps = rng.uniform(0.05, 0.2, OUT)
    k = rng.integers(-7, 6, (IN, OUT)) + 0.3
    k[0], k[1] = -8, 7
    w = (k * steps).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w


def held_out(count: int, fraction: float) -> list[int]:
    from qpasses.learned import training

    return list(training.held_out_batches(count, fraction))


def batches(count: int, held: list[int], along_ones: bool, rows: int = 32) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of correlated rows (4 directions plus a little noise, as real activations), the same
    distribution in every batch; or, with ``along_ones``, learning batches on the all-ones direction alone
    (x = a * 1: learning then cancels each column's sum of rounding errors by rounding some weights 0.7 s
    away) and held-out batches of independent Gaussian rows (which pay for every weight moved away)."""
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((4, IN))
    feeds = []
    for i in range(count):
        if along_ones:
            x = rng.standard_normal((rows, 1)) * np.ones((1, IN)) if i not in held else rng.standard_normal((rows, IN))
        else:
            x = rng.standard_normal((rows, 4)) @ mixing + 0.1 * rng.standard_normal((rows, IN))
        feeds.append({"x": x.astype(np.float32)})
    return feeds


def run_adaround(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **options: Any) -> tuple[Any, Any, Any]:
    g = graph_ir.load(model)
    ctx = PassContext(calibration_data=feeds)
    report = PassManager([REGISTRY.create_pass("adaround", **{**FAST, **options})]).run(g, ctx)
    return g, ctx.artifacts[AdaRoundResults]["matmul"], report


def test_held_out_batches_are_spread_and_leave_learning_data() -> None:
    assert held_out(8, 0.0) == [] and held_out(1, 0.5) == []  # off, or nothing would be left to learn on
    assert held_out(8, 0.2) == [2, 6] and held_out(16, 0.2) == [2, 8, 13]  # spread over the calibration order
    assert held_out(4, 0.01) == [2]  # at least one
    for count in range(2, 40):
        for fraction in (0.05, 0.2, 0.5, 0.9):
            held = held_out(count, fraction)
            assert 1 <= len(held) < count and len(set(held)) == len(held)
            assert all(0 <= i < count for i in held)


@needs_torch
def test_overfitted_layer_keeps_nearest_on_the_held_out_batches() -> None:
    model, w = matmul_model()
    from qpasses.learned.layers import starting_encoding

    enc = starting_encoding(w, 4, True, "symmetric", 1)
    np.testing.assert_allclose(w / np.asarray(enc.scale) - np.asarray(enc.offset), w / w[1] * 7 + 8, atol=1e-4)
    held = held_out(5, 0.2)
    feeds = batches(5, held, along_ones=True)
    # Learning on the one-direction batches alone (the old choice, on those batches) keeps the learned rounding ...
    _, fitted, _ = run_adaround(model, [f for i, f in enumerate(feeds) if i not in held], holdout=0)
    assert not fitted.kept_nearest and fitted.loss < 0.5 * fitted.loss_nearest, fitted
    assert fitted.flipped > 0
    # ... which the held-out batch shows to be worse than rounding to nearest: nearest is kept.
    g, res, report = run_adaround(model, feeds, holdout=0.2)
    assert res.kept_nearest and res.held_out == 1, res
    enc = g.tensors["w"].encoding
    np.testing.assert_array_equal(g.tensors["w"].data, fake_quantize(w, enc).astype(np.float32))
    remarks = [r for r in report.remarks if r.pass_name == "adaround"]
    assert any(
        r.kind == "missed" and "kept rounding to nearest" in r.message and "held-out" in r.reason for r in remarks
    )
    assert any(r.kind == "applied" and "1 of 1 layers kept rounding to nearest" in r.message for r in remarks), [
        r.message for r in remarks
    ]


@needs_torch
def test_learned_rounding_is_kept_where_it_generalizes() -> None:
    model, w = matmul_model()
    feeds = batches(5, [], along_ones=False)
    g, res, report = run_adaround(model, feeds, holdout=0.2)
    assert not res.kept_nearest and res.held_out == 1 and res.flipped > 0, res
    assert res.loss < 0.9 * res.loss_nearest, res  # measured on the held-out batch
    assert np.any(g.tensors["w"].data != fake_quantize(w, g.tensors["w"].encoding))
    assert any("0 of 1 layers kept rounding to nearest" in r.message for r in report.remarks)


@needs_torch
def test_held_out_batches_never_reach_a_learning_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every target a learning step compares with is a learning batch's; the held-out ones are only scored."""
    from qpasses.learned import training

    model, w = matmul_model()
    feeds = batches(10, [], along_ones=False, rows=4)
    held = held_out(10, 0.3)
    assert len(held) == 3
    expected = [f["x"].astype(np.float64) @ w for f in feeds]
    stepped: list[np.ndarray] = []
    scored: list[np.ndarray] = []
    loss, evaluate = training.reconstruction_loss, training.evaluate

    def counting_loss(out: Any, target: Any) -> Any:
        stepped.append(target.numpy().copy())
        return loss(out, target)

    def counting_evaluate(forward: Any, targets: Any) -> Any:
        scored.extend(t.numpy().copy() for t in targets)
        return evaluate(forward, targets)

    monkeypatch.setattr(training, "reconstruction_loss", counting_loss)
    monkeypatch.setattr(training, "evaluate", counting_evaluate)
    _, res, _ = run_adaround(model, feeds, holdout=0.3, iterations=70)

    def batch_of(target: np.ndarray) -> int:
        (match,) = [i for i, e in enumerate(expected) if np.allclose(target, e, rtol=1e-4, atol=1e-4)]
        return match

    used = [batch_of(t) for t in stepped]
    assert len(used) == 70 and set(used) == set(range(10)) - set(held), sorted(set(used))
    assert {batch_of(t) for t in scored} == set(held)
    assert res.held_out == 3


@needs_torch
def test_one_batch_learns_on_it_and_says_so() -> None:
    model, _ = matmul_model()
    _, res, report = run_adaround(model, batches(1, [], along_ones=False), holdout=0.2)
    assert res.held_out == 0
    assert any("no batch held out" in r.message for r in report.remarks if r.pass_name == "adaround")


@needs_torch
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_holdout_is_a_one_line_error(bad: float) -> None:
    model, _ = matmul_model()
    g = graph_ir.load(model)
    with pytest.raises(PassError, match=r"pass 'adaround': holdout must be in \[0, 1\)") as err:
        REGISTRY.create_pass("adaround", holdout=bad, progress=False)(g, PassContext(calibration_data=[]))
    assert "\n" not in str(err.value)
