"""Failure classes of real exported models, handled by default (one generated model each)."""

from __future__ import annotations

import failure_class_models as fc
import numpy as np
import onnx
import pytest

from qpasses.core import verification
from qpasses.data.evaluation import sqnr_db
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model


def _quantize(model: onnx.ModelProto, calib: list, **kw: object):
    return quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, **kw)


def _remarks(result, pass_name: str) -> list[str]:
    return [f"{r.message} {r.reason}" for r in result.report.remarks if r.pass_name == pass_name]


def _quantized_inputs(model: onnx.ModelProto) -> set[str]:
    """FP32 tensor names that pass through a QuantizeLinear."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _close(fp32: onnx.ModelProto, qdq: onnx.ModelProto, feeds: list[dict]) -> float:
    ref = np.concatenate([verification.exact_session(fp32).run(None, f)[0].ravel() for f in feeds])
    got = np.concatenate([verification.exact_session(qdq).run(None, f)[0].ravel() for f in feeds])
    assert np.array_equal(np.isinf(ref), np.isinf(got)), "masked (-inf) positions changed"
    finite = np.isfinite(ref)
    return sqnr_db(ref[finite], got[finite])


def test_non_finite_constants_stay_float_and_masks_survive() -> None:
    model = fc.neg_inf_mask()
    result = _quantize(model, fc.feeds(model, 8))
    qdq = result.model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    assert "neg_inf" in inits and np.isneginf(inits["neg_inf"])  # stored as is, not quantized
    assert "neg_inf" not in _quantized_inputs(qdq)
    assert any("holds inf/NaN" in r for r in _remarks(result, "keep-nonfinite-float"))
    assert _close(model, qdq, fc.feeds(model, 4, seed=9)) > 25
    # The conv before the mask is still quantized.
    assert {"x", "c"} & _quantized_inputs(qdq) or "r" in _quantized_inputs(qdq)


def test_encoding_error_names_the_tensor_and_op() -> None:
    """Without the keep-float pass, encode-weights meets the -inf param and names it and its reader."""
    import graph_ir
    from qpasses.core.context import PassContext
    from qpasses.core.errors import QPassesError
    from qpasses.core.pass_manager import PassManager
    from qpasses.passes import default_registry

    reg = default_registry()
    graph = graph_ir.load(fc.neg_inf_mask())
    passes = [reg.create_pass("annotate-precision"), reg.create_pass("encode-weights")]
    with pytest.raises(QPassesError, match=r"parameter neg_inf read by .*Max 'max_neg_inf'.*NaN or infinite"):
        PassManager(passes).run(graph, PassContext())


def test_question_mark_dims_are_not_cross_checked() -> None:
    """PaddlePaddle's "?" dims: (16, 3, 48, 192) is accepted as onnxruntime accepts it."""
    model = fc.question_mark_dims()
    calib = fc.feeds(model, 2, shape=(4, 3, 12, 20))
    result = _quantize(model, calib)
    assert result.parity is not None and result.parity.ok
    assert _close(model, result.model, calib) > 30


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_shape_arithmetic_is_never_quantized(dynamic: bool) -> None:
    model = fc.anchor_grid(dynamic=dynamic)
    calib = fc.feeds(model, 4, batch=1)
    result = _quantize(model, calib)
    qdq = result.model
    ops = {n.op_type for n in qdq.graph.node}
    quantized = _quantized_inputs(qdq)
    assert not {"grid", "grid_px", "width", "limit"} & quantized
    assert "y" not in quantized and "y_fp" not in quantized  # the op where the grid meets data is float
    assert "c" in quantized or "x" in quantized  # the conv itself is still quantized
    if dynamic:
        assert "Range" in ops
        assert any("dynamic shape" in r for r in _remarks(result, "keep-data-independent-float"))
    else:
        assert not {"Range", "Shape", "Gather"} & ops  # folded
        assert any("constant-folded" in r for r in _remarks(result, "keep-data-independent-float"))
    assert _close(model, qdq, fc.feeds(model, 2, seed=5)) > 30


def test_boxes_and_scores_concat_stays_float_and_parts_stay_quantized() -> None:
    model = fc.boxes_and_scores()
    calib = fc.feeds(model, 4)
    result = _quantize(model, calib)
    qdq = result.model
    quantized = _quantized_inputs(qdq)
    assert "y" not in quantized and "y_fp" not in quantized  # the joined output is float
    assert "boxes" in quantized and "scores" in quantized  # each part on its own grid
    assert any("head_concat joins parts" in r for r in _remarks(result, "keep-mixed-ranges-float"))
    test = fc.feeds(model, 4, seed=3)
    ref = np.concatenate([verification.exact_session(model).run(None, f)[0] for f in test])
    got = np.concatenate([verification.exact_session(qdq).run(None, f)[0] for f in test])
    # The scores (channels 4-5) keep their resolution: ~1/255 of their own range, not of 320 px
    # (one joined 8-bit grid would give them a step of 1.25).
    assert np.abs(ref[:, 4:] - got[:, 4:]).mean() < 0.005
    assert sqnr_db(ref[:, 4:], got[:, 4:]) > 30


def test_mixed_ranges_without_the_pass_collapse_the_scores() -> None:
    """The case the pass exists for: one 8-bit grid for boxes and scores destroys the scores."""
    from qpasses.quant.encodings import fake_quantize
    from qpasses.quant.range_search import compute

    boxes, scores = np.linspace(0, 320, 256), np.linspace(0, 1, 64)
    joined = np.concatenate([boxes, scores])
    enc = compute(joined, 8, "tf")
    assert sqnr_db(scores, fake_quantize(scores, enc)) < 10


def test_auto_fallback_keeps_the_quantizer_that_breaks_the_output() -> None:
    model = fc.outlier_intermediate()
    calib = fc.feeds(model, 4)
    test = fc.feeds(model, 4, seed=11)
    plain = _quantize(model, calib, auto_fallback=False)
    assert _close(model, plain.model, test) < 10  # collapses: 'lifted' on a 0..1e4 grid
    result = _quantize(model, calib)
    assert [s.tensor for s in result.fallback] == ["lifted"]
    assert result.fallback[0].alone_db < 10
    assert "lifted" not in _quantized_inputs(result.model)
    assert "c" in _quantized_inputs(result.model) or "x" in _quantized_inputs(result.model)
    assert _close(model, result.model, test) > 25
    assert any("kept 1 tensors" in r for r in _remarks(result, "auto-fallback"))


def test_auto_fallback_leaves_healthy_models_alone() -> None:
    model = fc.question_mark_dims()
    calib = fc.feeds(model, 2, shape=(2, 3, 8, 8))
    assert _quantize(model, calib).fallback == []


def test_float_min_attention_mask_keeps_scores_float() -> None:
    """unidic_tagger: a float32-min mask bias would give the masked scores a ~1e38 quantizer (scores -> 0)."""
    model = fc.float_min_attention_mask()
    calib = [{"x": np.random.default_rng(s).standard_normal((1, 6, 8)).astype(np.float32)} for s in range(8)]
    result = _quantize(model, calib)
    quantized = _quantized_inputs(result.model)
    assert not {"f32_min", "bias", "masked"} & quantized  # neither the sentinel nor the masked scores
    assert "probs" not in quantized or "q" in quantized  # the softmax reads the scores in float
    assert any("masking sentinel" in r for r in _remarks(result, "keep-nonfinite-float"))
    assert any("masked by 'f32_min'" in r for r in _remarks(result, "keep-nonfinite-float"))
    for seed in (20, 21):
        feed = {"x": np.random.default_rng(seed).standard_normal((1, 6, 8)).astype(np.float32)}
        ref = verification.exact_session(model).run(None, feed)[0]
        got = verification.exact_session(result.model).run(None, feed)[0]
        assert sqnr_db(ref, got) > 20
    # The masked positions get exactly zero attention: the context ignores the padding rows.
    feed = {"x": np.random.default_rng(30).standard_normal((1, 6, 8)).astype(np.float32)}
    padded = {"x": feed["x"].copy()}
    padded["x"][:, 4:] = 100.0  # only the padding rows change
    a = verification.exact_session(result.model).run(None, feed)[0]
    b = verification.exact_session(result.model).run(None, padded)[0]
    assert np.allclose(a[:, :4], b[:, :4], atol=1e-3), "a masked position leaked into the attention"


def test_log_of_power_spectrum_stays_float() -> None:
    """DNSMOS: a quantized power spectrum rounds quiet bins to 0 and log(0) floors at -27.6."""
    model = fc.log_power_spectrum()
    result = _quantize(model, fc.quiet_audio_feeds(8))
    quantized = _quantized_inputs(result.model)
    assert not {"x", "re", "im", "power", "floored", "ln"} & quantized
    assert any("singular at 0" in r for r in _remarks(result, "keep-log-domain-inputs-float"))
    test = fc.quiet_audio_feeds(4, seed=7)
    sess_fp = verification.exact_session(model)
    sess_q = verification.exact_session(result.model)
    for f in test:
        # The log-power itself is exact (computed in float) and the layer after it stays close.
        ref, got = sess_fp.run(None, f)[0], sess_q.run(None, f)[0]
        assert np.isfinite(got).all()
        assert sqnr_db(ref, got) > 25


def _tensor_sqnr(model: onnx.ModelProto, qdq: onnx.ModelProto, feeds: list[dict], name: str) -> float:
    """SQNR vs FP32 of tensor ``name`` (an intermediate one returned as an extra output), exact semantics."""
    from qpasses.data.sessions import with_outputs

    ref = np.concatenate(
        [verification.exact_session(with_outputs(model, [name])).run([name], f)[0].ravel() for f in feeds]
    )
    got = np.concatenate(
        [verification.exact_session(with_outputs(qdq, [name])).run([name], f)[0].ravel() for f in feeds]
    )
    return sqnr_db(ref, got)


def test_log_features_read_by_a_small_first_layer_stay_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNSMOS: log10 power over decades on an 8-bit grid is off by a fixed share of the power in every bin;
    the small first layer reads it unrounded (and runs in float), the large layer after it stays integer."""
    from qpasses.passes.fallback import log_domain_inputs

    model = fc.log_features_front_end()
    calib, test = fc.quiet_audio_feeds(8), fc.quiet_audio_feeds(8, seed=7)
    result = _quantize(model, calib)
    quantized = _quantized_inputs(result.model)
    assert not {"ln", "logpow", "h"} & quantized  # the features, and the small layer's output (it runs float)
    assert "r" in quantized  # the large layer's input
    assert any("log-feature tensors" in r for r in _remarks(result, "keep-log-domain-inputs-float"))
    monkeypatch.setattr(log_domain_inputs, "log_features", lambda graph, op: ([], []))
    rounded = _quantize(model, calib)
    assert "logpow" in _quantized_inputs(rounded.model)
    # The slope layer's output: FP32's values from float features (its +-1 weights are exact on the int8
    # grid), about 35 dB from rounded ones; the model's output gains too (30.7 vs 29.3 dB).
    assert _tensor_sqnr(model, result.model, test, "h") > 60 > 40 > _tensor_sqnr(model, rounded.model, test, "h")
    assert _tensor_sqnr(model, result.model, test, "y") > _tensor_sqnr(model, rounded.model, test, "y") + 1.0

    htp = _quantize(fc.log_features_front_end(), calib, target="htp")
    acts = htp.encodings.activations
    assert acts["logpow"].bitwidth == 16  # int16 features, read by the small layer, which writes 8 bits
    assert acts["r"].bitwidth == 8


def test_log_features_read_by_a_large_layer_stay_quantized() -> None:
    """When the layer reading the log features holds 1% or more of the weights, float features would run
    it in float: they are quantized and a remark names that layer."""
    result = _quantize(fc.log_power_spectrum(), fc.quiet_audio_feeds(8))
    assert "logpow" in _quantized_inputs(result.model)
    assert any("log features" in r and "quantized" in r for r in _remarks(result, "keep-log-domain-inputs-float"))
