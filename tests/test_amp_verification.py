"""AMP's final check: the chosen point's real model scored simulated / runtime session / exact QDQ.

The runtime session (onnxruntime's defaults: QDQ fused into integer kernels) is what users run and
what the target and the fallback follow; exact QDQ semantics is the reference. A divergence between
the two is forced here by patching the scorer of the final check, since on this machine (and with
the portable model) onnxruntime's kernels agree with QDQ semantics. Independent re-measurements use
``qpasses.core.verification.exact_session`` (reference) and ``runtime_session`` (what the runtime score is).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_amp_models import chain_feeds, sensitive_chain

from qpasses.amp import choose_mixed_precision, parse_candidate, sqnr, top1_accuracy
from qpasses.amp.errors import AmpWarning
from qpasses.amp.evaluators import ModelScorer
from qpasses.amp.verify import DIVERGENCE_RTOL, divergence_tolerance, diverges
from qpasses.cli import main
from qpasses.core.verification import exact_session, runtime_session

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "digits_cnn.onnx")
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = ROOT / "models" / "digits_test.npz"
CANDIDATES = "8/4,8/8,16/16"


def top1(sess) -> float:
    data = np.load(TEST)
    return float((sess.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())


@pytest.fixture(scope="module")
def evals():
    return top1_accuracy(TEST, limit=120), top1_accuracy(TEST)


def patch_verify(monkeypatch, change):
    """Route the final check's scores through ``change(scorer, value) -> value`` (FP32 left alone)."""
    original = ModelScorer.score_with

    def score_with(self, fn, where):
        value = original(self, fn, where)
        return change(self, value) if where == "verify" else value

    monkeypatch.setattr(ModelScorer, "score_with", score_with)


def test_three_scores_are_reported_and_agree_on_the_portable_model(tmp_path, evals):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmpWarning)  # no divergence: no warning
        result = choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path, target="ort", progress=False)
    tol = divergence_tolerance(result.fp32_score)
    assert result.divergence_tolerance == pytest.approx(tol) == pytest.approx(DIVERGENCE_RTOL * result.fp32_score)
    assert result.score == result.runtime_score >= result.target
    assert abs(result.runtime_score - result.exact_score) <= tol
    assert abs(result.simulated_score - result.exact_score) <= tol
    assert result.warnings == [] and not any("fused integer kernels" in m for m in result.messages)
    # Re-measured here: exact QDQ semantics (the reference) and the default session (the runtime score).
    saved = str(tmp_path / "model.qdq.onnx")
    assert top1(exact_session(saved)) == pytest.approx(result.exact_score)
    assert top1(runtime_session(saved)) == pytest.approx(result.runtime_score)
    # The saved point is the last verified one; its simulated score is its search score.
    last = result.verification[-1]
    assert result.verification[0].kind == "chosen" and last.assignment == result.assignment
    assert (last.simulated_score, last.runtime_score, last.exact_score) == (
        result.simulated_score,
        result.runtime_score,
        result.exact_score,
    )
    searched = {
        json.dumps({g: str(c) for g, c in p.assignment.items()}, sort_keys=True): p.score for p in result.pareto
    }
    key = json.dumps({g: str(c) for g, c in result.assignment.items()}, sort_keys=True)
    if key in searched:
        assert result.simulated_score == pytest.approx(searched[key])
    info = json.loads((tmp_path / "amp_info.json").read_text())
    assert info["final_score"] == info["runtime_score"] == result.runtime_score
    assert info["exact_score"] == result.exact_score and info["simulated_score"] == result.simulated_score
    assert info["warnings"] == [] and info["verification"][-1]["exact_score"] == result.exact_score
    summary = result.summary()
    assert f"score {result.score:.4f} in onnxruntime's default session" in summary
    assert f"exact QDQ {result.exact_score:.4f}" in summary and f"simulated {result.simulated_score:.4f}" in summary


def test_note_reports_the_chosen_points_score_not_the_fallbacks(tmp_path, evals, monkeypatch):
    # The chosen point's real model (its first verification, runtime and exact alike) scores 0.5: a
    # simulation-vs-model mismatch. AMP must step back and say what the *chosen* point scored.
    first: list[bytes] = []

    def change(scorer, value):
        if not first:
            first.append(scorer.model)
        return 0.5 if scorer.model == first[0] else value

    patch_verify(monkeypatch, change)
    with pytest.warns(AmpWarning, match="the simulation scored the chosen point"):
        result = choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path, progress=False)
    chosen, final = result.verification[0], result.verification[-1]
    assert chosen.kind == "chosen" and chosen.runtime_score == chosen.exact_score == 0.5
    assert not chosen.meets_target and final.meets_target and final is not chosen
    assert result.assignment == final.assignment != chosen.assignment
    assert result.score == final.runtime_score >= result.target and result.score != 0.5
    note = next(m for m in result.messages if m.startswith("the chosen point scored"))
    assert note.startswith("the chosen point scored 0.5000 on its real QDQ model")
    assert f"below the target {result.target:.4f}" in note and f"simulated: {chosen.simulated_score:.4f}" in note
    took = next(m for m in result.messages if m.startswith(("took ", "fell back to ")))
    assert f"{final.label}" in took and f"it scores {result.score:.4f} in the runtime session" in took
    assert f"{final.relative_bitops:.3f} x baseline" in took
    # No runtime/exact divergence was involved: no such warning.
    assert not any("fused integer kernels" in w for w in result.warnings)


def test_runtime_exact_divergence_is_a_loud_warning_with_its_size(tmp_path, evals, monkeypatch):
    # The runtime session loses 0.2 on every quantized model (as onnxruntime's u8s8 kernels do on x86
    # without VNNI); exact QDQ semantics are untouched. Nothing meets the target in the runtime session,
    # so AMP keeps the baseline, and must say so, with the sizes.
    patch_verify(monkeypatch, lambda scorer, value: value if scorer.exact else value - 0.2)
    with pytest.warns(AmpWarning, match=r"0\.2000 lower .*fused integer kernels on this CPU diverge"):
        result = choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path, progress=False)
    [warning] = [w for w in result.warnings if "fused integer kernels" in w]
    assert warning in result.messages
    assert warning.startswith(
        f"onnxruntime's default session scores the chosen point "
        f"{result.verification[0].runtime_score:.4f}, but exact QDQ semantics score the "
        f"same model {result.verification[0].exact_score:.4f}: 0.2000 lower"
    )
    assert f"% of |FP32 score {result.fp32_score:.4f}|" in warning
    assert f"qpasses check {tmp_path / 'model.qdq.onnx'} --runtime ort" in warning
    assert "quantize for target 'ort'" in warning and "AMP fell back from it to the baseline" in warning
    # The fallback is still decided by the runtime score: the baseline everywhere, and the notes say so.
    assert set(result.assignment.values()) == {parse_candidate("16/16")}
    assert result.verification[-1].kind == "baseline" and result.bitops == result.baseline_bitops
    assert result.exact_score - result.runtime_score == pytest.approx(0.2)
    note = next(m for m in result.messages if m.startswith("the chosen point scored"))
    chosen = result.verification[0]
    assert f"scored {chosen.runtime_score:.4f}" in note and f"exact QDQ semantics: {chosen.exact_score:.4f}" in note
    assert "the runtime session is 0.2000 off exact QDQ semantics, which meets the target" in note
    fell = next(m for m in result.messages if m.startswith("fell back to the baseline (16/16 on every group)"))
    assert "at BitOps 1.000 x baseline" in fell and "no verified point meets it" in fell
    assert json.loads((tmp_path / "amp_info.json").read_text())["warnings"] == result.warnings


def test_cli_prints_the_divergence_as_a_warning(tmp_path, capsys, monkeypatch):
    patch_verify(monkeypatch, lambda scorer, value: value if scorer.exact else value - 0.2)
    script = tmp_path / "eval.py"
    script.write_text(
        f"import numpy as np\n_d = np.load({str(TEST)!r})\n"
        "def evaluate(s):\n"
        "    return float((s.run(None, {'input': _d['input']})[0].argmax(1) == _d['labels']).mean())\n"
    )
    code = main(
        [
            "amp",
            MODEL,
            "--calib",
            CALIB,
            "--eval-script",
            str(script),
            "--candidates",
            "8/8,16/16",
            "-o",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    warning_lines = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warning_lines) == 1 and "0.2000 lower" in warning_lines[0]
    assert "--runtime ort" in warning_lines[0] and "AmpWarning" not in captured.err  # printed once, not twice
    assert "note: the chosen point scored" in captured.out and "fused integer kernels" not in captured.out


@pytest.mark.parametrize("progress", [True, False])
def test_reference_evaluations_show_a_progress_bar(tmp_path, capsys, progress):
    model = sensitive_chain()
    metric = sqnr(chain_feeds(2, seed=5), model)
    choose_mixed_precision(model, chain_feeds(2), "8/8,16/16", metric, metric, 15.0, tmp_path, progress=progress)
    err = capsys.readouterr().err
    assert ("AMP reference" in err) == progress and ("AMP verify" in err) == progress


def test_divergence_rule():
    assert divergence_tolerance(0.98) == pytest.approx(0.0049)
    assert divergence_tolerance(-40.0) == pytest.approx(0.2)
    assert divergence_tolerance(math.inf) > 0 and divergence_tolerance(0.0) > 0
    assert not diverges(0.97, 0.974, 0.0049) and diverges(0.97, 0.976, 0.0049)
    assert diverges(math.inf, 40.0, 0.2) and not diverges(math.inf, math.inf, 0.2)
    assert not diverges(math.nan, 1.0, 0.2)
