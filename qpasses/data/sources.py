"""Calibration data sources, normalised to one stream of validated feeds.

Users bring data as Python iterables or callables, ``.npz`` archives, or QNN-style input
lists. Passes only ever see ``dict[str, np.ndarray]`` feeds that already match the model,
so a mismatch is reported once, naming the input, the shapes and the sample/file/line that
caused it, instead of surfacing as an opaque onnxruntime error mid-calibration.
Input lists, re-iterable iterables and callables are streamed: only the current feed is held in memory.

A one-shot iterator (a generator) can be read only once, yet several passes read the calibration
data (seq-mse, calibrate, bias-correction, the automatic fallback...), each wrapping the same source
again. So a one-shot source is recorded as it is first read (``_Replay``) and every later wrapping
of the same iterator object replays the record, then continues reading the source where the
record ends: every pass sees all of the data, and the source is read exactly once. Recorded feeds
are copies (a generator may refill one buffer); past ``REPLAY_MEMORY_BYTES`` they go to
uncompressed ``.npz`` files in a temporary directory, removed when the iterator is garbage.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qpasses.core.errors import CalibrationDataError
from qpasses.data.input_lists import parse_input_list, raw_layout
from qpasses.data.input_specs import (
    Feed,
    InputSpec,
    check_dtype,
    coerce_specs,
    feed_samples,
    fmt_shape,
    shape_error,
    shape_problem,
    validate_feed,
)
from qpasses.data.replay import replay_for

DEFAULT_BATCH_SIZE = 16


# --------------------------------------------------------------------------- npz


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype] | None]:
    """Shape and dtype of every array in an .npz, read from the .npy headers only.

    None for a header version we do not parse; those arrays are checked when loaded.
    """
    fmt = np.lib.format
    out: dict[str, tuple[tuple[int, ...], np.dtype] | None] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = fmt.read_array_header_2_0(f)
                    else:
                        out[info.filename[:-4]] = None
                        continue
                out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CalibrationDataError(f"{path}: not a readable .npz archive ({e})") from e
    return out


@dataclass(frozen=True)
class _NpzPlan:
    """How one npz array becomes feeds: one per row, or split into batches of ``step``."""

    per_row: bool
    step: int
    feeds: int
    samples: int
    rows: int | None = None  # rows along axis 0 when split, to check inputs agree


def _npz_plan(path: Path, spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype, batch_size: int) -> _NpzPlan:
    where = f"{path} array {spec.name!r}"
    check_dtype(where, spec, dtype)
    if dtype.hasobject:
        raise CalibrationDataError(f"{where}: object arrays are not supported")
    rank = spec.rank
    if rank is None:  # unknown rank: assume the array is the input itself, split by batch
        rank = len(shape)
    if rank == 0 and len(shape) == 0:
        return _NpzPlan(per_row=False, step=1, feeds=1, samples=1)
    if len(shape) == rank + 1:
        problem = shape_problem(spec, shape[1:])
        if problem:
            raise shape_error(f"{where} (one feed per row)", spec, shape[1:], problem)
        per_feed = shape[1] if rank >= 1 else 1
        return _NpzPlan(per_row=True, step=1, feeds=shape[0], samples=shape[0] * per_feed)
    if len(shape) == rank:
        problem = shape_problem(spec, shape, skip_batch=True)
        if problem:
            raise shape_error(where, spec, shape, problem)
        batch = spec.shape[0] if spec.shape else None
        step = batch if isinstance(batch, int) else batch_size
        if shape[0] % step and isinstance(batch, int):
            raise CalibrationDataError(
                f"{where}: {shape[0]} rows cannot be split into batches of {step} "
                f"(the model fixes the batch dim at {step})"
            )
        return _NpzPlan(per_row=False, step=step, feeds=-(-shape[0] // step), samples=shape[0], rows=shape[0])
    raise CalibrationDataError(
        f"{where}: has shape {fmt_shape(shape)}; expected the input's shape "
        f"{fmt_shape(spec.shape)} (split along the batch axis) or one more leading axis "
        f"(one feed per row)"
    )


# --------------------------------------------------------------------------- the source


_BatchFactory = Callable[[], Iterator[tuple[str, Any]]]


class CalibrationData:
    """A re-iterable stream of validated feeds from any supported source.

    Build it with :meth:`from_source`. Iterating yields ``dict[str, np.ndarray]`` feeds in
    model-input order; ``len()`` is the number of feeds when known up front.
    """

    def __init__(
        self,
        batches: _BatchFactory,
        specs: Sequence[InputSpec],
        *,
        description: str,
        num_batches: int | None = None,
        num_samples: int | None = None,
        requested_outputs: Sequence[str] = (),
        keep_alive: Any = None,
    ) -> None:
        self._batches = batches
        self.specs: list[InputSpec] = list(specs)
        self.description = description
        self._num_batches = num_batches
        self._num_samples = num_samples
        self.requested_outputs: list[str] = list(requested_outputs)
        self._keep_alive = keep_alive  # a one-shot source: its replay holds it only weakly

    # --- constructors -------------------------------------------------------------------

    @classmethod
    def from_source(
        cls,
        source: CalibrationSource,
        specs: Sequence[InputSpec] | onnx.ModelProto | Any,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> CalibrationData:
        """Dispatch on the source: path to ``.npz`` or input list, iterable, or callable.

        ``specs`` may be input specs, a ModelProto or a graph_ir Graph. ``batch_size`` only
        applies when an ``.npz`` array must be split along a dynamic batch axis. A single
        dict is taken as one feed.
        """
        if isinstance(source, CalibrationData):
            return source
        specs = coerce_specs(specs)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise CalibrationDataError(f"calibration data file not found: {path}")
            if not path.is_file():
                raise CalibrationDataError(f"calibration data path is not a file: {path}")
            if path.suffix.lower() == ".npz":
                return cls.from_npz(path, specs, batch_size=batch_size)
            return cls.from_input_list(path, specs)
        if isinstance(source, Mapping):
            return cls.from_iterable([source], specs)
        if isinstance(source, (np.ndarray, bytes, bytearray)):
            raise CalibrationDataError(
                f"calibration data of type {type(source).__name__} is ambiguous; pass feeds "
                f"as dicts {{input_name: array}}, an .npz path or an input-list path"
            )
        if callable(source):
            return cls.from_callable(source, specs)
        if isinstance(source, Iterable):
            return cls.from_iterable(source, specs)
        raise CalibrationDataError(
            f"unsupported calibration data source of type {type(source).__name__}; expected an "
            f"iterable or callable of feed dicts, an .npz path or an input-list path"
        )

    @classmethod
    def from_iterable(
        cls, source: Iterable[Mapping[str, Any]], specs: Sequence[InputSpec] | onnx.ModelProto | Any
    ) -> CalibrationData:
        """Feeds from an iterable. A one-shot iterator/generator is recorded on first read and replayed
        afterwards (see the module docstring), so it reads as all of its feeds every time."""
        specs = coerce_specs(specs)
        it = iter(source)
        one_shot = it is source
        replay = replay_for(it) if one_shot else None
        feeds: Iterable[Any] = source if replay is None else replay

        def batches() -> Iterator[tuple[str, Any]]:
            for i, feed in enumerate(feeds):
                yield f"calibration feed {i}", feed

        if replay is not None:
            size = len(replay) if replay.complete else None
        else:
            size = len(source) if isinstance(source, Sized) else None
        return cls(
            batches,
            specs,
            description=f"{type(source).__name__} of feeds",
            num_batches=size,
            keep_alive=source if one_shot else None,
        )

    @classmethod
    def from_callable(
        cls,
        factory: Callable[[], Iterable[Mapping[str, Any]]],
        specs: Sequence[InputSpec] | onnx.ModelProto | Any,
    ) -> CalibrationData:
        """Feeds from a callable, called afresh on every iteration so passes can re-read."""
        specs = coerce_specs(specs)
        label = getattr(factory, "__name__", type(factory).__name__)

        def batches() -> Iterator[tuple[str, Any]]:
            result = factory()
            if isinstance(result, Mapping) or not isinstance(result, Iterable):
                raise CalibrationDataError(
                    f"calibration callable {label!r} returned {type(result).__name__}; "
                    f"it must return an iterable of feed dicts"
                )
            for i, feed in enumerate(result):
                yield f"calibration feed {i} (from {label}())", feed

        return cls(batches, specs, description=f"callable {label}")

    @classmethod
    def from_npz(
        cls,
        path: str | os.PathLike[str],
        specs: Sequence[InputSpec] | onnx.ModelProto | Any,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> CalibrationData:
        """Feeds from an ``.npz`` keyed by input name; other keys (e.g. labels) are ignored.

        An array with one more axis than its input holds one feed per row. An array of the
        input's own rank is split along axis 0: in batches of the model's fixed batch dim
        if it has one, else of ``batch_size`` (the last batch may be smaller).
        Shapes and dtypes are checked up front from the .npy headers.
        """
        specs = coerce_specs(specs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CalibrationDataError(f"batch_size must be a positive integer, got {batch_size!r}")
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"calibration data file not found: {path}")
        headers = _npz_headers(path)
        missing = [s.name for s in specs if s.name not in headers]
        if missing:
            raise CalibrationDataError(f"{path}: no array for input(s) {missing}; arrays present: {sorted(headers)}")
        unparsed = [s.name for s in specs if headers[s.name] is None]
        if unparsed:  # rare .npy format versions: fall back to loading those arrays
            with np.load(path, allow_pickle=False) as npz:
                for name in unparsed:
                    arr = npz[name]
                    headers[name] = (arr.shape, arr.dtype)
        known = {name: header for name, header in headers.items() if header is not None}  # all, now
        plans: dict[str, _NpzPlan] = {}
        for spec in specs:
            shape, dtype = known[spec.name]
            plans[spec.name] = _npz_plan(path, spec, shape, dtype, batch_size)
        counts = {name: p.feeds for name, p in plans.items()}
        if len(set(counts.values())) > 1:
            raise CalibrationDataError(
                f"{path}: inputs give different numbers of feeds {counts}; every input array "
                f"must cover the same samples"
            )
        split_rows = {name: p.rows for name, p in plans.items() if p.rows is not None}
        if len(set(split_rows.values())) > 1:
            raise CalibrationDataError(f"{path}: input arrays have different numbers of rows {split_rows}")
        num_feeds = next(iter(counts.values()))
        if num_feeds == 0:
            raise CalibrationDataError(f"{path}: contains no calibration samples")
        names = [s.name for s in specs]

        def batches() -> Iterator[tuple[str, Any]]:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in names}
                for i in range(num_feeds):
                    feed = {}
                    for name in names:
                        plan, arr = plans[name], arrays[name]
                        if arr.ndim == 0:
                            feed[name] = arr
                        elif plan.per_row:
                            feed[name] = arr[i]
                        else:
                            feed[name] = arr[i * plan.step : (i + 1) * plan.step]
                    yield f"{path} feed {i}", feed

        first = plans[specs[0].name]
        return cls(batches, specs, description=str(path), num_batches=num_feeds, num_samples=first.samples)

    @classmethod
    def from_input_list(
        cls,
        path: str | os.PathLike[str],
        specs: Sequence[InputSpec] | onnx.ModelProto | Any,
    ) -> CalibrationData:
        """Feeds of batch 1 from a QNN-style input list of raw files.

        Every file's existence and exact size is checked up front (stat only), so a bad
        line fails before calibration starts; data is read one line at a time.
        """
        specs = coerce_specs(specs)
        path = Path(path)
        parsed = parse_input_list(path, [s.name for s in specs])
        if not parsed.entries:
            raise CalibrationDataError(f"input list {path} contains no samples")
        by_name = {s.name: s for s in specs}
        layouts: list[dict[str, tuple[tuple[int, ...], np.dtype]]] = []
        for entry in parsed.entries:
            where = f"input list {path} line {entry.line}"
            layouts.append({name: raw_layout(by_name[name], file, where) for name, file in entry.files.items()})

        def batches() -> Iterator[tuple[str, Any]]:
            for entry, layout in zip(parsed.entries, layouts, strict=True):
                where = f"input list {path} line {entry.line}"
                feed = {}
                for name, file in entry.files.items():
                    shape, dtype = layout[name]
                    try:
                        data = np.fromfile(file, dtype=dtype)
                    except OSError as e:
                        raise CalibrationDataError(f"{where}: cannot read {file}: {e}") from e
                    if data.size != math.prod(shape):
                        raise CalibrationDataError(
                            f"{where}: file {file} changed size since it was checked "
                            f"({data.size} {dtype} values, expected {math.prod(shape)})"
                        )
                    spec_dtype = by_name[name].dtype
                    if spec_dtype is not None and dtype != spec_dtype:
                        data = data.astype(spec_dtype)  # float32 raw file for a fp16/fp64 input
                    feed[name] = data.reshape(shape)
                yield where, feed

        n = len(parsed.entries)
        return cls(
            batches,
            specs,
            description=f"input list {path}",
            num_batches=n,
            num_samples=n,
            requested_outputs=parsed.requested_outputs,
        )

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Feed]:
        return self._iterate()

    def _iterate(self) -> Iterator[Feed]:
        count = samples = 0
        for where, raw in self._batches():
            feed = validate_feed(raw, self.specs, where)
            count += 1
            samples += feed_samples(feed, self.specs)
            yield feed
        if count == 0:
            raise CalibrationDataError(f"the {self.description} yielded no calibration feeds")
        # A full pass tells us sizes the source could not report up front.
        self._num_batches = count
        self._num_samples = samples

    @property
    def num_batches(self) -> int | None:
        """Number of feeds, or None until known (callables/iterators: after one full pass)."""
        return self._num_batches

    @property
    def num_samples(self) -> int | None:
        """Total samples across feeds (sum of batch dims), or None until known."""
        return self._num_samples

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError(f"the number of feeds of the {self.description} is not known yet")
        return self._num_batches

    def __repr__(self) -> str:
        return f"CalibrationData({self.description}, batches={self._num_batches}, samples={self._num_samples})"


CalibrationSource = (
    str | os.PathLike | Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]] | CalibrationData
)
"""Everything :meth:`CalibrationData.from_source` accepts."""
