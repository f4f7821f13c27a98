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
import tempfile
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qpasses.core.errors import CalibrationDataError

DEFAULT_BATCH_SIZE = 16
REPLAY_MEMORY_BYTES = 256 << 20
"""Bytes of a one-shot source's recorded feeds kept in memory; later feeds are spilled to disk."""

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


def _coerce_specs(specs: Sequence[InputSpec] | onnx.ModelProto | Any) -> list[InputSpec]:
    if isinstance(specs, Sequence) and all(isinstance(s, InputSpec) for s in specs):
        out = list(specs)
    else:
        out = input_specs(specs)
    if not out:
        raise CalibrationDataError("the model has no graph inputs to feed calibration data to")
    return out


# --------------------------------------------------------------------------- validation


def _fmt_shape(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _shape_problem(spec: InputSpec, shape: tuple[int, ...], skip_batch: bool = False) -> str | None:
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


def _shape_error(where: str, spec: InputSpec, shape: Sequence[int], problem: str) -> CalibrationDataError:
    return CalibrationDataError(
        f"{where}: input {spec.name!r} has shape {_fmt_shape(tuple(shape))}, "
        f"expected {_fmt_shape(spec.shape)} ({problem})"
    )


def _check_dtype(where: str, spec: InputSpec, dtype: np.dtype) -> None:
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
        _check_dtype(where, spec, arr.dtype)
        if spec.dtype is not None and arr.dtype != spec.dtype:
            arr = arr.astype(spec.dtype)
        problem = _shape_problem(spec, arr.shape)
        if problem:
            raise _shape_error(where, spec, arr.shape, problem)
        # Symbolic dims are not cross-checked: onnxruntime treats every dim_param as free (exporters
        # such as PaddlePaddle's write "?" for every unknown dim), and we validate no stricter than it.
        out[spec.name] = arr
    return out


def _feed_samples(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """Samples in a feed: the leading dim of the first input that has one."""
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim >= 1:
            return int(arr.shape[0])
    return 1


# --------------------------------------------------------------------------- input lists


@dataclass(frozen=True)
class InputListEntry:
    """One sample of an input list: the files for each input, and where it was declared."""

    line: int
    files: dict[str, Path]


@dataclass(frozen=True)
class InputList:
    """A parsed QNN-style input list."""

    path: Path
    entries: list[InputListEntry]
    requested_outputs: list[str]


def parse_input_list(path: str | os.PathLike[str], input_names: Sequence[str]) -> InputList:
    """Parse an input list without reading any data file.

    Lines are either one path (single-input models) or ``name:=path`` pairs; relative
    paths resolve against the list's directory; ``#``/``%`` lines name requested outputs;
    blank lines are ignored.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationDataError(f"cannot read input list {path}: {e}") from e
    base = path.parent
    entries: list[InputListEntry] = []
    outputs: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path} line {lineno}"
        if line[0] in "#%":
            for tok in line[1:].split():
                name = tok.lstrip("#%")
                if name and name not in outputs:
                    outputs.append(name)
            continue
        tokens = line.split()
        pairs = [t for t in tokens if ":=" in t]
        files: dict[str, str] = {}
        if pairs and len(pairs) != len(tokens):
            raise CalibrationDataError(f"{where}: mixes 'name:=path' pairs and bare paths: {line!r}")
        if pairs:
            for tok in tokens:
                name, _, file = tok.partition(":=")
                if not name or not file:
                    raise CalibrationDataError(f"{where}: malformed 'name:=path' pair {tok!r}")
                if name in files:
                    raise CalibrationDataError(f"{where}: input {name!r} given twice")
                files[name] = file
        elif len(input_names) == 1 and len(tokens) == 1:
            files[input_names[0]] = tokens[0]
        elif len(input_names) == 1:
            raise CalibrationDataError(
                f"{where}: expected one path for the model's single input, got {len(tokens)} "
                f"tokens (paths with spaces are not supported)"
            )
        else:
            raise CalibrationDataError(
                f"{where}: the model has {len(input_names)} inputs {list(input_names)}; use 'name:=path' pairs"
            )
        unknown = [n for n in files if n not in input_names]
        if unknown:
            raise CalibrationDataError(
                f"{where}: unknown input name(s) {unknown}; the model's inputs are {list(input_names)}"
            )
        missing = [n for n in input_names if n not in files]
        if missing:
            raise CalibrationDataError(f"{where}: missing input(s) {missing}")
        resolved = {}
        for name in input_names:
            p = Path(files[name]).expanduser()
            resolved[name] = p if p.is_absolute() else base / p
        entries.append(InputListEntry(lineno, resolved))
    return InputList(path, entries, outputs)


def _raw_shape(spec: InputSpec, where: str) -> tuple[int, ...]:
    """The concrete shape raw files are read as: the input's shape with batch 1."""
    if spec.shape is None:
        raise CalibrationDataError(f"{where}: input {spec.name!r} has unknown rank; raw input files need a fixed shape")
    shape = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            shape.append(d)
        elif axis == 0:
            shape.append(1)
        else:
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} has shape {_fmt_shape(spec.shape)}; raw input "
                f"files need every non-batch dim fixed (axis {axis} is {d or 'unknown'})"
            )
    return tuple(shape)


def _raw_dtypes(spec: InputSpec) -> list[np.dtype]:
    """Dtypes a raw file may hold: float32 (QNN's default) and, if different, the native one."""
    if spec.dtype is None or spec.dtype == _FLOAT32:
        return [_FLOAT32]
    if np.issubdtype(spec.dtype, np.floating):
        return [_FLOAT32, spec.dtype]
    return [spec.dtype]


def _raw_layout(spec: InputSpec, file: Path, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Check a raw file exists and has exactly the right size; return (shape, file dtype)."""
    shape = _raw_shape(spec, where)
    count = math.prod(shape)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise CalibrationDataError(f"{where}: input {spec.name!r}: file not found: {file}") from None
    except OSError as e:
        raise CalibrationDataError(f"{where}: input {spec.name!r}: cannot read {file}: {e}") from e
    if not file.is_file():
        raise CalibrationDataError(f"{where}: input {spec.name!r}: not a regular file: {file}")
    options = _raw_dtypes(spec)
    for dtype in options:
        if size == count * dtype.itemsize:
            return shape, dtype
    expected = " or ".join(f"{count * d.itemsize} ({d})" for d in options)
    raise CalibrationDataError(
        f"{where}: input {spec.name!r}: file {file} has {size} bytes, expected {expected} for shape {_fmt_shape(shape)}"
    )


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
    _check_dtype(where, spec, dtype)
    if dtype.hasobject:
        raise CalibrationDataError(f"{where}: object arrays are not supported")
    rank = spec.rank
    if rank is None:  # unknown rank: assume the array is the input itself, split by batch
        rank = len(shape)
    if rank == 0 and len(shape) == 0:
        return _NpzPlan(per_row=False, step=1, feeds=1, samples=1)
    if len(shape) == rank + 1:
        problem = _shape_problem(spec, shape[1:])
        if problem:
            raise _shape_error(f"{where} (one feed per row)", spec, shape[1:], problem)
        per_feed = shape[1] if rank >= 1 else 1
        return _NpzPlan(per_row=True, step=1, feeds=shape[0], samples=shape[0] * per_feed)
    if len(shape) == rank:
        problem = _shape_problem(spec, shape, skip_batch=True)
        if problem:
            raise _shape_error(where, spec, shape, problem)
        batch = spec.shape[0] if spec.shape else None
        step = batch if isinstance(batch, int) else batch_size
        if shape[0] % step and isinstance(batch, int):
            raise CalibrationDataError(
                f"{where}: {shape[0]} rows cannot be split into batches of {step} "
                f"(the model fixes the batch dim at {step})"
            )
        return _NpzPlan(per_row=False, step=step, feeds=-(-shape[0] // step), samples=shape[0], rows=shape[0])
    raise CalibrationDataError(
        f"{where}: has shape {_fmt_shape(shape)}; expected the input's shape "
        f"{_fmt_shape(spec.shape)} (split along the batch axis) or one more leading axis "
        f"(one feed per row)"
    )


# --------------------------------------------------------------------------- the source


_BatchFactory = Callable[[], Iterator[tuple[str, Any]]]


def _copied(raw: Any) -> Any:
    """A feed's arrays copied (the source may reuse its buffers); anything odd is kept for validation to report."""
    if not isinstance(raw, Mapping):
        return raw
    try:
        return {k: np.array(v) for k, v in raw.items()}
    except (ValueError, TypeError):
        return raw


def _nbytes(feed: Any) -> int:
    if not isinstance(feed, Mapping):
        return 0
    return sum(v.nbytes for v in feed.values() if isinstance(v, np.ndarray))


def _spillable(feed: Any) -> bool:
    return isinstance(feed, Mapping) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) and not v.dtype.hasobject for k, v in feed.items()
    )


class _Replay:
    """A one-shot iterator of feeds, recorded as it is read so that it can be read again any number of times.

    Iterations may interleave: each replays the record up to where it is, then pulls the next feed
    from the source (recording it). Only a weak reference to the source is kept, so a cache keyed
    by the source does not keep it alive; ``CalibrationData`` holds the source while it needs it.
    """

    def __init__(self, source: Iterator[Any]) -> None:
        self._source: weakref.ref[Iterator[Any]] | Iterator[Any] | None
        try:
            self._source = weakref.ref(source)
        except TypeError:
            self._source = source
        self._items: list[Any] = []  # feeds in memory, or the Path of a spilled one
        self._in_memory = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.complete = False

    @property
    def directory(self) -> Path | None:
        return None if self._tmp is None else Path(self._tmp.name)

    def __len__(self) -> int:
        return len(self._items)

    def _pull(self) -> bool:
        """Read and record the source's next feed; False once it is exhausted."""
        source = self._source() if isinstance(self._source, weakref.ref) else self._source
        if source is None:  # cannot happen while a CalibrationData holds it; be explicit if it does
            raise CalibrationDataError("the calibration data iterator was garbage-collected before it was read")
        try:
            raw = next(source)
        except StopIteration:
            self.complete = True
            self._source = None  # drop the (weak) reference; nothing more to read
            return False
        feed = _copied(raw)
        size = _nbytes(feed)
        if self._in_memory + size > REPLAY_MEMORY_BYTES and _spillable(feed):
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="qpasses-calib-replay-")
                weakref.finalize(self, self._tmp.cleanup)
            path = Path(self._tmp.name) / f"feed_{len(self._items):06d}.npz"
            np.savez(path, **feed)
            self._items.append(path)
        else:
            self._in_memory += size
            self._items.append(feed)
        return True

    def _item(self, i: int) -> Any:
        item = self._items[i]
        if isinstance(item, Path):
            with np.load(item, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        return item

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while i < len(self._items) or (not self.complete and self._pull()):
            yield self._item(i)
            i += 1


# One record per one-shot source object, shared by every CalibrationData wrapping it. Weak keys, so
# a finished generator (and its record, spilled files included) goes away with the last reference.
_REPLAYS: weakref.WeakKeyDictionary[Any, _Replay] = weakref.WeakKeyDictionary()
# Iterators that take no weak references (list_iterator, map...): the few most recent, held strongly.
_STRONG_REPLAYS: dict[int, tuple[Any, _Replay]] = {}
_STRONG_LIMIT = 4


def _replay_for(source: Iterator[Any]) -> _Replay:
    try:
        replay = _REPLAYS.get(source)
        if replay is None:
            replay = _REPLAYS[source] = _Replay(source)
        return replay
    except TypeError:  # not weak-referenceable (or unhashable)
        pass
    hit = _STRONG_REPLAYS.get(id(source))
    if hit is not None and hit[0] is source:
        return hit[1]
    replay = _Replay(source)
    _STRONG_REPLAYS[id(source)] = (source, replay)
    while len(_STRONG_REPLAYS) > _STRONG_LIMIT:
        del _STRONG_REPLAYS[next(iter(_STRONG_REPLAYS))]
    return replay


def replay_directory(source: Any) -> Path | None:
    """Where a one-shot source's spilled feeds are stored (None: nothing spilled, or not a one-shot source)."""
    try:
        replay = _REPLAYS.get(source)
    except TypeError:
        hit = _STRONG_REPLAYS.get(id(source))
        replay = hit[1] if hit is not None and hit[0] is source else None
    return None if replay is None else replay.directory


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
        specs = _coerce_specs(specs)
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
        specs = _coerce_specs(specs)
        it = iter(source)
        one_shot = it is source
        replay = _replay_for(it) if one_shot else None
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
        specs = _coerce_specs(specs)
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
        specs = _coerce_specs(specs)
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
        specs = _coerce_specs(specs)
        path = Path(path)
        parsed = parse_input_list(path, [s.name for s in specs])
        if not parsed.entries:
            raise CalibrationDataError(f"input list {path} contains no samples")
        by_name = {s.name: s for s in specs}
        layouts: list[dict[str, tuple[tuple[int, ...], np.dtype]]] = []
        for entry in parsed.entries:
            where = f"input list {path} line {entry.line}"
            layouts.append({name: _raw_layout(by_name[name], file, where) for name, file in entry.files.items()})

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
            samples += _feed_samples(feed, self.specs)
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
