"""fold-batchnorm and cle: FP32 equivalence (onnxruntime), equalized ranges, absorption, remarks, CLI.

Truth is independent of the passes: outputs come from onnxruntime on the original model,
per-channel ranges and absorbed biases are recomputed here from the ONNX weights with numpy.
"""

from __future__ import annotations

from pathlib import Path

import cle_models
import model_zoo
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graph_ir
from qpasses.cli import main
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager, PipelineReport
from qpasses.core.remarks import Remark
from qpasses.core.verification import exact_session
from qpasses.passes.equalize.cross_layer_equalization import CrossLayerEqualization
from qpasses.passes.equalize.fold_batchnorm import FoldBatchNorm, FoldedBatchNorms

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_test.npz"
RTOL = 1e-4


# --------------------------------------------------------------------------- helpers


def run_passes(
    model: onnx.ModelProto, *, fold_first: bool = True, verify: str = "checker", **cle_options: object
) -> tuple[onnx.ModelProto, PipelineReport, PassContext]:
    graph = graph_ir.load(model)
    ctx = PassContext()
    passes = ([FoldBatchNorm()] if fold_first else []) + [CrossLayerEqualization(**cle_options)]
    report = PassManager(passes, verify=verify).run(graph, ctx)  # type: ignore[arg-type]
    return graph.to_onnx(), report, ctx


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return exact_session(model).run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def rel_err(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(ort_run(a, feeds), ort_run(b, feeds), strict=True):
        assert x.shape == y.shape
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y)) / max(np.max(np.abs(x)), 1e-12)))
    return worst


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def attr(n: onnx.NodeProto, name: str, default: object) -> object:
    a = next((a for a in n.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def ranges(model: onnx.ModelProto, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-output-channel, per-input-channel) max|W| of a layer, from its ONNX weight."""
    n = node(model, name)
    w = np.abs(weights(model)[n.input[1]]).astype(np.float64)
    g = int(attr(n, "group", 1))  # type: ignore[arg-type]
    if n.op_type == "Conv":  # [out, in/g, k...]
        per_group = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        return w.reshape(w.shape[0], -1).max(1), per_group.max(axis=(1, 3)).reshape(-1)
    if n.op_type == "ConvTranspose":  # [in, out/g, k...]
        per_group = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        return per_group.max(axis=(1, 3)).reshape(-1), w.reshape(w.shape[0], -1).max(1)
    if n.op_type == "Gemm" and attr(n, "transB", 0):  # [out, in]
        return w.max(1), w.max(0)
    return w.max(0), w.max(1)  # Gemm / MatMul [in, out]


def remarks(report: PipelineReport, kind: str, pass_name: str = "cle") -> list[Remark]:
    return [r for r in report.remarks if r.kind == kind and r.pass_name == pass_name]


def layer_names(model: onnx.ModelProto, names: tuple[str, ...]) -> list[str]:
    types = {n.name: n.op_type for n in model.graph.node}
    return [n for n in names if types.get(n) in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


def digits() -> dict[str, np.ndarray]:
    return dict(np.load(DIGITS))


def shipped(name: str) -> onnx.ModelProto:
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{name} not shipped yet")
    return onnx.load(path)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_cnn_residual.onnx"])
def test_shipped_models_equivalent(name: str) -> None:
    model = shipped(name)
    # verify="numeric": the pass manager itself compares onnxruntime outputs after each pass.
    out, report, _ = run_passes(model, verify="numeric")
    onnx.checker.check_model(out, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert remarks(report, "applied")
    data = digits()
    assert rel_err(model, out, feeds_for(model, batch=8)) < RTOL
    assert rel_err(model, out, {"input": data["input"]}) < RTOL
    before, after = ort_run(model, {"input": data["input"]})[0], ort_run(out, {"input": data["input"]})[0]
    assert np.array_equal(before.argmax(1), after.argmax(1))


@pytest.mark.parametrize("name", sorted(cle_models.EQUIVALENCE_MODELS))
def test_generated_models_equivalent(name: str) -> None:
    model = cle_models.EQUIVALENCE_MODELS[name]()
    out, _, _ = run_passes(model)
    onnx.checker.check_model(out, full_check=True)
    for seed in (0, 1):
        assert rel_err(model, out, feeds_for(model, seed)) < RTOL


ZOO = [
    "conv_bn_relu",
    "constant_node_weights",
    "conv_no_group_attr",
    "opset11_model",
    "dynamic_dims",
    "clip_relu6_attrs",
]


@pytest.mark.parametrize("name", ZOO)
def test_model_zoo_equivalent(name: str) -> None:
    model = model_zoo.ALL_MODELS[name]()
    out, _, _ = run_passes(model)
    onnx.checker.check_model(out, full_check=True)
    feeds = model_zoo.random_feeds(model)
    if name.startswith("clip_relu6"):  # Relu6 -> Relu is exact only below 6: keep activations small
        feeds = {k: v * 0.1 for k, v in feeds.items()}
    assert rel_err(model, out, feeds) < RTOL


# --------------------------------------------------------------------------- equalized ranges


@pytest.mark.parametrize(
    "make",
    [
        cle_models.pair_100x,
        cle_models.depthwise_chain,
        cle_models.grouped_chain,
        cle_models.long_chain,
        cle_models.convtranspose_chain,
        cle_models.gemm_mlp,
        cle_models.matmul_mlp,
        lambda: shipped("digits_cnn.onnx"),
    ],
)
def test_equalized_links_have_equal_channel_ranges(make: object) -> None:
    out, report, _ = run_passes(make())  # type: ignore[operator]
    links = [r for r in remarks(report, "applied") if r.message.startswith("equalized")]
    assert links
    for r in links:
        layers = layer_names(out, r.nodes)
        assert layers[0] == r.nodes[0] and layers[-1] == r.nodes[-1]
        ends = [ranges(out, layers[0])[0], ranges(out, layers[-1])[1]]
        if len(layers) == 3:  # triple around a depthwise conv: all three ranges meet
            ends.append(ranges(out, layers[1])[0])
        for other in ends[1:]:
            np.testing.assert_allclose(other, ends[0], rtol=1e-3, err_msg=str(r))


def test_channel_ranges_100x_apart_are_equalized() -> None:
    model = cle_models.pair_100x()
    r1, _ = ranges(model, "conv1")
    _, r2 = ranges(model, "output")
    assert r1.max() / r1.min() > 50 and r2.max() / r2.min() > 50
    out, report, _ = run_passes(model)
    r1, _ = ranges(out, "conv1")
    _, r2 = ranges(out, "output")
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    assert r1.max() / r1.min() < 3
    (applied,) = [r for r in remarks(report, "applied") if r.message.startswith("equalized")]
    assert applied.nodes == ("conv1", "relu1", "output")
    assert rel_err(model, out, feeds_for(model)) < RTOL


def test_iterating_balances_overlapping_pairs_better_than_one_sweep() -> None:
    """DFQ iterates to a fixed point; one sweep (AIMET) leaves the earlier pairs of a chain unbalanced."""

    def worst_mismatch(model: onnx.ModelProto) -> float:
        names = ["conv0", "conv1", "conv2", "conv3", "output"]
        return max(
            float(np.max(np.abs(np.log(ranges(model, a)[0] / ranges(model, b)[1]))))
            for a, b in zip(names, names[1:], strict=False)
        )

    model = cle_models.long_chain()
    one, _, _ = run_passes(model, iterations=1)
    full, report, _ = run_passes(model)
    assert worst_mismatch(full) < 1e-3 < worst_mismatch(one)
    assert any("converged" in r.message for r in remarks(report, "analysis"))


# --------------------------------------------------------------------------- batch-norm folding


def test_fold_variants_keep_structure_and_state() -> None:
    model = cle_models.matmul_mlp()
    graph = graph_ir.load(model)
    ctx = PassContext()
    report = PassManager([FoldBatchNorm()], verify="checker").run(graph, ctx)
    out = graph.to_onnx()
    types = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in types
    assert types.count("Gemm") == 1  # bias-less 2-D MatMul + BN became a Gemm
    assert types.count("Add") == 1  # MatMul + Add(bias) + BN folded into the Add's constant
    assert rel_err(model, out, feeds_for(model)) < RTOL
    w = weights(model)
    gamma, beta = ctx.artifacts[FoldedBatchNorms]["mm1"]
    np.testing.assert_allclose(gamma, w["bn1.scale"])
    np.testing.assert_allclose(beta, w["bn1.bias"])
    assert len(remarks(report, "applied", "fold-batchnorm")) == 2


def test_fold_copies_shared_weight_and_keeps_graph_output_name() -> None:
    model = cle_models.shared_weight_bn_output()
    out, _, _ = run_passes(model)
    assert [o.name for o in out.graph.output] == ["out_a", "out_b"]
    conv_a = next(n for n in out.graph.node if n.output[0] == "out_a")
    conv_b = node(out, "out_b")
    assert conv_b.input[1] == "shared.weight" and conv_a.input[1] != "shared.weight"
    np.testing.assert_array_equal(weights(out)["shared.weight"], weights(model)["shared.weight"])


def test_constant_node_weights_stay_in_constant_nodes() -> None:
    model = cle_models.depthwise_chain(constants=True)
    out, _, _ = run_passes(model)
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    for n in out.graph.node:
        if n.op_type == "Conv":
            assert producers.get(n.input[1]) == "Constant", n.name
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)


def test_unfoldable_batchnorms_stay_with_reasons() -> None:
    model = cle_models.unfoldable_bn()
    out, report, _ = run_passes(model)
    assert sum(n.op_type == "BatchNormalization" for n in out.graph.node) == 3
    kept = {r.message: r for r in report.remarks if r.message.startswith("kept")}
    assert len(kept) == 3 and len([r for r in report.remarks if r.message.startswith("kept")]) == 3  # once each
    assert "read 2 times" in kept["kept bn_shared_input"].reason
    assert "Add 'add'" in kept["kept bn_after_add"].reason
    assert "gamma_in is not a constant" in kept["kept output"].reason
    assert rel_err(model, out, feeds_for(model)) < RTOL


def test_matmul_bn_on_3d_input_is_not_folded() -> None:
    """BN normalizes axis 1; for a [N, T, K] @ [K, C] MatMul that is T, not the output channel."""
    b = cle_models.Builder(40)
    b.node("MatMul", ["input", b.weight("mm.weight", b.randn(16, 4))], "mm")
    b.bn("mm", "output", 4)
    model = b.model("matmul_3d", [("input", [2, 4, 16])], ["output"])
    out, report, _ = run_passes(model)
    (kept,) = [r for r in report.remarks if r.message == "kept output"]
    assert "input rank is 3" in kept.reason and kept.nodes == ("mm", "output")
    assert any(n.op_type == "BatchNormalization" for n in out.graph.node)


def test_cle_alone_folds_batchnorms_first() -> None:
    model = shipped("digits_cnn.onnx")
    out, report, ctx = run_passes(model, fold_first=False)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert len([r for r in remarks(report, "applied") if r.message.startswith("folded")]) == 4
    assert set(ctx.artifacts[FoldedBatchNorms]) >= {"features.0.conv", "features.4.conv"}
    assert rel_err(model, out, {"input": digits()["input"][:32]}) < RTOL


# --------------------------------------------------------------------------- high-bias absorption


def _folded_bias(model: onnx.ModelProto, conv: str, bn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(folded conv bias, gamma, beta) by hand from the original model's weights."""
    w = weights(model)
    gamma, beta, mean, var = (w[f"{bn}.{p}"].astype(np.float64) for p in ("scale", "bias", "mean", "var"))
    k = gamma / np.sqrt(var + 1e-5)
    return (w[f"{conv}.bias"] - mean) * k + beta, gamma, beta


@pytest.mark.parametrize("relu", [True, False])
def test_high_bias_absorption_matches_hand_computation(relu: bool) -> None:
    model = cle_models.hba_model(relu=relu)
    # no scaling: the absorbed amount is checked as is; DFQ's amount through the Relu, unverified
    out, report, ctx = run_passes(model, iterations=0, absorb_through_relu="always")
    b1, gamma, beta = _folded_bias(model, "conv1", "bn1")
    c = np.maximum(0, beta - 3 * np.abs(gamma)) if relu else beta
    assert np.all(c > 0)
    w = weights(model)
    w_out = weights(out)
    np.testing.assert_allclose(w_out[node(out, "conv1").input[2]], b1 - c, rtol=1e-5, atol=1e-5)
    expected_b2 = w["output.bias"] + np.einsum("oikl,i->o", w["output.weight"], c)
    np.testing.assert_allclose(w_out[node(out, "output").input[2]], expected_b2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ctx.artifacts[FoldedBatchNorms]["conv1"][1], beta - c, atol=1e-6)
    (absorbed,) = [r for r in remarks(report, "applied") if r.message.startswith("absorbed")]
    assert absorbed.nodes[0] == "conv1" and absorbed.nodes[-1] == "output"
    # Through a Relu this is exact only while pre-activations stay >= beta - 3|gamma| (true here).
    assert rel_err(model, out, feeds_for(model)) < RTOL
    # With scaling as well, and idempotent: a second cle finds nothing left to do.
    graph = graph_ir.load(model)
    ctx = PassContext()
    PassManager([FoldBatchNorm(), CrossLayerEqualization(absorb_through_relu="always")]).run(graph, ctx)
    again = PassManager([CrossLayerEqualization(absorb_through_relu="always")]).run(graph, ctx)
    assert not again.modified
    assert rel_err(model, graph.to_onnx(), feeds_for(model)) < RTOL


def test_absorption_through_relu_is_capped_at_the_calibration_minimum() -> None:
    """By default a high bias crosses a Relu only as far as the calibration data shows the pre-activation
    goes (exact on that data); without calibration data it does not cross, with a remark."""
    model = cle_models.hba_model(relu=True)
    b1, gamma, beta = _folded_bias(model, "conv1", "bn1")
    dfq = np.maximum(0, beta - 3 * np.abs(gamma))
    _, report, _ = run_passes(model, iterations=0)
    (skipped,) = [r for r in remarks(report, "missed") if "through Relu" in r.message]
    assert "no calibration data" in (skipped.reason or "")
    assert not [r for r in remarks(report, "applied") if r.message.startswith("absorbed")]
    calib = [feeds_for(model, seed=s) for s in range(4)]
    graph = graph_ir.load(model)
    PassManager([FoldBatchNorm(), CrossLayerEqualization(iterations=0)]).run(graph, PassContext(calibration_data=calib))
    out = graph.to_onnx()
    # The pre-activation minimum per channel, from the FP32 model with conv1's output as an extra output
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    bn_out = node(model, "bn1").output[0]
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(bn_out))
    lows = np.min([ort_run(probe, f)[-1].min(axis=(0, 2, 3)) for f in calib], axis=0)
    c = np.minimum(dfq, np.maximum(lows, 0))
    assert np.any(c < dfq) or np.all(c == dfq)
    np.testing.assert_allclose(weights(out)[node(out, "conv1").input[2]], b1 - c, rtol=1e-5, atol=1e-5)
    for feeds in calib:  # exact on the calibration data
        assert rel_err(model, out, feeds) < RTOL


def test_absorption_into_padded_conv_is_skipped_unless_asked() -> None:
    model = cle_models.hba_model(padded=True)
    out, report, _ = run_passes(model, absorb_through_relu="always")
    (skipped,) = [r for r in remarks(report, "missed") if "not absorbed" in r.message]
    assert "zero-pads" in skipped.reason and skipped.nodes[-1] == "output"
    assert rel_err(model, out, feeds_for(model)) < RTOL

    forced, report, _ = run_passes(model, absorb_into_padded=True, absorb_through_relu="always")
    assert [r for r in remarks(report, "applied") if r.message.startswith("absorbed")]
    feeds = feeds_for(model)
    ref, got = ort_run(model, feeds)[0], ort_run(forced, feeds)[0]
    scale = np.abs(ref).max()
    interior = np.abs(ref - got)[:, :, 1:-1, 1:-1].max() / scale
    border = np.abs(ref - got).max() / scale
    assert interior < RTOL < border  # exact inside, wrong where the padding replaced shifted values


# --------------------------------------------------------------------------- Relu6


def test_relu6_becomes_relu_and_is_exact_below_6() -> None:
    model = cle_models.relu6_small()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("conv0", onnx.TensorProto.FLOAT, None))
    feeds = feeds_for(model)
    assert ort_run(probe, feeds)[1].max() < 6  # the Clip never clips at 6 on these inputs
    out, report, _ = run_passes(model)
    assert [n.op_type for n in out.graph.node if n.op_type in ("Clip", "Relu")] == ["Relu"]
    (replaced,) = [r for r in remarks(report, "applied") if r.message.startswith("replaced Relu6")]
    assert replaced.nodes == ("relu6",)
    assert rel_err(model, out, feeds) < RTOL


def test_relu6_kept_when_disabled() -> None:
    model = cle_models.relu6_small()
    out, report, _ = run_passes(model, relu6_to_relu=False)
    assert any(n.op_type == "Clip" for n in out.graph.node)
    (missed,) = remarks(report, "missed")
    assert "relu6_to_relu is off" in missed.reason and missed.nodes == ("conv0", "relu6")
    assert rel_err(model, out, feeds_for(model)) == 0


@pytest.mark.parametrize("name", ["clip_relu6_inputs", "clip_relu6_attrs"])
def test_relu6_forms_are_recognised(name: str) -> None:
    """Clip(0, 6) with min/max as initializer inputs (opset 13) or attributes (opset 10)."""
    out, report, _ = run_passes(model_zoo.ALL_MODELS[name]())
    assert [r.nodes for r in remarks(report, "applied") if r.message.startswith("replaced Relu6")] == [("Clip_0",)]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv", "Clip"]  # the last Clip ends no chain


def test_digits_relu6_model() -> None:
    model = shipped("digits_cnn_relu6.onnx")
    data = digits()
    exact, report, _ = run_passes(model, relu6_to_relu=False)
    assert len([r for r in remarks(report, "missed") if "relu6_to_relu is off" in r.reason]) == 4
    assert rel_err(model, exact, {"input": data["input"]}) < RTOL

    relu, report, _ = run_passes(model)
    assert len([r for r in remarks(report, "applied") if r.message.startswith("replaced Relu6")]) == 4
    assert not any(n.op_type == "Clip" for n in relu.graph.node)
    # Activations do exceed 6 on real digits, so Relu6 -> Relu changes logits (documented);
    # accuracy stays where it was.
    acc = lambda m: float((ort_run(m, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())  # noqa: E731
    assert abs(acc(relu) - acc(model)) < 0.02


# --------------------------------------------------------------------------- remarks


def test_remarks_list_chains_and_near_misses() -> None:
    _, report, _ = run_passes(shipped("digits_cnn.onnx"))
    chains = [r.nodes for r in remarks(report, "applied") if r.message.startswith("equalized")]
    assert chains == [
        ("features.0.conv", "features.0.act", "features.1.conv"),
        ("features.1.conv", "features.1.act", "features.2", "features.3.conv", "features.3.act", "features.4.conv"),
        ("features.4.conv", "features.4.act", "gap", "flatten", "fc"),
    ]
    triple = next(r for r in remarks(report, "applied") if "DepthwiseConv" in r.message)
    assert triple.message == "equalized Conv->Relu->MaxPool->DepthwiseConv->Relu->Conv"

    _, report, _ = run_passes(shipped("digits_cnn_residual.onnx"))
    (fork,) = remarks(report, "missed")
    assert fork.nodes[0] == "features.1.conv" and "read 2 times" in fork.reason

    _, report, _ = run_passes(cle_models.branching())
    (fork,) = remarks(report, "missed")
    assert fork.nodes == ("conv0", "relu0") and "(left, right)" in fork.reason

    _, report, _ = run_passes(cle_models.unsupported_activations())
    reasons = {r.nodes: r.reason for r in remarks(report, "missed")}
    assert "Sigmoid 'sigmoid'" in reasons[("conv0", "sigmoid")]
    assert "LeakyRelu 'leaky'" in reasons[("conv1", "leaky")]
    assert "Clip(0, 3)" in reasons[("conv2", "clip3")]
    assert not remarks(report, "applied")


def test_fixed_point_pipeline_settles() -> None:
    graph = graph_ir.load(shipped("digits_cnn.onnx"))
    report = PassManager([FoldBatchNorm(), CrossLayerEqualization()], fixed_point=True).run(graph, PassContext())
    assert [r.modified for r in report.records] == [True, True, False, False]


# --------------------------------------------------------------------------- CLI


def test_cli_fold_and_cle(tmp_path: Path) -> None:
    out_path = tmp_path / "digits_cle.onnx"
    assert main(["run", str(MODELS / "digits_cnn.onnx"), "--pipeline", "fold-batchnorm,cle", "-o", str(out_path)]) == 0
    out = onnx.load(out_path)
    onnx.checker.check_model(out, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    model = onnx.load(MODELS / "digits_cnn.onnx")
    assert rel_err(model, out, {"input": digits()["input"]}) < RTOL
    assert (
        main(
            [
                "run",
                str(MODELS / "digits_cnn.onnx"),
                "--pipeline",
                "cle{iterations=2,relu6_to_relu=false}",
                "-o",
                str(tmp_path / "b.onnx"),
            ]
        )
        == 0
    )
