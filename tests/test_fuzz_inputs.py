"""Property: user files and data give a clear ``QPassesError`` or a correct load, never a traceback.

- encodings/overrides files (``encodings_io.load``): random AIMET 0.6.1 and 1.0.0 documents, valid or
  corrupted (wrong types, missing keys, huge/NaN numbers, deep nesting, truncated text, invalid
  UTF-8, unknown tensor names), with and without the model's tensor specs. A document that loads
  must give finite, positive scales and integer offsets on the bitwidth's grid, name only known
  tensors, and survive ``save`` -> ``load`` unchanged in both layouts;
- calibration data (``CalibrationData.from_source`` and iterating it): lists, generators, callables,
  single dicts, raw objects, .npz archives and QNN input lists holding wrong shapes, dtypes, NaN,
  empty arrays, objects, missing/extra inputs. Every feed that comes out matches the model's inputs
  (names, dtype, rank, fixed dims).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fuzz_graphs import (
    STATS,
    CalibrationCase,
    EncodingsCase,
    calibration_cases,
    encodings_documents,
    fuzz_settings,
    fuzz_stats,  # noqa: F401  (autouse: cases and time per property)
)
from hypothesis import given

from qpasses.core.errors import QPassesError
from qpasses.data.sources import CalibrationData
from qpasses.quant import encodings_io
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import PrecisionOverride

# ---------------------------------------------------------------------------------------------------
# encodings files


def _write(tmp: Path, case: EncodingsCase) -> Path:
    path = tmp / "encodings.json"
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text, encoding="utf-8")
    return path


def _same_grid(x: object, y: object) -> bool:
    """Equal, taking a one-channel per-channel encoding as the per-tensor one (0.6.1 cannot tell them apart)."""

    def canonical(e: object) -> object:
        if isinstance(e, Encoding) and e.axis is not None and len(e.scale) == 1:
            return Encoding(e.bitwidth, e.scale, e.offset, e.symmetric, None)
        return e

    return canonical(x) == canonical(y)


def below_min_range(e: object) -> bool:
    """A grid spanning less than the spec's minimum range 1e-4: a 1.0.0 file may state one, but 0.6.1
    (min/max, recomputed by the spec's rule on import) cannot carry it, so only the 1.0.0 layout round-trips."""
    return isinstance(e, Encoding) and any(s * (2**e.bitwidth - 1) < 1e-4 for s in e.scale)


def carried_by_0_6_1(name: str, e: object, section: str, case: EncodingsCase) -> bool:
    """Whether 0.6.1 round-trips ``e``: yes above the minimum range, and below it for a symmetric bias grid
    (a derived bias is s_in * s_w), which the importer takes as stated (Q3)."""
    if not below_min_range(e):
        return True
    assert isinstance(e, Encoding)
    if case.tensors is not None:
        bias = case.tensors[name].role == "bias"
    else:  # without the model, a 32-bit parameter can only be a bias
        bias = section == "params" and e.bitwidth == 32
    return bias and e.symmetric


def check_loaded(loaded: encodings_io.EncodingsFile, case: EncodingsCase, tmp: Path) -> None:
    for section in (loaded.activations, loaded.params):
        for name, entry in section.items():
            assert case.tensors is None or name in case.tensors, f"unknown tensor {name!r} accepted"
            if isinstance(entry, PrecisionOverride):
                assert entry.dtype in ("int", "float") and isinstance(entry.bitwidth, int)
                continue
            assert isinstance(entry, Encoding), entry
            assert all(math.isfinite(s) and s > 0 for s in entry.scale), f"{name}: scales {entry.scale}"
            levels = 2**entry.bitwidth - 1
            assert all(isinstance(o, int) for o in entry.offset), f"{name}: offsets {entry.offset}"
            assert all(-levels <= o <= 0 for o in entry.offset) or entry.symmetric, (
                f"{name}: offsets {entry.offset} outside the {entry.bitwidth}-bit grid"
            )
    tiny = not all(
        carried_by_0_6_1(name, e, section, case)
        for section in ("activations", "params")
        for name, e in getattr(loaded, section).items()
    )
    if (
        any(below_min_range(e) for section in (loaded.activations, loaded.params) for e in section.values())
        and not tiny
    ):
        STATS.note("bias grid below the minimum range: 0.6.1 round trip compared")
    if tiny:
        STATS.note("grid below the minimum range: 0.6.1 round trip not compared")
    for version in ("1.0.0",) if tiny else ("0.6.1", "1.0.0"):
        path = tmp / f"again-{version}.json"
        encodings_io.save(path, loaded, version)
        again = encodings_io.load(path, tensors=case.tensors)
        for attr in ("activations", "params"):
            a, b = getattr(loaded, attr), getattr(again, attr)
            assert set(a) == set(b), f"{version}: save -> load changed the names"
            for name in a:
                assert _same_grid(a[name], b[name]), f"{version}: save -> load changed {name}: {a[name]} -> {b[name]}"


@fuzz_settings(800)
@given(case=encodings_documents())
def test_encodings_files_load_or_fail_clearly(case: EncodingsCase, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("enc")
    path = _write(tmp, case)
    try:
        loaded = encodings_io.load(path, tensors=case.tensors)
    except QPassesError as exc:
        assert str(exc), "an empty error message"
        STATS.case(f"{'corrupted' if case.corrupted else 'generated'}: {type(exc).__name__}")
        return
    STATS.case(f"{'corrupted' if case.corrupted else 'generated'}: loaded")
    check_loaded(loaded, case, tmp)


# ---------------------------------------------------------------------------------------------------
# calibration data


def check_feed(feed: object, case: CalibrationCase) -> None:
    assert isinstance(feed, dict), type(feed)
    assert list(feed) == [name for name, _, _ in case.specs.inputs], f"feed names {list(feed)}"
    for name, shape, dtype in case.specs.inputs:
        arr = feed[name]
        assert isinstance(arr, np.ndarray), f"{name}: {type(arr).__name__}"
        assert arr.dtype == np.dtype(dtype), f"{name}: dtype {arr.dtype}, expected {dtype}"
        assert arr.ndim == len(shape), f"{name}: rank {arr.ndim}, expected {len(shape)}"
        for axis, (want, got) in enumerate(zip(shape, arr.shape, strict=True)):
            assert not isinstance(want, int) or want == got, f"{name}: axis {axis} is {got}, expected {want}"


@fuzz_settings(800)
@given(case=calibration_cases())
def test_calibration_data_loads_or_fails_clearly(
    case: CalibrationCase, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("calib")
    model = case.specs.model()
    try:
        data = CalibrationData.from_source(case.source(tmp), model, batch_size=2)
        feeds = list(data)
    except QPassesError as exc:
        assert str(exc), "an empty error message"
        STATS.case(f"{case.kind}: {type(exc).__name__}")
        return
    STATS.case(f"{case.kind}: loaded")
    assert feeds, "no feeds and no error"
    for feed in feeds:
        check_feed(feed, case)


# ---------------------------------------------------------------------------------------------------
# minimal reproducers of the bugs this fuzzing found (B1-B5, fixed): each was a traceback instead of a
# one-line EncodingError naming the file


EMPTY_DOC = '{"activation_encodings": {}, "param_encodings": {}}'


@pytest.mark.parametrize(
    "raw",
    [
        EMPTY_DOC.encode("utf-16"),
        EMPTY_DOC.encode("utf-16-be"),
        EMPTY_DOC.replace("{}", '{"\xe9": []}', 1).encode("latin-1"),
    ],
    ids=["utf16-bom", "utf16-no-bom", "latin1"],
)
def test_b1_non_utf8_encodings_file_is_an_encoding_error(tmp_path: Path, raw: bytes) -> None:
    """B1: a file that is not UTF-8 (UTF-16 as Windows Notepad saves 'Unicode') escaped as UnicodeDecodeError."""
    path = tmp_path / "enc.json"
    path.write_bytes(raw)
    with pytest.raises(QPassesError, match=r"enc\.json: .*UTF") as info:
        encodings_io.load(path)
    assert "\n" not in str(info.value)


def test_utf8_bom_encodings_file_loads(tmp_path: Path) -> None:
    """A UTF-8 byte order mark (what some Windows editors write) is not an error."""
    path = tmp_path / "enc.json"
    path.write_bytes(EMPTY_DOC.encode("utf-8-sig"))
    assert encodings_io.load(path) == encodings_io.EncodingsFile()


def test_b2_deeply_nested_encodings_file_is_an_encoding_error(tmp_path: Path) -> None:
    """B2: 100000-deep JSON escaped as RecursionError from json.loads."""
    path = tmp_path / "enc.json"
    path.write_text('{"activation_encodings": ' + "[" * 100_000 + "]" * 100_000 + ', "param_encodings": {}}')
    with pytest.raises(QPassesError):
        encodings_io.load(path)


@pytest.mark.parametrize("field", ["bitwidth", "min", "scale"])
def test_b3_huge_integer_in_encodings_file_is_an_encoding_error(tmp_path: Path, field: str) -> None:
    """B3: JSON integers beyond float range escaped as OverflowError from float()/math.isfinite()."""
    huge = 10**400
    if field == "scale":
        doc = {
            "activation_encodings": [{"name": "a", "bw": 8, "dtype": "INT", "scale": [huge], "offset": [0]}],
            "param_encodings": [],
        }
    else:
        entry = {"bitwidth": 8, "min": -1.0, "max": 1.0, field: -huge if field == "min" else huge}
        doc = {"activation_encodings": {"a": [entry]}, "param_encodings": {}}
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(QPassesError):
        encodings_io.load(path)


def test_loaded_encoding_saves_as_loadable_0_6_1(tmp_path: Path) -> None:
    """Found by this fuzzing, fixed meanwhile (bb1232f): a 1.0.0 grid overflowing float (scale 1e308) loaded, and
    saving it as 0.6.1 wrote "max": Infinity, which load() rejected."""
    doc = {
        "activation_encodings": [{"name": "a", "bw": 8, "dtype": "INT", "scale": [1e308], "offset": [-128]}],
        "param_encodings": [],
    }
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(doc))
    try:
        loaded = encodings_io.load(path)
    except QPassesError:
        return  # rejecting the overflowing grid up front is a fix too
    encodings_io.save(tmp_path / "out.json", loaded, "0.6.1")
    encodings_io.load(tmp_path / "out.json")


def test_b5_offset_beyond_int64_is_an_encoding_error(tmp_path: Path) -> None:
    """B5: an offset beyond int64 became an object array in Encoding, and np.round raised TypeError."""
    doc = {
        "activation_encodings": [{"name": "a", "bw": 8, "dtype": "INT", "scale": [1.0], "offset": [-(2**63) - 1]}],
        "param_encodings": [],
    }
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(QPassesError):
        encodings_io.load(path)


@pytest.mark.parametrize("offset", [-(2**63) - 1, -(10**30), 2**64])
def test_b5_encoding_rejects_offsets_beyond_int64(offset: int) -> None:
    """B5 at its root: ``Encoding`` itself checks such offsets against the grid instead of crashing in numpy."""
    with pytest.raises(QPassesError, match="offsets must lie in"):
        Encoding(8, (1.0,), (offset,))


@pytest.mark.parametrize(
    "raw",
    [
        EMPTY_DOC.encode("utf-16"),
        ('{"activation_encodings": ' + "[" * 100_000 + "]" * 100_000 + ', "param_encodings": {}}').encode(),
    ],
    ids=["B1-utf16", "B2-nested"],
)
def test_cli_bad_overrides_file_is_exit_2_with_one_line(
    tmp_path: Path, raw: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """``qpasses quantize --overrides BAD.json``: the user's file, so exit 2 and one line naming it, no output."""
    from qpasses.cli import main

    bad = tmp_path / "bad.json"
    bad.write_bytes(raw)
    out = tmp_path / "out"
    model = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
    assert main(["quantize", str(model), "-o", str(out), "-q", "--no-calib", "--overrides", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json" in err and "Traceback" not in err, err
    assert not (out / "model.qdq.onnx").exists()


@pytest.mark.parametrize(("role", "bitwidth"), [("bias", 32), (None, 32), ("weight", 16)])
def test_q3_symmetric_bias_grid_below_min_range_round_trips_in_0_6_1(
    tmp_path: Path, role: str | None, bitwidth: int
) -> None:
    """Q3 at the file level: a per-channel symmetric bias grid whose first channel spans < 1e-4, saved as 0.6.1,
    loads back unchanged for a bias (or a 32-bit parameter of unknown role). A weight's min/max still get the
    spec's minimum-range rule, which moves the tiny channel's grid off symmetric: a clear error."""
    half = 2 ** (bitwidth - 1)
    enc = Encoding(bitwidth, (1e-4 / 2**bitwidth / 40, 2.5e-3 / half), (-half,) * 2, True, 0)
    tensors = None if role is None else {"b": encodings_io.TensorSpec(role, 2, 0)}
    path = tmp_path / "enc.json"
    encodings_io.save(path, encodings_io.EncodingsFile(params={"b": enc}), "0.6.1")
    if role == "weight":
        with pytest.raises(QPassesError, match="must be symmetric"):
            encodings_io.load(path, tensors=tensors)
        return
    assert encodings_io.load(path, tensors=tensors).params["b"] == enc


def test_q3_inconsistent_tiny_bias_entry_follows_the_spec_rule(tmp_path: Path) -> None:
    """Only a grid stated exactly (min = -2^31 * scale, max = (2^31 - 1) * scale) is taken as it is: a tiny bias
    entry whose scale disagrees with its min/max gets the spec's minimum range from min/max."""
    doc = {
        "activation_encodings": {},
        "param_encodings": {
            "b": [{"bitwidth": 32, "dtype": "int", "is_symmetric": "True", "min": -1e-6, "max": 1e-6, "scale": 1e-20}]
        },
    }
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(doc))
    loaded = encodings_io.load(path, tensors={"b": encodings_io.TensorSpec("bias", 1, 0)}).params["b"]
    assert isinstance(loaded, Encoding) and loaded.max[0] - loaded.min[0] >= 1e-4 * (1 - 1e-9)
