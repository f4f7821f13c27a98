"""SeqMSE: searched weight encodings, checked against onnxruntime and an independent min-max.

Why: SeqMSE's promise is that each layer's output error is never worse than with min-max weight
encodings (min-max is one of its candidates), and its numpy layer kernels must compute exactly
what onnxruntime does or the search optimises the wrong thing. Per-layer errors here are measured
with onnxruntime on models whose weights the test fake-quantizes itself.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.cli import main
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError, PassError, QPassesError
from qpasses.core.pass_manager import PassManager
from qpasses.core.verification import exact_session
from qpasses.passes import default_registry
from qpasses.passes.quantize.layer_kernels import constant_bias, layer_output, make_kernel
from qpasses.passes.quantize.seq_mse_search import SeqMseResults
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model

MODELS = Path(__file__).resolve().parent.parent / "models"
REGISTRY = default_registry()
BATCH = 16
NUM_BATCHES = 4
CALIB = np.load(MODELS / "digits_calib.npz")["input"]
FEEDS = [{"input": CALIB[i * BATCH : (i + 1) * BATCH]} for i in range(NUM_BATCHES)]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return exact_session(model)


def _single_op(
    op_type: str, x_shape: list[int], weight: np.ndarray, bias: np.ndarray | None = None, **attrs: object
) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        inputs.append("b")
    node = helper.make_node(op_type, inputs, ["y"], name="op", **attrs)
    graph = helper.make_graph(
        [node],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _check_kernel(model: onnx.ModelProto, x: np.ndarray, channel_last: bool) -> None:
    """numpy kernel output == onnxruntime's, as [rows, channels]."""
    expected = _session(model).run(None, {"x": x})[0]
    if not channel_last:  # [N, M, *spatial] -> [N * spatial, M]
        expected = np.moveaxis(expected, 1, -1)
    expected = expected.reshape(-1, expected.shape[-1])
    g = graph_ir.load(model)
    op = g.op("op")
    w = g.tensors["w"].data
    kernel = make_kernel(op, w.shape)
    got = layer_output(kernel, x, w, constant_bias(g, op, w.shape, kernel))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng() -> None:
    """Each test draws the same data whatever ran before it (xdist and -k change the order)."""
    global RNG
    RNG = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --- numpy kernels vs onnxruntime ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cin", "cout", "group", "kernel", "attrs"),
    [
        (4, 6, 1, (3, 3), {}),
        (4, 6, 2, (3, 3), {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}),
        (8, 8, 8, (3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),  # depthwise
        (8, 16, 8, (5, 3), {"dilations": [2, 1], "pads": [2, 1, 2, 1]}),  # depthwise x2
        (3, 5, 1, (1, 1), {"strides": [3, 3]}),
        (4, 6, 1, (3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        (4, 6, 2, (4, 4), {"auto_pad": "SAME_LOWER"}),
        (4, 6, 1, (3, 3), {"auto_pad": "VALID", "dilations": [2, 2]}),
    ],
    ids=[
        "plain",
        "grouped-stride-pad-dilation",
        "depthwise-stride",
        "depthwise-mult",
        "1x1-stride",
        "same-upper",
        "same-lower",
        "valid",
    ],
)
def test_conv_kernel_matches_onnxruntime(
    cin: int, cout: int, group: int, kernel: tuple[int, int], attrs: dict[str, object]
) -> None:
    w = _randn(cout, cin // group, *kernel)
    model = _single_op("Conv", [3, cin, 11, 10], w, _randn(cout), group=group, kernel_shape=list(kernel), **attrs)
    _check_kernel(model, _randn(3, cin, 11, 10), channel_last=False)


def test_conv1d_and_conv3d_kernels_match_onnxruntime() -> None:
    _check_kernel(
        _single_op("Conv", [2, 4, 17], _randn(6, 2, 3), group=2, strides=[2], pads=[1, 2]),
        _randn(2, 4, 17),
        channel_last=False,
    )
    _check_kernel(
        _single_op("Conv", [2, 3, 5, 6, 7], _randn(4, 3, 3, 1, 2), pads=[1, 0, 1, 1, 0, 0]),
        _randn(2, 3, 5, 6, 7),
        channel_last=False,
    )


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        {"strides": [2, 3], "dilations": [2, 1], "pads": [0, 1, 2, 0]},
        {"strides": [2, 2], "output_shape": [15, 13]},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    ],
    ids=["plain", "stride-pad-outpad", "dilation-asym-pads", "output-shape", "same-upper"],
)
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_kernel_matches_onnxruntime(attrs: dict[str, object], group: int) -> None:
    w = _randn(4, 3, 3, 3)  # [C_in, C_out / group, kH, kW]
    model = _single_op("ConvTranspose", [2, 4, 7, 6], w, _randn(3 * group), group=group, **attrs)
    _check_kernel(model, _randn(2, 4, 7, 6), channel_last=False)


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_kernel_matches_onnxruntime(trans_a: int, trans_b: int) -> None:
    w = _randn(5, 7) if trans_b else _randn(7, 5)
    x = _randn(7, 9) if trans_a else _randn(9, 7)
    model = _single_op("Gemm", list(x.shape), w, _randn(5), transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    _check_kernel(model, x, channel_last=True)


def test_matmul_kernel_matches_onnxruntime() -> None:
    _check_kernel(_single_op("MatMul", [2, 3, 6], _randn(6, 4)), _randn(2, 3, 6), channel_last=True)
    _check_kernel(_single_op("MatMul", [5, 6], _randn(6, 4)), _randn(5, 6), channel_last=True)


# --- the search -----------------------------------------------------------------------------------------


def _folded_digits(name: str = "digits_cnn") -> graph_ir.Graph:
    g = graph_ir.load(MODELS / f"{name}.onnx")
    REGISTRY.create_pass("fold-batchnorm")(g)
    return g


def _encode(g: graph_ir.Graph, weight_bw: int, calibration: object = FEEDS, **seq_options: object) -> PassContext:
    """seq-mse then encode-weights (the encodings quantize_model would lower), on ``g`` in place."""
    ctx = PassContext(calibration_data=calibration)
    passes = [
        REGISTRY.create_pass("seq-mse", weight_bw=weight_bw, progress=False, **seq_options),
        REGISTRY.create_pass("encode-weights", weight_bw=weight_bw, per_channel=True),
    ]
    PassManager(passes).run(g, ctx)
    return ctx


def _minmax_weight(w: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Per-channel symmetric min-max (QNN spec: step = max(max / (2^(b-1) - 1), -min / 2^(b-1)))."""
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    half = 2 ** (bits - 1)
    scale = np.maximum(np.maximum(rows.max(1), 0) / (half - 1), -np.minimum(rows.min(1), 0) / half)
    return _fake_quant(w, scale, axis, bits)


def _fake_quant(w: np.ndarray, scale: np.ndarray, axis: int, bits: int) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = -1
    s = np.asarray(scale, np.float64).reshape(shape)
    half = 2 ** (bits - 1)
    return (np.clip(np.rint(w / s), -half, half - 1) * s).astype(np.float32)


def _layer_mse(model: onnx.ModelProto, weights: dict[str, np.ndarray], output: str, feeds: list[dict]) -> float:
    """MSE of ``output`` with ``weights`` swapped in vs ``model`` as is (same inputs), over ``feeds``."""

    def variant(swaps: dict[str, np.ndarray]) -> ort.InferenceSession:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for init in m.graph.initializer:
            if init.name in swaps:
                init.CopyFrom(numpy_helper.from_array(swaps[init.name], init.name))
        m.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
        return _session(m)

    ref, quant = variant({}), variant(weights)
    errors = [np.mean((quant.run([output], f)[0] - ref.run([output], f)[0]) ** 2) for f in feeds]
    return float(np.mean(errors))


def _weighted_ops(g: graph_ir.Graph) -> list[graph_ir.Op]:
    return [op for op in g.topological_order() if op.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


def _assert_never_worse(
    g_fp: graph_ir.Graph, g: graph_ir.Graph, bits: int, symmetry: str, feeds: list[dict] = FEEDS
) -> list[float]:
    """Per layer: output MSE with SeqMSE weights <= with min-max weights, on the inputs of ``symmetry``.

    symfp: the FP32 model upstream. symqt: upstream layers carry their SeqMSE weights (the
    quantized model the search saw). Returns the per-layer gains (min-max MSE / SeqMSE MSE).
    """
    gains = []
    upstream: dict[str, np.ndarray] = {}
    for op in _weighted_ops(g):
        name = op.inputs[1]
        t = g.tensors[name]
        assert t.meta["encoding_source"] == "seq-mse", op.name
        w = g_fp.tensors[name].data
        searched = _fake_quant(w, np.asarray(t.encoding.scale), t.encoding.axis, bits)
        base = onnx.ModelProto()
        base.CopyFrom(g_fp.to_onnx())
        for init in base.graph.initializer:
            if init.name in upstream:
                init.CopyFrom(numpy_helper.from_array(upstream[init.name], init.name))
        mse_seq = _layer_mse(base, {name: searched}, op.outputs[0], feeds)
        mse_minmax = _layer_mse(base, {name: _minmax_weight(w, t.encoding.axis, bits)}, op.outputs[0], feeds)
        assert mse_seq <= mse_minmax * (1 + 1e-4) + 1e-12, (op.name, mse_seq, mse_minmax)
        gains.append(mse_minmax / max(mse_seq, 1e-30))
        if symmetry == "symqt":
            upstream[name] = searched
    return gains


@pytest.mark.parametrize("symmetry", ["symqt", "symfp"])
@pytest.mark.parametrize("model_name", ["digits_cnn", "digits_cnn_residual"])
def test_layer_output_mse_never_worse_than_minmax_4bit(model_name: str, symmetry: str) -> None:
    g_fp = _folded_digits(model_name)
    g = g_fp.copy()
    ctx = _encode(g, 4, inp_symmetry=symmetry)
    gains = _assert_never_worse(g_fp, g, 4, symmetry)
    assert max(gains) > 1.2, gains  # and it does find better ranges at 4 bits
    assert set(ctx.artifacts[SeqMseResults]) == {op.name for op in _weighted_ops(g)}


def _generated_model() -> onnx.ModelProto:
    """ConvTranspose (grouped, strided) -> Relu -> Conv -> Flatten -> MatMul -> Gemm (transB=0)."""
    rng = np.random.default_rng(1)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_t(3, shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", "wt", "bt"],
            ["t"],
            name="deconv",
            group=2,
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
        ),
        helper.make_node("Relu", ["t"], ["tr"], name="relu"),
        helper.make_node("Conv", ["tr", "wc"], ["c"], name="conv", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
        helper.make_node("Gemm", ["m", "wg", "bg"], ["y"], name="gemm"),
    ]
    inits = [
        init("wt", 4, 3, 3, 3),
        init("bt", 6),
        init("wc", 5, 6, 3, 3),
        init("wm", 5 * 3 * 3, 12),
        init("wg", 12, 7),
        init("bg", 7),
    ]
    graph = helper.make_graph(
        nodes,
        "gen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_conv_transpose_matmul_gemm_never_worse_than_minmax() -> None:
    data = np.random.default_rng(2).standard_normal((64, 4, 4, 4)).astype(np.float32)
    feeds = [{"x": data[i * BATCH : (i + 1) * BATCH]} for i in range(NUM_BATCHES)]
    g_fp = graph_ir.load(_generated_model())
    g = g_fp.copy()
    ctx = _encode(g, 4, calibration=feeds)
    assert set(ctx.artifacts[SeqMseResults]) == {"deconv", "conv", "matmul", "gemm"}
    assert g.tensors["wt"].encoding.axis == 1 and g.tensors["wt"].encoding.num_channels == 3
    assert g.tensors["wg"].encoding.axis == 1 and g.tensors["wm"].encoding.axis == 1
    gains = _assert_never_worse(g_fp, g, 4, "symqt", feeds)
    assert max(gains) > 1.2, gains


def test_searched_ranges_are_fractions_of_minmax() -> None:
    g = _folded_digits()
    ctx = _encode(g, 4, num_candidates=8)
    g_minmax = _folded_digits()
    REGISTRY.create_pass("encode-weights", weight_bw=4, per_channel=True)(g_minmax)
    for op in _weighted_ops(g):
        t = g.tensors[op.inputs[1]]
        res = ctx.artifacts[SeqMseResults][op.name]
        base = np.asarray(g_minmax.tensors[op.inputs[1]].encoding.scale)
        np.testing.assert_allclose(np.asarray(t.encoding.scale) / base, res.fractions, rtol=1e-9)
        assert set(res.fractions) <= {k / 8 for k in range(1, 9)}
        assert t.encoding.symmetric and t.encoding.bitwidth == 4 and t.encoding.axis == 0  # Conv, Gemm transB
        assert res.mse <= res.minmax_mse * (1 + 1e-9)


@pytest.mark.parametrize(
    ("symmetry", "loss"), list(itertools.product(["asym", "symfp", "symqt"], ["mse", "l1", "sqnr"]))
)
def test_each_symmetry_and_loss_runs(symmetry: str, loss: str) -> None:
    g = _folded_digits()
    ctx = _encode(g, 4, inp_symmetry=symmetry, loss_fn=loss, num_candidates=10, num_batches=2)
    results = ctx.artifacts[SeqMseResults]
    assert len(results) == 5
    for res in results.values():
        assert res.loss <= res.minmax_loss + 1e-9 * abs(res.minmax_loss)  # min-max is a candidate
        assert all(0 < f <= 1 for f in res.fractions)
    if loss == "mse" and symmetry != "asym":
        assert all(r.mse <= r.minmax_mse * (1 + 1e-9) for r in results.values())


def test_per_tensor_search() -> None:
    g = _folded_digits()
    ctx = _encode(g, 4, per_channel=False, num_candidates=10)
    for op in _weighted_ops(g):
        enc = g.tensors[op.inputs[1]].encoding
        assert enc.axis is None and enc.num_channels == 1
        found = ctx.artifacts[SeqMseResults][op.name]
        assert found.mse <= found.minmax_mse * (1 + 1e-9)


def test_excluded_ops_keep_minmax_encodings() -> None:
    result = quantize_model(
        MODELS / "digits_cnn.onnx",
        FEEDS,
        QuantConfig(weight_bw=4, per_channel=True),
        seq_mse=True,
        seq_mse_options={"exclude": ["fc", "features.3.conv"]},
        progress=False,
        quantize_outputs=True,
    )
    plain = quantize_model(
        MODELS / "digits_cnn.onnx",
        FEEDS,
        QuantConfig(weight_bw=4, per_channel=True),
        progress=False,
        quantize_outputs=True,
    )
    weights = {op.name: op.inputs[1] for op in _weighted_ops(_folded_digits())}
    for op_name in ("fc", "features.3.conv"):
        assert result.encodings.params[weights[op_name]] == plain.encodings.params[weights[op_name]]
    searched = weights["features.1.conv"]
    assert result.encodings.params[searched] != plain.encodings.params[searched]
    missed = [r for r in result.report.remarks if r.pass_name == "seq-mse" and r.kind == "missed"]
    assert {r.nodes for r in missed} == {("fc",), ("features.3.conv",)}
    assert all("exclude" in r.reason for r in missed)


def test_pipeline_option_text_and_missing_data() -> None:
    g = graph_ir.load(MODELS / "digits_cnn.onnx")
    from qpasses.core.pipeline import build_passes, parse_pipeline

    passes = build_passes(
        parse_pipeline(
            "fold-batchnorm,seq-mse{num_candidates=5,weight_bw=4,progress=false,exclude=fc;features.0.conv}"
        ),
        REGISTRY,
    )
    ctx = PassContext(calibration_data=str(MODELS / "digits_calib.npz"))
    PassManager(passes).run(g, ctx)
    assert set(ctx.artifacts[SeqMseResults]) == {"features.1.conv", "features.3.conv", "features.4.conv"}
    with pytest.raises(CalibrationDataError, match="no calibration data"):
        REGISTRY.create_pass("seq-mse", progress=False)(_folded_digits())
    with pytest.raises(QPassesError, match="SeqMSE needs calibration data"):
        quantize_model(MODELS / "digits_cnn.onnx", None, seq_mse=True)
    with pytest.raises(PassError, match="inp_symmetry"):
        REGISTRY.create_pass("seq-mse", inp_symmetry="sym")(_folded_digits(), PassContext(calibration_data=FEEDS))


def test_unfolded_batchnorm_layers_are_left_to_minmax() -> None:
    g = graph_ir.load(MODELS / "digits_cnn.onnx")
    p = REGISTRY.create_pass("seq-mse", weight_bw=4, progress=False)
    result = p(g, PassContext(calibration_data=FEEDS))
    missed = {r.nodes[0]: r.reason for r in result.remarks if r.kind == "missed"}
    assert set(missed) == {"features.0.conv", "features.1.conv", "features.3.conv", "features.4.conv"}
    assert all("fold-batchnorm" in reason for reason in missed.values())
    assert g.tensors["fc.weight"].meta["encoding_source"] == "seq-mse"


def test_cli_quantize_with_seq_mse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    rc = main(
        [
            "quantize",
            str(MODELS / "digits_cnn.onnx"),
            "--weight-bw",
            "4",
            "--per-channel",
            "--seq-mse",
            "--quantize-outputs",
            "--seq-mse-candidates",
            "10",
            "-q",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "pass seq-mse: modified" in text and "searched 5 layers (10 candidates, asym, mse)" in text
    model = onnx.load(out / "model.qdq.onnx")
    test = np.load(MODELS / "digits_test.npz")
    logits = _session(model).run(None, {"input": test["input"]})[0]
    assert np.mean(logits.argmax(1) == test["labels"]) > 0.85
    assert main(["quantize", str(MODELS / "digits_cnn.onnx"), "--seq-mse-loss", "l1", "-o", str(out)]) == 2


def _branches_model() -> onnx.ModelProto:
    """x -> convA, x -> convB (independent), Concat -> convC: A and B can share one input capture."""
    rng = np.random.default_rng(3)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_t(3, shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="convA", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="convB", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["a", "b"], ["ab"], name="concat", axis=1),
        helper.make_node("Relu", ["ab"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="convC", kernel_shape=[3, 3]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])
    graph = helper.make_graph(
        nodes,
        "branches",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [init("wa", 4, 3, 3, 3), init("wb", 4, 3, 1, 1), init("wc", 5, 8, 3, 3)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("symmetry", "captures"), [("symqt", 2), ("symfp", 0), ("asym", 2)])
def test_independent_layers_share_one_capture(monkeypatch: pytest.MonkeyPatch, symmetry: str, captures: int) -> None:
    """One capture per run of layers on the model quantized so far; the FP32 inputs and the feeds: one read."""
    import qpasses.passes.quantize.seq_mse as seq_mse

    calls: list[list[str]] = []
    real = seq_mse.capture

    def counting(model: onnx.ModelProto, feeds: list[dict], names: list[str]) -> dict[str, list[np.ndarray]]:
        calls.append(list(names))
        return real(model, feeds, names)

    monkeypatch.setattr(seq_mse, "capture", counting)
    data = np.random.default_rng(4).standard_normal((32, 3, 6, 6)).astype(np.float32)
    feeds = [{"x": data[:16]}, {"x": data[16:]}]
    g_fp = graph_ir.load(_branches_model())
    g = g_fp.copy()
    ctx = _encode(g, 4, calibration=feeds, inp_symmetry=symmetry)
    assert len(calls) == captures, calls
    assert ctx.statistics.collections == 1  # FP32 inputs (symfp, asym) and the feeds
    assert set(ctx.artifacts[SeqMseResults]) == {"convA", "convB", "convC"}
    if symmetry != "asym":
        _assert_never_worse(g_fp, g, 4, symmetry, feeds)


def test_quantized_model_swaps_constant_node_weights() -> None:
    from qpasses.data.weight_swap import SwappedWeights

    model = onnx.ModelProto()
    model.CopyFrom(graph_ir.load(MODELS / "digits_cnn.onnx").to_onnx())
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.weight"))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "fc.weight"))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["fc.weight"], value=numpy_helper.from_array(w)))
    swap = SwappedWeights(model)
    swap.set("fc.weight", np.zeros_like(w))
    logits = _session(swap.model).run(None, {"input": CALIB[:4]})[0]
    fc_bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.bias"))
    np.testing.assert_allclose(logits, np.broadcast_to(fc_bias, logits.shape), rtol=1e-6)


def test_annotated_weight_precisions_are_respected() -> None:
    from qpasses.quant.precision_type import Precision

    g = _folded_digits()
    g.tensors[g.op("fc").inputs[1]].precision = Precision("int", 8)
    g.tensors[g.op("features.0.conv").inputs[1]].precision = Precision("float", 16)
    ctx = PassContext(calibration_data=FEEDS)
    REGISTRY.create_pass("seq-mse", weight_bw=4, progress=False)(g, ctx)
    results = ctx.artifacts[SeqMseResults]
    assert "features.0.conv" not in results
    assert results["fc"].encoding.bitwidth == 8 and results["features.1.conv"].encoding.bitwidth == 4
