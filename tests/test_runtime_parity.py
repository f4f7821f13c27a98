"""Portable uint8 storage, the x86 non-VNNI kernel emulation and the runtime parity check.

Everything here holds on a CPU with VNNI and on one without: reference comparisons use exact QDQ
semantics; the fused-kernel behaviour is compared with the numpy emulation of the AVX2 u8s8 kernel
(int16 pair saturation), and the one host-dependent test asserts whichever behaviour this host's
onnxruntime shows (probed), each against an independent expectation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.cli import main
from qpasses.core import verification
from qpasses.passes.quantize.portable_storage import PortableStorage
from qpasses.passes.quantize.runtime_parity_check import RuntimeParityWarning
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.kernel_emulation import (
    INT16_MAX,
    _rows_and_matrix,
    emulate_mac,
    fused_macs,
    runtime_saturates,
    saturation_probe_model,
)
from qpasses.runtime.parity import check_feeds, check_parity, strip_activation_qdq

MODELS = Path(__file__).resolve().parent.parent / "models"
CALIB = np.load(MODELS / "digits_calib.npz")["input"]
FEEDS = [{"input": CALIB[i : i + 16]} for i in range(0, 64, 16)]


def _digits(target: str) -> onnx.ModelProto:
    return quantize_model(
        MODELS / "digits_cnn.onnx",
        FEEDS,
        QuantConfig(per_channel=True),
        target=target,
        progress=False,
        runtime_check=False,
    ).model


@pytest.fixture(scope="module")
def portable() -> onnx.ModelProto:
    # ``ort``: the default's uint8 storage, and the same descriptor as ``ort-vnni`` but for the storage
    return _digits("ort")


@pytest.fixture(scope="module")
def signed() -> onnx.ModelProto:
    return _digits("ort-vnni")


def _weight_dqs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def _elem(model: onnx.ModelProto, name: str) -> int:
    return next(t.data_type for t in model.graph.initializer if t.name == name)


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# --- storage ---------------------------------------------------------------------------------------


def test_default_and_ort_store_8bit_as_uint8_and_qnn_targets_keep_int8(portable, signed) -> None:
    for dq in _weight_dqs(portable):
        if _elem(portable, dq.input[0]) == TensorProto.INT32:
            continue  # int32 biases
        assert _elem(portable, dq.input[0]) == TensorProto.UINT8, dq.name
        assert (_array(portable, dq.input[2]) == 128).all(), dq.name  # symmetric int8 grid, shifted
    for q in (n for n in portable.graph.node if n.op_type == "QuantizeLinear"):
        assert _elem(portable, q.input[2]) == TensorProto.UINT8
    weight_types = {_elem(signed, dq.input[0]) for dq in _weight_dqs(signed)}
    assert weight_types == {TensorProto.INT8, TensorProto.INT32}
    htp = quantize_model(
        MODELS / "digits_cnn.onnx",
        FEEDS,
        QuantConfig(per_channel=True),
        target="htp",
        progress=False,
        runtime_check=False,
    ).model
    assert TensorProto.INT8 in {_elem(htp, dq.input[0]) for dq in _weight_dqs(htp)}


def test_storage_does_not_change_the_grid(portable, signed) -> None:
    """Same scale and q - zp: exact QDQ semantics give bit-identical outputs."""
    x = {"input": CALIB[:32]}
    a = verification.exact_session(portable).run(None, x)[0]
    b = verification.exact_session(signed).run(None, x)[0]
    np.testing.assert_array_equal(a, b)


# --- emulation vs hand-computed values ---------------------------------------------------------------


def test_emulation_saturates_pairs_as_computed_by_hand() -> None:
    model = saturation_probe_model(k=64)
    (mac,) = fused_macs(model)
    assert mac.kernel == "u8s8" and mac.can_saturate
    em = emulate_mac(mac, np.full((4, 64), 255, np.uint8))
    # Every pair 255*127*2 = 64770 saturates to 32767: all 32 pairs of each of the 8 outputs.
    assert em.saturated_pairs == 1.0
    exact, saturated = 64 * 255 * 127, 32 * INT16_MAX
    expected_sqnr = 10 * np.log10(exact**2 / (exact - saturated) ** 2)
    assert em.sqnr_db == pytest.approx(expected_sqnr, rel=1e-9) and em.diverges
    small = emulate_mac(mac, np.full((4, 64), 100, np.uint8))  # 100*127*2 = 25400 fits in int16
    assert small.saturated_pairs == 0 and not small.diverges


def _int8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """The probe with int8 activations on the same grid (zero point -128: int8 127 is uint8 255)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    z = next(t for t in out.graph.initializer if t.name == "z")
    z.CopyFrom(numpy_helper.from_array(np.array(-128, np.int8), "z"))
    return out


def test_emulation_replays_int8_activations_shifted_to_uint8() -> None:
    """s8s8 runs the u8s8 kernel on activations + 128 (x86 without VNNI: a digits CNN stored s8s8 gives
    8.2 dB SQNR vs its exact semantics there, as stored u8s8): the same pairs saturate as for the uint8
    twin, by hand."""
    (mac,) = fused_macs(_int8_activations(saturation_probe_model(k=64)))
    assert mac.kernel == "s8s8" and mac.can_saturate
    em = emulate_mac(mac, np.full((4, 64), 127, np.int8))  # uint8 255: 255*127*2 = 64770 per pair
    exact, saturated = 64 * 255 * 127, 32 * INT16_MAX
    assert em.saturated_pairs == 1.0
    assert em.sqnr_db == pytest.approx(10 * np.log10(exact**2 / (exact - saturated) ** 2), rel=1e-9)
    small = emulate_mac(mac, np.full((4, 64), -28, np.int8))  # uint8 100: 25400 fits
    assert small.saturated_pairs == 0 and not small.diverges


@pytest.mark.parametrize(
    ("group", "stride", "pads", "dilation"), [(1, 1, (1, 1, 1, 1), 1), (2, 2, (0, 1, 1, 0), 1), (1, 1, (2, 2, 2, 2), 2)]
)
def test_emulation_im2col_matches_onnxruntime_conv(group: int, stride: int, pads: tuple, dilation: int) -> None:
    """The replayed accumulators (without saturation) equal onnxruntime's float Conv of the same integers."""
    rng = np.random.default_rng(group + stride)
    cin, cout = 4, 6
    w = rng.integers(-127, 128, (cout, cin // group, 3, 3)).astype(np.int8)
    x = rng.integers(0, 256, (2, cin, 7, 9)).astype(np.uint8)
    zp_a = 3
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "s"),
        numpy_helper.from_array(np.uint8(zp_a), "z"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.int8(0), "zw"),
    ]
    attrs = {"group": group, "strides": [stride, stride], "pads": list(pads), "dilations": [dilation, dilation]}
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    expected = verification.exact_session(model).run(None, {"x": x})[0]  # [N, cout, OH, OW]
    (mac,) = fused_macs(model)
    rows, wm, groups = _rows_and_matrix(mac, x)
    acc = np.concatenate([(rows[g].astype(np.int64) - zp_a) @ wm[g] for g in range(groups)], axis=1)
    n, _, oh, ow = expected.shape
    got = acc.reshape(n, oh, ow, cout).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, expected.astype(np.int64))


def test_emulation_flags_int8_weights_and_clears_portable(portable, signed) -> None:
    flagged = check_parity(signed, FEEDS[:1], emulate=True).emulation_diverges
    # 1 input channel, 3x3 taps pair up and overflow (the Gemm may too, depending on the data)
    assert flagged and flagged[0].op == "features.0.conv" and flagged[0].kernel == "u8s8"
    report = check_parity(portable, FEEDS[:1], emulate=True)
    assert report.emulated and all(e.kernel == "u8u8" and e.saturated_pairs == 0 for e in report.emulated)


@pytest.mark.parametrize("int8_activations", [False, True])
def test_this_hosts_fused_kernel_matches_exact_or_the_emulation(int8_activations: bool) -> None:
    """On a VNNI/ARM host the fused probe equals exact QDQ; on x86 without VNNI it equals the emulation,
    with uint8 or int8 activations (the same grid: the same saturated accumulator)."""
    model = saturation_probe_model()
    model = _int8_activations(model) if int8_activations else model
    x = {"x": np.full((4, 64), 255, np.float32)}
    fused = verification.runtime_session(model).run(None, x)[0]
    exact = verification.exact_session(model).run(None, x)[0]
    if runtime_saturates():
        # out = round(saturated accumulator / 8192) on the output grid (scale 8192, real zero at 0).
        assert np.allclose(fused, np.round(32 * INT16_MAX / 8192) * 8192)
    else:
        np.testing.assert_array_equal(fused, exact)


# --- parity check -----------------------------------------------------------------------------------


def test_portable_model_has_runtime_parity_on_this_cpu(portable) -> None:
    fp32 = onnx.load(MODELS / "digits_cnn.onnx")
    report = check_parity(portable, FEEDS, reference=fp32)
    assert report.ok, report.format()
    (out,) = report.outputs
    assert abs(out.exact_db - out.runtime_db) <= 0.5 and out.exact_db > 25


def test_divergence_is_localized_to_the_first_op(portable, monkeypatch) -> None:
    """A runtime that computes one Conv differently is reported with that Conv named first."""
    broken = onnx.ModelProto()
    broken.CopyFrom(portable)
    conv = next(n for n in broken.graph.node if n.name == "features.3.conv")
    wq = next(
        t
        for t in broken.graph.initializer
        if t.name == next(n for n in broken.graph.node if n.output[0] == conv.input[1]).input[0]
    )
    w = numpy_helper.to_array(wq).copy()
    w[: w.shape[0] // 2] = 128  # half the output channels read zero weights
    wq.CopyFrom(numpy_helper.from_array(w, wq.name))
    real = verification.runtime_session

    def fake_runtime(model, **kw):  # the "runtime" runs the broken model, with the same extra outputs
        if len(model.graph.node) != len(portable.graph.node):
            return real(model, **kw)  # the FP32 reference, the saturation probe
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.ClearField("initializer")
        m.graph.initializer.extend(broken.graph.initializer)
        return real(m, **kw)

    monkeypatch.setattr(verification, "runtime_session", fake_runtime)
    report = check_parity(portable, FEEDS[:2], reference=onnx.load(MODELS / "digits_cnn.onnx"), emulate=False)
    assert report.diverged and not report.ok
    assert report.divergences[0].producer == "features.3.conv"
    assert "features.3.conv" in report.problems()[0]


def test_strip_activation_qdq_keeps_quantized_weights(portable) -> None:
    stripped = strip_activation_qdq(portable)
    x = {"input": CALIB[:8]}
    ref = verification.exact_session(onnx.load(MODELS / "digits_cnn.onnx")).run(None, x)[0]
    got = verification.exact_session(stripped).run(None, x)[0]
    qdq = verification.exact_session(portable).run(None, x)[0]
    # Weight quantization only: closer to FP32 than the fully quantized model.
    assert np.abs(got - ref).mean() < np.abs(qdq - ref).mean()


def test_quantize_model_reports_parity_and_warns_on_divergence(monkeypatch) -> None:
    result = quantize_model(MODELS / "digits_cnn.onnx", FEEDS, QuantConfig(per_channel=True), progress=False)
    assert result.parity is not None and result.parity.ok
    assert "runtime parity" in result.summary()
    assert any(r.pass_name == "runtime-parity" and r.kind == "applied" for r in result.report.remarks)

    import qpasses.runtime.parity as rp

    monkeypatch.setattr(rp, "runtime_saturates", lambda: False)
    from qpasses.runtime.kernel_emulation import MacEmulation

    monkeypatch.setattr(rp, "emulate_mac", lambda mac, a, **kw: MacEmulation(mac.op, mac.op_type, "u8s8", 1, 0.5, 3.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quantize_model(MODELS / "digits_cnn.onnx", FEEDS, QuantConfig(per_channel=True), progress=False)
    assert not result.parity.ok
    assert any(issubclass(w.category, RuntimeParityWarning) for w in caught)
    missed = [r for r in result.report.remarks if r.pass_name == "runtime-parity" and r.kind == "missed"]
    assert missed and "portable-storage" in missed[0].reason


# --- portable-storage on other tools' models, and the CLI ----------------------------------------------


@pytest.fixture(scope="module")
def ort_quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(FEEDS)

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    path = tmp_path_factory.mktemp("ort") / "ort_s8.onnx"
    quantize_static(
        str(MODELS / "digits_cnn.onnx"),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return path


def test_portable_storage_pass_is_exact_and_removes_u8s8(ort_quantized: Path) -> None:
    g = graph_ir.load(ort_quantized)
    assert PortableStorage()(g).modified
    after = g.to_onnx()
    before = onnx.load(ort_quantized)
    x = {"input": CALIB[:32]}
    np.testing.assert_array_equal(
        verification.exact_session(before).run(None, x)[0], verification.exact_session(after).run(None, x)[0]
    )
    assert {m.kernel for m in fused_macs(before)} == {"u8s8"}
    assert {m.kernel for m in fused_macs(after)} == {"u8u8"}
    assert not any(t.data_type == TensorProto.INT8 for t in after.graph.initializer)


def test_check_runtime_cli_flags_ort_s8_model_and_passes_portable(
    ort_quantized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = str(MODELS / "digits_calib.npz")
    assert main(["check", str(ort_quantized), "--runtime", "ort", "--calib", calib]) == 1
    out = capsys.readouterr().out
    assert "DIVERGES" in out and "features.0.conv" in out and "portable-storage" in out
    fixed = tmp_path / "portable.onnx"
    assert main(["run", str(ort_quantized), "--pipeline", "portable-storage", "-o", str(fixed)]) == 0
    assert main(["check", str(fixed), "--runtime", "ort", "--calib", calib]) == 0
    assert "parity: ok" in capsys.readouterr().out
    assert main(["check", str(fixed), "--runtime", "ort"]) == 0  # random inputs in range
    assert main(["check", str(fixed)]) == 2  # neither --target nor --runtime


def test_cli_eval_prints_exact_and_runtime_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "quantize",
                str(MODELS / "digits_cnn.onnx"),
                "--per-channel",
                "--eval",
                str(MODELS / "digits_test.npz"),
                "-o",
                str(tmp_path / "out"),
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("evaluated on"))
    exact, runtime = (
        float(v)
        for v in line.split("SQNR vs FP32 ")[1]
        .split(" onnxruntime")[0]
        .replace(" dB exact QDQ /", "")
        .replace(" dB", "")
        .split()
    )
    assert abs(exact - runtime) <= 0.5
    assert "runtime parity" in out and "parity: ok" in out


class _Counted(list[dict[str, np.ndarray]]):
    """Feeds that know their total samples, as CalibrationData does after its first full read."""

    @property
    def num_samples(self) -> int:
        return sum(len(f["x"]) for f in self)


def _batch_model(batch: int | str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


def _rows(sizes: list[int]) -> list[dict[str, np.ndarray]]:
    data = np.arange(2 * sum(sizes), dtype=np.float32).reshape(-1, 2)
    bounds = np.cumsum([0, *sizes])
    return [{"x": data[a:b]} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize(
    ("sizes", "known", "batch", "samples", "feeds"),
    [
        ([2] * 8, True, "N", 4, 2),  # 16 samples: a quarter is 4, two batches of 2
        ([2] * 8, False, "N", 16, 8),  # total unknown: up to max_samples (64)
        ([16] * 2, True, "N", 8, 1),  # the first batch cut to the quarter, 8 rows
        ([1] * 64, True, "N", 16, 16),
        ([3, 1, 1, 1], True, "N", 1, 1),  # 6 samples: a quarter rounds to 1; at least one
        ([16] * 2, True, 16, 16, 1),  # a fixed batch cannot be cut: the first batch whole
        ([100], True, "N", 25, 1),
        ([400], True, "N", 64, 1),  # never more than max_samples
    ],
)
def test_check_feeds_take_a_share_of_the_calibration_samples(
    sizes: list[int], known: bool, batch: int | str, samples: int, feeds: int
) -> None:
    rows = _rows(sizes)
    data = _Counted(rows) if known else iter(rows)
    chosen = check_feeds(_batch_model(batch), data, 64)
    assert len(chosen) == feeds and sum(len(f["x"]) for f in chosen) == samples
    first = np.concatenate([f["x"] for f in rows])[:samples]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in chosen]), first)


def test_check_feeds_do_not_depend_on_the_batching() -> None:
    """The same 32 samples fed in batches of 1, 2, 4, 8 or 32: the check reads the same first 8."""
    picked = []
    for size in (1, 2, 4, 8, 32):
        chosen = check_feeds(_batch_model("N"), _Counted(_rows([size] * (32 // size))), 64)
        picked.append(np.concatenate([f["x"] for f in chosen]))
    for p in picked:
        np.testing.assert_array_equal(p, picked[0])
    assert len(picked[0]) == 8


def test_parity_runs_on_a_quarter_of_the_calibration_samples() -> None:
    """The default flow's parity check (and the fallback, on the same samples) reads 4 of 16 samples, in
    whatever batches they come."""
    for size in (1, 2, 16):
        calib = [{"input": CALIB[i : i + size]} for i in range(0, 16, size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = quantize_model(MODELS / "digits_cnn.onnx", calib, QuantConfig(per_channel=True), progress=False)
        assert result.parity is not None and result.parity.samples == 4, size
