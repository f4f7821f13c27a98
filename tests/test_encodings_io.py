"""Encodings files: the spec's own examples, exact round trips, and errors that name the entry."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import EncodingsFile, PrecisionOverride, TensorSpec
from qpasses.quant.encodings_io import from_json, load, save, to_json
from qpasses.quant.range_search import compute

# The override example from qnn-quantization.txt ("Quantization Overrides"), verbatim.
SPEC_OVERRIDES = """
{
   "activation_encodings": {
       "Conv1:0": [
           {"bitwidth": 8, "max": 12.82344407824954, "min": 0.0, "offset": 0, "scale": 0.050288015993135454}
       ],
       "input:0": [
           {"bitwidth": 8, "max": 0.9960872825108046, "min": -1.0039304197656937, "offset": 127,
            "scale": 0.007843206675594112}
       ]
   },
   "param_encodings": {
       "Conv2d/weights": [
           {"bitwidth": 8, "max": 1.700559472933134, "min": -2.1006477158567995, "offset": 140,
            "scale": 0.01490669485799974}
       ]
   }
}
"""

# "Per-channel Quantization Overrides", cases 1 and 2, in one file.
SPEC_PER_CHANNEL = {
    "activation_encodings": {},
    "param_encodings": {
        "features.9.conv.3.weight": [
            {
                "bitwidth": 8,
                "is_symmetric": "False",
                "max": 3.0387749017453665,
                "min": -2.059169834735364,
                "offset": -103,
                "scale": 0.019991940143061618,
            }
        ],
        "features.8.conv.3.weight": [
            {
                "bitwidth": 8,
                "is_symmetric": "True",
                "max": 0.7011175155639648,
                "min": -0.7066381259227362,
                "offset": -128.0,
                "scale": 0.005520610358771377,
            },
            {
                "bitwidth": 8,
                "is_symmetric": "True",
                "max": 0.5228064656257629,
                "min": -0.5269230519692729,
                "offset": -128.0,
                "scale": 0.004116586343509945,
            },
            {
                "bitwidth": 8,
                "is_symmetric": "True",
                "max": 0.7368279099464417,
                "min": -0.7426297045129491,
                "offset": -128.0,
                "scale": 0.005801794566507415,
            },
        ],
    },
}

# "Mixed Precision": bitwidth/dtype only, no ranges.
SPEC_MIXED = {
    "activation_encodings": {
        "data_0": [{"bitwidth": 8, "dtype": "int"}],
        "conv2_1": [{"bitwidth": 32, "dtype": "float"}],
    },
    "param_encodings": {
        "conv2_w_0": [{"bitwidth": 32, "dtype": "float"}],
        "conv1_b_0": [{"bitwidth": 8, "dtype": "int"}],
    },
    "version": "0.5.0",
}


def test_spec_override_example_recomputes_scale_and_offset(tmp_path):
    path = tmp_path / "overrides.json"
    path.write_text(SPEC_OVERRIDES)
    loaded = load(path)
    conv = loaded.activations["Conv1:0"]
    assert conv.scale[0] == pytest.approx(0.050288015993135454, rel=1e-12) and conv.offset == (0,)
    # The file's offsets 127 and 140 are ignored: min/max say zero sits at levels 128 and 141.
    assert loaded.activations["input:0"].offset == (-128,)
    assert loaded.activations["input:0"].scale[0] == pytest.approx(0.007843206675594112, rel=1e-9)
    weights = loaded.params["Conv2d/weights"]
    assert weights.offset == (-141,) and weights.scale[0] == pytest.approx(0.01490669485799974, rel=1e-9)


def test_spec_per_channel_example():
    loaded = from_json(SPEC_PER_CHANNEL)
    case1 = loaded.params["features.9.conv.3.weight"]
    assert case1.offset == (-103,) and not case1.symmetric and case1.axis is None
    assert case1.scale[0] == pytest.approx(0.019991940143061618, rel=1e-12)
    case2 = loaded.params["features.8.conv.3.weight"]
    assert case2.symmetric and case2.axis == 0 and case2.offset == (-128, -128, -128)
    assert case2.scale == (0.005520610358771377, 0.004116586343509945, 0.005801794566507415)


def test_spec_mixed_precision_example():
    loaded = from_json(SPEC_MIXED)
    assert loaded.activations == {
        "data_0": PrecisionOverride(8, "int"),
        "conv2_1": PrecisionOverride(32, "float"),
    }
    assert loaded.params["conv2_w_0"] == PrecisionOverride(32, "float")
    assert loaded.params["conv1_b_0"] == PrecisionOverride(8, "int")


def _sample() -> EncodingsFile:
    rng = np.random.default_rng(3)
    activations: dict = {f"act{i}": compute(rng.normal(i, 1 + i, size=100), bw) for i, bw in enumerate([8, 16] * 20)}
    activations["fp"] = PrecisionOverride(16, "float")
    activations["sym"] = compute(rng.normal(size=50), 8, "symmetric")
    params = {
        "w_pt": compute(rng.normal(size=(4, 3)), 4),
        "w_pc": compute(rng.normal(size=(16, 3, 3, 3)), 8, axis=0),
        "w_pc4": compute(rng.normal(size=(5, 7)), 4, axis=0),
        "bias": compute(rng.normal(size=16), 32, symmetric=True),
        "w_fp": PrecisionOverride(32, "float"),
        "w_int": PrecisionOverride(8, "int"),
    }
    return EncodingsFile(activations, params)


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0"])
def test_round_trip_is_exact(tmp_path, version):
    original = _sample()
    path = tmp_path / "enc.json"
    save(path, original, version)
    loaded = load(path)
    assert loaded == original  # Encoding compares scale/offset tuples exactly
    save(path, loaded, version)
    assert load(path) == original
    assert [p.name for p in tmp_path.iterdir()] == ["enc.json"]  # no temp files left behind


def test_round_trip_keeps_a_known_per_channel_axis():
    original = EncodingsFile(params={"w": compute(np.random.default_rng(0).normal(size=(3, 5)), 8, axis=1)})
    for version in ("0.6.1", "1.0.0"):
        loaded = from_json(to_json(original, version), tensors={"w": TensorSpec("weight", channels=5, axis=1)})
        assert loaded == original


def test_export_layout_0_6_1():
    enc = compute(np.array([-1.8, -1.0, 0.0, 0.5]), 8)
    doc = to_json(EncodingsFile({"x": enc}, {"w": compute(np.ones((2, 2)), 8, axis=0), "f": PrecisionOverride(16)}))
    assert doc["version"] == "0.6.1"
    (entry,) = doc["activation_encodings"]["x"]
    assert entry == {
        "bitwidth": 8,
        "dtype": "int",
        "is_symmetric": "False",
        "max": enc.max[0],
        "min": enc.min[0],
        "offset": -200,
        "scale": enc.scale[0],
    }
    assert [e["is_symmetric"] for e in doc["param_encodings"]["w"]] == ["True", "True"]
    assert doc["param_encodings"]["f"] == [{"bitwidth": 16, "dtype": "float"}]
    json.dumps(doc)  # plain JSON types only


def test_export_layout_1_0_0():
    doc = to_json(EncodingsFile({"x": compute([-1.0, 1.0], 16)}, {"w": compute(np.ones((2, 2)), 4, axis=0)}), "1.0.0")
    assert doc["version"] == "1.0.0"
    (act,) = doc["activation_encodings"]
    assert act["name"] == "x" and act["enc_type"] == "PER_TENSOR" and act["dtype"] == "INT" and act["bw"] == 16
    assert act["is_sym"] is False and len(act["scale"]) == len(act["offset"]) == 1
    (param,) = doc["param_encodings"]
    assert param["enc_type"] == "PER_CHANNEL" and param["is_sym"] is True and param["offset"] == [-8, -8]


def test_1_0_0_float_and_int_entries_from_aimet():
    doc = {
        "version": "1.0.0",
        "activation_encodings": [
            {"name": "a", "bw": 16, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False},
            {"name": "b", "bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR"},
            {"name": "c", "bw": 16, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "offset": [-35799.0],
             "scale": [6.05e-05]},
        ],
        "param_encodings": [
            {"name": "w", "bw": 4, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": True, "offset": [-8, -8],
             "scale": [0.0405, 0.0397]},
        ],
    }  # fmt: skip
    loaded = from_json(doc)
    assert loaded.activations["a"] == PrecisionOverride(16, "int")
    assert loaded.activations["b"] == PrecisionOverride(16, "float")
    assert loaded.activations["c"] == Encoding(16, (6.05e-05,), (-35799,))
    assert loaded.params["w"] == Encoding(4, (0.0405, 0.0397), (-8, -8), symmetric=True, axis=0)


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "enc.json"
    save(path, EncodingsFile({"x": compute([0.0, 1.0], 8)}))
    before = path.read_text()

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save(path, EncodingsFile({"y": compute([0.0, 2.0], 8)}))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["enc.json"]


# --- every bad override names the file, the section and the tensor -----------------------------------

KNOWN = {
    "act": TensorSpec("activation"),
    "w": TensorSpec("weight", channels=3),
    "b": TensorSpec("bias"),
}


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def _legacy(activations=None, params=None) -> dict:
    return {"activation_encodings": activations or {}, "param_encodings": params or {}}


def _range(bitwidth=8, lo=-1.0, hi=1.0, **extra) -> dict:
    return {"bitwidth": bitwidth, "min": lo, "max": hi, **extra}


@pytest.mark.parametrize(
    ("doc", "tensor", "problem"),
    [
        (_legacy({"nope": [_range()]}), "activation_encodings 'nope'", "unknown tensor"),
        (_legacy({"act": [_range(bitwidth=4)]}), "activation_encodings 'act'", "activation bitwidth 4"),
        (_legacy(params={"w": [_range(bitwidth=20)]}), "param_encodings 'w'", "weight bitwidth 20"),
        (_legacy(params={"b": [_range(bitwidth=16)]}), "param_encodings 'b'", "bias bitwidth 16"),
        (_legacy({"act": [{"bitwidth": 8, "dtype": "float"}]}), "'act'", "float bitwidth 8"),
        (_legacy({"act": [_range(lo=2.0, hi=1.0)]}), "activation_encodings 'act'", "min 2.0 is greater than max 1.0"),
        (_legacy(params={"w": [_range(), _range()]}), "param_encodings 'w'", "2 per-channel encodings .* 3 channels"),
        (_legacy({"act": [_range(), _range()]}), "activation_encodings 'act'", "per tensor"),
        (
            _legacy({"act": [{"min": -1.0, "max": 1.0}]}),
            "activation_encodings 'act'",
            "missing required key 'bitwidth'",
        ),
        (_legacy({"act": [{"bitwidth": 8, "min": -1.0}]}), "activation_encodings 'act'", "missing required key 'max'"),
        (_legacy({"act": [_range(lo="low")]}), "activation_encodings 'act'", "'min' must be a finite number"),
        (_legacy({"act": [_range(bitwidth=8.5)]}), "activation_encodings 'act'", "'bitwidth' must be an integer"),
        (_legacy({"act": {"bitwidth": 8}}), "activation_encodings 'act'", "non-empty list"),
        (_legacy({"act": [_range(dtype="half")]}), "activation_encodings 'act'", "'dtype' must be"),
        (
            _legacy(params={"w": [_range(lo=-1.0, hi=2.0)] * 3}),
            "param_encodings 'w'",
            "per-channel encodings must be symmetric",
        ),
        (
            _legacy({"act": [_range(is_symmetric="maybe")]}),
            "activation_encodings 'act'",
            "'is_symmetric' must be",
        ),
    ],
)
def test_bad_legacy_entries_name_the_entry(tmp_path, doc, tensor, problem):
    path = _write(tmp_path, doc)
    with pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*{tensor}: .*{problem}"):
        load(path, tensors=KNOWN)


def _v1(activations=(), params=()) -> dict:
    return {"version": "1.0.0", "activation_encodings": list(activations), "param_encodings": list(params)}


def _v1_entry(name, **fields) -> dict:
    entry = {"name": name, "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False}
    return {**entry, "scale": [0.1], "offset": [-10], **fields}


@pytest.mark.parametrize(
    ("doc", "tensor", "problem"),
    [
        (_v1([_v1_entry("nope")]), "activation_encodings 'nope'", "unknown tensor"),
        (_v1([_v1_entry("act", bw=12)]), "activation_encodings 'act'", "activation bitwidth 12"),
        (_v1([{"bw": 8, "dtype": "INT"}]), r"activation_encodings\[0\]", "missing required key 'name'"),
        (_v1([_v1_entry("act"), _v1_entry("act")]), "activation_encodings 'act'", "listed more than once"),
        (_v1([{"name": "act", "dtype": "INT"}]), "activation_encodings 'act'", "missing required key 'bw'"),
        (_v1([_v1_entry("act", scale=[0.1, 0.2])]), "activation_encodings 'act'", "same length"),
        (_v1([_v1_entry("act", offset=[5])]), "activation_encodings 'act'", "offsets must lie"),
        (_v1([_v1_entry("act", scale=[-0.1])]), "activation_encodings 'act'", "positive"),
        (
            _v1(params=[_v1_entry("w", enc_type="PER_CHANNEL", scale=[0.1] * 4, offset=[-128] * 4)]),
            "param_encodings 'w'",
            "4 per-channel encodings .* 3 channels",
        ),
        (_v1(params=[_v1_entry("w", enc_type="PER_BLOCK")]), "param_encodings 'w'", "PER_BLOCK"),
    ],
)
def test_bad_v1_entries_name_the_entry(tmp_path, doc, tensor, problem):
    path = _write(tmp_path, doc)
    with pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*{tensor}: .*{problem}"):
        load(path, tensors=KNOWN)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"activation_encodings": {', "malformed JSON at line 1"),
        ("[]", "top level must be a JSON object"),
        ('{"activation_encodings": {}}', "missing required section 'param_encodings'"),
        ('{"activation_encodings": {}, "param_encodings": []}', "both be objects .* or both lists"),
    ],
)
def test_bad_files(tmp_path, text, problem):
    path = _write(tmp_path, text)
    with pytest.raises(EncodingError, match=rf"^{re.escape(path)}: .*{problem}"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(EncodingError, match="cannot read"):
        load(tmp_path / "absent.json")


def test_unknown_version_on_export():
    with pytest.raises(EncodingError, match="version"):
        to_json(EncodingsFile(), "2.0.0")  # type: ignore[arg-type]


def test_without_tensor_specs_params_accept_weight_or_bias_bitwidths():
    loaded = from_json(_legacy(params={"w": [_range(bitwidth=4)], "b": [_range(bitwidth=32)]}))
    assert loaded.params["w"].bitwidth == 4 and loaded.params["b"].bitwidth == 32
    with pytest.raises(EncodingError, match="'x': parameter bitwidth 24"):
        from_json(_legacy(params={"x": [_range(bitwidth=24)]}))
