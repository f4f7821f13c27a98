"""Every CLI subcommand, including bad input: one-line error, exit 2, input untouched, no output left."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import model_zoo
import numpy as np
import onnx
import pytest

from qpasses.cli import main
from qpasses.core.verification import exact_session

MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT = MODELS / "digits_cnn.onnx"


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "in.onnx"
    shutil.copy(DEFAULT, path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return exact_session(str(path)).run(None, {"input": x})[0]


def test_run_empty_pipeline_is_round_trip(model, tmp_path):
    out = tmp_path / "out.onnx"
    assert main(["run", str(model), "-o", str(out)]) == 0
    x = np.load(MODELS / "digits_test.npz")["input"][:8]
    assert _outputs(model, x).tobytes() == _outputs(out, x).tobytes()
    assert out.read_bytes() == model.read_bytes()


def test_run_pipeline_and_file(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert (
        main(
            ["run", str(model), "--pipeline", "remove-identity,dce,infer-shapes", "-o", str(out), "--verify", "numeric"]
        )
        == 0
    )
    assert "pass infer-shapes: modified" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    pf = tmp_path / "p.yaml"
    pf.write_text("- dce\n- infer-shapes\n")
    assert main(["run", str(model), "--pipeline-file", str(pf), "-o", str(out)]) == 0


def test_run_graphsurgeon_script(model, tmp_path):
    script = tmp_path / "rw.py"
    script.write_text(
        "import onnx_graphsurgeon as gs\n"
        "def rewrite(graph):\n"
        "    out = graph.outputs[0]\n"
        "    neg = gs.Variable('neg_logits', dtype=out.dtype, shape=out.shape)\n"
        "    graph.nodes.append(gs.Node('Neg', inputs=[out], outputs=[neg]))\n"
        "    graph.outputs = [neg]\n"
    )
    out = tmp_path / "out.onnx"
    assert main(["run", str(model), "--script", str(script), "-o", str(out)]) == 0
    x = np.load(MODELS / "digits_test.npz")["input"][:4]
    np.testing.assert_array_equal(_outputs(out, x), -_outputs(model, x))


def test_run_ir_script(model, tmp_path):
    script = tmp_path / "rw.py"
    script.write_text("REWRITE_API = 'ir'\ndef rewrite(graph):\n    graph.insert_op_on_edge(graph.inputs[0], 'Neg')\n")
    out = tmp_path / "out.onnx"
    assert main(["run", str(model), "--script", str(script), "-o", str(out)]) == 0
    x = np.load(MODELS / "digits_test.npz")["input"][:4]
    np.testing.assert_allclose(_outputs(out, x), _outputs(model, -x), rtol=1e-6)


def test_dump_after(model, tmp_path):
    out = tmp_path / "out.onnx"
    dumps = tmp_path / "dumps"
    assert (
        main(
            [
                "run",
                str(model),
                "--pipeline",
                "dce,infer-shapes",
                "-o",
                str(out),
                "--dump-after",
                "infer-shapes",
                "--dump-dir",
                str(dumps),
            ]
        )
        == 0
    )
    assert [p.name for p in dumps.iterdir()] == ["02-infer-shapes.onnx"]


def test_inspect(model, capsys):
    assert main(["inspect", str(model)]) == 0
    text = capsys.readouterr().out
    assert "BatchNormalization" in text and "initializers" in text
    assert main(["inspect", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    m = onnx.load(str(model))
    assert info["num_ops"] == len(m.graph.node)
    assert info["weights"]["initializers"] == len(m.graph.initializer)
    assert info["op_histogram"]["Conv"] == sum(n.op_type == "Conv" for n in m.graph.node)


def test_inspect_counts_constant_nodes_and_control_flow(tmp_path, capsys):
    p = tmp_path / "c.onnx"
    onnx.save(model_zoo.constant_node_weights(), str(p))
    main(["inspect", str(p), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["weights"]["initializers"] == 0 and info["weights"]["constant_nodes"] > 0
    q = tmp_path / "if.onnx"
    onnx.save(model_zoo.if_outer_scope(), str(q))
    main(["inspect", str(q), "--json"])
    assert json.loads(capsys.readouterr().out)["control_flow_ops"]


def test_list_commands(capsys):
    assert main(["list-passes"]) == 0
    assert "dce" in capsys.readouterr().out
    assert main(["list-targets"]) == 0
    assert "htp" in capsys.readouterr().out


def test_python_dash_m(model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qpasses", "inspect", str(model)], capture_output=True, text=True)
    assert r.returncode == 0 and "Conv" in r.stdout


def _bad(args: list[str], inputs: list[Path], out: Path, capsys, match: str) -> None:
    digests = {p: _digest(p) for p in inputs if p.exists()}
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qpasses: error:") and match in err and "\n" not in err, err
    assert "Traceback" not in err
    for p, d in digests.items():
        assert _digest(p) == d
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_truncated_model(tmp_path, capsys):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(DEFAULT.read_bytes()[: DEFAULT.stat().st_size // 2])
    out = tmp_path / "out.onnx"
    _bad(["run", str(bad), "-o", str(out)], [bad], out, capsys, "trunc.onnx")


def test_non_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello, I am a text file\n")
    out = tmp_path / "out.onnx"
    _bad(["run", str(bad), "-o", str(out)], [bad], out, capsys, "notes.onnx")
    _bad(["inspect", str(bad)], [bad], out, capsys, "notes.onnx")


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    _bad(["run", str(tmp_path / "nope.onnx"), "-o", str(out)], [], out, capsys, "not found")


def test_unknown_pass(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    _bad(
        ["run", str(model), "--pipeline", "dce,no-such-pass", "-o", str(out)],
        [model],
        out,
        capsys,
        "unknown pass 'no-such-pass'",
    )


def test_pipeline_file_bad_option(model, tmp_path, capsys):
    pf = tmp_path / "p.yaml"
    pf.write_text("- name: dce\n  options: {aggressive: true}\n")
    out = tmp_path / "out.onnx"
    _bad(
        ["run", str(model), "--pipeline-file", str(pf), "-o", str(out)],
        [model, pf],
        out,
        capsys,
        "pass 'dce' has no option 'aggressive'",
    )


def test_output_equal_to_input_refused(model, capsys):
    d = _digest(model)
    assert main(["run", str(model), "-o", str(model)]) == 2
    assert "input" in capsys.readouterr().err
    assert _digest(model) == d


def test_failing_script_leaves_nothing(model, tmp_path, capsys):
    script = tmp_path / "rw.py"
    script.write_text("def rewrite(graph):\n    raise ValueError('user bug')\n")
    out = tmp_path / "out.onnx"
    _bad(["run", str(model), "--script", str(script), "-o", str(out)], [model], out, capsys, "rewrite-script")


def test_quantize_with_eval_report(model, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(model),
                "--calib",
                str(MODELS / "digits_calib.npz"),
                "-q",
                "-o",
                str(out),
                "--eval",
                str(MODELS / "digits_test.npz"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("evaluated on 360 samples"))
    test = np.load(MODELS / "digits_test.npz")
    fp32 = _outputs(model, test["input"])
    q = _outputs(out / "model.qdq.onnx", test["input"])
    expected_sqnr = 10 * np.log10(np.sum(fp32.astype(np.float64) ** 2) / np.sum((fp32 - q).astype(np.float64) ** 2))
    assert f"{expected_sqnr:.2f} dB" in line
    assert f"top-1 FP32 {np.mean(fp32.argmax(1) == test['labels']):.4f}" in line


def test_quantize_bad_eval_data_writes_nothing(model, tmp_path, capsys):
    bad = tmp_path / "eval.npz"
    np.savez(bad, pixels=np.zeros((2, 1, 16, 16), np.float32))
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(model),
                "--calib",
                str(MODELS / "digits_calib.npz"),
                "-q",
                "-o",
                str(out),
                "--eval",
                str(bad),
            ]
        )
        == 2
    )
    assert "has no array for input(s) ['input']" in capsys.readouterr().err
    assert not (out / "model.qdq.onnx").exists()


def test_run_quantization_pipeline_with_calib(model, tmp_path):
    out = tmp_path / "q.onnx"
    assert (
        main(
            [
                "run",
                str(model),
                "--pipeline",
                "fold-batchnorm,encode-weights{per_channel=true},calibrate{progress=false},quantize",
                "--calib",
                str(MODELS / "digits_calib.npz"),
                "--target",
                "ort",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    m = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) > 0
    x = np.load(MODELS / "digits_test.npz")["input"]
    assert np.mean(_outputs(out, x).argmax(1) == _outputs(model, x).argmax(1)) > 0.95


def test_run_calibrate_without_data_is_a_user_error(model, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    _bad(["run", str(model), "--pipeline", "calibrate", "-o", str(out)], [model], out, capsys, "no calibration data")
