"""Target descriptors: the built-ins, user files (JSON/YAML), entry points, and errors naming the field."""

from __future__ import annotations

import json
import re
import shutil

import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto

from qpasses.cli import main
from qpasses.core.errors import TargetError
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quant.precision_type import Precision
from qpasses.quantize import quantize_model
from qpasses.targets import BUILTIN_TARGETS, Kernel, TargetDescriptor, from_dict, load_target_file, resolve_target

INT8, INT16, INT32 = Precision("int", 8), Precision("int", 16), Precision("int", 32)

NPU_YAML = """\
name: my-npu
description: a small int8/int16 NPU
needs_quantized: true
per_channel_weights: false
kernels:
  "*": [[int8, int8, int32]]
  Conv: [[int8, int8, int32], [int16, int8, int32]]
ops: [Conv, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm, Add, Clip]
int32_ops: [Add]
float_bitwidths: []
"""


def test_builtins_follow_the_spec_backend_table():
    by_name = {t.name: t for t in BUILTIN_TARGETS}
    assert set(by_name) == {"htp", "dsp", "hta", "cpu", "gpu", "ort", "ort-vnni"}
    assert set(default_registry().targets) >= set(by_name)
    for name in ("htp", "dsp", "hta"):  # "Choose a quantized model"
        assert by_name[name].needs_quantized and by_name[name].runs_integer
    for name in ("cpu", "gpu"):  # "Quantized models are currently incompatible"
        assert by_name[name].float_only and not by_name[name].needs_quantized
    assert not by_name["hta"].per_channel_weights and by_name["htp"].per_channel_weights
    assert by_name["htp"].supports_kernel("Conv", INT16, INT8, INT32)
    assert not by_name["dsp"].supports_kernel("Conv", INT16, INT8, INT32)
    assert by_name["gpu"].float_bitwidths == (16, 32) and by_name["cpu"].float_bitwidths == (32,)
    assert by_name["ort"].supports_int32("Add") and not by_name["hta"].supports_int32("Add")
    for t in BUILTIN_TARGETS:  # the file form round-trips
        assert from_dict(json.loads(json.dumps(t.to_dict()))) == t


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_user_target_from_file(tmp_path, suffix):
    import yaml

    data = yaml.safe_load(NPU_YAML)
    path = tmp_path / f"my_npu{suffix}"
    path.write_text(NPU_YAML if suffix == ".yaml" else json.dumps(data))
    npu = load_target_file(path)
    assert npu.name == "my-npu" and npu.needs_quantized and not npu.per_channel_weights
    assert npu.supported_kernels("Conv") == (Kernel(INT8, INT8, INT32), Kernel(INT16, INT8, INT32))
    assert npu.supported_kernels("Relu") == (Kernel(INT8, INT8, INT32),)
    assert resolve_target(str(path)) == npu
    assert not npu.supports_op("Softmax")


class _FsPath:
    """A PathLike that is not a pathlib.Path (its str() is not the path)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return self.path


def test_user_target_from_any_pathlike(tmp_path):
    """A PathLike resolves through os.fspath, whatever its suffix, as a Path does (str() gave its repr)."""
    path = tmp_path / "npu_descriptor"
    path.write_text(NPU_YAML)
    assert resolve_target(_FsPath(str(path))) == load_target_file(path) == resolve_target(path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"needs_quantized": "yes"}, "needs_quantized"),
        ({"kernels": {"Conv": [["int8", "int9x", "int32"]]}}, "kernels.Conv[0]"),
        ({"kernels": {"Conv": "int8"}}, "kernels.Conv"),
        ({"float_bitwidths": [8]}, "float_bitwidths"),
        ({"float_bitwidths": [32], "default_float_bw": 16}, "default_float_bw"),
        ({"default_act_bw": 12}, "default_act_bw"),
        ({"int32_ops": "Add"}, "int32_ops"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, change, field):
    import yaml

    data = {**yaml.safe_load(NPU_YAML), **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TargetError, match=re.escape(f"field '{field}'")):
        load_target_file(path)


def test_missing_name_and_unreadable_file(tmp_path):
    path = tmp_path / "noname.yaml"
    path.write_text("needs_quantized: true\n")
    with pytest.raises(TargetError, match="field 'name'"):
        load_target_file(path)
    with pytest.raises(TargetError, match="cannot read target file"):
        load_target_file(tmp_path / "missing.yaml")
    with pytest.raises(TargetError, match="field 'name'"):
        TargetDescriptor(name="")


def test_entry_point_target_is_resolved_by_name(monkeypatch):
    import qpasses.core.registry as registry_mod

    npu = TargetDescriptor(name="ep-npu", needs_quantized=True, per_channel_weights=False)

    class EntryPoint:
        def load(self):
            return npu

    monkeypatch.setattr(
        registry_mod, "entry_points", lambda group: [EntryPoint()] if group == "qpasses.targets" else []
    )
    assert resolve_target("ep-npu", default_registry()) is npu
    assert npu.supported_kernels("Conv") == (Kernel(INT8, INT8, INT32),)  # a quantized target's default kernel


def _weight_scale_counts(model: onnx.ModelProto) -> list[int]:
    """Number of scales of each weight DequantizeLinear (1 = per tensor)."""
    inits = {t.name: t for t in model.graph.initializer}
    stored = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return [
        int(onnx.numpy_helper.to_array(inits[n.input[1]]).size)
        for n in stored
        if inits[n.input[0]].data_type == TensorProto.INT8 and len(inits[n.input[0]].dims) == 4
    ]


def test_quantize_uses_the_descriptor(tmp_path):
    calib = MODELS / "digits_calib.npz"
    hta = quantize_model(MODELS / "digits_cnn.onnx", calib, QuantConfig(per_channel=True), target="hta", progress=False)
    assert set(_weight_scale_counts(hta.model)) == {1}  # HTA: per-tensor weights even with per-channel asked
    assert any("per-channel weights disabled" in r.message for r in hta.report.remarks)
    htp = quantize_model(MODELS / "digits_cnn.onnx", calib, QuantConfig(per_channel=True), target="htp", progress=False)
    assert max(_weight_scale_counts(htp.model)) > 1
    # A target file works on the command line too.
    model = tmp_path / "m.onnx"
    shutil.copy(MODELS / "digits_cnn.onnx", model)
    target = tmp_path / "my_npu.yaml"
    target.write_text(NPU_YAML)
    assert (
        main(
            [
                "quantize",
                str(model),
                "--calib",
                str(calib),
                "--per-channel",
                "--target",
                str(target),
                "-o",
                str(tmp_path / "out"),
                "-q",
            ]
        )
        == 0
    )
    assert set(_weight_scale_counts(onnx.load(tmp_path / "out" / "model.qdq.onnx"))) == {1}
