"""Exit codes, messages and output integrity of the command (the reliability audit's reproducers)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.cli import main
from qpasses.passes.cleanup.identity_elimination import IdentityElimination
from qpasses.quant import encodings_io
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = str(MODELS / "digits_cnn.onnx")
CALIB = str(MODELS / "digits_calib.npz")


def _save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, path)
    return str(path)


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


# --- bugs are exit 1 with a traceback file, user errors exit 2 -----------------------------------------


def test_a_crashing_pass_is_an_internal_error_with_a_traceback_file(tmp_path, monkeypatch, capsys) -> None:
    def boom(self, graph, ctx):  # noqa: ANN001, ANN202
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(IdentityElimination, "run", boom)
    out = tmp_path / "out.onnx"
    assert main(["run", DIGITS, "--pipeline", "remove-identity", "-o", str(out)]) == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and "internal error in pass 'remove-identity'" in err
    assert "ZeroDivisionError: simulated bug" in err and "a bug in qpasses" in err
    path = err.split("traceback written to ")[1].rstrip(")\n")
    assert "Traceback" in Path(path).read_text() and "boom" in Path(path).read_text()
    assert not out.exists()


def test_a_rewrite_script_that_raises_is_the_users_error(tmp_path, capsys) -> None:
    script = tmp_path / "rw.py"
    script.write_text("def rewrite(graph):\n    raise KeyError('my bug')\n")
    assert main(["run", DIGITS, "--script", str(script), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "raised KeyError" in _err(capsys)


def test_graphsurgeon_rewrite_keeps_annotations(tmp_path) -> None:
    import graph_ir
    from qpasses.core.context import PassContext
    from qpasses.core.pass_manager import PassManager
    from qpasses.passes import default_registry
    from qpasses.quant.range_search import compute

    script = tmp_path / "rw.py"
    script.write_text("def rewrite(graph):\n    return graph\n")
    g = graph_ir.load(DIGITS)
    name = next(iter(g.inputs))
    g.tensors[name].encoding = compute(np.array([0.0, 1.0]), 8, "tf")
    g.tensors[name].meta["note"] = "kept"
    PassManager([default_registry().create_pass("rewrite-script", path=str(script))]).run(g, PassContext())
    assert g.tensors[name].encoding is not None and g.tensors[name].meta["note"] == "kept"


# --- output paths checked before the work ----------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(tmp_path, capsys) -> None:
    existing = tmp_path / "a_file"
    existing.write_text("x")
    assert main(["quantize", DIGITS, "--calib", CALIB, "-o", str(existing), "-q"]) == 2
    assert "not a folder" in _err(capsys)
    assert existing.read_text() == "x"
    assert main(["run", DIGITS, "-o", str(tmp_path)]) == 2
    assert "is a directory" in _err(capsys)
    assert main(["run", DIGITS, "-o", str(existing / "under_a_file.onnx")]) == 2
    assert "is not a folder" in _err(capsys)


def test_contradicting_and_unknown_flags_are_errors(tmp_path, capsys) -> None:
    assert main(["quantize", DIGITS, "--calib", CALIB, "--no-calib", "-o", str(tmp_path / "q")]) == 2
    assert "contradict" in _err(capsys)
    assert (
        main(
            [
                "run",
                DIGITS,
                "--pipeline",
                "remove-identity",
                "--dump-after",
                "no-such-pass",
                "-o",
                str(tmp_path / "o.onnx"),
            ]
        )
        == 2
    )
    assert "not in the pipeline" in _err(capsys)


# --- OUTDIR complete or untouched -------------------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_complete_set(tmp_path, monkeypatch) -> None:
    result = quantize_model(DIGITS, CALIB, QuantConfig(per_channel=True), progress=False)
    out = tmp_path / "out"
    result.save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"model.qdq.onnx", "encodings.json", "report.txt"}

    def full_disk(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encodings_io, "save", full_disk)
    result.report.add_remark("applied", "test", "a different report")
    with pytest.raises(OSError):
        result.save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_concurrent_saves_never_collide(tmp_path) -> None:
    result = quantize_model(DIGITS, CALIB, QuantConfig(), progress=False)
    out = tmp_path / "out"
    errors: list[BaseException] = []

    def save() -> None:
        try:
            for _ in range(5):
                result.save(out)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in out.iterdir()) == ["encodings.json", "model.qdq.onnx", "report.txt"]


# --- models the passes used to blame themselves for ---------------------------------------------------------


def _opset7_conv_bn() -> onnx.ModelProto:
    """IR 3 / opset 7: initializers are also listed as graph inputs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in [
            ("s", rng.uniform(0.5, 1.5, 4)),
            ("b", rng.standard_normal(4)),
            ("m", rng.standard_normal(4)),
            ("v", rng.uniform(0.5, 1.5, 4)),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    return model


def test_ir3_model_folds_batchnorm(tmp_path, capsys) -> None:
    src = _save(_opset7_conv_bn(), tmp_path / "old.onnx")
    out = tmp_path / "folded.onnx"
    assert main(["run", src, "--pipeline", "fold-batchnorm", "-o", str(out)]) == 0
    model = onnx.load(out)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    inputs = {i.name for i in model.graph.input}
    assert {t.name for t in model.graph.initializer} <= inputs  # IR 3: initializers are inputs


def test_dangling_input_and_cycle_are_named(tmp_path, capsys) -> None:
    io = (
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    dangling = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["nothere"], ["y"], name="r")], "g", *io),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    assert main(["run", _save(dangling, tmp_path / "d.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "Relu 'r' reads 'nothere'" in _err(capsys)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="entry"),
        helper.make_node("Add", ["a", "c"], ["b"], name="p"),
        helper.make_node("Relu", ["b"], ["c"], name="q"),
        helper.make_node("Relu", ["a"], ["y"], name="exit"),
    ]
    cyclic = helper.make_model(helper.make_graph(nodes, "g", *io), opset_imports=[helper.make_opsetid("", 13)])
    assert main(["run", _save(cyclic, tmp_path / "c.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    err = _err(capsys)
    assert "cycle" in err and "p" in err and "q" in err and "entry" not in err and "exit" not in err


def test_custom_domain_model_with_numeric_verify_runs(tmp_path, capsys) -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["i"], name="id"),
        helper.make_node("MyOp", ["i"], ["y"], name="custom", domain="my.domain"),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("my.domain", 1)],
    )
    out = tmp_path / "o.onnx"
    assert (
        main(
            [
                "run",
                _save(model, tmp_path / "m.onnx"),
                "--pipeline",
                "remove-identity",
                "--verify",
                "numeric",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "numeric verification skipped" in capsys.readouterr().out and out.exists()


def test_float16_numeric_verification_uses_float16_tolerance(tmp_path) -> None:
    import model_zoo

    model = model_zoo.float16_model()
    assert (
        main(
            [
                "run",
                _save(model, tmp_path / "h.onnx"),
                "--pipeline",
                "fold-batchnorm,cle",
                "--verify",
                "numeric",
                "-o",
                str(tmp_path / "o.onnx"),
            ]
        )
        == 0
    )


# --- --eval data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input": np.zeros((4, 1, 9, 9), np.float32)}, "axis 2 is 9"),
        ({"input": np.array([[1, "a"]], dtype=object)}, "evaluation data"),
        ({"input": np.zeros((4, 1, 16, 16), np.float32), "labels": np.arange(3)}, "'labels' must be 4 integers"),
        ({"input": np.zeros((0, 1, 16, 16), np.float32)}, "holds no samples"),
    ],
)
def test_bad_eval_data_is_one_line(tmp_path, capsys, arrays, message) -> None:
    data = tmp_path / "eval.npz"
    np.savez(data, **arrays)
    assert main(["quantize", DIGITS, "--calib", CALIB, "--eval", str(data), "-o", str(tmp_path / "q"), "-q"]) == 2
    err = _err(capsys)
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "q").exists()


def test_float64_eval_data_is_converted(tmp_path, capsys) -> None:
    data = tmp_path / "eval.npz"
    test = np.load(MODELS / "digits_test.npz")
    np.savez(data, input=test["input"][:20].astype(np.float64), labels=test["labels"][:20])
    assert main(["quantize", DIGITS, "--calib", CALIB, "--eval", str(data), "-o", str(tmp_path / "q"), "-q"]) == 0
    assert "evaluated on 20 samples" in capsys.readouterr().out


def test_rewrite_script_without_a_path_says_so(tmp_path, capsys) -> None:
    assert main(["run", DIGITS, "--pipeline", "rewrite-script", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "needs its script" in _err(capsys)


# --- one declarative pipeline: --print-pipeline text through `qpasses run` is the same model -------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--per-channel"],
        ["--per-channel", "--cle", "--act-mode", "enhanced"],
        ["--act-bw", "16", "--weight-bw", "4", "--target", "htp"],
        ["--seq-mse", "--seq-mse-candidates", "5", "--no-bias-correction"],
        ["--no-fold-batchnorm", "--weight-mode", "tf", "--target", "ort-vnni"],
    ],
    ids=["per-channel", "cle-enhanced", "a16w4-htp", "seq-mse", "no-fold-ort-vnni"],
)
def test_printed_pipeline_through_run_gives_the_same_model(tmp_path, capsys, flags) -> None:
    base = ["quantize", DIGITS, "--calib", CALIB, *flags, "-o", str(tmp_path / "q"), "-q", "--no-auto-fallback"]
    assert main([*base, "--print-pipeline"]) == 0
    text = capsys.readouterr().out.strip()
    assert "\n" not in text and text.startswith("inline-functions")
    assert main(base) == 0
    target = flags[flags.index("--target") + 1] if "--target" in flags else None
    run = ["run", DIGITS, "--pipeline", text, "--calib", CALIB, "-o", str(tmp_path / "run.onnx")]
    assert main(run + (["--target", target] if target else [])) == 0
    assert (tmp_path / "run.onnx").read_bytes() == (tmp_path / "q" / "model.qdq.onnx").read_bytes()
