"""fold-matmul-bias: MatMul + bias Add -> Gemm (reshaped for N-D input), FP32-exact.

Truth: the FP32 model in onnxruntime (before vs after the rewrite), and the quantized model's output
SQNR vs FP32 with the pass on and off.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core import verification
from qpasses.core.context import PassContext
from qpasses.core.pass_base import PassResult
from qpasses.data.evaluation import sqnr_db
from qpasses.passes.equalize.fold_matmul_bias import FoldMatMulBias
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share

K, N = 16, 24


def linear(x_shape: list, *, head: bool = False, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x @ w + b -> Relu -> @ w2 (or, with ``head``, x @ w + b is what the model returns)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) / 4).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    b[0] = 6.0  # a large bias channel: the MatMul output's grid and the sum's differ
    w2 = (rng.standard_normal((N, K)) / 5).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), helper.make_node("Add", ["mm", "b"], ["h"])]
    out = "h"
    if not head:
        nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
        out = "y"
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [*x_shape[:-1], N if head else K])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feed(shape: tuple[int, ...], seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    graph = graph_ir.from_onnx(model)
    result = FoldMatMulBias()(graph, PassContext())
    return graph.to_onnx(), result


@pytest.mark.parametrize(
    ("x_shape", "feed_shape", "opset"),
    [
        (["N", K], (5, K), 17),  # 2-D: a Gemm directly
        ([2, 7, K], (2, 7, K), 17),  # N-D, static: reshaped back to a constant shape
        (["B", "T", K], (3, 5, K), 17),  # N-D, dynamic: reshaped back to Shape(x)[:-1] + [N]
        (["B", "T", K], (3, 5, K), 11),  # an opset-11 model (Slice bounds as inputs)
    ],
)
def test_rewrite_is_fp32_exact(x_shape: list, feed_shape: tuple[int, ...], opset: int) -> None:
    model = linear(x_shape, opset=opset)
    folded, result = _fold(model)
    onnx.checker.check_model(folded)
    assert [n.op_type for n in folded.graph.node].count("Gemm") == 1
    assert "MatMul" in [n.op_type for n in folded.graph.node]  # the second MatMul has no bias
    feed = _feed(feed_shape)
    want = verification.exact_session(model).run(None, feed)[0]
    got = verification.exact_session(folded).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert result.modified and any("folded the bias Add of 1 MatMuls" in r.message for r in result.remarks)


def test_a_returned_layer_and_an_unknown_rank_are_left_alone() -> None:
    folded, _ = _fold(linear(["N", "T", K], head=True))
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]  # keep-output-heads-float decides heads
    unknown = linear(["N", "T", K])
    unknown.graph.input[0].type.tensor_type.ClearField("shape")
    folded, _ = _fold(unknown)
    assert "Gemm" not in [n.op_type for n in folded.graph.node]


def test_quantized_layer_rounds_once_and_stays_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = linear(["B", "T", K])
    calib = [_feed((4, 6, K), seed=s) for s in range(8)]
    test = [_feed((4, 6, K), seed=100 + s) for s in range(4)]

    def sqnr(qdq: onnx.ModelProto) -> float:
        ref = np.concatenate([verification.exact_session(model).run(None, f)[0].ravel() for f in test])
        got = np.concatenate([verification.exact_session(qdq).run(None, f)[0].ravel() for f in test])
        return sqnr_db(ref, got)

    def quantize() -> onnx.ModelProto:
        cfg = QuantConfig(per_channel=True)
        return quantize_model(model, calib, cfg, progress=False, auto_fallback=False, bias_correction=False).model

    on = quantize()
    assert "mm" not in {n.input[0] for n in on.graph.node if n.op_type == "QuantizeLinear"}  # no 8-bit MatMul output
    assert integer_mac_share(on, test[0]).share == 1.0  # QGemm + QLinearMatMul
    monkeypatch.setattr(FoldMatMulBias, "run", lambda self, graph, ctx: self.result(False))
    off = quantize()
    assert "mm" in {n.input[0] for n in off.graph.node if n.op_type == "QuantizeLinear"}
    good, bad = sqnr(on), sqnr(off)
    assert good - bad > 1.0, (good, bad)


def test_cli_no_fold_matmul_bias_keeps_the_exporters_layers(tmp_path, capsys) -> None:  # noqa: ANN001
    from qpasses.cli.app import main

    path = tmp_path / "linear.onnx"
    onnx.save(linear(["B", "T", K]), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([_feed((2, 6, K), seed=s)["x"] for s in range(4)]))
    kinds = {}
    for flags, out in (([], "fold"), (["--no-fold-matmul-bias"], "keep")):
        assert main(["quantize", str(path), "--calib", str(calib), "-q", "-o", str(tmp_path / out), *flags]) == 0
        kinds[out] = [n.op_type for n in onnx.load(tmp_path / out / "model.qdq.onnx").graph.node]
        capsys.readouterr()
        assert (
            main(["quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "p"), "--print-pipeline", *flags])
            == 0
        )
        assert ("fold-matmul-bias" in capsys.readouterr().out) == (out == "fold")
    assert "Gemm" in kinds["fold"] and "Gemm" not in kinds["keep"] and kinds["keep"].count("MatMul") == 2
