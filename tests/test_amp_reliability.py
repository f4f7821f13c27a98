"""AMP refuses scores it cannot trust: a callback's NaN/inf/non-number/exception, and a cache made for
something else or damaged.

Each case is the user's mistake: the CLI prints one line (exit 2) naming the callback, the phase and
the assignment (group and candidate) or the cache file and what differs; the API raises ``AmpError``.
The final verification is measured on every run, so a hand-edited cache cannot report a score the
saved model does not have (checked against a fresh ``runtime_session`` / ``exact_session`` score).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qpasses.amp.cache as amp_cache
from qpasses.amp import choose_mixed_precision, sqnr, top1_accuracy
from qpasses.amp.candidates import signature
from qpasses.amp.errors import AmpError
from qpasses.cli import main
from qpasses.core.verification import exact_session, runtime_session

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "digits_cnn.onnx")
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = ROOT / "models" / "digits_test.npz"

EVAL_SCRIPT = """
import numpy as np
_data = np.load({test!r})

def evaluate(session):
    name = session.get_inputs()[0].name
    x, y = _data["input"][:120], _data["labels"][:120]
    return float((session.run(None, {{name: x}})[0].argmax(1) == y).mean())
"""

# The first call scores the FP32 model (fine); the second, every group at 8/8, returns BAD.
BAD_SCRIPT = """
_calls = [0]

def evaluate(session):
    _calls[0] += 1
    if _calls[0] == 1:
        return 0.9
{body}
"""

BAD_BODIES = {
    "nan": ("    return float('nan')", "returned nan"),
    "inf": ("    return float('inf')", "returned inf"),
    "string": ("    return 'good'", "must return a number"),
    "none": ("    return None", "must return a number"),
    "list": ("    return [0.5]", "must return a number"),
    "raises": ("    raise KeyError('logits')", "raised KeyError: 'logits'"),
}


def top1(session) -> float:
    data = np.load(TEST)
    x, y = data["input"][:120], data["labels"][:120]
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


def cli_args(script: Path, out: Path, model: str = MODEL) -> list[str]:
    return [
        "amp",
        model,
        "--calib",
        CALIB,
        "--eval-script",
        str(script),
        "--candidates",
        "8/8,16/16",
        "--allowed-drop",
        "0.01",
        "-o",
        str(out),
        "-q",
    ]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qpasses: error: ") and "internal error" not in err
    return err


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_cli_bad_score_is_one_line_naming_the_script_and_candidate(tmp_path, capsys, case):
    body, said = BAD_BODIES[case]
    script = tmp_path / "eval.py"
    script.write_text(BAD_SCRIPT.format(body=body))
    assert main(cli_args(script, tmp_path / "out")) == 2
    err = one_line_error(capsys)
    assert said in err
    assert f"evaluate() in {script.resolve()}" in err
    assert "AMP phase2 score of every group at 8/8" in err


def test_cli_nan_on_the_fp32_model_is_named(tmp_path, capsys):
    script = tmp_path / "eval.py"
    script.write_text("def evaluate(session):\n    return float('nan')\n")
    assert main(cli_args(script, tmp_path / "out")) == 2
    err = one_line_error(capsys)
    assert "AMP reference score of the FP32 model" in err and "returned nan" in err


@pytest.fixture(scope="module")
def metric():
    return sqnr(TEST, MODEL, limit=32)


@pytest.mark.parametrize(
    "bad",
    [math.nan, math.inf, -math.inf, "0.5", True, ValueError("no labels")],
    ids=["nan", "inf", "-inf", "str", "bool", "raises"],
)
def test_api_bad_phase1_score_names_the_group_and_candidate(tmp_path, metric, bad):
    def phase1(session):
        if isinstance(bad, Exception):
            raise bad
        return bad

    # SQNR: FP32 ~133 dB, all 16/16 ~71 dB, all 8/8 ~32 dB; a 70 dB drop needs phase 1.
    with pytest.raises(AmpError) as info:
        choose_mixed_precision(
            MODEL, CALIB, "8/8,16/16", phase1, metric, 70.0, tmp_path, phase1="exhaustive", progress=False
        )
    text = str(info.value)
    assert "\n" not in text
    assert "AMP phase1 score of " in text and " at 8/8 (the other " in text and "groups at 16/16)" in text
    assert "test_amp_reliability" in text and "phase1" in text  # the callback, by module and name
    if isinstance(bad, Exception):
        assert "raised ValueError: no labels" in text
    elif isinstance(bad, float):
        assert "a score must be a finite number" in text
    else:
        assert "must return a number" in text


def test_api_inf_everywhere_is_refused_not_the_lowest_candidate(tmp_path):
    with pytest.raises(AmpError, match=r"AMP phase2 score of every group at 8/8: .* returned inf"):
        choose_mixed_precision(MODEL, CALIB, "8/8,16/16", None, lambda s: math.inf, 0.01, tmp_path, progress=False)


# --- the cache ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One clean CLI run (its script and results folder); tests copy the folder before touching it."""
    folder = tmp_path_factory.mktemp("amp_first")
    script = folder / "eval.py"
    script.write_text(EVAL_SCRIPT.format(test=str(TEST)))
    out = folder / "out"
    assert main(cli_args(script, out)) == 0
    return script, out


def copy_out(first_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(first_run[1], out)
    return out


def test_resume_with_the_same_inputs_reuses_the_cache(first_run, tmp_path):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    assert main([*cli_args(script, out), "--resume"]) == 0
    info = json.loads((out / "amp_info.json").read_text())
    stats = info["stats"]
    assert stats["reference"]["evaluations"] == 0 and stats["reference"]["cache_hits"] > 0
    assert sum(s["evaluations"] for s in stats.values()) == stats["verify"]["evaluations"] == 2  # runtime + exact


def test_resume_refuses_another_model(first_run, tmp_path, capsys):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    model = onnx.load(MODEL)
    weight = next(w for w in model.graph.initializer if len(w.dims) == 4)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.01
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    assert main([*cli_args(script, out, str(other)), "--resume"]) == 2
    err = one_line_error(capsys)
    assert "made for another model" in err and "without --resume" in err and str(out / ".cache") in err
    assert main(cli_args(script, out, str(other))) == 0  # without --resume: starts fresh, as before


def test_resume_refuses_another_eval_script(first_run, tmp_path, capsys):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    other = tmp_path / "eval2.py"
    other.write_text(script.read_text().replace("[:120]", "[:200]"))
    assert main([*cli_args(other, out), "--resume"]) == 2
    err = one_line_error(capsys)
    assert "made for another eval script / callbacks" in err and "model" not in err.split("another")[1]


def test_resume_refuses_another_qpasses_version(first_run, tmp_path, capsys, monkeypatch):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    monkeypatch.setattr(amp_cache, "qpasses_version", lambda: "99.0")
    assert main([*cli_args(script, out), "--resume"]) == 2
    err = one_line_error(capsys)
    recorded = json.loads((first_run[1] / ".cache" / "fingerprint.json").read_text())["qpasses_version"]
    assert f"made for another qpasses version ({recorded} -> 99.0)" in err


def test_tampered_verification_score_is_measured_again(first_run, tmp_path):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    first = json.loads((out / "amp_info.json").read_text())
    assignment = {g: c for g, c in first["precisions"].items()}
    sig = signature(assignment)
    path = out / ".cache" / "scores.json"
    scores = json.loads(path.read_text())
    scores[f"verify|{sig}"] = scores[f"verify-exact|{sig}"] = 1.0  # the hand edit
    path.write_text(json.dumps(scores))
    assert main([*cli_args(script, out), "--resume"]) == 0
    info = json.loads((out / "amp_info.json").read_text())
    saved = (out / "model.qdq.onnx").read_bytes()
    assert info["final_score"] == info["runtime_score"] == top1(runtime_session(saved)) != 1.0
    assert info["exact_score"] == top1(exact_session(saved))
    assert info["stats"]["verify"]["evaluations"] >= 2


@pytest.mark.parametrize(
    "name,text,said",
    [
        ("scores.json", "[]", "scores.json holds a list"),
        ("scores.json", "garbage", "scores.json is not valid JSON"),
        ("scores.json", None, "is 'good', not a finite number"),
        ("scores.json", "nan", "is nan, not a finite number"),
        ("fingerprint.json", "garbage", "fingerprint.json is not valid JSON"),
        ("fingerprint.json", "[1, 2]", "fingerprint.json holds a list"),
    ],
)
def test_resume_refuses_a_damaged_cache_file(first_run, tmp_path, capsys, name, text, said):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    path = out / ".cache" / name
    if text is None or text == "nan":
        scores = json.loads(path.read_text())
        key = next(k for k in scores if k.startswith("phase2|"))
        scores[key] = "good" if text is None else math.nan
        text = json.dumps(scores)
    path.write_text(text)
    assert main([*cli_args(script, out), "--resume"]) == 2
    err = one_line_error(capsys)
    assert said in err and str(out / ".cache") in err
    assert main(cli_args(script, out)) == 0  # a clean start replaces it


def test_a_file_in_place_of_the_cache_folder(first_run, tmp_path, capsys):
    script, _ = first_run
    out = copy_out(first_run, tmp_path)
    shutil.rmtree(out / ".cache")
    (out / ".cache").write_text("not a folder")
    assert main([*cli_args(script, out), "--resume"]) == 2
    assert "it is not a folder" in one_line_error(capsys)
    assert main(cli_args(script, out)) == 0
    assert (out / ".cache" / "fingerprint.json").is_file()


def test_api_resume_refuses_a_builtin_metric_on_other_data(tmp_path):
    choose_mixed_precision(
        MODEL, CALIB, "8/8,16/16", None, top1_accuracy(TEST, limit=60), 0.01, tmp_path, progress=False
    )
    again = choose_mixed_precision(
        MODEL,
        CALIB,
        "8/8,16/16",
        None,
        top1_accuracy(TEST, limit=60),
        0.01,
        tmp_path,
        clean_start=False,
        progress=False,
    )
    assert any("reusing cached results" in m for m in again.messages)
    with pytest.raises(
        AmpError,
        match=r"made for another eval script / callbacks; run without --resume "
        r"\(clean_start=True\)",
    ):
        choose_mixed_precision(
            MODEL,
            CALIB,
            "8/8,16/16",
            None,
            top1_accuracy(TEST, limit=120),
            0.01,
            tmp_path,
            clean_start=False,
            progress=False,
        )
