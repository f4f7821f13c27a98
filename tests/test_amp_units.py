"""AMP building blocks: groups, candidates, BitOps by hand, the searches, demotion and phase 3.

The search tests use a synthetic metric whose sensitive groups are known by construction, so
they check the algorithms themselves; the pipeline tests (test_amp_pipeline.py) use real models.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_amp_models import mixed_ops, requantizations

import graph_ir
from qpasses.amp.bitops import mac_table
from qpasses.amp.candidates import Candidate, OpKernel, filter_candidates, parse_candidate, parse_candidates
from qpasses.amp.convert_reduction import conversions, reduce_converts
from qpasses.amp.demotion import demotion_search
from qpasses.amp.errors import AmpError
from qpasses.amp.groups import find_groups
from qpasses.amp.overrides import quantize_assignment
from qpasses.amp.pareto import forward_steps, reverse_steps, run_phase2
from qpasses.amp.preparation import prepare_graph
from qpasses.amp.search import binary_search, brute_force_search, interpolation_search
from qpasses.amp.sensitivity import make_entry, phase1_tasks, sort_accuracy_list, with_group
from qpasses.quant.config import QuantConfig
from qpasses.quant.precision_type import Precision
from qpasses.targets.builtin import DSP, HTP

C88, C168, C1616, C84 = (parse_candidate(c) for c in ("8/8", "16/8", "16/16", "8/4"))


# --- candidates ------------------------------------------------------------------------------------


def test_candidate_forms_parse_to_the_same_thing():
    assert parse_candidate("16/8") == parse_candidate(((16, "int"), (8, "int"))) == C168
    fp16 = parse_candidate("16f/16f")
    assert fp16.act == Precision("float", 16) and fp16.param == Precision("float", 16)
    assert str(fp16) == "16f/16f" and fp16.to_tuple() == ((16, "float"), (16, "float"))
    assert [str(c) for c in parse_candidates("16/16, 8/8,16/8,8/8")] == ["8/8", "16/8", "16/16"]
    # float bits count sqrt(1.5) times (AIMET): float16 is dearer than int16
    assert fp16.cost == pytest.approx(256 * 1.5) and C1616.cost == 256


@pytest.mark.parametrize("bad", ["8", "8/x", "12/8", "16/16f", ((8, "int"), (8, "bfloat")), "8/8"])
def test_bad_candidates_are_named(bad):
    with pytest.raises(AmpError):
        parse_candidates([bad]) if bad != "8/8" else parse_candidates(["8/8", "8/8"])


def test_target_kernels_filter_candidates():
    conv = [OpKernel("Conv", True, True)]
    cands = parse_candidates("8/8,8/16,16/8,16/16")
    assert [str(c) for c in filter_candidates({"g": conv}, cands, HTP)["g"]] == ["8/8", "16/8", "16/16"]
    assert [str(c) for c in filter_candidates({"g": conv}, cands, DSP)["g"]] == ["8/8"]
    assert len(filter_candidates({"g": conv}, cands, DSP, use_all=True)["g"]) == 4
    with pytest.raises(AmpError, match="use_all_amp_candidates"):
        filter_candidates({"g": conv}, parse_candidates("16/8,16/16"), DSP)


# --- groups and BitOps -------------------------------------------------------------------------------


def test_groups_follow_fusion_shared_weights_and_inputs():
    graph = graph_ir.from_onnx(mixed_ops())
    part = find_groups(graph)
    by_name = {g.name: g for g in part}
    assert list(by_name) == ["conv_a", "conv_s1", "add", "matmul_act", "gemm"]
    a = by_name["conv_a"]
    assert a.ops == ("conv_a", "relu_a")  # the fused Relu joins its producer
    assert a.inputs == ("x",) and set(a.activations) == {"x", "ar"}  # the input quantizer, through a Reshape
    assert set(a.shared) == {"xr", "p"}  # data-movement outputs follow
    s = by_name["conv_s1"]
    assert s.ops == ("conv_s1", "conv_s2") and s.weights == ("ws",)  # one weight, one group
    assert by_name["add"].ops == ("add", "relu_add") and by_name["add"].reads == ("s1", "s2")
    assert by_name["gemm"].weights == ("wg",) and by_name["gemm"].biases == ("bg",)
    assert part.owner["p"] == "conv_a" and part.owner["g_in"] == "matmul_act"


def test_bitops_are_macs_times_bits_for_conv_gemm_and_matmul():
    graph = graph_ir.from_onnx(mixed_ops())
    part = find_groups(graph)
    macs = mac_table(graph, part)
    # conv_a: 1x4x8x8 outputs, each 3x3x3 MACs; conv_s*: 1x4x4x4 outputs x 4x3x3 (pads 1 on 4x4)
    assert macs.macs["conv_a"] == 4 * 8 * 8 * 3 * 3 * 3 == 6912
    assert macs.macs["conv_s1"] == macs.macs["conv_s2"] == 4 * 4 * 4 * 4 * 3 * 3 == 2304
    # MatMul [1,4,16] x [1,16,4]: 1x4x4 outputs, K = 16; Gemm [1,16] x [16,5]^T
    assert macs.macs["matmul_act"] == 4 * 4 * 16 == 256
    assert macs.macs["gemm"] == 16 * 5 == 80
    assert macs.group_bitops("conv_a", C168) == 6912 * 16 * 8
    assert macs.group_bitops("conv_s1", C88) == 2 * 2304 * 64
    assert macs.group_bitops("matmul_act", C168) == 256 * 16 * 16  # activation x activation
    assert macs.group_bitops("add", C1616) == 0
    fp16 = parse_candidate("16f/16f")
    assert macs.group_bitops("gemm", fp16) == pytest.approx(80 * 16 * 16 * 1.5)
    everything = {g.name: C88 for g in part}
    assert macs.bitops(everything) == (6912 + 2 * 2304 + 256 + 80) * 64


def test_conv_transpose_macs():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=[2, 2])
    g = helper.make_graph(
        [node],
        "ct",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    graph = graph_ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    macs = mac_table(graph, find_groups(graph))
    assert macs.macs["deconv"] == 5 * 5 * 3 * 2 * 3 * 3  # every input pixel x its channel's kernel slice


# --- searches ------------------------------------------------------------------------------------------


def _lazy(values, calls):
    def make(i):
        def f():
            calls.append(i)
            return values[i]

        return f

    return [make(i) for i in range(len(values))]


@pytest.mark.parametrize("target", [0.99, 0.95, 0.9, 0.5, 0.1, 1.5])
def test_binary_and_interpolation_agree_with_brute_force_on_a_monotone_curve(target):
    falling = [1.0, 0.98, 0.97, 0.95, 0.91, 0.9, 0.7, 0.5, 0.2]
    calls = {k: [] for k in ("b", "i", "f")}
    got = {
        k: fn(_lazy(falling, calls[k]), target)
        for k, fn in (("b", binary_search), ("i", interpolation_search), ("f", brute_force_search))
    }
    assert got["b"] == got["i"] == got["f"]
    if target <= 1.0:
        assert falling[got["b"]] >= target and (got["b"] == len(falling) - 1 or falling[got["b"] + 1] < target)
    assert len(set(calls["b"])) <= len(falling)
    rising = list(reversed(falling))  # phase2_reverse: promote until the target is met
    rev = {fn(_lazy(rising, []), target, True) for fn in (binary_search, interpolation_search, brute_force_search)}
    assert len(rev) == 1


def test_binary_search_evaluates_fewer_points_than_brute_force():
    values = list(np.linspace(1.0, 0.0, 64))
    b_calls, f_calls = [], []
    binary_search(_lazy(values, b_calls), 0.2)
    brute_force_search(_lazy(values, f_calls), 0.2)
    assert len(set(b_calls)) < 10 < len(set(f_calls))


# --- the algorithms on a synthetic metric --------------------------------------------------------------

GROUPS = [f"g{i}" for i in range(8)]
SENSITIVE = {"g2": 0.30, "g5": 0.20}  # score lost when the group is at the low candidate


def synthetic(assignment) -> float:
    """1.0, minus a large loss for each truly sensitive group at 8/8 and a tiny one for the others."""
    loss = sum(SENSITIVE.get(g, 0.001 * (i + 1)) for i, g in enumerate(GROUPS) if assignment[g] == C88)
    return 1.0 - loss


def test_phase1_and_phase2_keep_the_sensitive_groups_high():
    from qpasses.amp.bitops import MacTable

    macs = MacTable({g: 100 for g in GROUPS}, by_group={g: (g,) for g in GROUPS})
    baseline = {g: C1616 for g in GROUPS}
    tasks = phase1_tasks(GROUPS, {g: [C88, C1616] for g in GROUPS}, baseline)
    entries = sort_accuracy_list(
        [make_entry(g, c, synthetic(with_group(baseline, g, c)), baseline, macs) for g, c in tasks], GROUPS
    )
    assert {e.group for e in entries[-2:]} == set(SENSITIVE)  # most sensitive last
    assert entries[-1].group == "g2"
    target = 1.0 - 0.05
    for algorithm in ("binary", "interpolation", "brute-force"):
        result = run_phase2(
            forward_steps(entries, baseline),
            baseline,
            1.0,
            synthetic,
            macs,
            macs.bitops(baseline),
            target,
            algorithm=algorithm,
            progress=False,
        )
        chosen = result.chosen.assignment
        assert {g for g, c in chosen.items() if c == C1616} == set(SENSITIVE), algorithm
        assert synthetic(chosen) >= target
        bitops = [p.bitops for p in result.points]
        assert bitops == sorted(bitops, reverse=True)
    lowest = {g: C88 for g in GROUPS}
    rev = run_phase2(
        reverse_steps(entries, baseline, lowest),
        lowest,
        synthetic(lowest),
        synthetic,
        macs,
        macs.bitops(baseline),
        target,
        reverse=True,
        progress=False,
    )
    assert {g for g, c in rev.chosen.assignment.items() if c == C1616} == set(SENSITIVE)


def test_full_curve_is_monotone_in_bitops_and_scores_every_point():
    from qpasses.amp.bitops import MacTable

    macs = MacTable({g: 10 * (i + 1) for i, g in enumerate(GROUPS)}, by_group={g: (g,) for g in GROUPS})
    baseline = {g: C1616 for g in GROUPS}
    cands = {g: [C84, C88, C168, C1616] for g in GROUPS}

    def metric(a):
        return synthetic({g: C88 if c != C1616 else C1616 for g, c in a.items()}) - 0.01 * sum(
            c == C84 for c in a.values()
        )

    entries = sort_accuracy_list(
        [
            make_entry(g, c, metric(with_group(baseline, g, c)), baseline, macs)
            for g, c in phase1_tasks(GROUPS, cands, baseline)
        ],
        GROUPS,
    )
    steps = forward_steps(entries, baseline)
    result = run_phase2(steps, baseline, 1.0, metric, macs, macs.bitops(baseline), -math.inf, full=True, progress=False)
    assert len(result.points) == len(steps) + 1
    bitops = [p.bitops for p in result.points]
    assert all(a > b for a, b in zip(bitops, bitops[1:], strict=False))
    assert result.points[-1].assignment == {g: C84 for g in GROUPS}


def test_demotion_finds_the_sensitive_groups_and_meets_the_target():
    target = 1.0 - 0.05
    result = demotion_search(GROUPS, C1616, C88, synthetic, target, progress=False)
    assert set(result.promotions) == set(SENSITIVE)
    assert result.score >= target and synthetic(result.assignment) == result.score
    assert [d.group for d in result.history[-2:]] != [] and {d.group for d in result.history} == set(GROUPS)
    # no solution, and nothing to promote
    assert demotion_search(GROUPS, C1616, C88, synthetic, 1.5, progress=False).promotions is None
    assert demotion_search(GROUPS, C1616, C88, synthetic, 0.1, progress=False).promotions == []


def test_demotion_batches_walks_far_below_all_orders():
    calls = []

    def metric(a):
        calls.append(1)
        return synthetic(a)

    demotion_search(GROUPS, C1616, C88, metric, 0.95, progress=False)
    assert len(calls) <= len(GROUPS) * len(GROUPS)


# --- phase 3 -------------------------------------------------------------------------------------------


def test_phase3_removes_converts_without_missing_the_target(tmp_path):
    graph = prepare_graph("models/digits_cnn.onnx")
    part = find_groups(graph)
    macs = mac_table(graph, part)
    names = part.names
    assert "gap" in names and not macs.by_group["gap"]  # GlobalAveragePool: a group without MACs
    chosen = {g: C88 for g in names}
    chosen["gap"] = C1616  # int8 conv -> int16 pool -> int8 Gemm: two conversions for nothing
    assert len(conversions(part, chosen)) == 2
    evaluated = []

    def metric(a):
        evaluated.append(dict(a))
        return 0.97

    result = reduce_converts(
        part, chosen, {g: [C88, C1616] for g in names}, macs, metric, 0.96, current_score=0.97, progress=False
    )
    assert result.converts_before == 2 and result.converts_after == 0
    assert result.assignment["gap"] == C88 and result.score >= 0.96 and len(evaluated) == 1
    assert macs.bitops(result.assignment) <= macs.bitops(chosen)
    # The real lowering agrees: the node lists lose the DQ->Q->DQ conversions.
    calib = np.load("models/digits_calib.npz")["input"][:32]
    feeds = [{"input": calib[i : i + 16]} for i in range(0, 32, 16)]
    before = quantize_assignment(graph, part, chosen, feeds, QuantConfig()).model
    after = quantize_assignment(graph, part, result.assignment, feeds, QuantConfig()).model
    assert requantizations(before) == 2 and requantizations(after) == 0
    # A flip that misses the target is refused.
    refused = reduce_converts(part, chosen, {g: [C88, C1616] for g in names}, macs, lambda a: 0.5, 0.96, progress=False)
    assert refused.assignment == chosen and refused.flips and not any(f.accepted for f in refused.flips)


def test_candidate_order_is_by_cost():
    assert sorted([C1616, C84, C168, C88], key=lambda c: c.sort_key) == [C84, C88, C168, C1616]
    assert isinstance(C88, Candidate)


def test_plot_is_skipped_with_a_remark_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    from qpasses.amp.pareto import ParetoPoint
    from qpasses.amp.results import plot_pareto

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    points = [ParetoPoint(-1, 100.0, 1.0, 0.9, {"g": C1616}), ParetoPoint(0, 50.0, 0.5, 0.8, {"g": C88}, "g", C88)]
    message = plot_pareto(points, tmp_path / "pareto.png", target=0.85, chosen=0.5)
    assert message is not None and "qpasses[plot]" in message
    assert not (tmp_path / "pareto.png").exists()


@pytest.mark.parametrize("mode", ["symmetric", "tf", "adjusted"])
def test_simulated_weight_encoding_matches_encode_weights_on_a_mixed_axis_weight(mode: str) -> None:
    """A weight read by Gemms with transB 0 and 1 has no per-channel axis (the plan's axis is None):
    encode-weights encodes it per tensor with its per-tensor mode rules, and the AMP simulation must
    score that same grid (it took the per-channel branch: tf instead of symmetric)."""
    from onnx import TensorProto, helper, numpy_helper

    from qpasses.amp.fake_quant import weight_encoding
    from qpasses.core.context import PassContext
    from qpasses.passes import default_registry
    from qpasses.quant.plan import QuantPlan

    w = (np.random.default_rng(0).normal(size=(8, 8)) + 0.5).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Gemm", ["x", "w"], ["a"], name="g0", transB=0),
                helper.make_node("Gemm", ["a", "w"], ["y"], name="g1", transB=1),
            ],
            "mixed_axes",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
            [numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    graph, ctx = graph_ir.load(model), PassContext()
    default_registry().create_pass("encode-weights", per_channel=True, mode=mode)(graph, ctx)
    axis = ctx.get(QuantPlan, graph).plan.weights["w"].axis
    assert axis is None
    exported = graph.tensors["w"].encoding
    assert weight_encoding(w, 8, axis, per_channel=True, mode=mode) == exported
