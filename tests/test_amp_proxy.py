"""AMP's fast path: phase 1 by proxy, blocker checks, pruned simulation sessions, batched phase 3.

The pipeline tests run both phase-1 modes on the shipped digits models and hold the proxy to the
exhaustive result (same or lower BitOps, target met on the saved model, measured here), to fewer
calls of the user's callback, and to the bit-exactness of the simulation with the lowered model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_amp_models import mixed_feeds, mixed_ops

from qpasses.amp import choose_mixed_precision, parse_candidate, top1_accuracy
from qpasses.amp.bitops import MacTable
from qpasses.amp.blockers import phase2_with_blocker_checks
from qpasses.amp.candidates import Candidate
from qpasses.amp.convert_reduction import reduce_converts
from qpasses.amp.errors import AmpError
from qpasses.amp.evaluators import ScorerSpec, SimulationScorer
from qpasses.amp.groups import find_groups
from qpasses.amp.preparation import prepare_graph
from qpasses.amp.proxy import proxy_db, sample_feeds
from qpasses.amp.search import brute_force_search, gallop_search
from qpasses.amp.sensitivity import SensitivityEntry, make_entry, sort_accuracy_list
from qpasses.amp.sensitivity_phase import AUTO_PROXY_MIN_TASKS, phase1_mode
from qpasses.amp.simulation import SimulationModel
from qpasses.amp.statistics import calibrate_once
from qpasses.cli import main
from qpasses.core.verification import exact_session
from qpasses.quant.config import QuantConfig

ROOT = Path(__file__).resolve().parent.parent
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = ROOT / "models" / "digits_test.npz"
DIGITS = ("digits_cnn", "digits_cnn_relu6", "digits_cnn_residual")
C88, C168, C1616, C84 = (parse_candidate(c) for c in ("8/8", "16/8", "16/16", "8/4"))


# --- the proxy ------------------------------------------------------------------------------------


def test_proxy_db_weighs_outputs_alike_and_flags_broken_outputs():
    big = np.full((2, 4), 1000.0, np.float32)
    small = np.full((2, 4), 0.01, np.float32)
    same = [[big, small]]
    assert proxy_db(same, same) == math.inf
    # 1% noise on either output alone: the same dB whatever the output's scale (mean of noise/signal).
    noisy_big = proxy_db(same, [[big * 1.1, small]])
    noisy_small = proxy_db(same, [[big, small * 1.1]])
    assert noisy_big == pytest.approx(noisy_small) == pytest.approx(-10 * math.log10(0.01 / 2))
    assert proxy_db(same, [[big, np.full_like(small, np.nan)]]) == -math.inf
    ints = [[np.arange(4), small]]  # integer outputs are not compared
    assert proxy_db(ints, [[np.arange(4) + 1, small]]) == math.inf


def test_sample_feeds_slices_dynamic_batches_and_keeps_fixed_ones():
    feeds = [{"x": np.zeros((16, 3), np.float32)}, {"x": np.ones((16, 3), np.float32)}]
    got = sample_feeds(feeds, 2, {"x": "n"})
    assert len(got) == 1 and got[0]["x"].shape == (2, 3)
    assert [f["x"].shape for f in sample_feeds(feeds, 20, {"x": None})] == [(16, 3), (4, 3)]
    fixed = [{"x": np.zeros((1, 3), np.float32)} for _ in range(4)]
    assert len(sample_feeds(fixed, 2, {"x": 1})) == 2


def test_proxy_order_is_noise_per_bitops_with_free_groups_last():
    macs = MacTable({"a": 100, "b": 10}, by_group={"a": ("a",), "b": ("b",), "act": ()})
    base = {"a": C1616, "b": C1616, "act": C1616}
    entries = [
        make_entry("a", C88, math.nan, base, macs, proxy=30.0),  # 1e-3 noise for 19200 BitOps
        make_entry("b", C88, math.nan, base, macs, proxy=40.0),  # 1e-4 noise for 1920 BitOps
        make_entry("act", C88, math.nan, base, macs, proxy=60.0),  # no BitOps saved
        make_entry("b", C84, math.nan, base, macs, proxy=math.inf),
    ]  # free of noise
    order = [(e.group, str(e.candidate)) for e in sort_accuracy_list(entries, ["a", "b", "act"], by="proxy")]
    assert order == [("b", "8/4"), ("a", "8/8"), ("b", "8/8"), ("act", "8/8")]
    restored = SensitivityEntry.from_dict(entries[0].to_dict())
    assert restored.proxy == 30.0 and math.isnan(restored.score)


def test_auto_mode_uses_the_proxy_for_many_tasks_with_the_simulation_only():
    assert phase1_mode("auto", AUTO_PROXY_MIN_TASKS - 1, True) == "exhaustive"
    assert phase1_mode("auto", AUTO_PROXY_MIN_TASKS, True) == "proxy"
    assert phase1_mode("auto", 500, False) == "exhaustive"
    assert phase1_mode("proxy", 3, True) == "proxy" and phase1_mode("exhaustive", 500, True) == "exhaustive"


# --- searches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("good", [0, 3, 10])
@pytest.mark.parametrize("target", [0.95, 0.6, 0.05, -1.0])
def test_gallop_search_agrees_with_brute_force_after_a_known_good_point(good, target):
    falling = list(np.linspace(1.0, 0.0, 40))
    if falling[good] < target:
        return
    calls: list[int] = []

    def lazy(i):
        def f():
            calls.append(i)
            return falling[i]

        return f

    values = [lazy(i) for i in range(len(falling))]
    expected = brute_force_search([lambda v=v: v for v in falling], target)
    assert gallop_search(values, target, good) == expected
    assert len(set(calls)) <= 2 * math.ceil(math.log2(len(falling))) + 2
    assert gallop_search([lambda v=v: v for v in falling], target, good, brute_force=True) == expected


GROUPS = [f"g{i}" for i in range(12)]
SENSITIVE = {"g3": 0.2}


def _metric(assignment) -> float:
    """1.0 minus a big loss for g3 at 8/8 and a small one for each other group at 8/8."""
    return 1.0 - sum(SENSITIVE.get(g, 0.004) for g in GROUPS if assignment[g] == C88)


def _entries(misranked: bool) -> list[SensitivityEntry]:
    macs = MacTable({g: 100 for g in GROUPS}, by_group={g: (g,) for g in GROUPS})
    base = {g: C1616 for g in GROUPS}
    proxies = {g: 40.0 + i for i, g in enumerate(GROUPS)}
    proxies["g3"] = 80.0 if misranked else 10.0  # a misranking proxy calls the sensitive group harmless
    return sort_accuracy_list(
        [make_entry(g, C88, math.nan, base, macs, proxy=proxies[g]) for g in GROUPS], GROUPS, by="proxy"
    )


@pytest.mark.parametrize("misranked", [False, True])
def test_blocker_checks_move_a_misranked_group_and_match_exhaustive(misranked):
    macs = MacTable({g: 100 for g in GROUPS}, by_group={g: (g,) for g in GROUPS})
    base = {g: C1616 for g in GROUPS}
    target = 1.0 - 0.03  # room for 7 small losses, never for g3's
    calls: list[str] = []

    def score(a):
        calls.append("p2")
        return _metric(a)

    def alone(g, c):
        calls.append("alone")
        return _metric({**base, g: c})

    out = phase2_with_blocker_checks(
        _entries(misranked), base, 1.0, score, alone, macs, macs.bitops(base), target, progress=False
    )
    chosen = out.result.chosen.assignment
    assert chosen["g3"] == C1616 and sum(c == C88 for c in chosen.values()) == 7  # what exhaustive finds
    assert _metric(chosen) >= target
    assert [c.verdict for c in out.checks] == (["moved", "accumulated"] if misranked else ["accumulated"])
    if misranked:
        assert out.order[-1].group == "g3"  # moved to the end of the phase-1 list
    assert calls.count("alone") == len(out.checks) and len(calls) < 2 * len(GROUPS)
    none_left = phase2_with_blocker_checks(
        _entries(True),
        base,
        1.0,
        _metric,
        lambda g, c: _metric({**base, g: c}),
        macs,
        macs.bitops(base),
        target,
        max_repairs=0,
        progress=False,
    )
    assert none_left.exhausted and [c.verdict for c in none_left.checks] == ["out of repairs"]


# --- phase 3 in batches --------------------------------------------------------------------------------


def test_phase3_takes_every_flip_that_fits_in_one_evaluation_and_bisects_a_miss():
    graph = prepare_graph(str(ROOT / "models" / "digits_cnn_residual.onnx"))
    part = find_groups(graph)
    from qpasses.amp.bitops import mac_table
    from qpasses.amp.convert_reduction import conversions

    macs = mac_table(graph, part)
    names = part.names
    free = [g for g in names if not macs.by_group[g]]  # groups without MACs: free flips
    assert len(free) >= 2
    chosen = {g: (C1616 if g in free else C88) for g in names}
    before = len(conversions(part, chosen))
    calls: list[dict[str, Candidate]] = []

    def ok(a):
        calls.append(dict(a))
        return 1.0

    result = reduce_converts(part, chosen, {g: [C88, C1616] for g in names}, macs, ok, 0.5, progress=False)
    assert result.converts_after < before and result.evaluations == len(calls) <= 2
    assert all(f.accepted for f in result.flips) and max(f.batch for f in result.flips) >= 2
    bad = free[0]
    calls.clear()

    def picky(a):  # flipping ``bad`` misses the target; every other flip is fine
        calls.append(dict(a))
        return 0.0 if a[bad] != chosen[bad] else 1.0

    result = reduce_converts(part, chosen, {g: [C88, C1616] for g in names}, macs, picky, 0.5, progress=False)
    assert result.assignment[bad] == chosen[bad] and picky(result.assignment) >= 0.5
    assert any(f.group == bad and not f.accepted for f in result.flips)
    assert len(calls) <= 2 + 2 * math.ceil(math.log2(len(free) + 1)) + 2


# --- pruned sessions and IO binding --------------------------------------------------------------------


@pytest.mark.parametrize("act_mode", ["tf", "symmetric"])
@pytest.mark.parametrize("which", ["digits", "mixed_ops"])
def test_pruned_sessions_give_the_full_sessions_outputs_bit_for_bit(which, act_mode):
    if which == "digits":
        graph = prepare_graph(str(ROOT / "models" / "digits_cnn_residual.onnx"))
        feeds = [{"input": x} for x in np.load(CALIB)["input"].reshape(16, 16, 1, 16, 16)[:4]]
        x = {"input": np.load(TEST)["input"][:32]}
        cands = [C84, C88, C168, C1616]
    else:
        graph, feeds, x = prepare_graph(mixed_ops()), mixed_feeds(6), mixed_feeds(1)[0]
        cands = [C88, C168, C1616]
    part = find_groups(graph)
    config = QuantConfig(act_mode=act_mode)
    tables = calibrate_once(
        graph, feeds, config, act_bitwidths=[8, 16], weight_bitwidths=[4, 8, 16], bias_correction=True, batch_size=16
    )
    sim = SimulationModel(graph, part, tables, config)
    full = sim.session()
    rng = np.random.default_rng(7)
    assignments = [{g: c for g in part.names} for c in cands]
    assignments += [{g: cands[rng.integers(len(cands))] for g in part.names} for _ in range(4)]
    for a in assignments:
        feeds_a, layout = sim.plan_feeds(a)
        pruned = sim.session(layout=layout)
        full.set_feeds(feeds_a)
        pruned.set_feeds(feeds_a)
        for got, want in zip(pruned.run(None, x), full.run(None, x), strict=True):
            assert np.array_equal(got, want), a
        # Up to 8 pruned sessions are cached: none may keep an arena at its own high-water mark
        assert not pruned.session.get_session_options().enable_cpu_mem_arena
        model = sim.pruned(layout)
        kinds = [n.op_type for n in model.graph.node]
        assert "Clip" not in kinds or any(k not in (0, 8, 16) for k in layout)  # clamps are the saturation
        assert len(model.graph.input) < len(sim.model.graph.input)  # identity quantizers' inputs are gone
    ops = [n.op_type for n in sim.pruned(sim.plan_feeds(assignments[-1])[1]).graph.node]
    assert ops.count("QuantizeLinear") < [n.op_type for n in sim.model.graph.node].count("QuantizeLinear")


def test_simulated_session_binds_feeds_once_and_behaves_like_a_session():
    graph = prepare_graph(mixed_ops())
    part = find_groups(graph)
    tables = calibrate_once(
        graph,
        mixed_feeds(4),
        QuantConfig(),
        act_bitwidths=[8, 16],
        weight_bitwidths=[8, 16],
        bias_correction=False,
        batch_size=16,
    )
    sim = SimulationModel(graph, part, tables, QuantConfig())
    sess = sim.session()
    sess.set_feeds(sim.feeds({g: C88 for g in part.names}))
    x = mixed_feeds(1)[0]
    out = sess.run(None, x)
    assert [o.name for o in sess.get_outputs()] == ["out"] and out[0].shape == (1, 5)
    assert np.array_equal(sess.run(["out"], x)[0], out[0])
    sess.extra = sim.feeds({g: C1616 for g in part.names})  # assigning the feeds directly rebinds them
    assert not np.array_equal(sess.run(None, x)[0], out[0])
    with pytest.raises(ValueError, match="missing"):
        sess.run(None, {})


# --- the pipeline on the shipped digits models ------------------------------------------------------------


class Counting:
    """A callback that counts its calls (the user's metric)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, session):
        self.calls += 1
        return self.fn(session)


def accuracy_from_disk(path: Path) -> float:
    data = np.load(TEST)
    logits = exact_session(str(path)).run(None, {"input": data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory):
    out = {}
    for name in DIGITS:
        for mode in ("exhaustive", "proxy"):
            folder = tmp_path_factory.mktemp(f"{name}_{mode}")
            p1, p2 = Counting(top1_accuracy(TEST, limit=120)), Counting(top1_accuracy(TEST))
            result = choose_mixed_precision(
                str(ROOT / "models" / f"{name}.onnx"),
                CALIB,
                "8/4,8/8,16/16",
                p1,
                p2,
                0.01,
                folder,
                phase1=mode,
                progress=False,
            )
            out[name, mode] = (folder, result, p1.calls + p2.calls)
    return out


@pytest.mark.parametrize("name", DIGITS)
def test_proxy_is_as_good_as_exhaustive_with_fewer_metric_calls(both_modes, name):
    _, exhaustive, exhaustive_calls = both_modes[name, "exhaustive"]
    folder, proxy, proxy_calls = both_modes[name, "proxy"]
    assert exhaustive.phase1_mode == "exhaustive" and proxy.phase1_mode == "proxy"
    assert proxy.bitops <= exhaustive.bitops  # the same point or a cheaper one
    assert proxy.score >= proxy.target and accuracy_from_disk(folder / "model.qdq.onnx") >= proxy.target
    assert proxy_calls < exhaustive_calls
    assert proxy.stats["phase1"].evaluations == 0 and proxy.stats["phase1"].proxy_runs == len(proxy.phase1)
    assert sum(s.evaluations for s in proxy.stats.values()) == proxy_calls
    # The simulation stays bit-exact with the lowered model: the chosen point scores the same either way.
    assert proxy.simulated_score == pytest.approx(proxy.exact_score, abs=1e-12)
    info = json.loads((folder / "amp_info.json").read_text())
    assert info["phase1_mode"] == "proxy" and info["proxy_checks"]
    assert all("proxy_db" in e for e in json.loads((folder / "phase1.json").read_text()))


def test_proxy_scores_are_cached_and_the_cli_takes_the_mode(tmp_path, capsys):
    model = str(ROOT / "models" / "digits_cnn.onnx")
    script = tmp_path / "eval.py"
    script.write_text(f"""
import numpy as np
_data = np.load({str(TEST)!r})
def evaluate(session):
    name = session.get_inputs()[0].name
    return float((session.run(None, {{name: _data["input"]}})[0].argmax(1) == _data["labels"]).mean())
""")
    out = tmp_path / "out"
    args = [
        "amp",
        model,
        "--calib",
        CALIB,
        "--eval-script",
        str(script),
        "--candidates",
        "8/4,8/8,16/16",
        "--phase1",
        "proxy",
        "--proxy-samples",
        "4",
        "-o",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    first = json.loads((out / "amp_info.json").read_text())
    assert first["phase1_mode"] == "proxy" and first["stats"]["phase1"]["proxy_runs"] > 0
    assert "proxy runs" in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "amp_info.json").read_text())
    assert again["stats"]["phase1"]["proxy_runs"] == 0 and again["stats"]["phase1"]["cache_hits"] > 0
    assert again["precisions"] == first["precisions"]
    assert main([*args[:-3], "--proxy-samples", "0", "-o", str(tmp_path / "bad"), "-q"]) == 2


def test_bad_phase1_options_are_named(tmp_path):
    for kwargs in ({"phase1": "fast"}, {"proxy_samples": 0}, {"max_proxy_repairs": -1}):
        with pytest.raises(AmpError):
            choose_mixed_precision(
                onnx.load(str(ROOT / "models" / "digits_cnn.onnx")),
                CALIB,
                "8/8,16/16",
                None,
                lambda s: 1.0,
                0.01,
                tmp_path,
                progress=False,
                **kwargs,
            )


def test_pruned_sessions_serve_expensive_evaluations_with_the_same_scores():
    graph = prepare_graph(str(ROOT / "models" / "digits_cnn.onnx"))
    part = find_groups(graph)
    feeds = [{"input": x} for x in np.load(CALIB)["input"].reshape(16, 16, 1, 16, 16)[:4]]
    config = QuantConfig()
    tables = calibrate_once(
        graph, feeds, config, act_bitwidths=[8, 16], weight_bitwidths=[4, 8, 16], bias_correction=True, batch_size=16
    )
    metric = top1_accuracy(TEST)
    model = graph.to_onnx().SerializeToString()

    delay: list[float] = []

    def slow(session):  # a metric dearer than PRUNE_FACTOR session builds
        import time

        time.sleep(delay[0])
        return metric(session)

    auto = SimulationScorer(ScorerSpec(model, part, config, {"phase1": slow, "phase2": slow}, tables))
    delay.append(max(0.05, 2 * SimulationScorer.PRUNE_FACTOR * auto.stats.build_seconds))
    never = SimulationScorer(ScorerSpec(model, part, config, {"phase1": metric, "phase2": metric}, tables, prune=False))
    rng = np.random.default_rng(5)
    cands = [C84, C88, C1616]
    assignments = [{g: cands[rng.integers(3)] for g in part.names} for _ in range(4)]
    for a in [*assignments, assignments[0]]:
        assert auto.score(a, "phase2") == never.score(a, "phase2")
    assert never.stats.session_builds == 1
    assert 2 <= auto.stats.session_builds <= 1 + len(assignments)  # the first call measures, later ones prune
