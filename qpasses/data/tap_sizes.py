"""Sizing the runs of the tensor tap under the byte cap: the bytes of every value a run produces (shape
inference at the feed's shapes; onnxruntime measures, through ``Shape`` outputs, what inference cannot
tell), the rows a feed may be split into, and the error a failed run reports."""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from qpasses.core.errors import CalibrationDataError, ModelLoadError
from qpasses.data.input_specs import InputSpec
from qpasses.data.run_segments import (
    GraphStructure,
    dtype_itemsize,
    infer_value_infos,
    shape_only_model,
    value_elem_type,
    value_static_shape,
)
from qpasses.data.sessions import tap_session


@dataclass(eq=False)
class ShapeProbes:
    """The sessions that measure tensors' shapes, kept across feeds: a model fed sequences of many
    lengths (khmer_segmenter: 26 in 32 calibration items) needs one per set of tensors, not one per
    length (session creation was 60% of its calibration time)."""

    sessions: dict[tuple[str, ...], ort.InferenceSession] = field(default_factory=dict)
    tmps: list[tempfile.TemporaryDirectory[str]] = field(default_factory=list)

    def close(self) -> None:
        self.sessions.clear()
        for tmp in self.tmps:
            tmp.cleanup()
        self.tmps.clear()


def estimate_sizes(
    model: onnx.ModelProto,
    structure: GraphStructure,
    unit: Mapping[str, np.ndarray],
    inputs: Mapping[str, np.ndarray],
    batch: int,
    intra_op_threads: int,
    probes: ShapeProbes,
) -> dict[str, int]:
    """Bytes of every value the main graph's nodes produce, for ``unit`` (one row of ``inputs``, or all of
    it). ``probes``: the measuring sessions, reused (and kept) across calls."""
    shaped = shape_only_model(model)
    for vi in shaped.graph.input:
        value = unit.get(vi.name)
        if value is not None:
            vi.CopyFrom(
                helper.make_tensor_value_info(vi.name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
            )
    infos = infer_value_infos(shaped)
    sizes: dict[str, int] = {}
    unknown: list[str] = []
    for node in structure.nodes:
        for name in node.output:
            if not name:
                continue
            vi = infos.get(name)
            elem = None if vi is None else value_elem_type(vi)
            shape = None if vi is None else value_static_shape(vi)
            if vi is not None and elem is None:
                sizes[name] = 0  # sequences and maps are never requested and never cross a cut
            elif shape is None:
                unknown.append(name)
            else:
                sizes[name] = math.prod(shape) * dtype_itemsize(elem)
    if unknown:
        sizes.update(_measure(model, unknown, unit, infos, inputs, batch, intra_op_threads, probes))
    return sizes


def _measure(
    model: onnx.ModelProto,
    names: list[str],
    unit: Mapping[str, np.ndarray],
    infos: Mapping[str, onnx.ValueInfoProto],
    inputs: Mapping[str, np.ndarray],
    batch: int,
    intra_op_threads: int,
    probes: ShapeProbes,
) -> dict[str, int]:
    """Bytes of ``names`` from onnxruntime: one run on ``unit`` that returns only their shapes."""
    key = tuple(names)
    session = probes.sessions.get(key)
    if session is None:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        for i, name in enumerate(names):
            shape_of = f"__qpasses_shape_{i}"
            probe.graph.node.append(helper.make_node("Shape", [name], [shape_of], name=shape_of))
            probe.graph.output.append(helper.make_tensor_value_info(shape_of, onnx.TensorProto.INT64, None))
        try:
            session, tmp = tap_session(probe, intra_op_threads)
        except ModelLoadError as exc:  # e.g. a value that is not a tensor after all: then it is not capped
            warnings.warn(
                f"calibration: cannot measure the size of {len(names)} tensors ({exc}); "
                "max_bytes_per_run does not count them",
                RuntimeWarning,
                stacklevel=2,
            )
            return dict.fromkeys(names, 0)
        del probe
        probes.sessions[key] = session
        if tmp is not None:
            probes.tmps.append(tmp)
    try:
        shapes = session.run(None, dict(unit))
    except Exception as exc:  # the error a run would give: on the whole batch if that fails too
        if unit is not inputs:
            try:
                session.run(None, dict(inputs))
            except Exception as whole:  # noqa: BLE001
                raise run_error(batch, inputs, whole, None) from None
        raise run_error(batch, inputs, exc, None if unit is inputs else (0, 1)) from None
    out: dict[str, int] = {}
    for name, shape in zip(names, shapes, strict=True):
        vi = infos.get(name)
        out[name] = int(np.prod(shape)) * dtype_itemsize(None if vi is None else value_elem_type(vi))
    return out


def run_error(
    batch: int, inputs: Mapping[str, np.ndarray], exc: Exception, rows: tuple[int, int] | None
) -> CalibrationDataError:
    shapes = ", ".join(f"'{k}' {v.dtype} {list(v.shape)}" for k, v in inputs.items())
    where = (
        ""
        if rows is None
        else (
            f" (run on rows {rows[0]}:{rows[1]} to stay within max_bytes_per_run; "
            "a model that needs whole batches calibrates with max_bytes_per_run=0)"
        )
    )
    return CalibrationDataError(f"batch {batch}: onnxruntime failed on inputs {shapes}{where}: {exc}")


def feed_rows(inputs: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int | None:
    """Rows of a feed that may be split along axis 0 (every input's batch dim is dynamic), else None."""
    counts = set()
    for spec in specs:
        value = inputs[spec.name]
        if not spec.shape or isinstance(spec.shape[0], int) or value.ndim == 0:
            return None
        counts.add(value.shape[0])
    return counts.pop() if len(counts) == 1 else None
