"""Overrides whose range float32 cannot hold: min/max of +-1e300 wrote inf scales into the model.

They must now be an ``EncodingError`` naming the file, the section and the tensor (top-1 0.10 with
only a numpy RuntimeWarning before). Truth: float32's own limits (``np.finfo``).
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
from qpasses.quant.encodings_file import TensorSpec
from qpasses.quant.encodings_io import load
from qpasses.quant.range_search import from_min_max
from qpasses.quantize import quantize_model

KNOWN = {"act": TensorSpec("activation"), "w": TensorSpec("weight", channels=3), "b": TensorSpec("bias")}
F32_MAX = float(np.finfo(np.float32).max)


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


# --- non-finite / overflowing encodings ----------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(-1e300, 1e300), (0.0, 1e300), (-1e39, 1.0), (-1.0, 3.5e38)])
def test_legacy_range_beyond_float32_is_rejected(tmp_path: Path, lo: float, hi: float) -> None:
    path = _write(tmp_path, _legacy({"act": [{"bitwidth": 8, "dtype": "int", "min": lo, "max": hi}]}))
    with _raises(path, "activation_encodings 'act'", "float32"):
        load(path, tensors=KNOWN)


@pytest.mark.parametrize(("scale", "offset"), [(1e300, -128), (1e39, 0), (1e-50, -10), (1e37, -128)])
def test_v1_scale_beyond_float32_is_rejected(tmp_path: Path, scale: float, offset: int) -> None:
    entry = {
        "name": "act",
        "dtype": "INT",
        "bw": 8,
        "enc_type": "PER_TENSOR",
        "is_sym": False,
        "scale": [scale],
        "offset": [offset],
    }
    path = _write(tmp_path, _v1([entry]))
    with _raises(path, "activation_encodings 'act'", "float32"):
        load(path, tensors=KNOWN)


def test_encoding_rejects_scales_float32_cannot_hold() -> None:
    for scale in (1e300, 3.5e38, 1e-50):
        with pytest.raises(EncodingError, match="float32"):
            Encoding(8, (scale,), (0,))
    with pytest.raises(EncodingError, match="float32"):
        from_min_max(-1e300, 1e300, 8)
    # The largest ranges float32 activations can have still work.
    enc = from_min_max(-F32_MAX / 2, F32_MAX / 2, 8)
    assert np.isfinite(enc.qparams().scale).all()


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


def test_quantize_with_huge_override_fails_naming_file_section_tensor(tmp_path: Path) -> None:
    """The reproducer: min/max +-1e300 on an activation wrote inf scales (top-1 0.10, only a RuntimeWarning)."""
    path = _write(tmp_path, _legacy({"x": [{"bitwidth": 8, "min": -1e300, "max": 1e300}]}))
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 4)).astype(np.float32)} for i in range(2)]
    with _raises(path, "activation_encodings 'x'", "float32"):
        quantize_model(_gemm_model(), feeds, overrides=path, progress=False, runtime_check=False)
