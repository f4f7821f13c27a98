"""keep-softmax-inputs-float: the attention logits a Softmax reads stay float, its probabilities quantized.

Truth: the FP32 model in onnxruntime (output SQNR with and without the pass), the lowered graph (which
tensors have quantizers, which MACs still run as integer kernels) and the encodings per target.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_checks import output_sqnr, quantized_tensors

from qpasses.passes.fallback.softmax_inputs import KeepSoftmaxInputsFloat
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share

PASS = KeepSoftmaxInputsFloat.name
TOKENS, DIM = 16, 16
LOGITS = ("scores", "scaled", "biased")  # the score MatMul's output, its 1/sqrt(d) scale, its bias Add


def attention(
    seed: int = 0, *, decomposed: bool = False, returned: bool = False, prescaled: bool = False
) -> onnx.ModelProto:
    """One attention head: q, k, v = x Wq, x Wk, x Wv; p = Softmax(q k^T / sqrt(d) + bias); y = (p v) Wo.

    Wq, Wk are sharp (logits span about 70 on the test data: an 8-bit step of 0.27).
    ``decomposed``: Softmax as ReduceMax/Sub/Exp/ReduceSum/Div. ``returned``: the model returns ``p`` too.
    ``prescaled``: q is scaled before the score MatMul (``q_s``, as torch's exporter writes it) instead of
    the scores after it (``scaled`` is then a copy)."""
    rng = np.random.default_rng(seed)

    def weight(name: str, gain: float = 1.0) -> onnx.TensorProto:
        w = gain * rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
        return numpy_helper.from_array(w.astype(np.float32), name)

    bias = numpy_helper.from_array((rng.standard_normal((TOKENS, TOKENS))).astype(np.float32), "pos_bias")
    scale = numpy_helper.from_array(np.array(1 / np.sqrt(DIM), np.float32), "inv_sqrt_d")
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="mm_k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="mm_v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        *(
            [
                helper.make_node("Mul", ["q", "inv_sqrt_d"], ["q_s"], name="prescale"),
                helper.make_node("MatMul", ["q_s", "kt"], ["scores"], name="mm_scores"),
                helper.make_node("Identity", ["scores"], ["scaled"], name="scale"),
            ]
            if prescaled
            else [
                helper.make_node("MatMul", ["q", "kt"], ["scores"], name="mm_scores"),
                helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale"),
            ]
        ),
        helper.make_node("Add", ["scaled", "pos_bias"], ["biased"], name="bias"),
    ]
    inits = [weight("wq", 2.5), weight("wk", 2.5), weight("wv"), weight("wo"), bias, scale]
    if decomposed:
        axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
        inits.append(axes)
        nodes += [
            helper.make_node("ReduceMax", ["biased"], ["row_max"], name="row_max", axes=[-1], keepdims=1),
            helper.make_node("Sub", ["biased", "row_max"], ["shifted"], name="shift"),
            helper.make_node("Exp", ["shifted"], ["e"], name="exp"),
            helper.make_node("ReduceSum", ["e", "axes"], ["row_sum"], name="row_sum", keepdims=1),
            helper.make_node("Div", ["e", "row_sum"], ["p"], name="normalize"),
        ]
    else:
        nodes.append(helper.make_node("Softmax", ["biased"], ["p"], name="softmax", axis=-1))
    nodes += [
        helper.make_node("MatMul", ["p", "v"], ["o"], name="mm_pv"),
        helper.make_node("MatMul", ["o", "wo"], ["y"], name="mm_o"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, DIM])]
    if returned:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, TOKENS, TOKENS]))
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, DIM])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def token_feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, TOKENS, DIM)).astype(np.float32)} for _ in range(n)]


def _quantize(model: onnx.ModelProto, **kw: object):
    return quantize_model(model, token_feeds(16), QuantConfig(per_channel=True), progress=False, **kw)


def _remarks(result, kind: str, pass_name: str = PASS) -> list:  # noqa: ANN001
    return [r for r in result.report.remarks if r.pass_name == pass_name and r.kind == kind]


def _logit_range(model: onnx.ModelProto) -> float:
    from qpasses.core import verification

    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.append(helper.make_tensor_value_info("biased", TensorProto.FLOAT, None))
    s = verification.exact_session(extended)
    values = np.concatenate([s.run(["biased"], f)[0].ravel() for f in token_feeds(16)])
    return float(values.max() - values.min())


@pytest.mark.parametrize("decomposed", [False, True], ids=["Softmax", "decomposed"])
def test_logits_stay_float_probabilities_quantized(decomposed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = attention(decomposed=decomposed)
    assert _logit_range(model) > 25.0  # an 8-bit step above 0.1: each probability off by up to 5%
    result = _quantize(model, auto_fallback=False)
    quantized = quantized_tensors(result.model)
    assert not set(LOGITS) & quantized
    assert {"q", "kt", "p", "v"} <= quantized  # the score MatMul still reads 8-bit operands
    assert integer_mac_share(result.model, token_feeds(1)[0]).share == 1.0
    (remark,) = _remarks(result, "applied")
    # the logits, and the probabilities the float Softmax writes (a decomposed one's are its block's)
    assert f"kept the logits of 1 Softmax op in float32 ({3 if decomposed else 4} tensors)" in remark.message
    assert remark.nodes == ("biased",)

    monkeypatch.setattr(KeepSoftmaxInputsFloat, "run", lambda self, graph, ctx: self.result(False))
    without = _quantize(model, auto_fallback=False)
    assert set(LOGITS) & quantized_tensors(without.model)
    feeds = token_feeds(16, seed=7)
    good, bad = output_sqnr(model, result.model, feeds), output_sqnr(model, without.model, feeds)
    assert good - bad > 1.5, (good, bad)  # measured: 27.2 vs 24.3 dB


def test_quantized_only_targets() -> None:
    htp = _quantize(attention(), auto_fallback=False, target="htp")
    acts = htp.encodings.activations
    assert all(acts[n].bitwidth == 16 for n in (*LOGITS, "p"))  # the Softmax runs in int16
    assert acts["q"].bitwidth == acts["kt"].bitwidth == 8  # the score MatMul reads 8-bit operands
    assert any("int16" in r.message for r in _remarks(htp, "applied"))
    # hta runs nothing above 8 bits: the logits stay on its grid, and annotate-precision says why.
    hta = _quantize(attention(), auto_fallback=False, target="hta")
    assert all(hta.encodings.activations[n].bitwidth == 8 for n in LOGITS)
    assert not _remarks(hta, "applied")
    assert any("Softmax's logits" in r.message for r in _remarks(hta, "missed", "annotate-precision"))


def test_returned_probabilities_and_constant_weight_logits_are_left_alone() -> None:
    # What the model returns is keep-output-heads-float's to decide.
    returned = _quantize(attention(returned=True), auto_fallback=False)
    assert not _remarks(returned, "applied")
    assert "scores" in quantized_tensors(returned.model)
    # Logits a layer with constant weights writes stay quantized (a float output would run it in
    # float); the bias Add after it is kept.
    model = attention()
    for node in model.graph.node:
        if node.name == "mm_scores":
            node.input[1] = "wv"
        if node.name == "kt":  # k^T no longer read: drop it and the MatMul writing it
            node.op_type = "Identity"
            del node.attribute[:]
    result = _quantize(model, auto_fallback=False)
    quantized = quantized_tensors(result.model)
    assert "scores" in quantized and not {"scaled", "biased"} & quantized
    assert integer_mac_share(result.model, token_feeds(1)[0]).share == 1.0


def test_a_user_override_wins(tmp_path) -> None:  # noqa: ANN001
    import json

    overrides = tmp_path / "overrides.json"
    overrides.write_text(
        json.dumps({"activation_encodings": {"scores": [{"bitwidth": 8, "dtype": "int"}]}, "param_encodings": {}})
    )
    result = _quantize(attention(), auto_fallback=False, overrides=str(overrides))
    quantized = quantized_tensors(result.model)
    assert "scores" in quantized and not {"scaled", "biased"} & quantized


def test_mac_io_only_target_keeps_the_score_matmul_integer() -> None:
    # `ort` quantizes only what MACs read or write: the scaled q no MAC writes would stay float, and the
    # score MatMul with it (its output float too). It stays quantized for that MatMul, which onnxruntime
    # then runs on 8-bit inputs with a float output.
    model = attention(prescaled=True)
    result = _quantize(model, auto_fallback=False, target="ort")
    quantized = quantized_tensors(result.model)
    assert {"q_s", "kt"} <= quantized and "scores" not in quantized
    assert integer_mac_share(result.model, token_feeds(1)[0]).share == 1.0
