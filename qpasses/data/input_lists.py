"""QNN-style input lists: one line per sample naming raw files per input, read with the layout the model
expects."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qpasses.core.errors import CalibrationDataError
from qpasses.data.input_specs import InputSpec, fmt_shape

_FLOAT32 = np.dtype(np.float32)


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
                f"{where}: input {spec.name!r} has shape {fmt_shape(spec.shape)}; raw input "
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


def raw_layout(spec: InputSpec, file: Path, where: str) -> tuple[tuple[int, ...], np.dtype]:
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
        f"{where}: input {spec.name!r}: file {file} has {size} bytes, expected {expected} for shape {fmt_shape(shape)}"
    )
