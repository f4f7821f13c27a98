"""Property: ``quantize_model`` on random graphs and random configs.

- never crashes: it returns a model, or raises a ``QPassesError`` for calibration data that cannot
  give ranges (NaN/inf/empty batches; see ``ACCEPTED_ERRORS``), never another exception;
- the model passes ``onnx.checker``, runs in onnxruntime with finite outputs of the FP32 shapes, and
  its encodings export in both AIMET layouts and load back through ``encodings_io.load``;
- with exact QDQ semantics its outputs are those of an independent numpy fake-quant reference
  (``fuzz_graphs.FuzzReference``: float64 ops, float32 Q/DQ) run on the FP32 graph after the
  structural passes quantize runs first (BN folding, CLE; their FP32 exactness is
  ``test_fuzz_passes``' job), with the exported grids (plus the conversions insert-converts adds on
  single edges): 95% of the elements within 1 output step, all within 3 (see ``output_bound``),
  also with random int8/int16/float precision overrides;
- ``portable-storage`` on an int8-weight model changes no exact output (bit-identical);
- the exported encodings re-applied as overrides reproduce the model's outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fuzz_graphs import (
    STATS,
    FuzzGraph,
    FuzzReference,
    conversion_edges,
    fuzz_settings,
    fuzz_stats,  # noqa: F401  (autouse: cases and time per property)
    graphs,
    random_feeds,
)
from hypothesis import given
from hypothesis import strategies as st
from numpy_reference import Grid

import graph_ir
from qpasses.core.errors import CalibrationDataError, QPassesError
from qpasses.core.pass_manager import PassManager
from qpasses.core.verification import exact_session
from qpasses.passes import default_registry
from qpasses.passes.quantize.apply_overrides import tensor_specs
from qpasses.quant import encodings_io
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings import Encoding
from qpasses.quantize import QuantizeResult, quantize_model

REGISTRY = default_registry()
# Random data makes the calibration outlier and runtime parity warnings expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# What a clear error is acceptable for: calibration data that cannot give a range. Anything else
# (another QPassesError on a valid FP32 graph with finite data) fails the property.
ACCEPTED_ERRORS = {
    "nan": (CalibrationDataError, QPassesError),
    "inf": (CalibrationDataError, QPassesError),
    "empty": (CalibrationDataError, QPassesError),
}

configs = st.fixed_dictionaries(
    {
        "per_channel": st.booleans(),
        "act_bw": st.sampled_from([8, 16]),
        "weight_bw": st.sampled_from([4, 8]),
        "bias_bw": st.sampled_from([32, 32, 8]),
        "act_mode": st.sampled_from(["tf", "tf", "enhanced", "percentile", "symmetric"]),
        "weight_mode": st.sampled_from(["symmetric", "symmetric", "tf", "enhanced", "adjusted"]),
    }
).map(
    lambda c: (
        {**c, "weight_mode": "symmetric"}
        if c["weight_mode"] == "adjusted" and (c["weight_bw"] != 8 or c["per_channel"])
        else c
    )
)


def calibration(model: onnx.ModelProto, kind: str, seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """Calibration feeds: random normal, scaled, constant, or with a NaN/inf, or an empty batch."""
    feeds = random_feeds(model, seed, count=count, scale=4.0 if kind == "scaled" else 1.0)
    x = feeds[-1]["input"]
    if kind == "constant":
        for f in feeds:
            f["input"] = np.full_like(f["input"], 0.5)
    elif kind == "nan":
        x.reshape(-1)[0] = np.nan
    elif kind == "inf":
        x.reshape(-1)[-1] = np.inf
    elif kind == "empty":
        feeds[-1]["input"] = x[:0]
    return feeds


def empty_batch_possible(model: onnx.ModelProto) -> bool:
    return not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def check_runs(result: QuantizeResult, fp32: onnx.ModelProto) -> dict[str, np.ndarray]:
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    feeds = random_feeds(fp32, 11)[0]
    names = [o.name for o in fp32.graph.output]
    ref = dict(zip(names, exact_session(fp32).run(names, feeds), strict=True))
    got = dict(zip(names, exact_session(model).run(names, feeds), strict=True))
    for name in names:
        assert got[name].shape == ref[name].shape, f"output {name}: shape {got[name].shape} != {ref[name].shape}"
        assert np.all(np.isfinite(got[name])), f"output {name} is not finite"
    return got


def model_specs(model: onnx.ModelProto, **structural: bool) -> dict[str, encodings_io.TensorSpec]:
    """What quantize validates an overrides file against: the tensors before and after its structural passes."""
    return {**tensor_specs(graph_ir.load(model)), **tensor_specs(graph_ir.load(structural_fp32(model, **structural)))}


def _canonical(enc: Any) -> Any:
    """A per-channel encoding of one channel is the per-tensor one (a 0.6.1 file cannot tell them apart)."""
    if isinstance(enc, Encoding) and enc.axis is not None and len(enc.scale) == 1:
        return Encoding(enc.bitwidth, enc.scale, enc.offset, enc.symmetric, None)
    return enc


def check_encodings_export(result: QuantizeResult, model: onnx.ModelProto, tmp: Path, **structural: bool) -> None:
    """Both layouts round-trip through save/load (with the model's tensor specs) unchanged."""
    specs = model_specs(model, **structural)
    for version in ("0.6.1", "1.0.0"):
        path = tmp / f"enc-{version}.json"
        encodings_io.save(path, result.encodings, version)
        json.loads(path.read_text())  # plain JSON (no NaN/Infinity tokens)
        loaded = encodings_io.load(path, tensors=specs)
        for section in ("activations", "params"):
            want, got = getattr(result.encodings, section), getattr(loaded, section)
            assert set(got) == set(want), f"{version}: export -> load changed the {section} names"
            for name in want:
                assert _canonical(got[name]) == _canonical(want[name]), (
                    f"{version}: export -> load changed {name}: {want[name]} -> {got[name]}"
                )


@fuzz_settings(200)
@given(g=graphs(), config=configs, data=st.data())
def test_quantize_model_random_configs(
    g: FuzzGraph, config: dict[str, Any], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    kinds = ["normal", "normal", "normal", "scaled", "constant", "nan", "inf"]
    kinds += ["empty"] if empty_batch_possible(g.model) else []
    kind = data.draw(st.sampled_from(kinds), label="calibration")
    calib = calibration(g.model, kind, data.draw(st.integers(0, 9)), data.draw(st.integers(1, 3)))
    options = data.draw(
        st.fixed_dictionaries(
            {
                "cle": st.booleans(),
                "bias_correction": st.booleans(),
                "auto_fallback": st.booleans(),
                "fold_batchnorm": st.booleans(),
                "target": st.sampled_from([None, None, "ort", "ort-vnni"]),
                "runtime_check": st.booleans(),
                "batch_size": st.sampled_from([1, 16]),
            }
        ),
        label="options",
    )
    try:
        result = quantize_model(g.model, calib, QuantConfig(**config), progress=False, **options)
    except QPassesError as exc:
        assert kind in ACCEPTED_ERRORS and isinstance(exc, ACCEPTED_ERRORS[kind]), (
            f"{type(exc).__name__} on a valid graph with {kind} calibration data: {exc}"
        )
        STATS.case(f"{kind} calibration: {type(exc).__name__}")
        return
    STATS.case(f"{kind} calibration: quantized")
    check_runs(result, g.model)
    for enc in [*result.encodings.activations.values(), *result.encodings.params.values()]:
        if isinstance(enc, Encoding):
            assert all(math.isfinite(s) and s > 0 for s in enc.scale), enc
    check_encodings_export(
        result, g.model, tmp_path_factory.mktemp("enc"), cle=options["cle"], fold=options["fold_batchnorm"]
    )


def structural_fp32(model: onnx.ModelProto, cle: bool = False, fold: bool = True) -> onnx.ModelProto:
    """The FP32 graph quantize works on after its structural passes (tensor names as in the encodings)."""
    graph = graph_ir.load(model)
    passes = [REGISTRY.create_pass("inline-functions")]
    passes += [REGISTRY.create_pass("fold-batchnorm")] if fold else []
    passes += [REGISTRY.create_pass("cle")] if cle else []
    passes += [REGISTRY.create_pass("fold-matmul-bias")]
    PassManager(passes, verify="none").run(graph)
    return graph.to_onnx()


def reference_outputs(
    result: QuantizeResult, fp32: onnx.ModelProto, feeds: dict[str, np.ndarray], bias_bw: int
) -> dict[str, np.ndarray]:
    acts = {n: Grid.of(e) for n, e in result.encodings.activations.items() if isinstance(e, Encoding)}
    params = {n: Grid.of(e) for n, e in result.encodings.params.items() if isinstance(e, Encoding)}
    names = {o for n in fp32.graph.node for o in n.output} | {"input"}
    edges = conversion_edges(result.model, names - set(acts))
    return FuzzReference(fp32).run_quantized(feeds, acts, params, bias_bw, edges)


def output_bound(result: QuantizeResult, name: str, expected: np.ndarray) -> tuple[float, float]:
    """(step, tolerance): the output's grid step (or 1e-3 of its range when it is float), and 3 steps.

    The reference emulates float32 Q/DQ, so outputs normally agree exactly; what is left is the rare
    rounding flip of a quantizer (float64 vs float32 accumulation; likelier on 16-bit grids), which a
    finer grid downstream can amplify: 95% of the elements must be within 1 step, all within 3 steps
    (or 2% of the output's range)."""
    enc = result.encodings.activations.get(name)
    span = float(np.abs(expected).max()) if expected.size else 0.0
    step = enc.scale[0] if isinstance(enc, Encoding) else max(span, 1e-6) * 1e-3
    return step, 3 * step + 1e-6


@fuzz_settings(200)
@given(g=graphs(), config=configs, cle=st.booleans(), auto_fallback=st.booleans())
def test_quantized_model_matches_numpy_reference(
    g: FuzzGraph, config: dict[str, Any], cle: bool, auto_fallback: bool
) -> None:
    calib = random_feeds(g.model, 1, count=3)
    result = quantize_model(
        g.model,
        calib,
        QuantConfig(**config),
        progress=False,
        bias_correction=False,
        cle=cle,
        runtime_check=False,
        auto_fallback=auto_fallback,
    )
    STATS.case()
    check_matches_reference(result, g.model, config["bias_bw"], cle=cle)


def check_matches_reference(result: QuantizeResult, model: onnx.ModelProto, bias_bw: int, cle: bool) -> None:
    """Exact-semantics outputs of the QDQ model vs the numpy fake-quant reference of the FP32 graph."""
    fp32 = structural_fp32(model, cle)
    feeds = random_feeds(model, 5)[0]
    expected = reference_outputs(result, fp32, feeds, bias_bw)
    names = [o.name for o in model.graph.output]
    got = dict(zip(names, exact_session(result.model).run(names, feeds), strict=True))
    for name in names:
        step, tolerance = output_bound(result, name, expected[name])
        if not got[name].size:
            continue
        diff = np.abs(got[name].astype(np.float64) - expected[name])
        within = float(np.mean(diff <= step + 1e-6))
        span = float(np.ptp(expected[name])) if expected[name].size else 0.0
        worst = float(diff.max())
        STATS.note(
            "outputs equal to the reference"
            if worst <= 1e-6
            else "outputs within 1 step"
            if worst <= step + 1e-6
            else "outputs within 3 steps"
            if worst <= tolerance
            else "an upstream flip amplified"
        )
        assert within >= 0.95 and worst <= max(tolerance, 0.02 * span + 1e-6), (
            f"output {name}: max |QDQ - reference| = {worst / step:.2f} steps (step {step:.3g}, range {span:.3g}); "
            f"{within:.1%} of elements within 1 step"
        )


@st.composite
def precision_overrides(draw: st.DrawFn, model: onnx.ModelProto) -> dict[str, Any]:
    """A 0.6.1 overrides document giving random tensors a precision only (no range): activations int8/int16
    or float32, layer weights int4/8/16 or float32."""
    graph = graph_ir.load(model)
    specs = tensor_specs(graph)
    acts = sorted(n for n, spec in specs.items() if spec.role == "activation")
    weights = sorted(
        {
            op.inputs[1]
            for op in graph.ops
            if op.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and len(op.inputs) > 1
            and graph.tensors[op.inputs[1]].is_constant
        }
    )
    doc: dict[str, Any] = {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {}}
    for name in draw(st.lists(st.sampled_from(acts), unique=True, min_size=1, max_size=4)):
        doc["activation_encodings"][name] = [
            draw(
                st.sampled_from(
                    [
                        {"bitwidth": 16, "dtype": "int"},
                        {"bitwidth": 16, "dtype": "int"},
                        {"bitwidth": 8, "dtype": "int"},
                        {"bitwidth": 32, "dtype": "float"},
                    ]
                )
            )
        ]
    if weights:
        for name in draw(st.lists(st.sampled_from(weights), unique=True, max_size=2)):
            doc["param_encodings"][name] = [
                draw(
                    st.sampled_from(
                        [
                            {"bitwidth": 16, "dtype": "int"},
                            {"bitwidth": 4, "dtype": "int"},
                            {"bitwidth": 8, "dtype": "int"},
                            {"bitwidth": 32, "dtype": "float"},
                        ]
                    )
                )
            ]
    return doc


@fuzz_settings(150)
@given(g=graphs(), config=configs, data=st.data())
def test_precision_overrides_mixed_precision_matches_reference(
    g: FuzzGraph, config: dict[str, Any], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Random int8/int16/float precision overrides: the mixed-precision model (with the conversions
    insert-converts adds) is valid, runs, and computes the fake-quant reference with the exported grids."""
    doc = data.draw(precision_overrides(g.model), label="overrides")
    path = tmp_path_factory.mktemp("overrides") / "overrides.json"
    path.write_text(json.dumps(doc))
    calib = random_feeds(g.model, 1, count=3)
    result = quantize_model(
        g.model,
        calib,
        QuantConfig(**config),
        progress=False,
        bias_correction=False,
        runtime_check=False,
        auto_fallback=False,
        overrides=path,
    )
    STATS.case()
    check_runs(result, g.model)
    check_matches_reference(result, g.model, config["bias_bw"], cle=False)


@fuzz_settings(60)
@given(g=graphs(), config=configs)
def test_portable_storage_is_bit_identical(g: FuzzGraph, config: dict[str, Any]) -> None:
    """An int8-weight model (target ort-vnni) re-stored as uint8 + 128 computes the same exact outputs."""
    calib = random_feeds(g.model, 1, count=2)
    result = quantize_model(
        g.model,
        calib,
        QuantConfig(**config),
        progress=False,
        target="ort-vnni",
        runtime_check=False,
        auto_fallback=False,
    )
    before = result.model
    graph = graph_ir.load(before)
    PassManager([REGISTRY.create_pass("portable-storage")], verify="none").run(graph)
    after = graph.to_onnx()
    onnx.checker.check_model(after, full_check=True)
    feeds = random_feeds(g.model, 3)[0]
    names = [o.name for o in before.graph.output]
    STATS.case()
    for a, b, name in zip(
        exact_session(before).run(names, feeds), exact_session(after).run(names, feeds), names, strict=True
    ):
        assert np.array_equal(a, b), f"output {name} changed: max diff {np.abs(a - b).max()}"


@fuzz_settings(80)
@given(g=graphs(), config=configs, version=st.sampled_from(["0.6.1", "1.0.0"]))
def test_exported_encodings_reapplied_as_overrides_reproduce_the_model(
    g: FuzzGraph, config: dict[str, Any], version: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """README: the exported file re-applied as overrides reproduces the same model."""
    calib = random_feeds(g.model, 1, count=2)
    options = dict(progress=False, bias_correction=False, runtime_check=False, auto_fallback=False)
    first = quantize_model(g.model, calib, QuantConfig(**config), **options)
    path = tmp_path_factory.mktemp("overrides") / "encodings.json"
    encodings_io.save(path, first.encodings, version)
    again = quantize_model(g.model, calib, QuantConfig(**config), overrides=path, **options)
    feeds = random_feeds(g.model, 3)[0]
    names = [o.name for o in g.model.graph.output]
    STATS.case()
    for a, b, name in zip(
        exact_session(first.model).run(names, feeds), exact_session(again.model).run(names, feeds), names, strict=True
    ):
        step, _ = output_bound(first, name, a)
        assert a.shape == b.shape and (not a.size or float(np.abs(a - b).max()) <= step + 1e-6), (
            f"output {name}: re-applied encodings moved it by {float(np.abs(a - b).max()) / step:.2f} steps"
        )


# ---------------------------------------------------------------------------------------------------
# minimal reproducers of the bugs this fuzzing found (Q1-Q3, fixed)


def _shared_weight_two_axes() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """input[N,3] -> MatMul(w[3,7]) -> Gemm(., w, transB=1) -> z[N,3]: one weight, output channels on axis 1 (7)
    for the MatMul and on axis 0 (3) for the Gemm."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((3, 7)) * 0.5).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["y"], name="mm"),
        helper.make_node("Gemm", ["y", "w"], ["z"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_two_axes",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model, [{"input": rng.standard_normal((4, 3)).astype(np.float32)}]


def test_q1a_shared_weight_with_two_channel_axes_quantizes() -> None:
    """Q1a: per-channel weights along the MatMul's axis crashed the runtime check (kernel_emulation broadcast the
    7 scales to the Gemm's 3 channels). One per-channel grid cannot serve both layers: the weight is per tensor."""
    model, calib = _shared_weight_two_axes()
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, quantize_outputs=True)
    check_runs(result, model)
    w = result.encodings.params["w"]
    assert isinstance(w, Encoding) and w.axis is None and w.num_channels == 1
    assert any("w" in r.nodes and "different axes" in r.reason for r in result.report.remarks), [
        str(r) for r in result.report.remarks
    ]


def test_q1b_shared_weight_encodings_reapply_as_overrides(tmp_path: Path) -> None:
    """Q1b: the exported encodings.json (7 scales along the MatMul's axis) was rejected as overrides for the same
    model (tensor_specs took the Gemm's axis, encode-weights the MatMul's); now both go through
    quant_plan.weight_axes, and a per-channel entry for that weight is a clear error."""
    model, calib = _shared_weight_two_axes()
    options = dict(
        progress=False, runtime_check=False, auto_fallback=False, bias_correction=False, quantize_outputs=True
    )
    first = quantize_model(model, calib, QuantConfig(per_channel=True), **options)
    encodings_io.save(tmp_path / "encodings.json", first.encodings)
    again = quantize_model(
        model, calib, QuantConfig(per_channel=True), overrides=tmp_path / "encodings.json", **options
    )
    assert again.encodings.params == first.encodings.params
    doc = json.loads((tmp_path / "encodings.json").read_text())
    doc["param_encodings"]["w"] = doc["param_encodings"]["w"] * 3  # three per-channel entries: the Gemm's count
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(QPassesError, match="'w'.*different axes"):
        quantize_model(model, calib, QuantConfig(per_channel=True), overrides=tmp_path / "bad.json", **options)


def _conv_bn_initializers_as_inputs() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """input[N,3,4,4] -> Conv(w1, b2) -> BatchNormalization, every initializer also a graph input (IR < 4
    exporters)."""
    from fuzz_graphs import GraphSpec, Step, Style, build

    conv = Step(
        "conv",
        (
            ("cout", 2),
            ("group", 1),
            ("kernel", 1),
            ("stride", 1),
            ("pads", (0, 0, 0, 0)),
            ("dilation", 1),
            ("bias", True),
            ("omit_group", False),
            ("gain", 1.0),
            ("quirk", "none"),
            ("source", "init"),
        ),
    )
    bn = Step("batchnorm", (("epsilon", 1e-05), ("negative_gamma", False), ("source", "init")))
    model = build(GraphSpec(13, "N", (3, 4, 4), 0, (conv, bn), Style(inits_as_inputs=True)))
    return model, random_feeds(model, 1, count=2)


@pytest.mark.parametrize("bitwidth", [4, 16])
def test_q2_weight_override_applies_when_batchnorm_is_folded_into_an_input_listed_weight(
    tmp_path: Path, bitwidth: int
) -> None:
    """Q2: with initializers listed as graph inputs (IR < 4), fold-batchnorm wrote the folded weight under a new
    name and left 'w1' an unread graph input that tensor_specs called an activation, so the override of 'w1' was
    rejected ({bitwidth: 4}) or applied to nothing ({bitwidth: 16}). The folded weight keeps its name now."""
    model, calib = _conv_bn_initializers_as_inputs()
    path = tmp_path / "overrides.json"
    path.write_text(
        json.dumps({"activation_encodings": {}, "param_encodings": {"w1": [{"bitwidth": bitwidth, "dtype": "int"}]}})
    )
    result = quantize_model(model, calib, QuantConfig(), progress=False, runtime_check=False, overrides=path)
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    weight = next(e for n, e in result.encodings.params.items() if conv.input[1].startswith(n))
    assert weight.bitwidth == bitwidth
    assert not {"w1", "b2"} & {i.name for i in result.model.graph.input}, "rewritten weights stay graph inputs"


def test_q3_tiny_bias_grid_encodings_reapply_as_overrides(tmp_path: Path) -> None:
    """Q3: x -> Conv(w1, b1=-100) -> Relu (dead: range [0, 0], so 16-bit s_in = 1e-4/65535) -> Conv(w2 with a zero
    output channel, bias 0 there), per_channel, act_bw=16: that channel's int32 bias grid s_in * s_w spans 2.6e-6,
    below the spec's minimum range 1e-4. Its 0.6.1 min/max were re-derived with the minimum-range rule on import
    (offset mismatch, EncodingError); a symmetric bias grid stated exactly is now taken as stated."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = np.abs(rng.standard_normal((2, 2, 1, 1))).astype(np.float32)
    w2 = rng.standard_normal((2, 2, 1, 1)).astype(np.float32)
    w2[0] = 0.0
    arrays = {"w1": w1, "b1": np.full(2, -100.0, np.float32), "w2": w2, "b2": np.array([0.0, -0.25], np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "dead_relu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 3, 3])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    calib = [{"x": np.abs(rng.standard_normal((2, 2, 3, 3))).astype(np.float32)}]
    config = QuantConfig(per_channel=True, act_bw=16)
    options = dict(progress=False, runtime_check=False, auto_fallback=False)
    first = quantize_model(model, calib, config, **options)
    first.save(tmp_path / "out")
    tiny = [
        n
        for n, e in first.encodings.params.items()
        if isinstance(e, Encoding) and e.bitwidth == 32 and min(e.scale) * (2**32 - 1) < 1e-4
    ]
    assert tiny, "the reproducer no longer makes a bias grid below the minimum range"
    again = quantize_model(model, calib, config, overrides=tmp_path / "out" / "encodings.json", **options)
    assert again.encodings.params == first.encodings.params
    assert again.encodings.activations == first.encodings.activations
