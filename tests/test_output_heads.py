"""keep-output-heads-float: what the model returns is not clipped to the calibration range.

Truth: the FP32 model in onnxruntime, on inputs beyond what the calibration data showed, and the
graph itself (which tensors have quantizers).
"""

from __future__ import annotations

import failure_class_models as fc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qpasses.core.verification import exact_session
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings_io import save as save_encodings
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share


def _quantized(model: onnx.ModelProto) -> set[str]:
    """Tensors with a quantizer (a graph output's quantizer reads the producer's ``<name>_fp``)."""
    names = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {n[:-3] if n.endswith("_fp") else n for n in names}


def _calib_and_loud(model: onnx.ModelProto) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Calibration where the features move together (scores about 2), and inputs with each feature
    inside its calibrated range whose scores reach 1 and 3."""
    loud = {"x": np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], np.float32)}
    return fc.correlated_feeds(4), loud


def test_regression_head_stays_float_and_follows_scores_beyond_calibration() -> None:
    model = fc.regression_head()
    calib, loud = _calib_and_loud(model)
    ref = exact_session(model).run(None, loud)[0]
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    clipped = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, quantize_outputs=True)
    assert not {"score", "m"} & _quantized(result.model)  # the head and its bias Add run in float
    assert {"score", "m"} <= _quantized(clipped.model)
    err = np.abs(exact_session(result.model).run(None, loud)[0] - ref).max()
    err_clipped = np.abs(exact_session(clipped.model).run(None, loud)[0] - ref).max()
    assert err < 0.1 * err_clipped, (err, err_clipped)  # the 8-bit score grid clips at the calibrated maximum
    # The feature layer still runs as an integer kernel
    share = integer_mac_share(result.model, calib[0])
    assert share.share == 2 / 3, share  # 2x2 integer MACs per sample, the 2x1 head float
    remark = next(r for r in result.report.remarks if r.pass_name == "keep-output-heads-float")
    assert "back to 'm'" in remark.message


def _per_position_head() -> onnx.ModelProto:
    """[N, T, 8] -> MatMul (3-D, per time step) -> bias Add -> Softmax: a CTC-style head."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["m"], name="head"),
        helper.make_node("Add", ["m", "b"], ["logits"], name="bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 6, 5])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_per_position_head_stays_quantized_and_only_the_probabilities_are_float() -> None:
    model = _per_position_head()
    calib = [{"x": np.random.default_rng(i).standard_normal((2, 6, 8)).astype(np.float32)} for i in range(4)]
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    quantized = _quantized(result.model)
    assert "probs" not in quantized and "probs_fp" not in quantized
    assert {"m", "logits"} <= quantized  # its MACs count once per position: the MatMul stays integer


def _small_per_position_head() -> onnx.ModelProto:
    """[N, T, 8] -> MatMul 8x256 -> Relu -> MatMul 256x64 -> Relu -> MatMul 64x2 (the head: 0.7% of
    the weights) -> bias Add = emissions: a tagger's per-position head."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 256)) / 3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((256, 64)) / 16).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((64, 2)) / 8).astype(np.float32), "w3"),
        numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["m"], name="head"),
        helper.make_node("Add", ["m", "b3"], ["emissions"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tagger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
        [helper.make_tensor_value_info("emissions", TensorProto.FLOAT, ["N", 6, 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_per_position_head_with_a_small_weight_stays_float() -> None:
    model = _small_per_position_head()
    calib = [{"x": np.random.default_rng(i).standard_normal((2, 6, 8)).astype(np.float32)} for i in range(4)]
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    quantized = _quantized(result.model)
    assert not {"m", "emissions", "emissions_fp"} & quantized  # the head and its output run in float
    assert "r2" in quantized  # the layers before it stay integer
    share = integer_mac_share(result.model, calib[0])
    assert share.share == (8 * 256 + 256 * 64) / (8 * 256 + 256 * 64 + 64 * 2), share


def test_quantized_only_targets_and_outputs_other_ops_write_keep_their_quantizers() -> None:
    model = fc.regression_head()
    calib, _ = _calib_and_loud(model)
    on_dsp = quantize_model(model, calib, QuantConfig(per_channel=True), target="dsp", progress=False)
    assert {"score", "m"} <= _quantized(on_dsp.model)
    remark = next(r for r in on_dsp.report.remarks if r.pass_name == "keep-output-heads-float")
    assert remark.kind == "missed" and "integer kernels" in (remark.reason or "")
    # Its quantized output is fitted to the calibration samples: calibrate says how often that clips.
    samples = sum(len(f["x"]) for f in calib)
    (coverage,) = [r for r in on_dsp.report.remarks if r.pass_name == "calibrate" and r.kind == "missed"]
    assert f"range of {samples} calibration samples" in coverage.message and "score" in coverage.nodes
    assert f"1 in {samples + 1} new inputs" in (coverage.reason or "")
    on_cpu_default = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    assert not [r for r in on_cpu_default.report.remarks if r.pass_name == "calibrate" and r.kind == "missed"]
    boxes = fc.boxes_and_scores()  # a Concat writes its output: a float output would make it run float
    result = quantize_model(boxes, fc.feeds(boxes, 4), QuantConfig(per_channel=True), progress=False)
    assert not any(r.pass_name == "keep-output-heads-float" for r in result.report.remarks)


def test_a_quantized_only_target_with_16_bit_kernels_keeps_the_head_in_int16() -> None:
    """htp runs A16W8: the head and its output get int16 grids (dsp, 8-bit only, keeps them 8-bit), and the
    score's error on the calibration inputs drops to what the 8-bit feature layer leaves (0.38x dsp's here)."""
    model = fc.regression_head()
    calib, _ = _calib_and_loud(model)
    config = QuantConfig(per_channel=True)
    on_htp = quantize_model(model, calib, config, target="htp", progress=False)
    on_dsp = quantize_model(model, calib, config, target="dsp", progress=False)
    assert {on_htp.encodings.activations[t].bitwidth for t in ("score", "m")} == {16}
    assert {on_dsp.encodings.activations[t].bitwidth for t in ("score", "m")} == {8}
    assert not [r for r in on_htp.report.remarks if r.pass_name == "check-target" and r.kind == "missed"]
    remark = next(r for r in on_htp.report.remarks if r.pass_name == "keep-output-heads-float")
    assert remark.kind == "applied" and "int16" in remark.message
    feeds = calib[:2]
    ref = np.concatenate([exact_session(model).run(None, f)[0] for f in feeds])
    err = {
        name: np.abs(np.concatenate([exact_session(r.model).run(None, f)[0] for f in feeds]) - ref).mean()
        for name, r in (("htp", on_htp), ("dsp", on_dsp))
    }
    assert err["htp"] < 0.6 * err["dsp"], err


def test_user_encoding_for_the_output_wins(tmp_path) -> None:  # noqa: ANN001
    model = fc.regression_head()
    calib, _ = _calib_and_loud(model)
    clipped = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, quantize_outputs=True)
    save_encodings(tmp_path / "enc.json", clipped.encodings)
    again = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, overrides=tmp_path / "enc.json")
    assert {"score", "m"} <= _quantized(again.model)


def test_cli_quantize_outputs_flag(tmp_path, capsys) -> None:  # noqa: ANN001
    """`qpasses quantize` keeps the head float by default; --quantize-outputs quantizes it, and
    --print-pipeline shows the difference."""
    from qpasses.cli.app import main

    model = fc.regression_head()
    path = tmp_path / "head.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in fc.correlated_feeds(4)]))
    for flags, out in (([], "default"), (["--quantize-outputs"], "all")):
        code = main(["quantize", str(path), "--calib", str(calib), "-q", "-o", str(tmp_path / out), *flags])
        assert code == 0
    default = _quantized(onnx.load(tmp_path / "default" / "model.qdq.onnx"))
    everything = _quantized(onnx.load(tmp_path / "all" / "model.qdq.onnx"))
    assert "score" not in default and {"score", "m"} <= everything
    pipelines = []
    for flags in ([], ["--quantize-outputs"]):
        capsys.readouterr()
        assert (
            main(["quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "p"), "--print-pipeline", *flags])
            == 0
        )
        pipelines.append(capsys.readouterr().out)
    assert "keep-output-heads-float" in pipelines[0] and "keep-output-heads-float" not in pipelines[1]
