"""End-to-end quantization: FP32 ONNX -> QDQ ONNX + encodings.json, checked against independent truth.

Why: ``quantize_model`` / ``qpasses quantize`` is what users run; every number it writes must be
what the QNN spec says, and the QDQ model must compute what a fake-quantized FP32 model computes.
The expected values come from ``numpy_reference`` (own BN folding, own ops, own quantization
formula) or from the spec's rules written out here, never from qpasses' own helpers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import model_zoo
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy_reference import Grid, QuantSpec, Reference, spec_encoding
from onnx import TensorProto, helper, numpy_helper

from qpasses.cli import main
from qpasses.core.errors import QPassesError
from qpasses.core.verification import exact_session
from qpasses.quantize import QuantizeResult, quantize_model

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = ["digits_cnn", "digits_cnn_relu6", "digits_cnn_residual"]
LAYOUTS = pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
N_CALIB = 64


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / name) as data:
        return data["input"], data["labels"]


CALIB_X = _split("digits_calib.npz")[0][:N_CALIB]
TEST_X, TEST_Y = _split("digits_test.npz")

# Which tensors carry an activation encoding, from the QNN model of quantized execution (not from
# quant_plan): the graph input, every op output a backend materializes (Conv/Gemm outputs are
# fused with the Relu/Clip that follows), data-movement outputs (sharing their input's encoding)
# and the logits. ``bn_out`` names stand for the folded Conv output under either of its names.
_CHAIN = [
    "input",
    "features.0.act_out",
    "features.1.act_out",
    "features.2_out",
    "features.3.act_out",
    "features.4.act_out",
    "gap_out",
    "flatten_out",
    "logits",
]
EXPECTED_ACTIVATIONS = {
    "digits_cnn": set(_CHAIN),
    "digits_cnn_relu6": set(_CHAIN),
    "digits_cnn_residual": set(_CHAIN) | {"features.3.body.0.act_out", "features.3.body.1.bn_out"},
}
# (output, input) of data-movement ops: same encoding, same Q/DQ initializers.
SHARED = [("features.2_out", "features.1.act_out"), ("flatten_out", "gap_out")]


# --- helpers ------------------------------------------------------------------------------------------


def calib_feeds(x: np.ndarray = CALIB_X, batch: int = 16) -> list[dict[str, np.ndarray]]:
    return [{"input": x[i : i + batch]} for i in range(0, len(x), batch)]


@functools.cache
def quantized(name: str, per_channel: bool = False, **config: object) -> QuantizeResult:
    """Cached ``quantize_model`` of a shipped model with 64 calibration samples.

    Bias correction is off: the reference is plain fake quantization of the FP32 graph (bias
    correction has its own tests in test_bias_correction.py). Every tensor is quantized, as the spec
    has it (``quantize_outputs``: the default keeps the Gemm head float, tests/test_output_heads.py)."""
    return quantize_model(
        MODELS / f"{name}.onnx",
        calib_feeds(),
        {"per_channel": per_channel, **config},
        progress=False,
        bias_correction=False,
        quantize_outputs=True,
    )


@functools.cache
def reference(name: str) -> Reference:
    return Reference(onnx.load(MODELS / f"{name}.onnx"))


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    return exact_session(model if isinstance(model, onnx.ModelProto) else str(model))


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def accuracy(model: onnx.ModelProto | Path) -> float:
    (logits,) = run(model, {"input": TEST_X})
    return float((logits.argmax(axis=1) == TEST_Y).mean())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def interface(model: onnx.ModelProto) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    inits = {t.name for t in model.graph.initializer}
    io = lambda vis: [(v.name, v.type.tensor_type.elem_type) for v in vis if v.name not in inits]
    return io(model.graph.input), io(model.graph.output)


class QDQView:
    """Read-only lookups on a QDQ ModelProto."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.readers[i].append(n)
        self.nodes = {n.name: n for n in model.graph.node}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def dtype(self, name: str) -> int:
        return self.inits[name].data_type

    def dq(self, tensor: str) -> onnx.NodeProto:
        node = self.producer.get(tensor)
        assert node is not None and node.op_type == "DequantizeLinear", f"{tensor} is not read through a DQ"
        return node

    def ops(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if n.op_type == op_type]

    def quantized_inputs(self) -> set[str]:
        return {n.input[0] for n in self.ops("QuantizeLinear")}


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def canonical_activations(name: str, result: QuantizeResult) -> dict[str, Grid]:
    """Activation grids keyed by the reference's names (a folded conv output under its BN name)."""
    alias = {a: layer.output for layer in reference(name).layers for a in layer.aliases}
    return {alias.get(n, n): Grid.of(e) for n, e in result.encodings.activations.items()}


def quant_spec(result: QuantizeResult, bias_bw: int = 32) -> QuantSpec:
    return QuantSpec(
        {n: Grid.of(e) for n, e in result.encodings.activations.items()},
        {n: Grid.of(e) for n, e in result.encodings.params.items()},
        bias_bw,
    )


def check_matches_reference(name: str, result: QuantizeResult, steps: float = 3.0, bias_bw: int = 32) -> None:
    ref = reference(name)
    unknown = set(result.encodings.activations) - ref.tensor_names()
    assert not unknown, f"encodings for tensors the FP32 graph does not have: {unknown}"
    expected = ref.run({"input": TEST_X}, quant_spec(result, bias_bw))["logits"]
    (got,) = run(result.model, {"input": TEST_X})
    step = result.encodings.activations["logits"].scale[0]
    worst = float(np.abs(got - expected).max())
    assert worst <= steps * step + 1e-6, f"{name}: max |QDQ - reference| = {worst / step:.2f} logits steps"
    agree = float((got.argmax(axis=1) == expected.argmax(axis=1)).mean())
    assert agree >= 0.99, f"{name}: argmax agrees on {agree:.3f} of the test set"


def assert_close_relative(qdq: np.ndarray, fp32: np.ndarray, fraction: float = 0.1) -> None:
    """Quantized output within ``fraction`` of the FP32 output's range (8-bit sanity, not exactness)."""
    assert qdq.shape == fp32.shape
    worst = float(np.abs(qdq.astype(np.float64) - fp32).max())
    assert worst <= fraction * float(np.abs(fp32).max()), f"max error {worst} vs max |fp32| {np.abs(fp32).max()}"


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], model: Path, outdir: Path) -> str:
    """Run a failing ``qpasses quantize``: exit 2, one error line, input intact, no model written."""
    before = digest(model)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpasses: error: "), err
    assert digest(model) == before
    assert not (outdir / "model.qdq.onnx").exists()
    return lines[0]


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    shutil.copy(MODELS / "digits_cnn.onnx", path)
    return path


@pytest.fixture(scope="module")
def calib_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("calib") / "calib.npz", input=CALIB_X)


# --- 1. the QDQ model computes the fake-quantized FP32 model ---------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_interpreter_matches_onnxruntime_fp32(name: str) -> None:
    """The numpy reference (BN folded) reproduces the FP32 model, so it can judge the QDQ model."""
    model = onnx.load(MODELS / f"{name}.onnx")
    (expected,) = run(model, {"input": TEST_X[:64]})
    got = Reference(model).run({"input": TEST_X[:64]})["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("name", SHIPPED)
@LAYOUTS
def test_qdq_matches_numpy_fake_quant_reference(name: str, per_channel: bool) -> None:
    """onnxruntime on the QDQ model is within 3 logits steps of the numpy fake-quant reference."""
    result = quantized(name, per_channel)
    assert set(canonical_activations(name, result)) == EXPECTED_ACTIVATIONS[name]
    check_matches_reference(name, result)


@pytest.mark.parametrize("name", SHIPPED)
@LAYOUTS
def test_qdq_accuracy_close_to_fp32(name: str, per_channel: bool) -> None:
    fp32 = accuracy(MODELS / f"{name}.onnx")
    qdq = accuracy(quantized(name, per_channel).model)
    assert qdq >= fp32 - 0.02, f"{name}: FP32 {fp32:.4f}, QDQ {qdq:.4f}"


@pytest.mark.parametrize("name", SHIPPED)
def test_activation_encodings_follow_spec_on_calibration_ranges(name: str) -> None:
    """tf mode: the input encoding is the spec's rule on the calibration min/max; every other
    activation's grid spans its FP32 calibration range (0 included) to within a couple of steps."""
    result = quantized(name)
    grids = canonical_activations(name, result)
    want = spec_encoding(float(CALIB_X.min()), float(CALIB_X.max()), 8)
    got = grids["input"]
    assert got.bitwidth == 8 and got.offset == want.offset
    assert got.scale[0] == pytest.approx(want.scale[0], rel=1e-9)
    env = reference(name).run({"input": CALIB_X})
    for tensor, grid in grids.items():
        lo, hi = min(float(env[tensor].min()), 0.0), max(float(env[tensor].max()), 0.0)
        (s,), (o,) = grid.scale, grid.offset
        assert -(2**8 - 1) <= o <= 0
        assert abs(o * s - lo) <= 2 * s + 1e-6, f"{tensor}: min {o * s} vs calibration {lo}"
        assert abs((o + 255) * s - hi) <= 2 * s + 1e-6, f"{tensor}: max {(o + 255) * s} vs calibration {hi}"
    for out, src in SHARED:
        assert grids[out] == grids[src]


@pytest.mark.parametrize("name", SHIPPED)
@LAYOUTS
def test_stored_weights_and_biases_are_the_folded_fp32_values(name: str, per_channel: bool) -> None:
    """Stored int8 weights are the reference's folded weights on the exported grid (+-1 at ties);
    int32 biases are round(b / (s_in * s_w)) of the reference's folded bias."""
    result = quantized(name, per_channel)
    view = QDQView(result.model)
    for layer in reference(name).layers:
        node = view.nodes[layer.node.name]
        wdq = view.dq(node.input[1])
        # Portable storage: uint8 with zero point 128 for the int8 grid (q - zp is the same).
        stored = view.array(wdq.input[0]).astype(np.int64)
        zp = view.array(wdq.input[2]).astype(np.int64)
        q = stored - zp.reshape((-1,) + (1,) * (stored.ndim - 1))
        s_w = view.array(wdq.input[1]).astype(np.float64)
        grid = Grid(8, tuple(s_w.ravel()), (-128,) * s_w.size, 0 if per_channel else None)
        diff = q - (grid.to_levels(layer.weight) - 128)
        assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= max(1, diff.size // 100), layer.node.name
        enc = result.encodings.params[layer.weight_name]
        np.testing.assert_allclose(s_w.ravel(), enc.scale, rtol=1e-6)
        bdq = view.dq(node.input[2])
        s_in = float(view.array(view.dq(node.input[0]).input[1]))
        b_q = view.array(bdq.input[0]).astype(np.int64)
        expected = np.rint(layer.bias / (s_in * s_w.ravel()))
        assert np.abs(b_q - expected).max() <= 1, layer.node.name


# --- 2. structure of the QDQ model ------------------------------------------------------------------------


def check_weight_and_bias_storage(
    view: QDQView, per_channel: bool, weight_type: int = TensorProto.UINT8, bias_type: int = TensorProto.INT32
) -> int:
    """Every Conv/Gemm reads int weights and int biases through DQs; bias scale = s_in x s_w.
    Symmetric weights: zero point 0 when signed, 128 when stored as portable uint8."""
    weight_zp = 128 if weight_type == TensorProto.UINT8 else 0
    layers = view.ops("Conv") + view.ops("Gemm")
    assert layers
    for node in layers:
        wdq = view.dq(node.input[1])
        assert view.dtype(wdq.input[0]) == weight_type, node.name
        assert view.dtype(wdq.input[2]) == weight_type, node.name
        assert (view.array(wdq.input[2]).astype(np.int64) == weight_zp).all(), f"{node.name}: weight zero point"
        s_w = view.array(wdq.input[1])
        channels = view.array(wdq.input[0]).shape[0]
        if per_channel:
            assert s_w.shape == (channels,) and attr(wdq, "axis", 1) == 0, node.name
        else:
            assert s_w.shape == (), node.name
        bdq = view.dq(node.input[2])
        assert view.dtype(bdq.input[0]) == bias_type, node.name
        assert not view.array(bdq.input[2]).astype(np.int64).any(), f"{node.name}: bias zero point"
        s_in = view.array(view.dq(node.input[0]).input[1])
        assert s_in.shape == ()
        s_b = view.array(bdq.input[1])
        if bias_type != TensorProto.INT32:
            # Narrow biases get their own symmetric range (spec rule): step = max(max/127, -min/128).
            b = view.array(bdq.input[0]).astype(np.float64) * s_b
            assert s_b.shape == (), node.name
            assert np.abs(b).max() <= 128 * s_b + 1e-9, node.name
            continue
        np.testing.assert_allclose(s_b, s_in.astype(np.float64) * s_w, rtol=1e-6, err_msg=node.name)
        if per_channel:
            assert s_b.shape == (channels,) and attr(bdq, "axis", 1) == 0, node.name
    return len(layers)


@pytest.mark.parametrize("name", SHIPPED)
@LAYOUTS
def test_qdq_structure(name: str, per_channel: bool) -> None:
    result = quantized(name, per_channel)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    view = QDQView(model)
    check_weight_and_bias_storage(view, per_channel)
    # No float weight is left for a Conv/Gemm to read directly.
    for node in view.ops("Conv") + view.ops("Gemm"):
        assert all(i not in view.inits for i in node.input), node.name
    # Data-movement ops: the same scale/zero-point initializers on their input DQ and output Q.
    for op_type in ("MaxPool", "Flatten"):
        (node,) = view.ops(op_type)
        dq_in = view.dq(node.input[0])
        (q_out,) = view.readers[node.output[0]]
        assert q_out.op_type == "QuantizeLinear", op_type
        assert list(q_out.input[1:]) == list(dq_in.input[1:]), op_type
    # Activations are uint8 with the encodings' scale and zero point -offset.
    for q in view.ops("QuantizeLinear"):
        assert view.dtype(q.input[2]) == TensorProto.UINT8
    grids = result.encodings.activations
    for q in view.ops("QuantizeLinear"):
        tensor = q.input[0]
        enc = grids.get(tensor) or grids.get(tensor.removesuffix("_fp"))
        assert enc is not None, f"Q/DQ on {tensor}, which has no exported encoding"
        assert float(view.array(q.input[1])) == pytest.approx(enc.scale[0], rel=1e-6)
        assert int(view.array(q.input[2])) == -enc.offset[0]
    assert interface(model) == interface(onnx.load(MODELS / f"{name}.onnx"))


def test_cli_quantize_writes_outputs_and_leaves_input_alone(
    digits: Path, calib_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(digits)
    out = tmp_path / "out"
    assert main(["quantize", str(digits), "--calib", str(calib_npz), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert digest(digits) == before
    assert {p.name for p in out.iterdir()} >= {"model.qdq.onnx", "encodings.json", "report.txt"}
    model = onnx.load(out / "model.qdq.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert interface(model) == interface(onnx.load(digits))
    assert accuracy(out / "model.qdq.onnx") >= accuracy(digits) - 0.02


# --- 3. encodings.json: spec layout, export -> import round trip, partial overrides ------------------------


def _quantize_cli(model: Path, out: Path, *extra: str) -> dict:
    # Bias correction rewrites bias values, which an encodings file does not carry: round trips
    # through --overrides (applied to the FP32 model) compare runs without it. Every tensor quantized.
    flags = ["--no-bias-correction", "--quantize-outputs"] if "--calib" in extra else []
    assert main(["quantize", str(model), "-o", str(out), "-q", *extra, *flags]) == 0
    return json.loads((out / "encodings.json").read_text())


def test_exported_per_channel_encodings_follow_spec(
    digits: Path, calib_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per-channel: one entry per output channel, offset -2^(bw-1), is_symmetric True (0.6.1 and 1.0.0)."""
    doc = _quantize_cli(digits, tmp_path / "a", "--calib", str(calib_npz), "--per-channel")
    assert set(doc) >= {"activation_encodings", "param_encodings"}
    channels = {
        t.name: t.dims[0]
        for t in onnx.load(digits).graph.initializer
        if t.name.endswith(".weight") and len(t.dims) >= 2
    }
    for name, count in channels.items():
        entries = doc["param_encodings"][name]
        assert len(entries) == count, name
        for e in entries:
            assert e["bitwidth"] == 8 and e["offset"] == -128 and str(e["is_symmetric"]) == "True", name
            assert e["min"] == pytest.approx(-128 * e["scale"]) and e["max"] == pytest.approx(127 * e["scale"])
    for name, (e,) in doc["activation_encodings"].items():
        assert e["bitwidth"] == 8 and -255 <= e["offset"] <= 0, name
        assert e["scale"] == pytest.approx((e["max"] - e["min"]) / 255, rel=1e-6), name
        assert e["min"] == pytest.approx(e["offset"] * e["scale"], rel=1e-6, abs=1e-12), name
    v1 = _quantize_cli(
        digits, tmp_path / "b", "--calib", str(calib_npz), "--per-channel", "--encodings-version", "1.0.0"
    )
    capsys.readouterr()
    by_name = {e["name"]: e for e in v1["param_encodings"]}
    for name, count in channels.items():
        e = by_name[name]
        assert e["enc_type"] == "PER_CHANNEL" and e["bw"] == 8 and e["is_sym"] is True
        assert e["offset"] == [-128] * count and len(e["scale"]) == count


def _round_trip(model: Path, out: Path, first: list[str], overrides_doc: dict | None = None) -> tuple[dict, dict]:
    """Quantize, then re-quantize with the exported (or given) encodings as overrides and --no-calib."""
    doc = _quantize_cli(model, out / "first", *first)
    path = out / "first" / "encodings.json"
    if overrides_doc is not None:
        path = out / "overrides.json"
        path.write_text(json.dumps(overrides_doc))
    keep = [a for a in first if a in ("--per-channel",)] + (
        ["--encodings-version", first[first.index("--encodings-version") + 1]] if "--encodings-version" in first else []
    )
    again = _quantize_cli(model, out / "second", "--no-calib", "--overrides", str(path), *keep)
    return doc, again


def _same_outputs(a: Path, b: Path, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        assert x.tobytes() == y.tobytes()


@LAYOUTS
def test_round_trip_shipped_model_with_folded_biases(
    digits: Path, calib_npz: Path, tmp_path: Path, per_channel: bool
) -> None:
    flags = ["--calib", str(calib_npz)] + (["--per-channel"] if per_channel else [])
    doc, again = _round_trip(digits, tmp_path, flags)
    assert again == doc


@LAYOUTS
def test_round_trip_shipped_model_without_bias_entries(
    digits: Path, calib_npz: Path, tmp_path: Path, per_channel: bool
) -> None:
    """Activation and weight encodings survive export -> --overrides import exactly; so do the
    derived biases and the model's outputs (bias entries dropped)."""
    flags = ["--calib", str(calib_npz)] + (["--per-channel"] if per_channel else [])
    doc = _quantize_cli(digits, tmp_path / "first", *flags)
    ov = {
        "activation_encodings": doc["activation_encodings"],
        "param_encodings": {k: v for k, v in doc["param_encodings"].items() if not k.endswith(".bias")},
    }
    path = tmp_path / "ov.json"
    path.write_text(json.dumps(ov))
    again = _quantize_cli(
        digits, tmp_path / "second", "--no-calib", "--overrides", str(path), *(["--per-channel"] if per_channel else [])
    )
    assert again == doc
    _same_outputs(tmp_path / "first" / "model.qdq.onnx", tmp_path / "second" / "model.qdq.onnx", {"input": TEST_X})


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0"])
@LAYOUTS
def test_round_trip_model_with_own_biases(tmp_path: Path, version: str, per_channel: bool) -> None:
    """Conv+bias model (no BN): the full file, biases included, round-trips in both layouts."""
    proto = model_zoo.opset12_model()
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"  # batch of calibration samples
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    feeds = model_zoo.random_feeds(onnx.load(model), batch=1)
    rng = np.random.default_rng(1)
    calib = write_npz(tmp_path / "c.npz", input=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    flags = ["--calib", str(calib), "--encodings-version", version] + (["--per-channel"] if per_channel else [])
    doc, again = _round_trip(model, tmp_path, flags)
    assert again == doc
    params = doc["param_encodings"]
    names = {e["name"] for e in params} if version == "1.0.0" else set(params)
    assert names == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    _same_outputs(tmp_path / "first" / "model.qdq.onnx", tmp_path / "second" / "model.qdq.onnx", feeds)


def test_partial_overrides_keep_calibrated_values(digits: Path, calib_npz: Path, tmp_path: Path) -> None:
    """Overriding the logits and fc.weight changes exactly those (to the spec's grid of the given
    min/max) and the fc bias derived from them; everything else stays as calibrated."""
    base = _quantize_cli(digits, tmp_path / "base", "--calib", str(calib_npz))
    ov = {
        "activation_encodings": {"logits": [{"bitwidth": 8, "min": -20.0, "max": 12.0}]},
        "param_encodings": {"fc.weight": [{"bitwidth": 8, "min": -1.0, "max": 1.5}]},
    }
    path = tmp_path / "ov.json"
    path.write_text(json.dumps(ov))
    doc = _quantize_cli(digits, tmp_path / "ov", "--calib", str(calib_npz), "--overrides", str(path))
    for section, name, lo, hi in (
        ("activation_encodings", "logits", -20.0, 12.0),
        ("param_encodings", "fc.weight", -1.0, 1.5),
    ):
        (e,) = doc[section][name]
        want = spec_encoding(lo, hi, 8)
        assert e["offset"] == want.offset[0] and e["scale"] == pytest.approx(want.scale[0], rel=1e-9), name
    changed = {"logits", "fc.weight", "fc.bias"}
    for section in ("activation_encodings", "param_encodings"):
        for name, entries in base[section].items():
            if name not in changed:
                assert doc[section][name] == entries, name
    (b,) = doc["param_encodings"]["fc.bias"]
    (s_in,) = [e["scale"] for e in doc["activation_encodings"]["flatten_out"]]
    assert b["scale"] == pytest.approx(s_in * doc["param_encodings"]["fc.weight"][0]["scale"], rel=1e-9)


def test_overrides_in_1_0_0_layout(digits: Path, calib_npz: Path, tmp_path: Path) -> None:
    """The 1.0.0 list layout is read like 0.6.1: scale/offset taken as given."""
    ov = {
        "version": "1.0.0",
        "activation_encodings": [
            {
                "name": "logits",
                "dtype": "INT",
                "bw": 8,
                "enc_type": "PER_TENSOR",
                "is_sym": False,
                "scale": [0.125],
                "offset": [-160],
            }
        ],
        "param_encodings": [
            {
                "name": "fc.weight",
                "dtype": "INT",
                "bw": 8,
                "enc_type": "PER_CHANNEL",
                "is_sym": True,
                "scale": [0.01] * 10,
                "offset": [-128] * 10,
            }
        ],
    }
    path = tmp_path / "ov.json"
    path.write_text(json.dumps(ov))
    doc = _quantize_cli(digits, tmp_path / "out", "--calib", str(calib_npz), "--overrides", str(path))
    (e,) = doc["activation_encodings"]["logits"]
    assert (e["scale"], e["offset"], e["min"], e["max"]) == (0.125, -160, -20.0, 95 * 0.125)
    fc = doc["param_encodings"]["fc.weight"]
    assert [(x["scale"], x["offset"]) for x in fc] == [(0.01, -128)] * 10
    view = QDQView(onnx.load(tmp_path / "out" / "model.qdq.onnx"))
    (gemm,) = view.ops("Gemm")
    np.testing.assert_allclose(view.array(view.dq(gemm.input[1]).input[1]), np.full(10, 0.01, np.float32))


# --- 4. bitwidth variants -----------------------------------------------------------------------------------


def test_weight_bw_4_int4_weights_opset_21() -> None:
    result = quantized("digits_cnn", True, weight_bw=4)
    model = result.model
    assert model.opset_import[0].version >= 21 and {o.domain for o in model.opset_import} >= {""}
    onnx.checker.check_model(model, full_check=True)
    view = QDQView(model)
    check_weight_and_bias_storage(view, True, weight_type=TensorProto.INT4)
    for node in view.ops("Conv") + view.ops("Gemm"):
        q = view.array(view.dq(node.input[1]).input[0]).astype(np.int64)
        assert q.min() >= -8 and q.max() <= 7
    for enc in (result.encodings.params[n] for n in result.encodings.params if n.endswith(".weight")):
        assert enc.bitwidth == 4 and set(enc.offset) == {-8}
    check_matches_reference("digits_cnn", result)
    assert accuracy(model) >= accuracy(MODELS / "digits_cnn.onnx") - 0.15


def test_act_bw_16_uint16_activations_opset_21() -> None:
    result = quantized("digits_cnn", False, act_bw=16)
    model = result.model
    assert model.opset_import[0].version >= 21
    onnx.checker.check_model(model, full_check=True)
    view = QDQView(model)
    for q in view.ops("QuantizeLinear"):
        assert view.dtype(q.input[2]) == TensorProto.UINT16
    assert all(e.bitwidth == 16 for e in result.encodings.activations.values())
    check_weight_and_bias_storage(view, False)
    check_matches_reference("digits_cnn", result)
    assert accuracy(model) >= accuracy(MODELS / "digits_cnn.onnx") - 0.02


def test_bias_bw_8(digits: Path, calib_npz: Path, tmp_path: Path) -> None:
    """int8 biases (own symmetric range, not s_in x s_w); the model loads and runs."""
    doc = _quantize_cli(digits, tmp_path / "out", "--calib", str(calib_npz), "--bias-bw", "8")
    model = onnx.load(tmp_path / "out" / "model.qdq.onnx")
    onnx.checker.check_model(model, full_check=True)
    check_weight_and_bias_storage(QDQView(model), False, bias_type=TensorProto.INT8)
    for name, (e,) in doc["param_encodings"].items():
        if name.endswith(".bias"):
            assert e["bitwidth"] == 8 and e["offset"] == -128, name
    (logits,) = run(tmp_path / "out" / "model.qdq.onnx", {"input": TEST_X[:8]})
    assert logits.shape == (8, 10) and np.isfinite(logits).all()


def test_bias_bw_8_accuracy() -> None:
    result = quantized("digits_cnn", False, bias_bw=8)
    assert accuracy(result.model) >= accuracy(MODELS / "digits_cnn.onnx") - 0.05


# --- 5. models as real exporters write them -------------------------------------------------------------------


def _zoo_feeds(model: onnx.ModelProto, n: int = 4, batch: int = 1) -> list[dict[str, np.ndarray]]:
    return [model_zoo.random_feeds(model, batch=batch, seed=s) for s in range(n)]


def test_constant_node_weights_quantize_like_initializers() -> None:
    """PaddlePaddle-style Constant-node weights give the same encodings and outputs as the same
    weights stored as initializers."""
    const_model = model_zoo.constant_node_weights()
    init_model = model_zoo.conv_bn_relu(opset=13)
    calib = _zoo_feeds(const_model)
    a = quantize_model(const_model, calib, progress=False, quantize_outputs=True)
    b = quantize_model(init_model, calib, progress=False, quantize_outputs=True)
    assert a.encodings.params == b.encodings.params and len(a.encodings.params) >= 3
    assert a.encodings.activations == b.encodings.activations
    view = QDQView(a.model)
    assert not view.ops("Constant") or all(
        attr(c, "value").data_type != TensorProto.FLOAT for c in view.ops("Constant")
    )
    check_weight_and_bias_storage(view, False)
    feeds = model_zoo.random_feeds(const_model, batch=1, seed=9)
    np.testing.assert_allclose(run(a.model, feeds)[0], run(b.model, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("factory", [model_zoo.opset11_model, model_zoo.opset12_model], ids=["opset11", "opset12"])
def test_per_channel_upgrades_old_opsets(factory) -> None:
    model = factory()
    result = quantize_model(model, _zoo_feeds(model), {"per_channel": True}, progress=False)
    out = result.model
    assert out.opset_import[0].version >= 13
    onnx.checker.check_model(out, full_check=True)
    check_weight_and_bias_storage(QDQView(out), True)
    feeds = model_zoo.random_feeds(model, batch=1, seed=7)
    assert_close_relative(run(out, feeds)[0], run(model, feeds)[0])
    assert interface(out) == interface(model)


def _fp16_input_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], name="Cast", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["out"], name="Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16_input",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(4, 0.1, np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_float16_and_int64_inputs_left_alone() -> None:
    fp16 = _fp16_input_model()
    result = quantize_model(fp16, _zoo_feeds(fp16, batch=2), progress=False)
    view = QDQView(result.model)
    assert "image" not in view.quantized_inputs() and "x" in view.quantized_inputs()
    assert interface(result.model) == interface(fp16)
    feeds = model_zoo.random_feeds(fp16, batch=2)
    assert_close_relative(run(result.model, feeds)[0], run(fp16, feeds)[0])

    ints = model_zoo.int_input_model()
    result = quantize_model(ints, _zoo_feeds(ints, batch=2), progress=False)
    view = QDQView(result.model)
    assert "ids" not in view.quantized_inputs() and "features" in view.quantized_inputs()
    assert "ids" not in result.encodings.activations
    feeds = model_zoo.random_feeds(ints, batch=2, seed=5)
    assert_close_relative(run(result.model, feeds)[0], run(ints, feeds)[0])


def test_all_float16_model_is_a_clean_error() -> None:
    """Nothing is FP32, so there is nothing to quantize: a user error, not a crash or a float model."""
    model = model_zoo.float16_model()
    with pytest.raises(QPassesError, match="nothing was quantized: the model computes in float16.*float32"):
        quantize_model(model, _zoo_feeds(model), progress=False)


def test_already_quantized_model_keeps_running() -> None:
    model = model_zoo.already_quantized()
    result = quantize_model(model, _zoo_feeds(model), progress=False)
    assert any(r.kind == "missed" and "already contains" in r.message for r in result.report.remarks)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = model_zoo.random_feeds(model, batch=1, seed=3)
    (before,) = run(model, feeds)
    (after,) = run(result.model, feeds)
    np.testing.assert_allclose(after, before, atol=0.05)


def test_dynamic_dims_quantize_and_run_at_other_sizes() -> None:
    model = model_zoo.dynamic_dims()
    result = quantize_model(model, _zoo_feeds(model, batch=2), progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert interface(result.model) == interface(model)
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 10)).astype(np.float32)
    (fp32,) = run(model, {"input": x})
    (qdq,) = run(result.model, {"input": x})
    assert qdq.shape == (3, 2, 12, 10)
    assert_close_relative(qdq, fp32)


# --- 6. bad input through the CLI ------------------------------------------------------------------------------


def test_calibration_npz_with_wrong_input_name(digits: Path, tmp_path: Path, capsys) -> None:
    bad = write_npz(tmp_path / "bad.npz", pixels=CALIB_X)
    out = tmp_path / "out"
    line = cli_error(capsys, ["quantize", str(digits), "--calib", str(bad), "-o", str(out), "-q"], digits, out)
    assert "'input'" in line and "pixels" in line, line


def test_calibration_npz_with_wrong_shape(digits: Path, tmp_path: Path, capsys) -> None:
    bad = write_npz(tmp_path / "bad.npz", input=np.zeros((8, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    line = cli_error(capsys, ["quantize", str(digits), "--calib", str(bad), "-o", str(out), "-q"], digits, out)
    assert "'input'" in line and "8, 1, 8, 8" in line, line


def _raw(path: Path, count: int = 256) -> Path:
    np.random.default_rng(count).random(count).astype(np.float32).tofile(path)
    return path


def test_input_list_of_raw_files(digits: Path, tmp_path: Path, capsys) -> None:
    """The QNN input list: one raw float32 file per line (plain and name:=path forms)."""
    for i, x in enumerate(CALIB_X[:4]):
        x.tofile(tmp_path / f"s{i}.raw")
    want = spec_encoding(float(CALIB_X[:4].min()), float(CALIB_X[:4].max()), 8)
    for form, prefix in (("plain", ""), ("named", "input:=")):
        listing = tmp_path / f"{form}.txt"
        listing.write_text("".join(f"{prefix}{tmp_path / f's{i}.raw'}\n" for i in range(4)))
        doc = _quantize_cli(digits, tmp_path / form, "--calib", str(listing))
        (e,) = doc["activation_encodings"]["input"]
        assert e["offset"] == want.offset[0] and e["scale"] == pytest.approx(want.scale[0], rel=1e-9), form
    capsys.readouterr()


def test_input_list_with_missing_file(digits: Path, tmp_path: Path, capsys) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{_raw(tmp_path / 'ok.raw')}\n{tmp_path / 'missing_sample.raw'}\n")
    out = tmp_path / "out"
    line = cli_error(capsys, ["quantize", str(digits), "--calib", str(listing), "-o", str(out), "-q"], digits, out)
    assert "missing_sample.raw" in line, line


def test_input_list_with_wrong_size_file(digits: Path, tmp_path: Path, capsys) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{_raw(tmp_path / 'ok.raw')}\n{_raw(tmp_path / 'short_sample.raw', 200)}\n")
    out = tmp_path / "out"
    line = cli_error(capsys, ["quantize", str(digits), "--calib", str(listing), "-o", str(out), "-q"], digits, out)
    assert "short_sample.raw" in line, line


BAD_OVERRIDES = {
    "unknown-tensor": (
        {"activation_encodings": {"no_such_tensor": [{"bitwidth": 8, "min": 0.0, "max": 1.0}]}, "param_encodings": {}},
        "no_such_tensor",
    ),
    "bitwidth-out-of-range": (
        {"activation_encodings": {"gap_out": [{"bitwidth": 12, "min": 0.0, "max": 1.0}]}, "param_encodings": {}},
        "gap_out",
    ),
    "weight-bitwidth-out-of-range": (
        {"activation_encodings": {}, "param_encodings": {"fc.weight": [{"bitwidth": 2, "min": -1.0, "max": 1.0}]}},
        "fc.weight",
    ),
    "min-greater-than-max": (
        {"activation_encodings": {"logits": [{"bitwidth": 8, "min": 3.0, "max": -3.0}]}, "param_encodings": {}},
        "logits",
    ),
    "per-channel-count": (
        {
            "activation_encodings": {},
            "param_encodings": {
                "features.1.conv.weight": [{"bitwidth": 8, "min": -1.0, "max": 1.0, "offset": -128, "scale": 1 / 127.5}]
                * 3
            },
        },
        "features.1.conv.weight",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_overrides(digits: Path, tmp_path: Path, capsys, case: str) -> None:
    doc, culprit = BAD_OVERRIDES[case]
    path = tmp_path / "ov.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "out"
    line = cli_error(
        capsys, ["quantize", str(digits), "--no-calib", "--overrides", str(path), "-o", str(out)], digits, out
    )
    assert culprit in line, line


def test_malformed_overrides_json(digits: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "broken_overrides.json"
    path.write_text('{"activation_encodings": {"logits": [{"bitwidth": 8,,}]}')
    out = tmp_path / "out"
    line = cli_error(
        capsys, ["quantize", str(digits), "--no-calib", "--overrides", str(path), "-o", str(out)], digits, out
    )
    assert "broken_overrides.json" in line and "JSON" in line, line


# --- 7. Python API ---------------------------------------------------------------------------------------------


def test_python_api_with_in_memory_feeds(tmp_path: Path) -> None:
    feeds = [{"input": x[None]} for x in CALIB_X[:32]]
    result = quantize_model(onnx.load(MODELS / "digits_cnn.onnx"), feeds, {"per_channel": True}, progress=False)
    want = spec_encoding(float(CALIB_X[:32].min()), float(CALIB_X[:32].max()), 8)
    got = result.encodings.activations["input"]
    assert got.offset == want.offset and got.scale[0] == pytest.approx(want.scale[0], rel=1e-9)
    assert "W8A8" in result.summary() and "per-channel" in result.summary()
    out = result.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} >= {"model.qdq.onnx", "encodings.json", "report.txt"}
    assert accuracy(out / "model.qdq.onnx") >= accuracy(MODELS / "digits_cnn.onnx") - 0.02
    # A generator is an iterable of feed dicts too.
    again = quantize_model(MODELS / "digits_cnn.onnx", (f for f in feeds), {"per_channel": True}, progress=False)
    assert again.encodings.activations == result.encodings.activations


def test_model_local_functions_are_inlined_and_quantized() -> None:
    """Ops inside a model-local function are invisible unless inlined: quantize_model inlines them."""
    model = model_zoo.local_function()
    feeds = [model_zoo.random_feeds(model, seed=s) for s in range(3)]
    result = quantize_model(model, feeds, {}, progress=False)
    kinds = [n.op_type for n in result.model.graph.node]
    # the function body (MatMul + bias Add) is inlined, then folded into a Gemm
    assert "Gemm" in kinds and "QuantizeLinear" in kinds and not result.model.functions
    assert any(r.pass_name == "inline-functions" and r.kind == "applied" for r in result.report.remarks)
    (ref,) = run(model, feeds[0])
    (got,) = run(result.model, feeds[0])
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["names", "mixed"])
def test_pipeline_list_must_be_pass_specs_or_passes(kind: str) -> None:
    """A list of pass names, or PassSpecs mixed with Pass objects, is the user's mistake (it was an AttributeError)."""
    from qpasses.core.errors import PipelineError
    from qpasses.core.pipeline import PassSpec
    from qpasses.passes import default_registry

    pipeline = ["cle"] if kind == "names" else [PassSpec("cle"), default_registry().create_pass("cle")]
    with pytest.raises(PipelineError, match="list of PassSpec or of Pass objects"):
        quantize_model(MODELS / "digits_cnn.onnx", calib_feeds(), {}, pipeline=pipeline, progress=False)
