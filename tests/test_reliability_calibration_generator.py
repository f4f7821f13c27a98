"""A one-shot generator of calibration feeds: every pass must see all of it.

Regression: each pass wrapped the raw generator again, so after ``seq-mse`` read its 4 batches,
``calibrate`` reported "64 samples in 4 batches" of an 8-batch generator (the other half was gone),
with no warning. Truth: the same pipeline on a list of the same feeds (re-iterable by nature).
The record belongs to the run's one ``CalibrationData`` (the pass context keeps it), not to a
module-level registry.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError
from qpasses.core.pass_manager import PassManager, PipelineReport
from qpasses.data import replay as calibration_data_module
from qpasses.data.feeds import calibration_feeds, context_feeds
from qpasses.data.sources import CalibrationData
from qpasses.passes import default_registry

BATCHES, ROWS = 8, 16


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32), "conv.weight"),
        numpy_helper.from_array((rng.standard_normal(6) * 0.1).astype(np.float32), "conv.bias"),
        numpy_helper.from_array((rng.standard_normal((6, 4)) * 0.3).astype(np.float32), "fc.weight"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds() -> list[dict[str, np.ndarray]]:
    # Later batches have wider ranges: losing them changes the calibrated encodings.
    rng = np.random.default_rng(1)
    return [{"x": (rng.standard_normal((ROWS, 3, 8, 8)) * (1 + i)).astype(np.float32)} for i in range(BATCHES)]


def _generator() -> Iterator[dict[str, np.ndarray]]:
    yield from _feeds()


def _run(source: object) -> tuple[graph_ir.Graph, PipelineReport]:
    reg = default_registry()
    passes = [
        reg.create_pass("seq-mse", num_batches=4, num_candidates=4, weight_bw=4, progress=False),
        reg.create_pass("encode-weights", weight_bw=4),
        reg.create_pass("calibrate", progress=False),
        reg.create_pass("bias-correction", num_batches=BATCHES),
    ]
    graph = graph_ir.load(_model())
    report = PassManager(passes, verify="checker").run(graph, PassContext(calibration_data=source))
    return graph, report


def _calibrate_message(report: PipelineReport) -> str:
    (message,) = [r.message for r in report.remarks if r.pass_name == "calibrate" and r.kind == "applied"]
    return message


def _encodings(graph: graph_ir.Graph) -> dict[str, object]:
    return {name: t.encoding for name, t in graph.tensors.items() if t.encoding is not None}


@pytest.mark.parametrize("spill", [False, True])
def test_generator_gives_every_pass_all_batches(spill: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if spill:  # every recorded feed goes to the temporary .npz store on disk
        monkeypatch.setattr(calibration_data_module, "REPLAY_MEMORY_BYTES", 0)
    expected_graph, expected = _run(_feeds())
    graph, report = _run(_generator())
    assert f"on {BATCHES * ROWS} samples in {BATCHES} batches" in _calibrate_message(expected)
    assert _calibrate_message(report) == _calibrate_message(expected)
    assert _encodings(graph) == _encodings(expected_graph)
    for name in ("conv.bias", "fc.bias"):  # bias correction saw the same means
        np.testing.assert_array_equal(graph.tensors[name].data, expected_graph.tensors[name].data)


def test_generator_is_read_once_and_replayed() -> None:
    pulled: list[int] = []

    def counting() -> Iterator[dict[str, np.ndarray]]:
        for i, feed in enumerate(_feeds()):
            pulled.append(i)
            yield feed

    ctx = PassContext(calibration_data=counting())
    graph = graph_ir.load(_model())
    first = context_feeds(ctx, graph, ROWS)
    head = [f["x"] for f, _ in zip(first, range(3), strict=False)]
    again = context_feeds(ctx, graph, ROWS)  # another pass reads the run's data: the same object, replayed
    assert again is first and ctx.calibration_data is first
    everything = [f["x"] for f in again]
    assert len(everything) == BATCHES and pulled == list(range(BATCHES))
    for a, b in zip(head, everything, strict=False):
        np.testing.assert_array_equal(a, b)
    assert len(list(first)) == BATCHES and len(calibration_feeds(ctx.calibration_data, graph, ROWS)) == BATCHES
    assert pulled == list(range(BATCHES))  # never read twice


def test_recorded_feeds_are_copies() -> None:
    """A generator that refills one buffer must not rewrite the feeds already recorded."""
    buffer = np.zeros((2, 3, 8, 8), np.float32)

    def refilling() -> Iterator[dict[str, np.ndarray]]:
        for i in range(3):
            buffer[...] = i
            yield {"x": buffer}

    data = CalibrationData.from_source(refilling(), _model())
    assert [float(f["x"][0, 0, 0, 0]) for f in data] == [0.0, 1.0, 2.0]
    assert [float(f["x"][0, 0, 0, 0]) for f in data] == [0.0, 1.0, 2.0]


def test_spilled_store_is_removed_with_its_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration_data_module, "REPLAY_MEMORY_BYTES", 0)
    data = CalibrationData.from_source(_generator(), _model())
    assert len(list(data)) == BATCHES
    directory = data.replay_directory
    assert directory is not None and directory.is_dir() and len(list(directory.iterdir())) == BATCHES
    del data
    gc.collect()
    assert not directory.exists()


def test_no_module_level_registry() -> None:
    """Two wrappings of one generator do not share a record: the run's one ``CalibrationData`` owns it."""
    source = _generator()
    first = CalibrationData.from_source(source, _model())
    assert len(list(first)) == BATCHES
    with pytest.raises(CalibrationDataError, match="yielded no calibration feeds"):
        list(CalibrationData.from_source(source, _model()))
    assert not [name for name in vars(calibration_data_module) if "REPLAYS" in name.upper()]
