"""Calibration data sources, normalised to one stream of validated feeds.

Users bring data as Python iterables or callables, ``.npz`` archives, or QNN-style input
lists. Passes only ever see ``dict[str, np.ndarray]`` feeds that already match the model,
so a mismatch is reported once, naming the input, the shapes and the sample/file/line that
caused it, instead of surfacing as an opaque onnxruntime error mid-calibration.
Input lists, re-iterable iterables and callables are streamed: only the current feed is held in memory.

A one-shot iterator (a generator) can be read only once, yet several steps read the calibration
data (the statistics collection, the runtime parity check, the automatic fallback...). So the
``CalibrationData`` wrapping a one-shot source records it as it is first read (``Replay``, owned by
that object) and every later iteration replays the record, then continues reading the source where
the record ends: every reader sees all of the data, and the source is read exactly once. A run
normalises its source once (``quantize_model``; a pass context keeps the normalised data, see
``qpasses.data.feeds``), so every pass iterates the same object. Recorded feeds are copies (a
generator may refill one buffer); past ``REPLAY_MEMORY_BYTES`` they go to uncompressed ``.npz``
files in a temporary directory, removed with the record.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qpasses.core.errors import CalibrationDataError
from qpasses.data.input_lists import parse_input_list, raw_layout
from qpasses.data.input_specs import Feed, InputSpec, coerce_specs, feed_samples, validate_feed
from qpasses.data.npz_source import npz_feeds
from qpasses.data.replay import Replay

DEFAULT_BATCH_SIZE = 16


# --------------------------------------------------------------------------- the source


_BatchFactory = Callable[[], Iterator[tuple[str, Any]]]


class CalibrationData:
    """A re-iterable stream of validated feeds from any supported source.

    Build it with :meth:`from_source`. Iterating yields ``dict[str, np.ndarray]`` feeds in
    model-input order; ``len()`` is the number of feeds when known up front. ``batch_size`` is the
    batch size that split the source's arrays (None: its feeds do not depend on one).
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
        replay: Replay | None = None,
        batch_size: int | None = None,
    ) -> None:
        self._batches = batches
        self.specs: list[InputSpec] = list(specs)
        self.description = description
        self._num_batches = num_batches
        self._num_samples = num_samples
        self.requested_outputs: list[str] = list(requested_outputs)
        self._replay = replay  # the record of a one-shot source (it holds the source until exhausted)
        self.batch_size = batch_size

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
        afterwards (see the module docstring), so this object reads as all of its feeds every time."""
        specs = coerce_specs(specs)
        # A one-shot iterator is recorded; iter() is not called on a re-iterable until it is read.
        replay = Replay(source) if isinstance(source, Iterator) else None
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
            replay=replay,
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
        feeds = npz_feeds(Path(path), specs, batch_size)
        return cls(
            feeds.batches,
            specs,
            description=str(path),
            num_batches=feeds.num_feeds,
            num_samples=feeds.num_samples,
            batch_size=feeds.batch_size,
        )

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
    def replay_directory(self) -> Path | None:
        """Where a one-shot source's spilled feeds are stored (None: nothing spilled, or not a one-shot source)."""
        return None if self._replay is None else self._replay.directory

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
