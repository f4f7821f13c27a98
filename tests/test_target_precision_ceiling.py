"""A target with no activation precision above 8 bits (HTA): the analyses that would keep tensors higher
leave them on the target's grids (a model the target can run), say so, and the automatic fallback says why
nothing lifts an output below the floor."""

from __future__ import annotations

import re

import decomposed_block_models as dbm
import failure_class_models as fc
import numpy as np
import onnx
import pytest

from qpasses.core import verification
from qpasses.data.evaluation import pooled_sqnr_db
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quant.keep_float import FLOAT32, INT16, kept_precision
from qpasses.quantize import quantize_model
from qpasses.targets import resolve_target


def _target(name: str | None):  # noqa: ANN202
    return resolve_target(name, default_registry())


def _remarks(result, pass_name: str, kind: str | None = None) -> list[str]:  # noqa: ANN001
    return [
        f"{r.message} | {r.reason}"
        for r in result.report.remarks
        if r.pass_name == pass_name and (kind is None or r.kind == kind)
    ]


def _activation_bitwidths(result) -> set[int]:  # noqa: ANN001
    return {e.bitwidth for e in result.encodings.activations.values() if hasattr(e, "bitwidth")}


def test_kept_precision_follows_the_target() -> None:
    assert _target("hta").activation_bitwidths == (8,)
    assert 16 in _target("htp").activation_bitwidths
    assert kept_precision(_target("hta")) is None
    assert kept_precision(_target("htp")) == INT16
    assert kept_precision(_target("ort")) == FLOAT32
    assert kept_precision(None) == FLOAT32


@pytest.mark.parametrize("target, higher", [("htp", True), ("hta", False)])
def test_decomposed_layernorm_internals_stay_within_the_target(target: str, higher: bool) -> None:
    model = dbm.layernorm()
    calib = fc.feeds(model, 4)
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, target=target)
    bitwidth_problems = [r for r in _remarks(result, "check-target") if "bitwidth" in r]
    assert bitwidth_problems == []  # the target can run every precision the model holds
    if higher:
        assert 16 in _activation_bitwidths(result)
        assert any("decomposed LayerNorm" in r for r in _remarks(result, "keep-decomposed-blocks-float", "applied"))
    else:
        assert _activation_bitwidths(result) == {8}
        (left,) = [r for r in _remarks(result, "annotate-precision", "missed") if "decomposed LayerNorm" in r]
        assert "not kept higher" in left and "hta" in left
        assert _remarks(result, "keep-decomposed-blocks-float", "applied") == []


def test_auto_fallback_on_an_int8_only_target_keeps_nothing_higher_and_says_why() -> None:
    """outlier_intermediate breaks its output on any 8-bit grid; on HTP the fallback keeps 'lifted' in int16,
    on HTA nothing is higher: the model stays int8 and a remark gives the weights' share measured apart."""
    model = fc.outlier_intermediate()
    calib = fc.feeds(model, 4)
    config = QuantConfig(per_channel=True)
    htp = quantize_model(model, calib, config, progress=False, target="htp")
    assert [s.tensor for s in htp.fallback] == ["lifted"]
    assert htp.encodings.activations["lifted"].bitwidth == 16

    hta = quantize_model(model, calib, config, progress=False, target="hta")
    assert hta.fallback == [] and _activation_bitwidths(hta) == {8}
    (remark,) = _remarks(hta, "auto-fallback", "missed")
    assert "nothing above 8 bits" in remark and "spread over many activation quantizers" in remark
    worst = float(re.search(r"SQNR vs FP32 (-?[\d.]+) dB", remark).group(1))  # type: ignore[union-attr]
    weights = float(re.search(r"weights alone give (-?[\d.]+) dB", remark).group(1))  # type: ignore[union-attr]
    assert worst < 20.0 <= weights
    # The weights' share, measured independently: the lowered model with every activation DQ(Q(x)) replaced
    # by x (its output's too) on the checked sample (the first of four: a quarter), against the FP32 model.
    checked = calib[:1]
    fp32 = [verification.runtime_session(model).run(None, f)[0] for f in checked]
    weights_only = verification.exact_session(_activations_float(hta.model))
    got = [weights_only.run(None, f)[0] for f in checked]
    assert pooled_sqnr_db(fp32, got) == pytest.approx(weights, abs=0.06)


def _activations_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each DequantizeLinear of an activation's QuantizeLinear replaced by an Identity of x."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = {t.name for t in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        q = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in constants:
            source = q.input[0]
            node.op_type, node.domain = "Identity", ""
            del node.input[:]
            del node.attribute[:]
            node.input.append(source)
    return out


def _wide_channel_conv(seed: int = 0) -> onnx.ModelProto:
    """One output channel's weights 300x the others', the next 1x1 Conv weighing it 1/300: per-tensor 8-bit
    weights leave the small channels a few levels, whatever the activations do (what CLE equalizes)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (4, 3, 3, 3)).astype(np.float32)
    w[0] *= 300.0
    mix = np.array([1 / 300.0, 1.0, 1.0, 1.0], np.float32).reshape(1, 4, 1, 1)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(mix, "mix")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "mix"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_auto_fallback_names_the_weights_when_they_hold_the_loss() -> None:
    model = _wide_channel_conv()
    calib = fc.feeds(model, 4)
    config = QuantConfig(per_channel=True)
    result = quantize_model(model, calib, config, progress=False, target="hta", cle=False)
    assert result.clipped == [] and result.fallback == []
    (remark,) = _remarks(result, "auto-fallback", "missed")
    assert "the loss is in the weights" in remark
    weights = float(re.search(r"weights alone give (-?[\d.]+) dB", remark).group(1))  # type: ignore[union-attr]
    assert weights < 20.0
    # hta quantizes weights per tensor: CLE is on there by default, and evens the channels out.
    default = quantize_model(model, calib, config, progress=False, target="hta")
    assert any("on by default" in r for r in _remarks(default, "cle", "applied"))
    assert _remarks(default, "auto-fallback", "missed") == []
    assert default.parity is not None and min(o.exact_db for o in default.parity.outputs) > 30.0
    on_htp = quantize_model(model, calib, config, progress=False, target="htp")  # per-channel weights: no CLE
    assert "cle" not in [r.name for r in on_htp.report.records]


def test_amp_on_a_per_tensor_target_equalizes_as_quantize_does(tmp_path) -> None:  # noqa: ANN001
    """AMP's graph gets CLE on hta too (the same default), once: its final model scores what quantize's does."""
    from qpasses.amp.mixed_precision import choose_mixed_precision

    model = _wide_channel_conv()
    calib = fc.feeds(model, 4)
    ref = [verification.runtime_session(model).run(None, f)[0] for f in calib]

    def sqnr(session) -> float:  # noqa: ANN001
        return pooled_sqnr_db(ref, [session.run(None, f)[0] for f in calib])

    amp = choose_mixed_precision(model, calib, "8/4,8/8", None, sqnr, None, tmp_path, target="hta", progress=False)
    direct = quantize_model(model, calib, QuantConfig(), progress=False, target="hta", auto_fallback=False)
    assert amp.exact_score > 30.0
    assert amp.exact_score == pytest.approx(sqnr(verification.exact_session(direct.model)), abs=0.5)
