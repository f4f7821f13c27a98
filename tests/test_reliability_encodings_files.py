"""Encodings/overrides files that loaded "successfully" into a wrong model.

Each case must now be an ``EncodingError`` naming the file, the section and the tensor:

- a 1.0.0-style entry with min/max but no scale/offset, and a 0.6.1 entry with scale/offset but no
  min/max: both became bitwidth-only overrides (the range recalibrated, "applied 1 overrides");
- duplicate JSON keys: the last one won silently;
- ``version`` contradicting the layout (1.0.0 with dict sections was read as 0.6.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import PrecisionOverride, TensorSpec
from qpasses.quant.encodings_io import from_json, load
from qpasses.quantize import quantize_model

KNOWN = {"act": TensorSpec("activation"), "w": TensorSpec("weight", channels=3), "b": TensorSpec("bias")}


def _write(tmp_path: Path, doc: object, name: str = "enc.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def _raises(path: str, where: str, problem: str) -> pytest.RaisesContext:
    return pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*{where}.*{problem}")


def _legacy(activations: dict | None = None, params: dict | None = None, **top: object) -> dict:
    return {**top, "activation_encodings": activations or {}, "param_encodings": params or {}}


def _v1(activations: list | None = None, params: list | None = None, version: str = "1.0.0") -> dict:
    return {"version": version, "activation_encodings": activations or [], "param_encodings": params or []}


def _gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


# --- entries that silently became bitwidth-only overrides ---------------------------------------


def test_v1_entry_with_min_max_is_rejected(tmp_path: Path) -> None:
    """name/dtype/bw/min/max: a 1.0.0 entry carries scale/offset; min/max were dropped silently."""
    entry = {"name": "act", "dtype": "INT", "bw": 8, "min": -1.0, "max": 1.0}
    for version in ("1.0.0", None):
        doc = _v1([entry])
        if version is None:
            del doc["version"]
        path = _write(tmp_path, doc)
        with _raises(path, "activation_encodings 'act'", "'min'"):
            load(path, tensors=KNOWN)


def test_v1_entry_with_min_max_in_a_0_6_1_file_is_rejected(tmp_path: Path) -> None:
    """The audit's reproducer: version 0.6.1, list sections, a 1.0.0-style entry with min/max."""
    path = _write(tmp_path, _v1([{"name": "act", "dtype": "int", "bw": 8, "min": -1.0, "max": 1.0}], version="0.6.1"))
    with pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*0\.6\.1"):
        load(path, tensors=KNOWN)


def test_v1_keys_inside_a_legacy_entry_are_rejected(tmp_path: Path) -> None:
    entry = {"bitwidth": 8, "dtype": "int", "name": "act", "bw": 8, "min": -1.0, "max": 1.0}
    path = _write(tmp_path, _legacy({"act": [entry]}, version="0.6.1"))
    with _raises(path, "activation_encodings 'act'", "'bw'.*'name'"):
        load(path, tensors=KNOWN)


def test_legacy_scale_offset_without_min_max_is_rejected(tmp_path: Path) -> None:
    """0.6.1 scale/offset alone: the spec computes scale/offset from min/max, which are required."""
    entry = {"bitwidth": 8, "dtype": "int", "scale": 0.01, "offset": -128, "is_symmetric": "True"}
    path = _write(tmp_path, _legacy(params={"w": [entry] * 3}))
    with _raises(path, "param_encodings 'w'", "'min' and 'max'"):
        load(path, tensors=KNOWN)
    path = _write(tmp_path, _legacy({"act": [{"bitwidth": 8, "scale": 0.01}]}))
    with _raises(path, "activation_encodings 'act'", "'min' and 'max'"):
        load(path, tensors=KNOWN)


def test_bitwidth_only_overrides_still_load(tmp_path: Path) -> None:
    doc = _legacy(
        {"act": [{"bitwidth": 16, "dtype": "int"}]}, {"w": [{"bitwidth": 32, "dtype": "float"}]}, version="0.6.1"
    )
    loaded = load(_write(tmp_path, doc), tensors=KNOWN)
    assert loaded.activations["act"] == PrecisionOverride(16, "int")
    assert loaded.params["w"] == PrecisionOverride(32, "float")
    v1 = _v1([{"name": "act", "dtype": "INT", "bw": 16, "enc_type": "PER_TENSOR", "is_sym": False}])
    assert load(_write(tmp_path, v1), tensors=KNOWN).activations["act"] == PrecisionOverride(16, "int")


def test_quantize_reports_the_dropped_range_instead_of_recalibrating(tmp_path: Path) -> None:
    """Through quantize_model: was "applied 1 overrides" with the activation's range recalibrated."""
    entry = {"name": "h", "dtype": "INT", "bw": 8, "min": -100.0, "max": 100.0}
    path = _write(tmp_path, _v1([entry], version="0.6.1"))
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 4)).astype(np.float32)} for i in range(2)]
    with pytest.raises(EncodingError, match=re.escape(path)):
        quantize_model(_gemm_model(), feeds, overrides=path, progress=False, runtime_check=False)


# --- duplicate keys ---------------------------------------------------------------------------------


def test_duplicate_tensor_in_a_legacy_section_is_rejected(tmp_path: Path) -> None:
    text = (
        '{"version": "0.6.1", "activation_encodings": {'
        '"act": [{"bitwidth": 8, "min": -1.0, "max": 1.0}], '
        '"act": [{"bitwidth": 8, "min": -5.0, "max": 5.0}]}, "param_encodings": {}}'
    )
    path = _write(tmp_path, text)
    with _raises(path, "activation_encodings 'act'", "more than once"):
        load(path, tensors=KNOWN)


def test_duplicate_key_inside_an_entry_is_rejected(tmp_path: Path) -> None:
    text = (
        '{"activation_encodings": {"act": [{"bitwidth": 8, "min": -1.0, "max": 1.0, "max": 9.0}]},'
        ' "param_encodings": {}}'
    )
    path = _write(tmp_path, text)
    with _raises(path, "activation_encodings 'act'", "'max'.*more than once"):
        load(path, tensors=KNOWN)


def test_duplicate_section_is_rejected(tmp_path: Path) -> None:
    text = (
        '{"activation_encodings": {"act": [{"bitwidth": 8, "min": -1.0, "max": 1.0}]},'
        ' "param_encodings": {}, "activation_encodings": {}}'
    )
    path = _write(tmp_path, text)
    with _raises(path, "", "'activation_encodings'.*more than once"):
        load(path, tensors=KNOWN)


# --- version vs layout ------------------------------------------------------------------------------


def test_version_1_0_0_with_dict_sections_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, _legacy({"act": [{"bitwidth": 8, "min": -1.0, "max": 1.0}]}, version="1.0.0"))
    with pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*1\.0\.0.*list"):
        load(path, tensors=KNOWN)


@pytest.mark.parametrize("version", ["2.0.0", "one", 1.0])
def test_unknown_version_is_rejected(tmp_path: Path, version: object) -> None:
    path = _write(tmp_path, _legacy(version=version))
    with pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*version"):
        load(path, tensors=KNOWN)


def test_matching_versions_and_no_version_still_load(tmp_path: Path) -> None:
    entry = {"bitwidth": 8, "min": -1.0, "max": 1.0}
    for doc in (
        _legacy({"act": [entry]}),
        _legacy({"act": [entry]}, version="0.6.1"),
        _legacy({"act": [entry]}, version="0.6.0"),
    ):
        assert isinstance(load(_write(tmp_path, doc), tensors=KNOWN).activations["act"], Encoding)
    v1 = {
        "name": "act",
        "dtype": "INT",
        "bw": 8,
        "enc_type": "PER_TENSOR",
        "is_sym": False,
        "scale": [0.01],
        "offset": [-100],
    }
    assert from_json(_v1([v1])).activations["act"] == Encoding(8, (0.01,), (-100,))
