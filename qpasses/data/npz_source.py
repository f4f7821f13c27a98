"""Calibration feeds from an ``.npz`` archive: shapes and dtypes checked up front from the .npy headers,
then the arrays split into feeds (one per row, or batches along axis 0)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qpasses.core.errors import CalibrationDataError
from qpasses.data.input_specs import InputSpec, check_dtype, fmt_shape, shape_error, shape_problem


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
    by_batch_size: bool = False  # split in batches of ``batch_size`` (not the model's fixed batch dim)


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
        feeds = -(-shape[0] // step)
        return _NpzPlan(False, step, feeds, shape[0], rows=shape[0], by_batch_size=not isinstance(batch, int))
    raise CalibrationDataError(
        f"{where}: has shape {fmt_shape(shape)}; expected the input's shape "
        f"{fmt_shape(spec.shape)} (split along the batch axis) or one more leading axis "
        f"(one feed per row)"
    )


@dataclass(frozen=True)
class NpzFeeds:
    """An ``.npz`` read as feeds: ``batches()`` yields (where, feed); ``batch_size`` is the one that split
    its arrays (None: the feeds do not depend on it)."""

    batches: Callable[[], Iterator[tuple[str, Any]]]
    num_feeds: int
    num_samples: int
    batch_size: int | None


def npz_feeds(path: Path, specs: Sequence[InputSpec], batch_size: int) -> NpzFeeds:
    """Check the archive against ``specs`` (headers only) and plan its feeds; see ``CalibrationData.from_npz``."""
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
            f"{path}: inputs give different numbers of feeds {counts}; every input array must cover the same samples"
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
    split = batch_size if any(p.by_batch_size for p in plans.values()) else None
    return NpzFeeds(batches, num_feeds, first.samples, split)
