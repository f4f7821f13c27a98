"""cle on Gemm layers with alpha/beta/transB: the pass must keep the FP32 function.

Truth: onnxruntime outputs (``exact_session``) of the model before the pass, on the same inputs.
Regression: high-bias absorption moved ``c`` into the next Gemm's bias as ``W2 . c`` while the
Gemm computes ``alpha * W2 . x``, so Gemm(alpha=0.5) after a high-bias BN changed outputs by 75%.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager, PipelineReport
from qpasses.core.verification import exact_session
from qpasses.passes.equalize.cross_layer_equalization import CrossLayerEqualization
from qpasses.passes.equalize.fold_batchnorm import FoldBatchNorm

RTOL = 1e-4


def _gemm(
    rng: np.random.Generator,
    x: str,
    name: str,
    cin: int,
    cout: int,
    *,
    alpha: float,
    beta: float,
    trans_b: bool,
    spread: bool,
    inits: list[onnx.TensorProto],
    trans_a: bool = False,
) -> onnx.NodeProto:
    w = rng.standard_normal((cin, cout)) / np.sqrt(cin)
    if spread:  # output-channel ranges spanning 30x: something for cle to equalize
        w = w * np.logspace(0, 1.5, cout)[None, :]
    w = w.T if trans_b else w
    inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
    inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.3).astype(np.float32), f"{name}.bias"))
    attrs: dict[str, object] = {}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    if trans_b:
        attrs["transB"] = 1
    if trans_a:
        attrs["transA"] = 1
    return helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [name], name=name, **attrs)


def gemm_bn_gemm(
    seed: int,
    *,
    alphas: tuple[float, float],
    betas: tuple[float, float],
    trans_b: tuple[bool, bool],
    glue: str,
    bn_beta: float = 2.0,
    trans_a: bool = False,
) -> onnx.ModelProto:
    """x -> Gemm1 (transA: x is [features, batch]) -> BN(beta ~ bn_beta, huge variance) -> [glue] -> Gemm2 -> y.

    With a variance of 1e4 the BN's normalized output stays within about +-1 for standard-normal
    inputs, so absorption through a Relu is exact here too (pre-activations stay above beta - 3|gamma|).
    """
    rng = np.random.default_rng(seed)
    cin, hidden, cout = 5, 8, 4
    inits: list[onnx.TensorProto] = []
    nodes = [
        _gemm(
            rng,
            "x",
            "gemm1",
            cin,
            hidden,
            alpha=alphas[0],
            beta=betas[0],
            trans_b=trans_b[0],
            spread=True,
            inits=inits,
            trans_a=trans_a,
        )
    ]
    bn = {
        "scale": (0.2 + 0.3 * rng.random(hidden)) * np.where(np.arange(hidden) % 3 == 0, -1, 1),
        "B": bn_beta * (1.0 + rng.random(hidden)),
        "mean": rng.standard_normal(hidden) * 0.2,
        "var": np.full(hidden, 1e4),
    }
    for key, value in bn.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn.{key}"))
    nodes.append(
        helper.make_node("BatchNormalization", ["gemm1", *(f"bn.{k}" for k in bn)], ["bn"], name="bn", epsilon=1e-5)
    )
    x = "bn"
    if glue != "none":
        nodes.append(helper.make_node(glue, [x], ["glue"], name="glue"))
        x = "glue"
    nodes.append(
        _gemm(rng, x, "y", hidden, cout, alpha=alphas[1], beta=betas[1], trans_b=trans_b[1], spread=False, inits=inits)
    )
    x_shape = [cin, 3] if trans_a else [3, cin]
    graph = helper.make_graph(
        nodes,
        "gemm_bn_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, cout])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_cle(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PipelineReport]:
    graph = graph_ir.load(model)
    report = PassManager([FoldBatchNorm(), CrossLayerEqualization()], verify="none").run(graph, PassContext())
    return graph.to_onnx(), report


def rel_err(before: onnx.ModelProto, after: onnx.ModelProto, seed: int = 0) -> float:
    shape = [d.dim_value for d in before.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ref = exact_session(before).run(None, {"x": x})[0].astype(np.float64)
    got = exact_session(after).run(None, {"x": x})[0].astype(np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def test_reproducer_absorption_into_gemm_with_alpha() -> None:
    """Gemm -> BN(beta ~2) -> Gemm(alpha=0.5): was 75% off while reporting 'absorbed high bias'."""
    model = gemm_bn_gemm(0, alphas=(1.0, 0.5), betas=(1.0, 1.0), trans_b=(False, False), glue="none")
    after, report = run_cle(model)
    assert rel_err(model, after) < RTOL
    messages = [r.message for r in report.remarks if r.pass_name == "cle"]
    assert any("absorbed high bias" in m for m in messages), messages


@pytest.mark.parametrize("glue", ["none", "Relu", "Identity"])
@pytest.mark.parametrize("seed", range(6))
def test_random_alpha_beta_trans_b_keep_fp32_outputs(glue: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    alphas = tuple(float(a) for a in rng.choice([1.0, 0.5, 2.5, -0.7, 0.03], 2))
    betas = tuple(float(b) for b in rng.choice([1.0, 0.0, 0.25, -1.5, 3.0], 2))
    trans_b = tuple(bool(t) for t in rng.integers(0, 2, 2))
    trans_a = bool(seed % 2)  # the first Gemm's transA does not move its output channels
    model = gemm_bn_gemm(
        seed,
        alphas=alphas,
        betas=betas,
        trans_b=trans_b,
        glue=glue,  # type: ignore[arg-type]
        trans_a=trans_a,
    )
    after, report = run_cle(model)
    err = rel_err(model, after, seed)
    assert err < RTOL, (alphas, betas, trans_b, trans_a, err, report.format())
    # cle did something (equalized or absorbed), so the check above is not vacuous.
    assert any(r.kind == "applied" and r.pass_name == "cle" for r in report.remarks), report.format()


@pytest.mark.parametrize("alpha2,trans_b", list(itertools.product([0.5, -2.0, 4.0], [False, True])))
def test_equalization_without_bn_keeps_gemm_alpha_beta(alpha2: float, trans_b: bool) -> None:
    """Plain Gemm -> Relu -> Gemm (no BN, so no absorption): scaling alone must stay exact."""
    rng = np.random.default_rng(7)
    inits: list[onnx.TensorProto] = []
    nodes = [
        _gemm(rng, "x", "gemm1", 5, 8, alpha=-1.3, beta=0.5, trans_b=trans_b, spread=True, inits=inits),
        helper.make_node("Relu", ["gemm1"], ["relu"], name="relu"),
        _gemm(rng, "relu", "y", 8, 4, alpha=alpha2, beta=2.0, trans_b=not trans_b, spread=False, inits=inits),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_relu_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    after, report = run_cle(model)
    assert rel_err(model, after) < RTOL
    assert any(r.message.startswith("equalized") for r in report.remarks), report.format()
