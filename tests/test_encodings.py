"""Encodings against independent truth: the QNN spec's worked numbers and hand-computed grids."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import Encoding, dequantize, fake_quantize, quantize, validate_bitwidth
from qpasses.quant.int4_packing import pack_int4, unpack_int4
from qpasses.quant.range_search import bias_encoding, compute, from_min_max
from qpasses.quant.range_statistics import HistogramObserver, MinMaxObserver

# --- the spec's worked examples (qnn-quantization.txt, "Quantization Example") -------------------------


def test_spec_quantization_example():
    enc = compute(np.array([-1.8, -1.0, 0.0, 0.5]), 8)
    assert enc.min[0] == pytest.approx(-1.803922, abs=5e-7)
    assert enc.max[0] == pytest.approx(0.496078, abs=5e-7)
    assert enc.scale[0] == pytest.approx(0.009020, abs=5e-7)
    assert enc.offset == (-200,)  # "offset is 200": zero is level 200
    q = quantize([-1.8, -1.0, 0.0, 0.5], enc)
    assert q.tolist() == [0, 89, 200, 255]
    assert q.dtype == np.uint8


def test_spec_dequantization_example():
    enc = compute(np.array([-1.8, -1.0, 0.0, 0.5]), 8)
    deq = dequantize([0, 89, 200, 255], enc)
    # The spec prints 4 decimals; exact values are -1.803922, -1.001176, 0, 0.496078.
    np.testing.assert_allclose(deq, [-1.8039, -1.0011, 0.0, 0.4961], atol=1e-4)
    assert deq[2] == 0.0


def test_spec_mixed_sign_range_shifts_down():
    enc = compute(np.array([-5.1, 5.1]), 8)
    assert enc.min[0] == pytest.approx(-5.12, abs=1e-12)
    assert enc.max[0] == pytest.approx(5.08, abs=1e-12)
    assert enc.scale[0] == pytest.approx(0.04, abs=1e-15)
    assert enc.offset == (-128,)
    assert quantize([0.0], enc).tolist() == [128]


def test_spec_strictly_positive_sets_min_zero():
    enc = compute(np.array([5.0, 7.0, 10.0]), 8)
    assert (enc.min[0], enc.max[0], enc.offset) == (0.0, pytest.approx(10.0), (0,))
    assert quantize([0.0], enc).tolist() == [0]


def test_spec_strictly_negative_sets_max_zero():
    enc = compute(np.array([-20.0, -6.0]), 8)
    assert enc.min[0] == pytest.approx(-20.0)
    assert enc.max[0] == pytest.approx(0.0, abs=1e-12)
    assert enc.offset == (-255,)
    assert quantize([0.0], enc).tolist() == [255]


def test_minimum_range_is_enforced_before_zero_handling():
    assert compute(np.zeros(5), 8).max[0] == pytest.approx(1e-4)
    # Spec order: max = max(2, 2 + 0.0001) first, then min -> 0.
    enc = compute(np.full(3, 2.0), 8)
    assert (enc.min[0], enc.max[0]) == (0.0, pytest.approx(2.0001))
    # Tiny mixed range: max raised to -4e-5 + 1e-4 = 6e-5, step 1e-4/255, zero at level 102.
    enc = compute(np.array([-4e-5, 1e-5]), 8)
    assert enc.scale[0] == pytest.approx(1e-4 / 255)
    assert enc.offset == (-102,)


# --- other modes -------------------------------------------------------------------------------------


def test_symmetric_uses_the_extra_negative_level():
    enc = compute(np.array([-1.0, 0.5]), 8, "symmetric")
    assert enc.scale[0] == pytest.approx(1 / 128)  # max(0.5/127, 1/128)
    assert (enc.min[0], enc.max[0], enc.offset, enc.symmetric) == (-1.0, pytest.approx(127 / 128), (-128,), True)
    enc = compute(np.array([-0.5, 1.0]), 8, symmetric=True)
    assert enc.scale[0] == pytest.approx(1 / 127)
    assert (enc.min[0], enc.max[0]) == (pytest.approx(-128 / 127), pytest.approx(1.0))


def test_per_channel_matches_spec_override_example():
    # Rows reaching the spec's per-channel maxima (Case 2) must give its scales and minimums.
    maxima = [0.7011175155639648, 0.5228064656257629, 0.7368279099464417]
    weights = np.array([[m, -m / 2, 0.1] for m in maxima])
    enc = compute(weights, 8, axis=0)
    np.testing.assert_allclose(
        enc.scale, [0.005520610358771377, 0.004116586343509945, 0.005801794566507415], rtol=1e-15
    )
    np.testing.assert_allclose(enc.min, [-0.7066381259227362, -0.5269230519692729, -0.7426297045129491], rtol=1e-15)
    assert enc.offset == (-128, -128, -128)
    assert enc.symmetric and enc.axis == 0


@pytest.mark.parametrize("bitwidth", [4, 8, 12, 16])
def test_per_channel_offsets_are_minus_half_range(bitwidth):
    weights = np.random.default_rng(bitwidth).normal(size=(6, 3, 3, 3)) * np.arange(1, 7)[:, None, None, None]
    enc = compute(weights, bitwidth, axis=0)
    assert enc.offset == (-(2 ** (bitwidth - 1)),) * 6
    err = np.abs(fake_quantize(weights, enc) - weights)
    assert (err <= np.asarray(enc.scale)[:, None, None, None] / 2 + 1e-12).all()


def test_per_channel_last_axis_and_asymmetric_rejected():
    w = np.array([[1.0, -2.0], [3.0, -4.0], [0.5, 8.0]])
    enc = compute(w, 8, axis=-1)
    assert enc.axis == 1
    np.testing.assert_allclose(enc.scale, [3 / 127, 8 / 127])
    with pytest.raises(EncodingError, match="symmetric"):
        compute(w, 8, axis=1, symmetric=False)


def test_adjusted_covers_the_whole_range_with_zero_on_grid():
    # tf shifts [-1.8, 0.5] to [-1.8039, 0.4961], cutting 0.5. Adjusted keeps min, expands max:
    # 199 levels below zero, step max(1.8/199, 0.5/56) = 1.8/199.
    enc = compute(np.array([-1.8, -1.0, 0.0, 0.5]), 8, "adjusted")
    assert enc.scale[0] == pytest.approx(1.8 / 199)
    assert enc.offset == (-199,)
    assert enc.min[0] == pytest.approx(-1.8)
    assert enc.max[0] == pytest.approx(56 * 1.8 / 199)
    assert dequantize(quantize([0.5], enc), enc)[0] == pytest.approx(0.5, abs=enc.scale[0] / 2)
    assert compute(np.array([5.0, 10.0]), 8, "adjusted").offset == (0,)
    with pytest.raises(EncodingError, match="8-bit"):
        compute(np.array([-1.0, 1.0]), 16, "adjusted")


def _long_tailed(n: int = 1_000_000) -> np.ndarray:
    x = np.random.default_rng(0).laplace(size=n)
    x[:4] = [30.0, -35.0, 40.0, -25.0]
    return x


def test_enhanced_clips_long_tails_and_beats_tf():
    x = _long_tailed()
    tf, enhanced = compute(x, 8, "tf"), compute(x, 8, "enhanced")
    mse_tf = np.mean((fake_quantize(x, tf) - x) ** 2)
    mse_enhanced = np.mean((fake_quantize(x, enhanced) - x) ** 2)
    assert enhanced.max[0] < 40.0 and enhanced.min[0] > -35.0  # outliers clipped
    assert mse_enhanced < 0.7 * mse_tf
    assert quantize([0.0], enhanced)[0] == -enhanced.offset[0]  # zero still exact


def test_enhanced_symmetric_and_from_histogram_observer():
    x = _long_tailed(200_000)
    obs = HistogramObserver()
    for batch in np.array_split(x, 10):
        obs.update(batch)
    from_obs, from_values = compute(obs, 8, "enhanced"), compute(x, 8, "enhanced")
    assert from_obs.scale[0] == pytest.approx(from_values.scale[0], rel=0.1)
    sym = compute(x, 8, "enhanced", symmetric=True)
    assert sym.offset == (-128,)
    assert np.mean((fake_quantize(x, sym) - x) ** 2) < np.mean((fake_quantize(x, compute(x, 8, "symmetric")) - x) ** 2)


def test_enhanced_keeps_range_of_uniform_data():
    x = np.random.default_rng(1).uniform(-1.0, 3.0, size=100_000)
    enc = compute(x, 8, "enhanced")
    assert enc.min[0] == pytest.approx(-1.0, rel=0.1)
    assert enc.max[0] == pytest.approx(3.0, rel=0.1)


def test_percentile_clips_to_the_quantile():
    # 0..10000: the 99th percentile is 9900 and the 1st is 100 (then min -> 0).
    x = np.arange(10001, dtype=np.float64)
    enc = compute(x, 8, "percentile", percentile=99.0)
    assert (enc.min[0], enc.max[0], enc.offset) == (0.0, pytest.approx(9900.0), (0,))
    obs = HistogramObserver()
    obs.update(x)
    assert compute(obs, 8, "percentile", percentile=99.0).max[0] == pytest.approx(9900.0, abs=10001 / 2048)
    with pytest.raises(EncodingError, match="percentile"):
        compute(x, 8, "percentile", percentile=40.0)


def test_minmax_observer_source_and_missing_histogram():
    obs = MinMaxObserver()
    obs.update([-1.8, -1.0])
    obs.update([0.0, 0.5])
    assert compute(obs, 8) == compute(np.array([-1.8, -1.0, 0.0, 0.5]), 8)
    with pytest.raises(EncodingError, match="histogram"):
        compute(obs, 8, "enhanced")
    per_channel = MinMaxObserver(axis=0)
    per_channel.update(np.array([[1.0, -2.0], [0.5, 0.25]]))
    enc = compute(per_channel, 8)
    assert enc.axis == 0 and enc.offset == (-128, -128)
    np.testing.assert_allclose(enc.scale, [2 / 128, 0.5 / 127])


def test_compute_rejects_bad_input():
    with pytest.raises(EncodingError, match="mode"):
        compute([1.0], 8, "minmax")
    with pytest.raises(EncodingError, match="NaN"):
        compute([1.0, np.nan], 8)
    with pytest.raises(EncodingError, match="empty"):
        compute(np.array([]), 8)
    with pytest.raises(EncodingError, match="activation bitwidth 4"):
        compute([1.0], 4, role="activation")


# --- quantize / dequantize ---------------------------------------------------------------------------


@pytest.mark.parametrize("bitwidth", [4, 5, 8, 10, 12, 16])
def test_round_trip_error_is_at_most_half_a_step(bitwidth):
    rng = np.random.default_rng(bitwidth)
    data = rng.normal(loc=0.3, scale=2.0, size=5000)
    enc = compute(data, bitwidth)
    inside = rng.uniform(enc.min[0], enc.max[0], size=20000)
    err = np.abs(fake_quantize(inside, enc) - inside)
    assert err.max() <= enc.scale[0] / 2 * (1 + 1e-9)
    q = quantize(inside, enc)
    assert q.min() >= 0 and q.max() <= 2**bitwidth - 1


def test_saturation_outside_the_range():
    enc = compute(np.array([-1.0, 1.0]), 8)
    assert quantize([-100.0, 100.0], enc).tolist() == [0, 255]
    sym = compute(np.array([-1.0, 1.0]), 8, "symmetric")
    assert quantize([-100.0, 100.0], sym).tolist() == [-128, 127]
    assert quantize([-100.0, 100.0], sym, signed=False).tolist() == [0, 255]


def test_rounding_is_half_to_even_like_onnx():
    enc = Encoding(8, (1.0,), (-128,))
    assert quantize([0.5, 1.5, -0.5], enc).tolist() == [128, 130, 128]


def test_fake_quantize_keeps_float32():
    x = np.linspace(-1, 1, 11, dtype=np.float32)
    assert fake_quantize(x, compute(x, 8)).dtype == np.float32


def test_per_channel_broadcast_and_shape_check():
    enc = Encoding(8, (0.5, 0.25), (-128, -128), symmetric=True, axis=1)
    x = np.array([[1.0, 1.0], [-1.0, -1.0]])
    assert quantize(x, enc).tolist() == [[2, 4], [-2, -4]]
    np.testing.assert_array_equal(dequantize(quantize(x, enc), enc), x)
    with pytest.raises(EncodingError, match="channels"):
        quantize(np.ones((2, 3)), enc)


def test_qparams_for_onnx():
    asym = compute(np.array([-1.8, 0.5]), 8)
    qp = asym.qparams()
    assert qp.elem_type == TensorProto.UINT8 and qp.zero_point.dtype == np.uint8
    assert qp.zero_point.shape == () and int(qp.zero_point) == 200
    assert qp.scale.dtype == np.float32 and qp.scale == np.float32(2.3 / 255)
    assert int(asym.qparams(signed=True).zero_point) == 72  # 200 - 128
    sym = compute(np.array([[1.0, -1.0], [2.0, 0.0]]), 8, axis=0)
    qp = sym.qparams()
    assert qp.elem_type == TensorProto.INT8 and qp.axis == 0
    assert qp.zero_point.tolist() == [0, 0] and qp.zero_point.dtype == np.int8
    assert compute([1.0], 16, symmetric=True).qparams().elem_type == TensorProto.INT16
    assert compute([1.0], 4, symmetric=True).qparams().elem_type == TensorProto.INT4


def test_encoding_invariants():
    with pytest.raises(EncodingError, match="offsets must lie"):
        Encoding(8, (0.1,), (5,))
    with pytest.raises(EncodingError, match="positive"):
        Encoding(8, (0.0,), (0,))
    with pytest.raises(EncodingError, match="symmetric"):
        Encoding(8, (0.1,), (-100,), symmetric=True)
    with pytest.raises(EncodingError, match="per-tensor"):
        Encoding(8, (0.1, 0.2), (0, 0))
    assert Encoding(8, [0.1], [-128.0]) == Encoding(8, (0.1,), (-128,))  # normalised, comparable
    assert hash(Encoding(8, (0.1,), (0,))) == hash(Encoding(8, (0.1,), (0,)))


def test_from_min_max_rejects_inverted_range():
    with pytest.raises(EncodingError, match="greater than max"):
        from_min_max(1.0, -1.0, 8)


# --- bitwidths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bitwidth", "role", "ok"),
    [
        (4, "weight", True),
        (16, "weight", True),
        (3, "weight", False),
        (17, "weight", False),
        (8, "activation", True),
        (16, "activation", True),
        (4, "activation", False),
        (12, "activation", False),
        (8, "bias", True),
        (32, "bias", True),
        (16, "bias", False),
        (8.0, "weight", False),
        (True, "weight", False),
    ],
)
def test_validate_bitwidth(bitwidth, role, ok):
    if ok:
        assert validate_bitwidth(bitwidth, role) == bitwidth
    else:
        with pytest.raises(EncodingError, match=f"{role} bitwidth"):
            validate_bitwidth(bitwidth, role)


# --- bias ----------------------------------------------------------------------------------------------


def test_bias_scale_is_input_times_weight_scale():
    weight = Encoding(8, (0.01, 0.02), (-128, -128), symmetric=True, axis=0)
    bias, adjusted = bias_encoding(np.array([0.5, -0.25]), 0.1, weight)
    assert adjusted is weight
    np.testing.assert_allclose(bias.scale, [0.001, 0.002])
    assert bias.bitwidth == 32 and bias.axis == 0 and bias.symmetric
    qp = bias.qparams()
    assert qp.elem_type == TensorProto.INT32 and qp.zero_point.tolist() == [0, 0]
    assert quantize([0.5, -0.25], bias).tolist() == [500, -125]


def test_bias_overflow_guard_raises_weight_scale_only_where_needed():
    weight = Encoding(8, (1e-6, 1e-6), (-128, -128), symmetric=True, axis=0)
    b = np.array([1e4, 1e-3])
    bias, adjusted = bias_encoding(b, 1e-3, weight)
    # channel 0: 1e4 / (1e-3 * 1e-6) = 1e13 > 2^31; raised to fit in (2^31 - 1) / 2.
    assert adjusted.scale[0] == pytest.approx(1e4 / (1e-3 * (2**31 - 1) / 2))
    assert adjusted.scale[1] == 1e-6  # never lowered, untouched when it fits
    assert bias.scale[0] == pytest.approx(1e-3 * adjusted.scale[0])
    q = quantize(b, bias)
    assert q.dtype == np.int32 and abs(int(q[0])) <= 2**30
    np.testing.assert_allclose(dequantize(q, bias), b, atol=max(bias.scale) / 2)


def test_bias_per_tensor_weight_and_errors():
    weight = Encoding(8, (1e-6,), (-128,), symmetric=True)
    bias, adjusted = bias_encoding(np.array([1e4, -2e4]), 1e-3, weight)
    assert bias.axis is None and adjusted.scale[0] == pytest.approx(2e4 / (1e-3 * (2**31 - 1) / 2))
    with pytest.raises(EncodingError, match="bias bitwidth 16"):
        bias_encoding([1.0], 0.1, weight, bitwidth=16)
    with pytest.raises(EncodingError, match="channels"):
        bias_encoding([1.0, 2.0, 3.0], 0.1, Encoding(8, (0.1, 0.1), (-128, -128), True, 0))


# --- packed 4-bit ----------------------------------------------------------------------------------------


def test_pack_int4_matches_spec_example():
    # Spec: unpacked (0000 1010, 0000 0100) -> packed 0100 1010.
    assert pack_int4([10, 4], signed=False).tolist() == [0b01001010]
    assert unpack_int4(np.array([0b01001010], np.uint8), (2,), signed=False).tolist() == [10, 4]


def test_pack_int4_per_channel_sizes_from_spec():
    # (3,3,3,32) with 32 output channels: 27 values per channel -> 14 bytes per channel.
    q = np.random.default_rng(0).integers(-8, 8, size=(3, 3, 3, 32))
    packed = pack_int4(q, signed=True, axis=3)
    assert packed.shape == (32, 14)
    np.testing.assert_array_equal(unpack_int4(packed, q.shape, signed=True, axis=3), q)


@pytest.mark.parametrize("signed", [True, False])
def test_pack_int4_round_trip_odd_length(signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = np.random.default_rng(1).integers(lo, hi, size=(5, 7))
    packed = pack_int4(q, signed=signed)
    assert packed.shape == (18,) and packed.dtype == np.uint8
    assert packed[-1] >> 4 == 0  # odd count: last high nibble is padding
    out = unpack_int4(packed, q.shape, signed=signed)
    assert out.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(out, q)


def test_pack_int4_signed_nibbles_and_range_check():
    assert pack_int4([-1, -8], signed=True).tolist() == [0x8F]
    with pytest.raises(EncodingError, match=r"\[-8, 7\]"):
        pack_int4([8], signed=True)
    with pytest.raises(EncodingError, match="packed bytes"):
        unpack_int4(np.zeros(3, np.uint8), (4,), signed=True)
