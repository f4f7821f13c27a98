"""AdaRound: learned rounding measured against min-max and SeqMSE, its invariants, and its outputs.

Why: AdaRound's promise is a better quantized model than rounding to nearest on the same grid
(min-max) and than searching the grid alone (SeqMSE), with every weight at most one grid step from
its FP32 value; and what it learns must reach the deployed model: the weights lie on their grid, so
the lowered model stores the learned integers, and encodings.json re-applied to the model with the
learned weights reproduces the quantized model exactly. Without torch the pass must say how to
install it instead of failing on an import.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError, QPassesError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.pass_manager import PassManager
from qpasses.core.verification import exact_session
from qpasses.data.evaluation import sqnr_db
from qpasses.learned.layers import starting_encoding
from qpasses.passes import default_registry
from qpasses.passes.quantize.adaround import AdaRoundResults
from qpasses.passes.quantize.seq_mse_search import SeqMseResults
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings import dequantize, fake_quantize, quantize
from qpasses.quantize import quantize_model

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason='needs torch: pip install "qpasses[learn]"'
)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CALIB_PATH = str(MODELS / "digits_calib.npz")
DIGITS = str(MODELS / "digits_cnn.onnx")
TEST_X = np.load(MODELS / "digits_test.npz")["input"][:120]
REGISTRY = default_registry()
WEIGHTS = (
    "features.0.conv.weight",
    "features.1.conv.weight",
    "features.3.conv.weight",
    "features.4.conv.weight",
    "fc.weight",
)
# Small but enough to learn (a few seconds): 200 steps over 8 batches of 16.
FAST = {"iterations": 200, "num_batches": 8, "lr": 5e-2, "progress": False, "threads": 1}


class Snapshot(Pass):
    """Keeps the FP32 model as it is at this point of a pipeline (here: with the learned weights)."""

    name = "snapshot"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.model = graph.to_onnx()
        return self.result(False)


def generated_layers_model() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """ConvTranspose (grouped, strided) -> Relu -> Conv -> Relu -> Flatten -> MatMul -> Gemm, with data."""
    rng = np.random.default_rng(1)

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_t(3, shape) * scale).astype(np.float32), name)

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
        helper.make_node("Relu", ["c"], ["cr"], name="relu2"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
        helper.make_node("Gemm", ["m", "wg", "bg"], ["y"], name="gemm"),
    ]
    inits = [
        init("wt", 4, 3, 3, 3),
        init("bt", 6),
        init("wc", 5, 6, 3, 3),
        init("wm", 5 * 3 * 3, 12, scale=0.1),
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = rng.standard_normal((64, 4, 4, 4)).astype(np.float32)
    return model, [{"x": data[i : i + 16]} for i in range(0, 64, 16)]


def _learned(pass_name: str, bits: int = 4, per_channel: bool = True, **options: object) -> list[Pass]:
    return [
        REGISTRY.create_pass("fold-batchnorm"),
        REGISTRY.create_pass(pass_name, weight_bw=bits, per_channel=per_channel, **{**FAST, **options}),
    ]


def _sqnr(model: onnx.ModelProto, reference: np.ndarray) -> float:
    return sqnr_db(reference, exact_session(model).run(None, {"input": TEST_X})[0])


# --- accuracy ----------------------------------------------------------------------------------------------


@needs_torch
def test_adaround_w4a8_beats_min_max_and_seq_mse() -> None:
    fp32 = exact_session(DIGITS).run(None, {"input": TEST_X})[0]
    config = QuantConfig(weight_bw=4, act_bw=8, per_channel=True)
    minmax = _sqnr(quantize_model(DIGITS, CALIB_PATH, config, progress=False).model, fp32)
    seq_mse = _sqnr(quantize_model(DIGITS, CALIB_PATH, config, seq_mse=True, progress=False).model, fp32)
    result = quantize_model(DIGITS, CALIB_PATH, config, pipeline=_learned("adaround"), progress=False)
    adaround = _sqnr(result.model, fp32)
    # Measured on these 120 test images: min-max 12.5, SeqMSE 16.2, AdaRound 23.7 dB.
    assert adaround > seq_mse + 4.0 and adaround > minmax + 6.0, (adaround, seq_mse, minmax)

    # Without learning (no steps), the same pipeline rounds to nearest and loses that margin: on the searched
    # grid it is about SeqMSE (the same search, on AdaRound's learning batches), on min-max's below it.
    def nearest(grid: str) -> float:
        flow = _learned("adaround", iterations=1, lr=1e-9, grid=grid)
        return _sqnr(quantize_model(DIGITS, CALIB_PATH, config, pipeline=flow, progress=False).model, fp32)

    searched, mode = nearest("seq-mse"), nearest("mode")
    assert mode < seq_mse - 2.0 and abs(searched - seq_mse) < 1.0 and adaround > searched + 4.0, (searched, mode)
    applied = [r for r in result.report.remarks if r.pass_name == "adaround" and r.kind == "applied"]
    assert [r.nodes for r in applied[:5]] == [
        ("features.0.conv",),
        ("features.1.conv",),
        ("features.3.conv",),
        ("features.4.conv",),
        ("fc",),
    ]
    assert all("output loss" in r.message and "rounded the other way" in r.message for r in applied[:5])


@needs_torch
def test_rounded_weights_stay_within_one_grid_step() -> None:
    fp = graph_ir.load(DIGITS)
    REGISTRY.create_pass("fold-batchnorm")(fp)
    g = fp.copy()
    ctx = PassContext(calibration_data=CALIB_PATH)
    PassManager(
        [
            REGISTRY.create_pass("adaround", weight_bw=4, **FAST),
            REGISTRY.create_pass("encode-weights", weight_bw=4, per_channel=True),
        ]
    ).run(g, ctx)
    flipped = 0
    for name in WEIGHTS:
        t, w = g.tensors[name], fp.tensors[name].data
        enc = t.encoding
        assert t.meta["encoding_source"] == "adaround" and enc.bitwidth == 4 and enc.axis == 0
        scale = np.asarray(enc.scale).reshape(-1, *[1] * (w.ndim - 1))
        offset = np.asarray(enc.offset).reshape(scale.shape)
        clamped = np.clip(w, offset * scale, (15 + offset) * scale)  # the searched grid may clip outliers
        assert np.all(np.abs(t.data.astype(np.float64) - clamped) <= scale * (1 + 1e-6)), name
        # on the grid: the lowering's round-to-nearest gives back exactly the learned integers
        np.testing.assert_array_equal(dequantize(quantize(t.data, enc), enc).astype(np.float32), t.data)
        # the grid is one of the search's candidates k/20 x min-max per channel (k = 20: min-max's)
        fractions = np.asarray(enc.scale) / np.asarray(starting_encoding(w, 4, True, "symmetric", 0).scale)
        np.testing.assert_allclose(fractions * 20, np.rint(fractions * 20), atol=1e-6)
        assert np.all(fractions <= 1 + 1e-9) and np.all(fractions > 0)
        flipped += int(np.sum(t.data != fake_quantize(w, enc)))
    assert flipped > 0
    results = ctx.artifacts[AdaRoundResults]
    assert all(r.loss < r.loss_nearest for r in results.values()), results


def _run_adaround(model: onnx.ModelProto, feeds: object, bits: int, **options: object) -> tuple[Graph, AdaRoundResults]:
    g = graph_ir.load(model)
    ctx = PassContext(calibration_data=feeds)
    per_channel = bool(options.pop("per_channel", True))
    PassManager(
        [
            REGISTRY.create_pass("adaround", weight_bw=bits, per_channel=per_channel, **{**FAST, **options}),
            REGISTRY.create_pass("encode-weights", weight_bw=bits, per_channel=per_channel),
        ]
    ).run(g, ctx)
    return g, ctx.artifacts[AdaRoundResults]


@needs_torch
def test_every_weighted_op_type_per_tensor_and_per_channel() -> None:
    model, feeds = generated_layers_model()
    for bits, per_channel, input_from in ((8, False, "quantized"), (4, True, "fp32")):
        # The learning itself, on min-max's grid (the searched grid leaves these small layers little to learn)
        g, results = _run_adaround(model, feeds, bits, per_channel=per_channel, input_from=input_from, grid="mode")
        assert set(results) == {"deconv", "conv", "matmul", "gemm"}
        assert all(r.loss <= r.loss_nearest for r in results.values())
        assert sum(r.loss < 0.95 * r.loss_nearest for r in results.values()) >= 3, results
        for name, axis in (("wt", 1), ("wc", 0), ("wm", 1), ("wg", 1)):
            enc = g.tensors[name].encoding
            assert g.tensors[name].meta["encoding_source"] == "adaround"
            assert enc.bitwidth == bits and enc.axis == (axis if per_channel else None)
        # The default searches each op type's grid: rounding to nearest on it is never worse on the held-out
        # batches than on min-max's (same FP32 inputs in both runs)
        if input_from == "fp32":
            _, searched = _run_adaround(model, feeds, bits, per_channel=per_channel, input_from=input_from)
            assert {r.grid for r in results.values()} == {"min-max"}
            assert {r.grid for r in searched.values()} <= {"seq-mse search", "min-max"}
            assert any(r.grid == "seq-mse search" for r in searched.values()), searched
            for op, r in searched.items():
                assert r.loss_nearest <= results[op].loss_nearest * (1 + 1e-6), (op, r, results[op])


@needs_torch
def test_seq_mse_grid_is_kept_and_bn_must_be_folded() -> None:
    """After seq-mse, AdaRound learns the rounding on SeqMSE's grid; a layer with a BN after it is skipped."""
    fp = graph_ir.load(DIGITS)
    REGISTRY.create_pass("fold-batchnorm")(fp)
    ctx = PassContext(calibration_data=CALIB_PATH)
    g = fp.copy()
    report = PassManager(
        [
            REGISTRY.create_pass("seq-mse", weight_bw=4, progress=False),
            REGISTRY.create_pass("adaround", weight_bw=4, **FAST),
        ]
    ).run(g, ctx)
    for name in WEIGHTS:
        assert g.tensors[name].encoding == ctx.artifacts[SeqMseResults][g.consumers(name)[0].name].encoding
    assert any("on the seq-mse grid" in r.message for r in report.remarks)
    unfolded = graph_ir.load(DIGITS)
    report = PassManager([REGISTRY.create_pass("adaround", weight_bw=4, **FAST)]).run(
        unfolded, PassContext(calibration_data=CALIB_PATH)
    )
    missed = {r.nodes[0]: r.reason for r in report.remarks if r.kind == "missed" and r.nodes}
    assert "run fold-batchnorm first" in missed["features.0.conv"]


# --- encodings.json round trip ---------------------------------------------------------------------------


@needs_torch
def test_learned_encodings_round_trip_through_overrides(tmp_path: Path) -> None:
    """encodings.json + the model with the learned weights (AIMET's adarounded model) reproduce the result."""
    config = QuantConfig(weight_bw=4, act_bw=8, per_channel=True)
    snapshot = Snapshot()
    first = quantize_model(
        DIGITS, CALIB_PATH, config, pipeline=[*_learned("adaround"), snapshot], progress=False, quantize_outputs=True
    )
    first.save(tmp_path / "out")
    again = quantize_model(
        snapshot.model, CALIB_PATH, config, overrides=tmp_path / "out" / "encodings.json", progress=False
    )
    for name in WEIGHTS:
        enc, back = first.encodings.params[name], again.encodings.params[name]
        np.testing.assert_allclose(back.scale, enc.scale, rtol=1e-6)
        assert back.offset == enc.offset and back.bitwidth == 4
    np.testing.assert_array_equal(
        exact_session(first.model).run(None, {"input": TEST_X})[0],
        exact_session(again.model).run(None, {"input": TEST_X})[0],
    )
    # and the lowered model stores the learned integers themselves
    lowered = first.model
    stored = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    learned = graph_ir.load(snapshot.model)
    for name in WEIGHTS:
        dq = next(n for n in lowered.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(name))
        ints, scale, zero = (stored[n].astype(np.float64) for n in dq.input)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * ints.ndim
        shape[axis] = -1
        expected = np.rint(learned.tensors[name].data / scale.reshape(shape))
        np.testing.assert_array_equal(ints - zero.reshape(shape), expected)


# --- without torch -----------------------------------------------------------------------------------------


def test_without_torch_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    g = graph_ir.load(DIGITS)
    REGISTRY.create_pass("fold-batchnorm")(g)
    with pytest.raises(PassError, match=r'needs PyTorch.*pip install "qpasses\[learn\]"'):
        REGISTRY.create_pass("adaround", progress=False)(g, PassContext(calibration_data=CALIB_PATH))
    with pytest.raises(QPassesError, match=r'pass \'adaround\'.*pip install "qpasses\[learn\]"'):
        quantize_model(DIGITS, CALIB_PATH, progress=False, pipeline=[REGISTRY.create_pass("adaround")])


def test_base_install_imports_without_torch() -> None:
    """Registry, CLI and both passes load with torch unimportable; running one gives the install hint."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import qpasses.cli.app\n"
        "from qpasses.passes import default_registry\n"
        "from qpasses.core.context import PassContext\n"
        "import graph_ir\n"
        "reg = default_registry()\n"
        "p = reg.create_pass('adaround', progress=False); reg.create_pass('adascale')\n"
        f"g = graph_ir.load({DIGITS!r})\n"
        "try:\n"
        f"    p(g, PassContext(calibration_data={CALIB_PATH!r}))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PassError" in out.stdout and 'pip install "qpasses[learn]"' in out.stdout, out.stdout


@needs_torch
def test_options_are_checked() -> None:
    g = graph_ir.load(DIGITS)
    for bad in (
        {"input_from": "float"},
        {"iterations": 0},
        {"lr": 0.0},
        {"warm_start": 1.0},
        {"mode": "max"},
        {"threads": -1},
        {"grid": "mse"},
        {"num_candidates": 0},
    ):
        with pytest.raises(PassError, match="pass 'adaround'"):
            REGISTRY.create_pass("adaround", **bad)(g, PassContext(calibration_data=CALIB_PATH))


@needs_torch
@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (6, 9), (11,)])
def test_reconstruction_loss_and_evaluate_match_numpy(shape: tuple[int, ...]) -> None:
    """The fused loss is AIMET's: squared error summed over channels (axis 1), averaged over the rest;
    ``evaluate`` reports it and the per-element MSE over every batch (numpy float64 as truth)."""
    import torch

    from qpasses.learned import training

    rng = np.random.default_rng(3)
    outs = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    targets = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    errs = [(o.astype(np.float64) - t) ** 2 for o, t in zip(outs, targets, strict=True)]
    per_batch = [e.sum(1).mean() if e.ndim >= 2 else e.mean() for e in errs]

    loss = training.reconstruction_loss(torch.from_numpy(outs[0]), torch.from_numpy(targets[0]))
    assert float(loss) == pytest.approx(per_batch[0], rel=1e-5)

    out = torch.from_numpy(outs[1]).requires_grad_()
    training.reconstruction_loss(out, torch.from_numpy(targets[1])).backward()
    rows = errs[1].size // shape[1] if len(shape) >= 2 else errs[1].size
    expected_grad = 2.0 * (outs[1].astype(np.float64) - targets[1]) / rows
    np.testing.assert_allclose(out.grad.numpy(), expected_grad, rtol=1e-5, atol=1e-7)

    summary = training.evaluate(lambda i: torch.from_numpy(outs[i]), [torch.from_numpy(t) for t in targets])
    assert summary.loss == pytest.approx(np.mean(per_batch), rel=1e-5)
    assert summary.mse == pytest.approx(sum(e.sum() for e in errs) / sum(e.size for e in errs), rel=1e-5)


def test_loss_is_taken_after_a_bias_add_and_relu() -> None:
    """keras2onnx/paddle2onnx write MatMul -> Add(constant bias) -> Relu: the loss is after the Relu (what
    the backend fuses), not on the pre-bias MatMul output; an Add of two activations is not a bias."""
    from qpasses.learned.layers import activation_after

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["biased"], name="bias"),
        helper.make_node("Relu", ["biased"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["mm2"], name="mm2"),
        helper.make_node("Add", ["mm2", "x2"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu2"),
    ]
    inits.append(numpy_helper.from_array(rng.normal(size=(3, 3)).astype(np.float32), "w2"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [2, 4]), ("x2", [2, 3]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    g = graph_ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    ops = {op.name: op for op in g.ops}
    assert [op.name for op in activation_after(g, ops["mm"])] == ["bias", "relu"]
    assert activation_after(g, ops["mm2"]) == []
    assert [op.name for op in activation_after(g, ops["bias"])] == ["relu"]


@needs_torch
@pytest.mark.parametrize(("grid", "named"), [("seq-mse", "seq-mse search"), ("mode", "min-max")])
def test_cli_adaround_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str], grid: str, named: str) -> None:
    from qpasses.cli.app import main

    out = tmp_path / "q"
    args = ["quantize", str(DIGITS), "--calib", str(CALIB_PATH), "--weight-bw", "4", "--per-channel", "-o", str(out)]
    rc = main([*args, "--adaround", "--adaround-iterations", "20", "--adaround-grid", grid, "--no-auto-fallback"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"4-bit Conv weight on the {named} grid" in text, text
    assert onnx.load(out / "model.qdq.onnx").graph.node
