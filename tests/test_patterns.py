"""The anchored pattern matcher: matches, optional/repeated steps, and near-miss reasons."""

from __future__ import annotations

import time

from graph_ir import Graph, Op
from qpasses.core.patterns import Match, NearMiss, Pattern, Step, single_reader


def chain(*op_types: str, outputs: tuple[str, ...] = ("y",)) -> tuple[Graph, list[Op]]:
    """x -> op_types[0] -> ... -> y, ops named op0, op1, ..."""
    g = Graph()
    g.inputs = ["x"]
    ops, prev = [], "x"
    for i, t in enumerate(op_types):
        out = "y" if i == len(op_types) - 1 else f"t{i}"
        ops.append(g.add_op(t, [prev, f"w{i}"] if t == "Conv" else [prev], [out], name=f"op{i}"))
        prev = out
    g.outputs = list(outputs)
    return g, ops


def relu_only(graph: Graph, op: Op) -> str | None:
    return None if op.op_type == "Relu" else f"{op.op_type} is not Relu"


CONV_ACT_CONV = Pattern(
    "conv-act-conv",
    (
        Step("conv1", ("Conv",)),
        Step("act", ("Relu", "Sigmoid"), optional=True, where=relu_only),
        Step("conv2", ("Conv",)),
    ),
)


def test_match_with_and_without_optional_step() -> None:
    g, ops = chain("Conv", "Relu", "Conv")
    m = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(m, Match)
    assert m.names == ["op0", "op1", "op2"]
    assert m.one("act") is ops[1] and m.one("conv2") is ops[2]

    g, ops = chain("Conv", "Conv")
    m = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(m, Match) and m.names == ["op0", "op1"] and m.one("act") is None


def test_anchor_of_other_type_is_no_match() -> None:
    g, ops = chain("Relu", "Conv")
    assert CONV_ACT_CONV.match(g, ops[0]) is None


def test_predicate_rejection_is_a_near_miss_with_reason() -> None:
    g, ops = chain("Conv", "Sigmoid", "Conv")
    miss = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(miss, NearMiss)
    assert miss.kind == "rejected" and miss.step == 1
    assert miss.reason == "Sigmoid is not Relu"
    assert miss.names == ["op0", "op1"]


def test_type_mismatch_names_the_op_and_expected_types() -> None:
    g, ops = chain("Conv", "Relu", "Add")
    miss = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(miss, NearMiss) and miss.kind == "mismatch"
    assert "Add 'op2'" in miss.reason and "Conv (conv2)" in miss.reason


def test_fan_out_and_graph_outputs_are_branches() -> None:
    g, ops = chain("Conv", "Relu", "Conv")
    g.add_op("Relu", ["t1"], ["z"], name="other")  # t1 (the Relu output) now has two readers
    g.outputs.append("z")
    miss = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(miss, NearMiss) and miss.kind == "branch"
    assert "read 2 times" in miss.reason and "op2" in miss.reason and "other" in miss.reason

    g, ops = chain("Conv", "Relu", "Conv", outputs=("y", "t0"))
    miss = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(miss, NearMiss) and miss.kind == "branch" and "graph output" in miss.reason


def test_end_of_graph_is_a_plain_mismatch() -> None:
    g, ops = chain("Conv", "Relu")
    miss = CONV_ACT_CONV.match(g, ops[0])
    assert isinstance(miss, NearMiss) and miss.kind == "mismatch"


def test_trailing_optional_steps_may_be_missing() -> None:
    p = Pattern("conv-act", (Step("conv", ("Conv",)), Step("act", ("Relu",), optional=True)))
    g, ops = chain("Conv", "Add")
    m = p.match(g, ops[0])
    assert isinstance(m, Match) and m.names == ["op0"]
    g, ops = chain("Conv")  # output is a graph output: nothing to extend into, still a match
    assert isinstance(p.match(g, ops[0]), Match)


def test_repeat_step_takes_every_fitting_op() -> None:
    p = Pattern(
        "conv-glue-conv",
        (
            Step("conv1", ("Conv",)),
            Step("glue", ("Relu", "MaxPool"), optional=True, repeat=True),
            Step("conv2", ("Conv",)),
        ),
    )
    g, ops = chain("Conv", "Relu", "MaxPool", "Relu", "Conv")
    m = p.match(g, ops[0])
    assert isinstance(m, Match)
    assert [o.name for o in m.all("glue")] == ["op1", "op2", "op3"]
    g, ops = chain("Conv", "Conv")
    m = p.match(g, ops[0])
    assert isinstance(m, Match) and m.all("glue") == []


def test_non_strict_rejection_skips_an_optional_step() -> None:
    def never(graph: Graph, op: Op) -> str | None:
        return "not a bias"

    p = Pattern(
        "conv-add-relu",
        (
            Step("conv", ("Conv",)),
            Step("bias", ("Add",), optional=True, strict=False, where=never),
            Step("act", ("Relu", "Add")),
        ),
    )
    g, ops = chain("Conv", "Add")
    m = p.match(g, ops[0])
    assert isinstance(m, Match) and m.one("bias") is None and m.one("act") is ops[1]


def test_slots_restrict_how_the_walked_tensor_enters() -> None:
    g = Graph()
    g.inputs = ["x", "b"]
    conv = g.add_op("Conv", ["x", "w"], ["c"], name="conv")
    g.add_op("Add", ["b", "c"], ["y"], name="add")  # c enters the Add at slot 1
    g.outputs = ["y"]
    strict_slot = Pattern("p", (Step("conv", ("Conv",)), Step("add", ("Add",))))
    miss = strict_slot.match(g, conv)
    assert isinstance(miss, NearMiss) and "input 1" in miss.reason
    any_slot = Pattern("p", (Step("conv", ("Conv",)), Step("add", ("Add",), slots=(0, 1))))
    assert isinstance(any_slot.match(g, conv), Match)
    assert single_reader(g, conv) is None  # not read at the data slot


def test_check_hook_reason_becomes_a_rejection() -> None:
    def same_weight(graph: Graph, m: Match) -> str | None:
        w1, w2 = m.roles["conv1"][0].inputs[1], m.roles["conv2"][0].inputs[1]
        return None if w1 == w2 else f"weights differ ({w1} vs {w2})"

    p = Pattern("tied", CONV_ACT_CONV.steps, check=same_weight)
    g, ops = chain("Conv", "Relu", "Conv")
    miss = p.match(g, ops[0])
    assert isinstance(miss, NearMiss) and miss.kind == "rejected" and miss.reason == "weights differ (w0 vs w2)"


def test_second_output_in_use_stops_the_walk() -> None:
    g = Graph()
    g.inputs = ["x"]
    conv = g.add_op("Conv", ["x", "w"], ["c"], name="conv")
    g.add_op("MaxPool", ["c"], ["p", "idx"], name="pool")
    g.add_op("Conv", ["p", "w2"], ["y"], name="conv2")
    g.outputs = ["y", "idx"]
    p = Pattern("p", (Step("conv1", ("Conv",)), Step("pool", ("MaxPool",)), Step("conv2", ("Conv",))))
    miss = p.match(g, conv)
    assert isinstance(miss, NearMiss) and miss.kind == "branch" and "idx" in miss.reason


def test_find_all_scales_linearly() -> None:
    """Anchored walks: a 10k-op Conv/Relu chain is scanned quickly (no subgraph isomorphism)."""
    n = 10_000
    g, ops = chain(*(["Conv", "Relu"] * (n // 2)))
    start = time.perf_counter()
    matches, misses = CONV_ACT_CONV.find_all(g)
    assert time.perf_counter() - start < 5.0
    assert len(matches) == n // 2 - 1
    assert len(misses) == 1 and misses[0].names[0] == ops[-2].name
