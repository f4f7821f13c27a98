"""Mixed precision: the spec's two override examples, int8/int16 mixes, float fallback, the annotation rules.

Truth comes from outside qpasses: node lists computed by hand from the spec's text, onnxruntime
outputs, and the all-int8 model with conv2 put back to float by hand (what "conv2 runs in FP32
between two INT8 convs" means in a QDQ graph).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mixed_precision_models import (
    SPEC_FULL,
    SPEC_PARTIAL,
    data_path,
    feeding,
    op_counts,
    requantizations,
    run,
    three_conv_feeds,
    three_convs,
    write_json,
)
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.passes import default_registry
from qpasses.passes.quantize.apply_overrides import Overrides, load_overrides
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings_file import PrecisionOverride
from qpasses.quant.encodings_io import load as load_encodings
from qpasses.quant.precision_type import FLOAT16, FLOAT32, INT8, INT16
from qpasses.quantize import quantize_model

Q, DQ = "QuantizeLinear", "DequantizeLinear"
INT8_T, INT32_T, FLOAT_T, FLOAT16_T = TensorProto.INT8, TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT16
# Hand-derived from the spec: Q/DQ on data_0 and conv1_1 (int8); conv2 reads the dequantized conv1_1
# (int -> float needs only the DQ); conv2_1 is float and conv3 is int8, so a Q/DQ converts it; conv3_1 int8.
SPEC_PATH = [Q, DQ, "Conv", Q, DQ, "Conv", Q, DQ, "Conv", Q, DQ]
CALIB = three_conv_feeds(6)
TEST = three_conv_feeds(1, seed=7)[0]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    return three_convs()


def _quantize(model: onnx.ModelProto, tmp_path, overrides: dict | None = None, **config: object):
    path = write_json(tmp_path / "overrides.json", overrides) if overrides is not None else None
    return quantize_model(model, CALIB, QuantConfig(**config), overrides=path, progress=False)


def _conv2_back_to_float(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The all-int8 QDQ model with conv2 reading its original FP32 weight and bias."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    originals = {t.name: t for t in fp32.graph.initializer}
    for slot, name in ((1, "conv2_w_0"), (2, "conv2_b_0")):
        out.graph.initializer.append(originals[name])
        conv2.input[slot] = name
    return out


@pytest.mark.parametrize(
    ("overrides", "bias_bw", "bias_type"),
    [(SPEC_FULL, 8, INT8_T), (SPEC_PARTIAL, 32, INT32_T)],
    ids=["full", "partial"],
)
def test_spec_example_converts_before_and_after_conv2_only(three, tmp_path, overrides, bias_bw, bias_type):
    result = _quantize(three, tmp_path, overrides)
    model = result.model
    assert data_path(model, "data_0") == SPEC_PATH
    assert op_counts(model) == {"Conv": 3, Q: 4, DQ: 8}  # 4 activation Q/DQ + int weights/biases of conv1, conv3
    assert requantizations(model) == 0
    assert feeding(model, "conv2", 1) == ("initializer", FLOAT_T)
    assert feeding(model, "conv2", 2) == ("initializer", FLOAT_T)
    for conv in ("conv1", "conv3"):
        # The int8 grid, stored as portable uint8 (zero point 128) without a target.
        assert feeding(model, conv, 1) == (DQ, onnx.TensorProto.UINT8)
        assert feeding(model, conv, 2) == (DQ, bias_type)
    # Numerically: the all-int8 model (same bias bitwidth) with conv2 put back to FP32 by hand.
    baseline = _quantize(three, tmp_path, None, bias_bw=bias_bw).model
    expected = run(_conv2_back_to_float(baseline, three), TEST)
    np.testing.assert_allclose(run(model, TEST), expected, rtol=1e-5, atol=1e-5)
    assert result.encodings.activations["conv2_1"] == PrecisionOverride(32, "float")
    assert result.encodings.params["conv2_w_0"] == PrecisionOverride(32, "float")


def test_float_output_alone_makes_weights_and_bias_float(three, tmp_path):
    """The spec's rule: any of output/weight/bias float -> all three float."""
    only_output = {"activation_encodings": {"conv2_1": [{"bitwidth": 32, "dtype": "float"}]}, "param_encodings": {}}
    only_weight = {"activation_encodings": {}, "param_encodings": {"conv2_w_0": [{"bitwidth": 32, "dtype": "float"}]}}
    reference = run(_quantize(three, tmp_path, SPEC_PARTIAL).model, TEST)
    for overrides in (only_output, only_weight):
        model = _quantize(three, tmp_path, overrides).model
        assert data_path(model, "data_0") == SPEC_PATH
        assert feeding(model, "conv2", 1) == ("initializer", FLOAT_T)
        np.testing.assert_allclose(run(model, TEST), reference, rtol=1e-6, atol=1e-6)


def test_float16_op_between_int8_ops_gets_casts(three, tmp_path):
    overrides = {"activation_encodings": {"conv2_1": [{"bitwidth": 16, "dtype": "float"}]}, "param_encodings": {}}
    model = _quantize(three, tmp_path, overrides).model
    assert data_path(model, "data_0") == [Q, DQ, "Conv", Q, DQ, "Cast", "Conv", "Cast", Q, DQ, "Conv", Q, DQ]
    assert feeding(model, "conv2", 1) == ("initializer", FLOAT16_T)
    assert feeding(model, "conv2", 2) == ("initializer", FLOAT16_T)
    baseline = run(_quantize(three, tmp_path, SPEC_PARTIAL).model, TEST)
    np.testing.assert_allclose(run(model, TEST), baseline, atol=0.05 * np.abs(baseline).max())


def test_exported_encodings_reproduce_the_mixed_model(three, tmp_path):
    first = _quantize(three, tmp_path, SPEC_PARTIAL)
    out = first.save(tmp_path / "out")
    exported = load_encodings(out / "encodings.json")
    assert exported.activations["conv2_1"] == PrecisionOverride(32, "float")
    again = quantize_model(three, CALIB, overrides=out / "encodings.json", progress=False)
    assert data_path(again.model, "data_0") == SPEC_PATH
    np.testing.assert_allclose(run(again.model, TEST), run(first.model, TEST), rtol=1e-5, atol=1e-5)


def _sqnr(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray) -> float:
    (y,) = [run(model, {"input": x})]
    return float(10 * np.log10((ref**2).sum() / ((y - ref) ** 2).sum()))


def test_int8_int16_mix_runs_and_its_sqnr_lies_between(tmp_path):
    from conftest import MODELS

    model = MODELS / "digits_cnn.onnx"
    x = np.load(MODELS / "digits_test.npz")["input"][:128]
    ref = run(onnx.load(model), {"input": x})
    calib = str(MODELS / "digits_calib.npz")
    results = {}
    for label, act_bw, overrides in (
        ("int8", 8, None),
        ("int16", 16, None),
        (
            "mixed",
            8,
            {
                "activation_encodings": {
                    n: [{"bitwidth": 16, "dtype": "int"}] for n in ("features.1.act_out", "features.3.act_out")
                },
                "param_encodings": {},
            },
        ),
    ):
        path = write_json(tmp_path / f"{label}.json", overrides) if overrides else None
        # 16-bit weights: the activation bitwidth then decides the error.
        r = quantize_model(model, calib, QuantConfig(act_bw=act_bw, weight_bw=16), overrides=path, progress=False)
        results[label] = (r.model, _sqnr(r.model, x, ref))
    mixed = results["mixed"][0]
    # int8 conv1 output -> int16 conv; int16 conv3 output -> int8 conv4: two DQ -> Q -> DQ requantizations.
    assert requantizations(mixed) == 2
    assert requantizations(results["int8"][0]) == requantizations(results["int16"][0]) == 0
    assert results["int8"][1] < results["mixed"][1] < results["int16"][1]


def _conv_reshape_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
        helper.make_node("Relu", ["r"], ["out"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "fallback",
        [helper.make_tensor_value_info("x", FLOAT_T, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("out", FLOAT_T, [1, 64])],
        [w, b, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_float_fallback_propagates_encodings_across_data_invariant_ops(tmp_path):
    """No calibration: r's override encoding reaches c through the Reshape; tensors left without one are float."""
    overrides = {"activation_encodings": {"r": [{"bitwidth": 8, "min": -4.0, "max": 4.0}]}, "param_encodings": {}}
    path = write_json(tmp_path / "enc.json", overrides)
    result = quantize_model(_conv_reshape_model(), None, overrides=path, progress=False)
    model = result.model
    assert data_path(model, "x") == ["Conv", Q, DQ, "Reshape", Q, DQ, "Relu"]
    scales = {n.input[0]: n.input[1] for n in model.graph.node if n.op_type == Q}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits[scales["c"]] == pytest.approx(8.0 / 255)  # c quantized with r's encoding
    assert set(scales) == {"c", "r"}  # x and out fall back to float
    fallback = [str(r) for r in result.report.remarks if "float fallback" in r.reason]
    assert fallback, "the float fallback is reported"


def _annotated(model: onnx.ModelProto, overrides: dict | None, tmp_path, *, target: object = None, **options):
    graph = graph_ir.from_onnx(model)
    registry = default_registry()
    ctx = PassContext(target=registry.target(target) if isinstance(target, str) else target)
    passes = []
    if overrides is not None:
        ctx.artifacts.put(Overrides(load_overrides(str(write_json(tmp_path / "a.json", overrides)), graph)))
        passes.append(registry.create_pass("apply-overrides"))
    passes.append(registry.create_pass("annotate-precision", **options))
    report = PassManager(passes).run(graph, ctx)
    return graph, report


def test_rule_float_bias_bitwidth_and_conflicting_int_override(three, tmp_path):
    overrides = {
        "activation_encodings": {"conv2_1": [{"bitwidth": 16, "dtype": "float"}]},
        "param_encodings": {"conv2_b_0": [{"bitwidth": 8, "dtype": "int"}]},
    }
    graph, report = _annotated(three, overrides, tmp_path, float_bias_bw=32)
    t = graph.tensors
    assert (t["conv2_w_0"].precision, t["conv2_b_0"].precision) == (FLOAT16, FLOAT32)
    assert t["conv2_b_0"].meta["precision_source"] == "rule"
    assert any("replaced by float" in r.message for r in report.remarks)
    assert t["conv1_1"].precision == INT8 and t["conv1_w_0"].precision == INT8
    assert t["conv1_b_0"].precision.bitwidth == 32  # default bias_bw
    # The float conv2_1 is read by int8 conv3: calibration must give it an 8-bit encoding for the convert.
    assert t["conv2_1"].meta["encoding_bw"] == 8
    assert "encoding_bw" not in t["conv2_w_0"].meta


def test_data_invariant_ops_follow_their_input(tmp_path):
    from conftest import MODELS

    model = onnx.load(MODELS / "digits_cnn.onnx")
    overrides = {
        "activation_encodings": {"features.1.act_out": [{"bitwidth": 16, "dtype": "int"}]},
        "param_encodings": {},
    }
    graph, _ = _annotated(model, overrides, tmp_path)
    assert graph.tensors["features.2_out"].precision == INT16  # MaxPool after the int16 Relu
    assert graph.tensors["features.2_out"].meta["precision_source"] == "propagated"
    assert graph.tensors["features.3.act_out"].precision == INT8


def test_target_constraints_adjust_defaults_only(tmp_path):
    from conftest import MODELS

    model = onnx.load(MODELS / "digits_cnn.onnx")
    graph, report = _annotated(model, None, tmp_path, target="dsp", act_bw=16)
    precisions = {t.precision for t in graph.tensors.values() if t.precision is not None and not t.is_constant}
    assert precisions == {INT8}  # the DSP has int8 activations only
    assert any("target dsp" in r.message for r in report.remarks)
    overrides = {"activation_encodings": {"logits": [{"bitwidth": 16, "dtype": "int"}]}, "param_encodings": {}}
    graph, _ = _annotated(model, overrides, tmp_path, target="dsp")
    assert graph.tensors["logits"].precision == INT16  # an override is kept (check reports it)
    graph, _ = _annotated(model, None, tmp_path, target="cpu")
    assert {t.precision for t in graph.tensors.values() if t.precision is not None} == {FLOAT32}
