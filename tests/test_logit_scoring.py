"""The automatic fallback ranks quantizers of softmax-output models on the logits (``logit_scoring``)."""

from __future__ import annotations

import failure_class_models as fc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpasses.quantize as quantize_module
from qpasses.core import verification
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.logit_scoring import logit_views, scoring_view, softmax_inputs


def _classifier() -> onnx.ModelProto:
    """fc.outlier_intermediate with a Softmax over its channels as the output ('lifted' spoils the logits)."""
    model = fc.outlier_intermediate()
    model.graph.node[-1].output[0] = "logits"
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1))
    return model


def _tiny(outputs: list[tuple[str, str]]) -> onnx.ModelProto:
    """x -> Identity -> Q -> DQ -> Softmax ('p'), and x -> Relu ('r'); graph outputs as given (name, kind)."""
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("QuantizeLinear", ["xi", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Softmax", ["xd"], ["p0"], axis=-1),
        helper.make_node("Identity", ["p0"], ["p"]),
        helper.make_node("Relu", ["x"], ["r"]),
    ]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5]) for n, _ in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_softmax_inputs_look_through_identity_and_qdq() -> None:
    assert softmax_inputs(_tiny([("p", ""), ("r", "")])) == ["xd", None]


def test_views_need_every_output_to_be_a_softmax() -> None:
    """A model that also returns something else keeps one SQNR scale for all its outputs: no view."""
    both = _tiny([("p", ""), ("r", "")])
    assert logit_views(both, both) is None
    only = _tiny([("p", "")])
    views = logit_views(only, only)
    assert views is not None
    assert [o.name for o in views[0].graph.output] == ["xd"] and [o.name for o in only.graph.output] == ["p"]


def test_scoring_view_computes_the_logits() -> None:
    model = _tiny([("p", "")])
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    (logits,) = verification.exact_session(scoring_view(model, ["xd"])).run(None, {"x": x})
    expected = (np.clip(np.round(x / 0.1) + 128, 0, 255) - 128) * np.float32(0.1)  # the Q/DQ of x, by hand
    np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_fallback_on_a_softmax_output_ranks_on_the_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether to act is decided on the probabilities; which quantizer to keep, on the logits; the
    result is judged on the probabilities again (the second run's parity check)."""
    scored: list[list[str]] = []
    real = quantize_module.choose_clips

    def recorded(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        scored.append([o.name for o in model.graph.output])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "choose_clips", recorded)
    model = _classifier()
    result = quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)
    assert scored == [["logits_dq"]]  # the logits as the Softmax reads them (dequantized)
    assert [s.tensor for s in result.fallback] == ["lifted"]
    assert result.parity is not None and min(o.exact_db for o in result.parity.outputs) > 40.0
    remark = next(r for r in result.report.remarks if r.pass_name == "auto-fallback")
    assert "ranked on the softmax outputs' logits" in (remark.reason or "")
    plain = quantize_model(
        model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False, auto_fallback=False
    )
    assert plain.parity is not None and min(o.exact_db for o in plain.parity.outputs) < 20.0


def test_fallback_does_not_act_when_the_probabilities_are_above_the_floor() -> None:
    """Near-uniform probabilities over noisy logits: the outputs are fine (48 dB) though the logits are not
    (9 dB); the user's outputs decide whether the fallback acts."""
    model = fc.outlier_intermediate()
    g = model.graph
    spike = next(t for t in g.initializer if t.name == "spike")
    values = numpy_helper.to_array(spike).copy()
    values[values != 0] = 300.0  # a grid step of ~1.2 on logits of ~1: about 9 dB
    spike.CopyFrom(numpy_helper.from_array(values, "spike"))
    g.node[-1].output[0] = "logits"
    g.initializer.append(numpy_helper.from_array(np.float32(0.02), "k"))
    g.node.extend(
        [
            helper.make_node("Mul", ["logits", "k"], ["scaled"], name="scale"),
            helper.make_node("Softmax", ["scaled"], ["y"], name="softmax", axis=1),
        ]
    )
    feeds = fc.feeds(model, 4)
    result = quantize_model(model, feeds, QuantConfig(per_channel=True), progress=False)
    assert result.parity is not None and min(o.exact_db for o in result.parity.outputs) > 40.0
    assert result.fallback == [] and result.clipped == []
    assert not [r for r in result.report.remarks if r.pass_name == "auto-fallback"]
    views = logit_views(result.model, result.reference)  # what a trigger on the logits would have read
    assert views is not None and result.reference is not None
    batches = result.parity.batches
    reference = [verification.runtime_session(views[1]).run(None, f) for f in batches]
    got = [verification.exact_session(views[0]).run(None, f) for f in batches]
    noise = sum(float(((a[0] - b[0]) ** 2).sum()) for a, b in zip(got, reference, strict=True))
    signal = sum(float((b[0] ** 2).sum()) for b in reference)
    assert 10 * np.log10(signal / noise) < 20.0
