"""``qpasses check MODEL --target NAME``: one line per op the target cannot run, exit 1 if any, 2 on user errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS
from mixed_precision_models import int32_model, write_json
from onnx import TensorProto, helper, numpy_helper

from qpasses.cli import main

TARGETS = ["htp", "dsp", "hta", "cpu", "gpu", "ort"]
MODEL_FILES = ["digits_cnn.onnx", "digits_cnn_relu6.onnx", "digits_cnn_residual.onnx"]
DEFAULT = str(MODELS / "digits_cnn.onnx")


def _check(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["check", *argv])
    captured = capsys.readouterr()
    return code, [line for line in (captured.out + captured.err).splitlines() if line]


def _overrides(tmp_path, activations: dict, params: dict | None = None) -> str:
    data = {"activation_encodings": activations, "param_encodings": params or {}}
    return str(write_json(tmp_path / "enc.json", data))


@pytest.mark.parametrize("name", MODEL_FILES)
@pytest.mark.parametrize("target", TARGETS)
def test_shipped_models_conform_to_every_target(capsys, target, name):
    code, lines = _check(capsys, str(MODELS / name), "--target", target)
    assert code == 0, lines
    assert lines == [f"every op conforms to target {target}"]


def test_unsupported_bitwidth_combination(capsys, tmp_path):
    enc = _overrides(tmp_path, {"logits": [{"bitwidth": 16, "dtype": "int"}]})
    code, lines = _check(capsys, DEFAULT, "--target", "dsp", "--overrides", enc)
    assert code == 1
    assert lines[0].startswith("fc (Gemm): unsupported bitwidth combination int16/int8/int32")
    assert lines[-1] == "1 ops cannot run on target dsp as annotated"
    assert _check(capsys, DEFAULT, "--target", "htp", "--overrides", enc)[0] == 0  # HTP has A16W8


def test_float_ops_on_quantized_only_backends(capsys, tmp_path):
    enc = _overrides(tmp_path, {"features.3.act_out": [{"bitwidth": 32, "dtype": "float"}]})
    code, lines = _check(capsys, DEFAULT, "--target", "dsp", "--overrides", enc)
    assert code == 1
    assert lines[:2] == [
        "features.3.conv (Conv): float32 op on quantized-only backend dsp",
        "features.3.act (Relu): float32 op on quantized-only backend dsp",
    ]
    code, lines = _check(capsys, DEFAULT, "--target", "htp", "--overrides", enc)
    assert code == 1 and "float32 is not supported: htp runs float ops in float16 only" in lines[0]
    fp16 = _overrides(tmp_path, {"features.3.act_out": [{"bitwidth": 16, "dtype": "float"}]})
    assert _check(capsys, DEFAULT, "--target", "htp", "--overrides", fp16)[0] == 0


def test_quantized_op_on_float_backend(capsys, tmp_path):
    enc = _overrides(tmp_path, {"logits": [{"bitwidth": 8, "min": -10.0, "max": 10.0}]})
    code, lines = _check(capsys, DEFAULT, "--target", "cpu", "--overrides", enc)
    assert code == 1
    assert lines[0] == ("fc (Gemm): quantized op (int8) on float-only backend cpu: quantized models are incompatible")


def test_missing_encodings_without_calibration(capsys):
    code, lines = _check(capsys, DEFAULT, "--target", "dsp", "--no-calib")
    assert code == 1
    assert lines[0].startswith("features.0.conv (Conv): missing encoding: features.0.conv_out has no override")
    assert sum("missing encoding" in line for line in lines) >= 8
    assert _check(capsys, DEFAULT, "--target", "ort", "--no-calib")[0] == 0  # ort runs the float fallback


def test_unsupported_op_and_int32(capsys, tmp_path):
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Erf", ["c"], ["y"], name="erf")],
        "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )
    path = tmp_path / "erf.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    )
    code, lines = _check(capsys, str(path), "--target", "hta")
    assert code == 1 and lines[0] == "erf (Erf): unsupported op: hta does not run Erf"
    model = tmp_path / "int32.onnx"
    model.write_bytes(int32_model().SerializeToString())
    enc = _overrides(tmp_path, {n: [{"bitwidth": 32, "dtype": "int"}] for n in "abc"})
    code, lines = _check(capsys, str(model), "--target", "hta", "--overrides", enc)
    assert code == 1 and lines[0].startswith("add (Add): INT32 Add is not supported by hta")
    assert _check(capsys, str(model), "--target", "ort", "--overrides", enc)[0] == 0


def test_user_errors_exit_2(capsys, tmp_path):
    assert _check(capsys, DEFAULT, "--target", "nope")[0] == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, lines = _check(capsys, DEFAULT, "--target", "htp", "--overrides", str(bad))
    assert code == 2 and "malformed JSON" in lines[0]
    assert _check(capsys, str(tmp_path / "missing.onnx"), "--target", "htp")[0] == 2
    target = tmp_path / "t.yaml"
    target.write_text("name: t\nneeds_quantized: maybe\n")
    code, lines = _check(capsys, DEFAULT, "--target", str(target))
    assert code == 2 and "field 'needs_quantized'" in lines[0]


@pytest.mark.parametrize("target", ["htp", "dsp", "hta"])
def test_check_annotates_as_quantize_does(capsys, tmp_path, target):
    """check runs the default pipeline's structural and annotate stages: a model-local function is inlined
    (its call used to be reported as an op the target does not run), and the findings equal the remarks
    of the check-target pass that ``quantize --target`` runs on the graph it lowers."""
    import onnx
    from model_zoo import local_function

    from qpasses.quantize import quantize_model
    from qpasses.target_check import check_model

    model = local_function()
    path = tmp_path / "local_function.onnx"
    onnx.save(model, path)
    code, lines = _check(capsys, str(path), "--target", target)
    assert code == 0, lines
    assert lines == [f"every op conforms to target {target}"]
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(4)]
    result = quantize_model(model, calib, target=target, progress=False, runtime_check=False)
    missed = [r for r in result.report.remarks if r.pass_name == "check-target" and r.kind == "missed"]
    assert missed == [] and check_model(model, target) == []
