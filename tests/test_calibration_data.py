"""Every calibration source, and every way user data can fail to match the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import model_zoo as zoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qpasses.core.errors import CalibrationDataError, QPassesError
from qpasses.data.input_lists import parse_input_list
from qpasses.data.input_specs import InputSpec, input_specs, validate_feed
from qpasses.data.sources import DEFAULT_BATCH_SIZE, CalibrationData

F32 = np.dtype(np.float32)
IMG = (3, 16, 16)


def _img(n: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *IMG)).astype(dtype)


@pytest.fixture
def dyn() -> onnx.ModelProto:
    """conv_bn_relu: input ('N', 3, 16, 16) float32."""
    return zoo.conv_bn_relu()


@pytest.fixture
def fixed() -> onnx.ModelProto:
    """constant_node_weights: input (1, 3, 16, 16) float32."""
    return zoo.constant_node_weights()


@pytest.fixture
def two_inputs() -> onnx.ModelProto:
    """int_input_model: ids ('N', 6) int64 and features ('N', 8) float32."""
    return zoo.int_input_model()


# --------------------------------------------------------------------------- specs


def test_input_specs(dyn: onnx.ModelProto, two_inputs: onnx.ModelProto) -> None:
    assert input_specs(dyn) == [InputSpec("input", ("N", 3, 16, 16), F32)]
    assert input_specs(two_inputs) == [
        InputSpec("ids", ("N", 6), np.dtype(np.int64)),
        InputSpec("features", ("N", 8), F32),
    ]
    assert input_specs(zoo.dynamic_dims())[0].shape == ("N", 3, "H", "W")
    assert input_specs(zoo.float16_model())[0].dtype == np.float16


def test_input_specs_skip_initializers_listed_as_inputs() -> None:
    model = zoo.opset11_model()
    assert len(model.graph.input) == 5
    assert [s.name for s in input_specs(model)] == ["input"]


def test_input_specs_unknown_dims_and_rank() -> None:
    vi_zero = helper.make_tensor_value_info("a", TensorProto.FLOAT, [0, 4])
    vi_none = helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 4])
    vi_rankless = helper.make_tensor_value_info("c", TensorProto.FLOAT, None)
    graph = helper.make_graph([], "g", [vi_zero, vi_none, vi_rankless], [])
    specs = input_specs(helper.make_model(graph))
    assert [s.shape for s in specs] == [(None, 4), (None, 4), None]
    assert specs[2].rank is None


def test_input_specs_rejects_non_tensor_input() -> None:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([], "g", [seq], []))
    with pytest.raises(CalibrationDataError, match="'s' is not a tensor"):
        input_specs(model)


def test_input_specs_from_graph_like_object() -> None:
    tensors = {
        "x": SimpleNamespace(initializer=None, dtype=TensorProto.FLOAT, shape=("B", 4)),
        "w": SimpleNamespace(initializer=object(), dtype=TensorProto.FLOAT, shape=(4,)),
    }
    graph = SimpleNamespace(inputs=["x", "w"], tensor=tensors.__getitem__)
    assert input_specs(graph) == [InputSpec("x", ("B", 4), F32)]


def test_model_without_inputs_is_rejected() -> None:
    graph = helper.make_graph([], "g", [], [])
    with pytest.raises(CalibrationDataError, match="no graph inputs"):
        CalibrationData.from_source([], helper.make_model(graph))


def test_error_is_a_qpasses_error() -> None:
    assert issubclass(CalibrationDataError, QPassesError)


# --------------------------------------------------------------------------- iterables


def test_list_source(dyn: onnx.ModelProto) -> None:
    feeds = [{"input": _img(2, s)} for s in range(3)]
    data = CalibrationData.from_source(feeds, dyn)
    assert len(data) == 3 and data.num_batches == 3
    assert data.requested_outputs == []
    out = list(data)
    assert len(out) == 3
    np.testing.assert_array_equal(out[1]["input"], feeds[1]["input"])
    assert data.num_samples == 6
    assert len(list(data)) == 3  # lists are re-iterable


def test_generator_is_recorded_and_replayed(dyn: onnx.ModelProto) -> None:
    data = CalibrationData.from_source(({"input": _img(1, s)} for s in range(4)), dyn)
    assert data.num_batches is None and data.num_samples is None
    with pytest.raises(TypeError):
        len(data)
    first = list(data)
    assert len(first) == 4
    assert len(data) == 4 and data.num_samples == 4  # learned from the full pass
    again = list(data)  # a generator reads once; its record is replayed (every pass sees all of it)
    assert len(again) == 4
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["input"], b["input"])


def test_callable_source_is_reiterable(dyn: onnx.ModelProto) -> None:
    calls = []

    def make() -> Iterator[dict[str, np.ndarray]]:
        calls.append(1)
        for s in range(3):
            yield {"input": _img(2, s)}

    data = CalibrationData.from_source(make, dyn)
    assert data.num_batches is None
    assert len(list(data)) == 3
    assert len(list(data)) == 3
    assert len(calls) == 2
    assert len(data) == 3 and data.num_samples == 6


def test_callable_returning_non_iterable(dyn: onnx.ModelProto) -> None:
    data = CalibrationData.from_source(lambda: 42, dyn)
    with pytest.raises(CalibrationDataError, match="must return an iterable"):
        list(data)


def test_iterable_source_is_streamed(dyn: onnx.ModelProto) -> None:
    produced = []

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for s in range(100):
            produced.append(s)
            yield {"input": _img(1, s)}

    it = iter(CalibrationData.from_source(gen, dyn))
    next(it)
    next(it)
    assert produced == [0, 1]


def test_single_dict_is_one_feed(dyn: onnx.ModelProto) -> None:
    data = CalibrationData.from_source({"input": _img(2)}, dyn)
    assert len(data) == 1 and next(iter(data))["input"].shape == (2, *IMG)


def test_float64_and_lists_are_cast_to_float32(dyn: onnx.ModelProto) -> None:
    f64 = _img(1, dtype=np.float64)
    feeds = [{"input": f64}, {"input": f64.tolist()}]
    out = list(CalibrationData.from_source(feeds, dyn))
    for feed in out:
        assert feed["input"].dtype == np.float32
        np.testing.assert_allclose(feed["input"], f64.astype(np.float32))


def test_feed_keeps_model_input_order(two_inputs: onnx.ModelProto) -> None:
    feed = {"features": np.zeros((2, 8), np.float32), "ids": np.zeros((2, 6), np.int64)}
    out = next(iter(CalibrationData.from_source([feed], two_inputs)))
    assert list(out) == ["ids", "features"]


def test_calibration_data_passes_through(dyn: onnx.ModelProto) -> None:
    data = CalibrationData.from_source([{"input": _img(1)}], dyn)
    assert CalibrationData.from_source(data, dyn) is data


@pytest.mark.parametrize("source", [np.zeros((1, *IMG), np.float32), b"raw", 42, None])
def test_unsupported_source_types(dyn: onnx.ModelProto, source: object) -> None:
    with pytest.raises(CalibrationDataError, match="ambiguous|unsupported"):
        CalibrationData.from_source(source, dyn)  # type: ignore[arg-type]


def test_empty_iterable(dyn: onnx.ModelProto) -> None:
    with pytest.raises(CalibrationDataError, match="no calibration feeds"):
        list(CalibrationData.from_source([], dyn))


BAD_FEEDS = [
    pytest.param({"input": _img(1), "extra": _img(1)}, r"unknown input name\(s\) \['extra'\]", id="unknown"),
    pytest.param({}, r"missing input\(s\) \['input'\]", id="missing"),
    pytest.param(
        {"input": np.zeros(IMG, np.float32)},
        r"'input' has shape \(3, 16, 16\), expected \(N, 3, 16, 16\) \(rank 3 instead of 4\)",
        id="rank",
    ),
    pytest.param(
        {"input": np.zeros((1, 3, 16, 17), np.float32)},
        r"'input' has shape \(1, 3, 16, 17\), expected \(N, 3, 16, 16\) \(axis 3 is 17",
        id="dim",
    ),
    pytest.param({"input": np.zeros((1, *IMG), np.int32)}, "'input' has dtype int32, expected float32", id="dtype-int"),
    pytest.param(
        {"input": np.zeros((1, *IMG), np.float16)}, "'input' has dtype float16, expected float32", id="dtype-half"
    ),
    pytest.param([1, 2, 3], "expected a dict", id="not-a-dict"),
    pytest.param({"input": [[1.0], [2.0, 3.0]]}, "cannot be converted", id="ragged"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_FEEDS)
def test_bad_feed_names_input_shapes_and_sample(dyn: onnx.ModelProto, bad: object, message: str) -> None:
    feeds = [{"input": _img(1)}, bad]
    data = CalibrationData.from_source(feeds, dyn)
    it = iter(data)
    next(it)
    with pytest.raises(CalibrationDataError, match=message) as err:
        next(it)
    assert "calibration feed 1" in str(err.value)


def test_symbolic_dims_are_not_cross_checked_as_onnxruntime_does_not(two_inputs: onnx.ModelProto) -> None:
    """A repeated dim_param with two sizes is onnxruntime's to judge (it accepts such feeds)."""
    feed = {"ids": np.zeros((2, 6), np.int64), "features": np.zeros((3, 8), np.float32)}
    (out,) = list(CalibrationData.from_source([feed], two_inputs))
    assert out["features"].shape == (3, 8)


def test_int_input_rejects_float(two_inputs: onnx.ModelProto) -> None:
    feed = {"ids": np.zeros((2, 6), np.float32), "features": np.zeros((2, 8), np.float32)}
    with pytest.raises(CalibrationDataError, match="'ids' has dtype float32, expected int64"):
        list(CalibrationData.from_source([feed], two_inputs))


def test_validate_feed_directly(fixed: onnx.ModelProto) -> None:
    specs = input_specs(fixed)
    assert validate_feed({"input": _img(1)}, specs)["input"].shape == (1, *IMG)
    with pytest.raises(CalibrationDataError, match=r"sample 7: .*axis 0 is 2 but the model fixes it at 1"):
        validate_feed({"input": _img(2)}, specs, where="sample 7")


# --------------------------------------------------------------------------- npz


def test_npz_split_by_default_batch_size(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    x = _img(40)
    np.savez(tmp_path / "calib.npz", input=x, labels=np.arange(40))
    data = CalibrationData.from_source(tmp_path / "calib.npz", dyn)
    assert DEFAULT_BATCH_SIZE == 16
    assert len(data) == 3 and data.num_samples == 40
    feeds = list(data)
    assert [f["input"].shape[0] for f in feeds] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), x)


def test_npz_custom_batch_size(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=_img(10))
    data = CalibrationData.from_source(str(tmp_path / "calib.npz"), dyn, batch_size=4)
    assert [f["input"].shape[0] for f in data] == [4, 4, 2]


def test_npz_fixed_batch_one(tmp_path: Path, fixed: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=_img(5))
    data = CalibrationData.from_source(tmp_path / "calib.npz", fixed, batch_size=32)
    assert len(data) == 5 and data.num_samples == 5
    assert all(f["input"].shape == (1, *IMG) for f in data)


def test_npz_fixed_batch_larger_than_one(tmp_path: Path) -> None:
    specs = [InputSpec("x", (2, 4), F32)]
    np.savez(tmp_path / "ok.npz", x=np.zeros((6, 4), np.float32))
    assert [f["x"].shape for f in CalibrationData.from_npz(tmp_path / "ok.npz", specs)] == [(2, 4)] * 3
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 4), np.float32))
    with pytest.raises(CalibrationDataError, match="5 rows cannot be split into batches of 2"):
        CalibrationData.from_npz(tmp_path / "bad.npz", specs)


@pytest.mark.parametrize("batch", [1, 2])
def test_npz_one_feed_per_row(tmp_path: Path, dyn: onnx.ModelProto, batch: int) -> None:
    x = np.stack([_img(batch, s) for s in range(4)])
    np.savez(tmp_path / "rows.npz", input=x)
    data = CalibrationData.from_source(tmp_path / "rows.npz", dyn)
    feeds = list(data)
    assert len(data) == 4 and data.num_samples == 4 * batch
    assert all(f["input"].shape == (batch, *IMG) for f in feeds)
    np.testing.assert_array_equal(feeds[2]["input"], x[2])


def test_npz_rows_for_fixed_batch_model(tmp_path: Path, fixed: onnx.ModelProto) -> None:
    np.savez(tmp_path / "rows.npz", input=_img(3)[:, None])
    assert [f["input"].shape for f in CalibrationData.from_source(tmp_path / "rows.npz", fixed)] == [(1, *IMG)] * 3


def test_npz_two_inputs_and_float64(tmp_path: Path, two_inputs: onnx.ModelProto) -> None:
    ids = np.random.default_rng(0).integers(0, zoo.EMBEDDING_ROWS, (10, 6))
    np.savez_compressed(tmp_path / "c.npz", ids=ids, features=np.ones((10, 8)), labels=np.zeros(10))
    feeds = list(CalibrationData.from_source(tmp_path / "c.npz", two_inputs, batch_size=4))
    assert [(f["ids"].shape, f["features"].shape) for f in feeds] == [((4, 6), (4, 8))] * 2 + [((2, 6), (2, 8))]
    assert feeds[0]["features"].dtype == np.float32 and feeds[0]["ids"].dtype == np.int64


def test_npz_scalar_input(tmp_path: Path) -> None:
    specs = [InputSpec("t", (), F32)]
    np.savez(tmp_path / "s.npz", t=np.float32(0.5))
    assert [float(f["t"]) for f in CalibrationData.from_npz(tmp_path / "s.npz", specs)] == [0.5]
    np.savez(tmp_path / "rows.npz", t=np.arange(3, dtype=np.float32))
    feeds = list(CalibrationData.from_npz(tmp_path / "rows.npz", specs))
    assert [f["t"].shape for f in feeds] == [()] * 3


BAD_NPZ = [
    pytest.param(
        {"image": _img(2)}, r"no array for input\(s\) \['input'\]; arrays present: \['image'\]", id="missing-key"
    ),
    pytest.param(
        {"input": np.zeros((2, 16, 16), np.float32)},
        r"array 'input'.*shape \(2, 16, 16\); expected .*\(N, 3, 16, 16\)",
        id="rank",
    ),
    pytest.param(
        {"input": np.zeros((2, 3, 16, 17), np.float32)},
        r"array 'input'.*shape \(2, 3, 16, 17\), expected \(N, 3, 16, 16\) \(axis 3 is 17",
        id="dim",
    ),
    pytest.param(
        {"input": np.zeros((4, 2, 3, 8, 16), np.float32)},
        r"one feed per row.*\(2, 3, 8, 16\), expected \(N, 3, 16, 16\)",
        id="row-shape",
    ),
    pytest.param({"input": np.zeros((2, *IMG), np.int32)}, "array 'input'.* dtype int32, expected float32", id="dtype"),
    pytest.param({"input": np.zeros((0, *IMG), np.float32)}, "no calibration samples", id="empty"),
]


@pytest.mark.parametrize(("arrays", "message"), BAD_NPZ)
def test_bad_npz(tmp_path: Path, dyn: onnx.ModelProto, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError, match=message) as err:
        CalibrationData.from_source(path, dyn)
    assert str(path) in str(err.value)


def test_npz_inputs_must_agree(tmp_path: Path, two_inputs: onnx.ModelProto) -> None:
    np.savez(tmp_path / "a.npz", ids=np.zeros((40, 6), np.int64), features=np.zeros((20, 8), np.float32))
    with pytest.raises(CalibrationDataError, match="different numbers of feeds"):
        CalibrationData.from_source(tmp_path / "a.npz", two_inputs)
    np.savez(tmp_path / "b.npz", ids=np.zeros((17, 6), np.int64), features=np.zeros((20, 8), np.float32))
    with pytest.raises(CalibrationDataError, match="different numbers of rows"):
        CalibrationData.from_source(tmp_path / "b.npz", two_inputs)


def test_npz_not_a_zip(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationDataError, match="not a readable .npz"):
        CalibrationData.from_source(tmp_path / "x.npz", dyn)


def test_missing_path(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    with pytest.raises(CalibrationDataError, match="file not found.*nope.npz"):
        CalibrationData.from_source(tmp_path / "nope.npz", dyn)
    with pytest.raises(CalibrationDataError, match="not a file"):
        CalibrationData.from_source(tmp_path, dyn)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(tmp_path: Path, dyn: onnx.ModelProto, batch_size: object) -> None:
    np.savez(tmp_path / "c.npz", input=_img(2))
    with pytest.raises(CalibrationDataError, match="batch_size"):
        CalibrationData.from_source(tmp_path / "c.npz", dyn, batch_size=batch_size)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- input lists


def _raw(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array.tofile(path)
    return path


def test_input_list_single_input(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    xs = [_img(1, s) for s in range(3)]
    _raw(tmp_path / "data" / "a.raw", xs[0])
    _raw(tmp_path / "data" / "b.raw", xs[1])
    absolute = _raw(tmp_path / "elsewhere" / "c.raw", xs[2])
    (tmp_path / "list.txt").write_text(f"#out1 out2\n%logits\n\ndata/a.raw\n  data/b.raw  \n{absolute}\n\n")
    data = CalibrationData.from_source(str(tmp_path / "list.txt"), dyn)
    assert data.requested_outputs == ["out1", "out2", "logits"]
    assert len(data) == 3 and data.num_samples == 3
    feeds = list(data)
    for feed, x in zip(feeds, xs, strict=True):
        assert feed["input"].shape == (1, *IMG) and feed["input"].dtype == np.float32
        np.testing.assert_array_equal(feed["input"], x)


def test_input_list_relative_to_list_dir(tmp_path: Path, dyn: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> None:
    _raw(tmp_path / "lists" / "x.raw", _img(1))
    (tmp_path / "lists" / "input_list.txt").write_text("x.raw\n")
    monkeypatch.chdir(tmp_path)  # cwd differs from the list's directory
    assert len(list(CalibrationData.from_source("lists/input_list.txt", dyn))) == 1


def test_input_list_multi_input(tmp_path: Path, two_inputs: onnx.ModelProto) -> None:
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    feats = np.ones((1, 8), np.float32)
    _raw(tmp_path / "ids0.raw", ids)
    _raw(tmp_path / "f0.raw", feats)
    (tmp_path / "list.txt").write_text("features:=f0.raw ids:=ids0.raw\n")
    (feed,) = list(CalibrationData.from_source(tmp_path / "list.txt", two_inputs))
    assert list(feed) == ["ids", "features"]
    np.testing.assert_array_equal(feed["ids"], ids)
    np.testing.assert_array_equal(feed["features"], feats)


def test_input_list_named_pair_for_single_input(tmp_path: Path, fixed: onnx.ModelProto) -> None:
    _raw(tmp_path / "a.raw", _img(1))
    (tmp_path / "list.txt").write_text("input:=a.raw\n")
    assert len(list(CalibrationData.from_source(tmp_path / "list.txt", fixed))) == 1


def test_input_list_float16_input(tmp_path: Path) -> None:
    model = zoo.float16_model()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    _raw(tmp_path / "f32.raw", x)
    _raw(tmp_path / "f16.raw", x.astype(np.float16))
    (tmp_path / "list.txt").write_text("f32.raw\nf16.raw\n")
    feeds = list(CalibrationData.from_source(tmp_path / "list.txt", model))
    for feed in feeds:
        assert feed["input"].dtype == np.float16
        np.testing.assert_array_equal(feed["input"], x.astype(np.float16))


def test_input_list_streams_one_line_at_a_time(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    for i in range(3):
        _raw(tmp_path / f"{i}.raw", _img(1, i))
    (tmp_path / "list.txt").write_text("0.raw\n1.raw\n2.raw\n")
    data = CalibrationData.from_source(tmp_path / "list.txt", dyn)
    (tmp_path / "2.raw").write_bytes(b"")  # changed after the up-front check
    it = iter(data)
    next(it)
    next(it)  # earlier lines are read without touching the broken one
    with pytest.raises(CalibrationDataError, match=r"line 3: file .*2.raw changed size"):
        next(it)


def test_parse_input_list(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("# a b\n\nx:=1.raw y:=/abs/2.raw\n%c #d\n")
    parsed = parse_input_list(tmp_path / "list.txt", ["x", "y"])
    assert parsed.requested_outputs == ["a", "b", "c", "d"]
    assert [e.line for e in parsed.entries] == [3]
    assert parsed.entries[0].files == {"x": tmp_path / "1.raw", "y": Path("/abs/2.raw")}


BAD_LISTS = [
    pytest.param("ok.raw\nmissing.raw\n", r"line 2: input 'input': file not found: .*missing.raw", id="missing-file"),
    pytest.param(
        "ok.raw\n\nshort.raw\n",
        r"line 3: input 'input': file .*short.raw has 100 bytes, expected 3072",
        id="wrong-size",
    ),
    pytest.param("ok.raw ok.raw\n", "line 1: expected one path", id="two-bare-paths"),
    pytest.param("image:=ok.raw\n", r"line 1: unknown input name\(s\) \['image'\]", id="unknown-name"),
    pytest.param("input:=ok.raw ok.raw\n", "line 1: mixes", id="mixed"),
    pytest.param("input:=\n", "line 1: malformed", id="malformed"),
    pytest.param("input:=ok.raw input:=ok.raw\n", "line 1: input 'input' given twice", id="duplicate"),
    pytest.param("#only outputs\n\n", "contains no samples", id="empty"),
]


@pytest.mark.parametrize(("text", "message"), BAD_LISTS)
def test_bad_input_list(tmp_path: Path, dyn: onnx.ModelProto, text: str, message: str) -> None:
    _raw(tmp_path / "ok.raw", _img(1))
    (tmp_path / "short.raw").write_bytes(b"\0" * 100)
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(CalibrationDataError, match=message) as err:
        CalibrationData.from_source(path, dyn)
    assert str(path) in str(err.value)


def test_bad_multi_input_list(tmp_path: Path, two_inputs: onnx.ModelProto) -> None:
    _raw(tmp_path / "ids.raw", np.zeros((1, 6), np.int64))
    _raw(tmp_path / "f.raw", np.zeros((1, 8), np.float32))
    path = tmp_path / "list.txt"
    path.write_text("ids:=ids.raw\n")
    with pytest.raises(CalibrationDataError, match=r"line 1: missing input\(s\) \['features'\]"):
        CalibrationData.from_source(path, two_inputs)
    path.write_text("ids:=ids.raw features:=f.raw\nids.raw\n")
    with pytest.raises(CalibrationDataError, match="line 2: the model has 2 inputs.*name:=path"):
        CalibrationData.from_source(path, two_inputs)
    path.write_text("ids:=f.raw features:=ids.raw\n")  # swapped: int64 file is too big for float32
    with pytest.raises(CalibrationDataError, match="line 1: input 'ids': file .*f.raw has 32 bytes, expected 48"):
        CalibrationData.from_source(path, two_inputs)


def test_input_list_needs_fixed_non_batch_dims(tmp_path: Path) -> None:
    _raw(tmp_path / "a.raw", _img(1))
    (tmp_path / "list.txt").write_text("a.raw\n")
    with pytest.raises(CalibrationDataError, match=r"line 1: input 'input' has shape \(N, 3, H, W\).*axis 2 is H"):
        CalibrationData.from_source(tmp_path / "list.txt", zoo.dynamic_dims())


def test_input_list_unreadable(tmp_path: Path, dyn: onnx.ModelProto) -> None:
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CalibrationDataError, match="cannot read input list"):
        CalibrationData.from_source(tmp_path / "list.txt", dyn)
