"""AMP end to end on real models: the digits CNN, and a chain where one layer is known to be sensitive.

Scores are re-measured independently (onnxruntime + numpy on the saved files), never trusted
from the run itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_amp_models import chain_feeds, mixed_feeds, mixed_ops, requantizations, run, sensitive_chain

from qpasses.amp import choose_mixed_precision, parse_candidate, sqnr, top1_accuracy
from qpasses.amp.evaluators import RebuildScorer, ScorerSpec, SimulationScorer
from qpasses.amp.groups import find_groups
from qpasses.amp.preparation import prepare_graph
from qpasses.amp.statistics import calibrate_once
from qpasses.cli import main
from qpasses.core.verification import exact_session
from qpasses.quant.config import QuantConfig

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "digits_cnn.onnx")
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = ROOT / "models" / "digits_test.npz"
CANDIDATES = "8/4,8/8,16/16"  # int4 weights make the digits search non-trivial (all-int8 alone loses nothing)


def accuracy_from_disk(path: Path) -> float:
    """Top-1 of a saved model on the test split (exact QDQ semantics), computed here and not by qpasses."""
    data = np.load(TEST)
    sess = exact_session(str(path))
    logits = sess.run(None, {"input": data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


@pytest.fixture(scope="module")
def evals():
    return top1_accuracy(TEST, limit=120), top1_accuracy(TEST)


@pytest.fixture(scope="module")
def full_curve(tmp_path_factory, evals):
    out = tmp_path_factory.mktemp("amp_full")
    return out, choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, None, out, progress=False)


def test_full_curve_is_monotone_from_all_int16_to_all_int8(full_curve):
    out, result = full_curve
    points = json.loads((out / "pareto.json").read_text())
    assert len(points) == len(result.pareto) >= 5
    bitops = [p["bitops"] for p in points]
    assert bitops == sorted(bitops, reverse=True) and len(set(bitops)) >= 4
    assert set(points[0]["precisions"].values()) == {"16/16"}  # the start: every group at the baseline
    assert set(points[-1]["precisions"].values()) <= {"8/4", "8/8"}  # the end: every group at its lowest
    for p in points:
        assert set(p["precisions"]) == set(result.partition.names) and isinstance(p["score"], float)
    assert (out / "pareto.csv").read_text().splitlines()[0].startswith("index,bitops,relative_bitops,score")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "pareto.png").stat().st_size > 1000
    info = json.loads((out / "amp_info.json").read_text())
    assert set(info["bitops_per_group"]) == set(result.partition.names)
    assert info["stats"]["phase1"]["evaluations"] == len(result.phase1) > 0


def test_allowed_drop_is_met_by_the_saved_model(tmp_path, evals):
    drop = 0.01
    result = choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, drop, tmp_path, progress=False)
    measured = accuracy_from_disk(tmp_path / "model.qdq.onnx")
    assert measured == pytest.approx(result.exact_score)  # the saved model reproduces the reported score
    assert measured >= result.fp32_score - drop
    assert result.score == result.runtime_score >= result.fp32_score - drop
    assert result.bitops < result.baseline_bitops  # and something was lowered
    overrides = json.loads((tmp_path / "overrides.json").read_text())
    assert overrides["param_encodings"] and overrides["activation_encodings"]


def test_cache_is_reused_without_evaluating_again(tmp_path):
    calls = []

    def phase1(session):
        calls.append("phase1")
        return top1_accuracy(TEST, limit=60)(session)

    def phase2(session):
        calls.append("phase2")
        return top1_accuracy(TEST, limit=180)(session)

    first = choose_mixed_precision(MODEL, CALIB, CANDIDATES, phase1, phase2, 0.02, tmp_path, progress=False)
    assert calls.count("phase1") == len(first.phase1) > 0
    calls.clear()
    again = choose_mixed_precision(
        MODEL, CALIB, CANDIDATES, phase1, phase2, 0.02, tmp_path, clean_start=False, progress=False
    )
    # No phase-1 or search evaluation; only the final check is measured again (runtime session + exact QDQ).
    assert calls == ["phase2"] * again.stats["verify"].evaluations and again.stats["verify"].evaluations >= 2
    assert any("reusing cached results" in m for m in again.messages)
    assert [e.to_dict() for e in again.phase1] == [e.to_dict() for e in first.phase1]
    assert again.assignment == first.assignment and again.score == first.score
    choose_mixed_precision(MODEL, CALIB, CANDIDATES, phase1, phase2, 0.02, tmp_path, clean_start=True, progress=False)
    assert calls.count("phase1") == len(first.phase1)  # clean start evaluates again


def test_sensitive_layer_is_ranked_last_and_kept_high_with_conversions(tmp_path):
    model = sensitive_chain()
    data = chain_feeds(4, seed=5)
    metric = sqnr(data, model)
    result = choose_mixed_precision(model, chain_feeds(4), "8/8,16/16", metric, metric, 15.0, tmp_path, progress=False)
    assert result.phase1[-1].group == "conv2"  # least sensitive first: the sensitive layer is last
    assert result.phase1[-1].score < result.phase1[0].score - 20
    assert result.assignment["conv2"] == parse_candidate("16/16")
    assert result.assignment["conv1"] == result.assignment["conv3"] == parse_candidate("8/8")
    saved = onnx.load(str(tmp_path / "model.qdq.onnx"))
    assert requantizations(saved) == result.conversions == 2  # int8 -> int16 into conv2, int16 -> int8 out of it
    out = run(saved, data[0])
    assert out.shape == (4, 4, 8, 8) and np.isfinite(out).all()
    assert metric(exact_session(saved)) >= result.target


def test_demotion_returns_promotions_and_a_valid_model(tmp_path):
    model = sensitive_chain()
    metric = sqnr(chain_feeds(4, seed=5), model)
    result = choose_mixed_precision(
        model, chain_feeds(4), "8/8,16/16", None, metric, 15.0, tmp_path, algorithm="demotion", progress=False
    )
    assert result.promotions == ["conv2"]
    assert result.score >= result.target
    saved = onnx.load(str(tmp_path / "model.qdq.onnx"))
    onnx.checker.check_model(saved)
    assert run(saved, chain_feeds(1)[0]).shape == (4, 4, 8, 8)
    assert json.loads((tmp_path / "amp_info.json").read_text())["demotion"]["promotions"] == ["conv2"]
    assert len(json.loads((tmp_path / "pareto.json").read_text())) == 1 + len(result.demotion.history)


@pytest.mark.parametrize("which", ["digits", "mixed_ops"])
def test_simulation_scores_match_the_real_qdq_model(which):
    if which == "digits":
        graph, feeds = prepare_graph(MODEL), [{"input": x} for x in np.load(CALIB)["input"].reshape(16, 16, 1, 16, 16)]
        metric = top1_accuracy(TEST)
        names = ("8/4", "8/8", "16/8", "16/16")
    else:
        graph, feeds = prepare_graph(mixed_ops()), mixed_feeds(6)
        metric = sqnr(mixed_feeds(3), mixed_ops())
        names = ("8/8", "16/8", "16/16")
    part = find_groups(graph)
    config = QuantConfig()
    cands = [parse_candidate(c) for c in names]
    tables = calibrate_once(
        graph, feeds, config, act_bitwidths=[8, 16], weight_bitwidths=[4, 8, 16], bias_correction=True, batch_size=16
    )
    model = graph.to_onnx().SerializeToString()
    callbacks = {"phase1": metric, "phase2": metric}
    sim = SimulationScorer(ScorerSpec(model, part, config, callbacks, tables, prune=False))
    pruned = SimulationScorer(ScorerSpec(model, part, config, callbacks, tables, prune=True))
    real = RebuildScorer(ScorerSpec(model, part, config, callbacks, None, feeds))
    rng = np.random.default_rng(3)
    assignments = [{g: c for g in part.names} for c in cands[:2]]
    assignments += [{g: cands[rng.integers(len(cands))] for g in part.names} for _ in range(3)]
    layouts = set()
    for a in assignments:
        s, p, r = sim.score(a, "phase2"), pruned.score(a, "phase2"), real.score(a, "phase2")
        # The rebuilt model runs with exact QDQ semantics (no fused integer kernel), so the scores agree
        # (bit-exact here; float rounding order aside): not one test sample / not 1e-6 of the SQNR apart.
        assert s == pytest.approx(r, rel=1e-6, abs=1e-9), (a, s, r)
        assert p == s, (a, p, s)  # the pruned session of the assignment's layout: the same outputs
        layouts.add(pruned.model.plan_feeds(a)[1])
    assert sim.stats.session_builds == 1 and real.stats.session_builds == len(assignments)
    assert pruned.stats.session_builds == 1 + len(layouts)  # one pruned session per layout, reused


def test_process_pool_gives_the_same_phase1_list(tmp_path, evals):
    local = choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path / "local", progress=False)
    pooled = choose_mixed_precision(
        MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path / "pool", executor="process", workers=2, progress=False
    )
    assert [e.to_dict() for e in pooled.phase1] == [e.to_dict() for e in local.phase1]
    assert pooled.stats["phase1"].evaluations == len(local.phase1)
    # At most one simulation session per worker (a busy machine may hand every task to one worker).
    assert 1 <= pooled.stats["phase1"].session_builds <= 2
    assert pooled.assignment == local.assignment


def test_unpicklable_callbacks_are_refused_for_the_pool(tmp_path):
    from qpasses.amp import AmpError

    with pytest.raises(AmpError, match="picklable"):
        metric = top1_accuracy(TEST, limit=60)
        choose_mixed_precision(
            MODEL, CALIB, CANDIDATES, lambda s: metric(s), metric, 0.01, tmp_path, executor="process", progress=False
        )


def test_ray_gives_the_same_phase1_list(tmp_path, evals):
    pytest.importorskip("ray")
    local = choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path / "local", progress=False)
    remote = choose_mixed_precision(
        MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path / "ray", executor="ray", workers=2, progress=False
    )
    assert [e.to_dict() for e in remote.phase1] == [e.to_dict() for e in local.phase1]


def test_ray_missing_is_a_clear_error(tmp_path, evals, monkeypatch):
    import builtins

    from qpasses.amp import AmpError

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(AmpError, match=r"qpasses\[ray\]"):
        choose_mixed_precision(MODEL, CALIB, CANDIDATES, *evals, 0.01, tmp_path, executor="ray", progress=False)


EVAL_SCRIPT = """
import numpy as np
_data = np.load({test!r})

def evaluate(session):
    name = session.get_inputs()[0].name
    return float((session.run(None, {{name: _data["input"]}})[0].argmax(1) == _data["labels"]).mean())

def evaluate_phase1(session):
    name = session.get_inputs()[0].name
    x, y = _data["input"][:90], _data["labels"][:90]
    return float((session.run(None, {{name: x}})[0].argmax(1) == y).mean())
"""


def test_cli_end_to_end(tmp_path, capsys):
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT.format(test=str(TEST)))
    out = tmp_path / "out"
    code = main(
        [
            "amp",
            MODEL,
            "--calib",
            CALIB,
            "--eval-script",
            str(script),
            "--candidates",
            CANDIDATES,
            "--allowed-drop",
            "0.01",
            "--algorithm",
            "brute-force",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    for name in ("pareto.json", "model.qdq.onnx", "encodings.json", "overrides.json", "amp_info.json"):
        assert (out / name).is_file(), name
    assert (out / ".cache" / "phase1.json").is_file()
    info = json.loads((out / "amp_info.json").read_text())
    assert accuracy_from_disk(out / "model.qdq.onnx") == pytest.approx(info["exact_score"])
    assert info["final_score"] == info["runtime_score"] >= info["fp32_score"] - 0.01
    assert "AMP: score" in capsys.readouterr().out
    # Demotion through the CLI, then a bad candidate is a one-line error (exit 2).
    code = main(
        [
            "amp",
            MODEL,
            "--eval-script",
            str(script),
            "--candidates",
            "8/8,16/16",
            "--allowed-drop",
            "0.01",
            "--algorithm",
            "demotion",
            "-o",
            str(tmp_path / "dem"),
            "-q",
        ]
    )
    assert code == 0 and "demotion:" in capsys.readouterr().out
    assert main(["amp", MODEL, "--eval-script", str(script), "--candidates", "8/x", "-o", str(tmp_path / "bad")]) == 2
    assert "A/W" in capsys.readouterr().err


def test_float16_candidates_fall_back_to_real_models(tmp_path):
    model = sensitive_chain()
    metric = sqnr(chain_feeds(2, seed=5), model)
    result = choose_mixed_precision(
        model, chain_feeds(2), "8/8,16f/16f", metric, metric, 15.0, tmp_path, progress=False
    )
    assert not result.simulated and any("float candidates" in m for m in result.messages)
    assert result.assignment["conv2"] == parse_candidate("16f/16f") and result.score >= result.target
    assert math.isfinite(result.score)
