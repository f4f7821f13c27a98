"""What a model expects as input (names, dtypes, shapes with symbolic dims) and checking a feed against it:
never stricter than onnxruntime (symbolic dims, "?" included, are not cross-checked)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qpasses.core.errors import CalibrationDataError

Dim = int | str | None
Feed = dict[str, np.ndarray]
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """What the model accepts for one graph input.

    ``shape`` holds ints (fixed), strings (symbolic) or None (unknown) per axis, and is
    None itself when the rank is unknown. ``dtype`` is None for an unknown element type.
    """

    name: str
    shape: tuple[Dim, ...] | None
    dtype: np.dtype | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def _dim(d: Any) -> Dim:
    # Some exporters write 0 or -1 for "dynamic"; treat non-positive values as unknown.
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d) if d > 0 else None
    return d if isinstance(d, str) and d else None


def _spec_from_value_info(vi: onnx.ValueInfoProto) -> InputSpec:
    if not vi.type.HasField("tensor_type"):
        raise CalibrationDataError(f"graph input {vi.name!r} is not a tensor; only tensor inputs can be calibrated")
    tt = vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
    shape: tuple[Dim, ...] | None = None
    if tt.HasField("shape"):
        shape = tuple(_dim(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return InputSpec(vi.name, shape, dtype)


def input_specs(model: onnx.ModelProto | Any) -> list[InputSpec]:
    """Specs of the graph inputs a feed must provide (initializers listed as inputs excluded).

    Accepts an ``onnx.ModelProto`` or a ``graph_ir.Graph`` (anything with ``inputs`` and
    ``tensor(name)``), so calibration can run on either representation.
    """
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        return [_spec_from_value_info(vi) for vi in model.graph.input if vi.name not in inits]
    if hasattr(model, "inputs") and hasattr(model, "tensor"):
        specs = []
        for name in model.inputs:
            tensor = model.tensor(name)
            if getattr(tensor, "initializer", None) is not None:
                continue
            elem = tensor.dtype
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None
            shape = None if tensor.shape is None else tuple(_dim(d) for d in tensor.shape)
            specs.append(InputSpec(name, shape, dtype))
        return specs
    raise TypeError(f"expected an onnx.ModelProto or graph_ir.Graph, got {type(model).__name__}")


def coerce_specs(specs: Sequence[InputSpec] | onnx.ModelProto | Any) -> list[InputSpec]:
    if isinstance(specs, Sequence) and all(isinstance(s, InputSpec) for s in specs):
        out = list(specs)
    else:
        out = input_specs(specs)
    if not out:
        raise CalibrationDataError("the model has no graph inputs to feed calibration data to")
    return out


# --------------------------------------------------------------------------- validation


def fmt_shape(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def shape_problem(spec: InputSpec, shape: tuple[int, ...], skip_batch: bool = False) -> str | None:
    """Why ``shape`` does not fit ``spec`` (None if it does)."""
    if spec.shape is None:
        return None
    if len(shape) != len(spec.shape):
        return f"rank {len(shape)} instead of {len(spec.shape)}"
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if skip_batch and axis == 0:
            continue
        if isinstance(want, int) and want != got:
            return f"axis {axis} is {got} but the model fixes it at {want}"
    return None


def shape_error(where: str, spec: InputSpec, shape: Sequence[int], problem: str) -> CalibrationDataError:
    return CalibrationDataError(
        f"{where}: input {spec.name!r} has shape {fmt_shape(tuple(shape))}, "
        f"expected {fmt_shape(spec.shape)} ({problem})"
    )


def check_dtype(where: str, spec: InputSpec, dtype: np.dtype) -> None:
    if spec.dtype is None or dtype == spec.dtype:
        return
    if dtype == _FLOAT64 and spec.dtype == _FLOAT32:
        return  # numpy's default float; cast silently
    raise CalibrationDataError(
        f"{where}: input {spec.name!r} has dtype {dtype}, expected {spec.dtype} "
        f"(only float64 -> float32 is converted automatically)"
    )


def validate_feed(feed: Any, specs: Sequence[InputSpec], where: str = "feed") -> Feed:
    """Check one feed against the model inputs and return it as arrays in input order.

    Raises ``CalibrationDataError`` naming the input, expected and actual shape, and
    ``where`` (the sample, file or line) on any mismatch.
    """
    if not isinstance(feed, Mapping):
        raise CalibrationDataError(f"{where}: expected a dict mapping input names to arrays, got {type(feed).__name__}")
    names = [s.name for s in specs]
    unknown = [k for k in feed if k not in names]
    if unknown:
        raise CalibrationDataError(f"{where}: unknown input name(s) {unknown}; the model's inputs are {names}")
    missing = [n for n in names if n not in feed]
    if missing:
        raise CalibrationDataError(f"{where}: missing input(s) {missing}; the model's inputs are {names}")
    out: Feed = {}
    for spec in specs:
        try:
            arr = np.asarray(feed[spec.name])
        except (ValueError, TypeError) as e:
            raise CalibrationDataError(f"{where}: input {spec.name!r} cannot be converted to an array ({e})") from e
        check_dtype(where, spec, arr.dtype)
        if spec.dtype is not None and arr.dtype != spec.dtype:
            arr = arr.astype(spec.dtype)
        problem = shape_problem(spec, arr.shape)
        if problem:
            raise shape_error(where, spec, arr.shape, problem)
        # Symbolic dims are not cross-checked: onnxruntime treats every dim_param as free (exporters
        # such as PaddlePaddle's write "?" for every unknown dim), and we validate no stricter than it.
        out[spec.name] = arr
    return out


def feed_samples(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """Samples in a feed: the leading dim of the first input that has one."""
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim >= 1:
            return int(arr.shape[0])
    return 1
