"""Small generated models, one per failure class seen in real exported models.

Each reproduces the structure that broke quantization (not the whole real model): a -inf masking
constant, PaddlePaddle's "?" dims, shape arithmetic feeding data (YOLO's anchor grid), an output
concatenating boxes with scores, decomposed LayerNorm / GELU blocks.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 13)]


def _model(nodes, inputs, outputs, inits, opset=OPSET) -> onnx.ModelProto:  # noqa: ANN001
    graph = helper.make_graph(nodes, "failure_class", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(rng: np.random.Generator, name: str, x: str, cin: int, cout: int, out: str) -> tuple[list, list]:
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
    return [helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1, 1, 1, 1])], inits


def neg_inf_mask(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Max(x, -inf) ... -> Where(mask, x, -inf) -> ReduceMax: masking constants."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv(rng, "conv", "x", 3, 4, "c")
    mask = np.ones((1, 4, 8, 8), bool)
    mask[..., :2] = False
    inits += [numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"), numpy_helper.from_array(mask, "mask")]
    nodes += [
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Max", ["r", "neg_inf"], ["m"], name="max_neg_inf"),
        helper.make_node("Where", ["mask", "m", "neg_inf"], ["w"], name="where_mask"),
        helper.make_node("ReduceMax", ["w"], ["y"], name="reduce", axes=[2, 3], keepdims=0),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )


def question_mark_dims(seed: int = 0) -> onnx.ModelProto:
    """PaddlePaddle export style: every unknown dim is dim_param "?" (not one symbol)."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv(rng, "conv", "x", 3, 4, "c")
    nodes += [helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 4, "?", "?"])],
        inits,
    )


def anchor_grid(seed: int = 0, *, dynamic: bool = False) -> onnx.ModelProto:
    """YOLO-style decoding: a grid from Shape -> Gather -> Cast -> Range added to the conv output."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv(rng, "conv", "x", 3, 2, "c")
    inits += [
        numpy_helper.from_array(np.array(3, np.int64), "w_axis"),
        numpy_helper.from_array(np.array(0.5, np.float32), "start"),
        numpy_helper.from_array(np.array(1.0, np.float32), "delta"),
        numpy_helper.from_array(np.array(8.0, np.float32), "stride"),
    ]
    nodes += [
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "w_axis"], ["width_i"], name="gather_w", axis=0),
        helper.make_node("Cast", ["width_i"], ["width"], name="cast_w", to=TensorProto.FLOAT),
        helper.make_node("Add", ["width", "start"], ["limit"], name="limit"),
        helper.make_node("Range", ["start", "limit", "delta"], ["grid"], name="range"),
        helper.make_node("Mul", ["grid", "stride"], ["grid_px"], name="grid_px"),
        helper.make_node("Add", ["c", "grid_px"], ["y"], name="decode"),
    ]
    shape = ["N", 3, 8, 16] if dynamic else [1, 3, 8, 16]
    out_shape = ["N", 2, 8, 16] if dynamic else [1, 2, 8, 16]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )


def boxes_and_scores(seed: int = 0) -> onnx.ModelProto:
    """A detector head: box coordinates (0-320 px) concatenated with class scores (0-1) in one output."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv(rng, "box_conv", "x", 3, 4, "box_raw")
    n2, i2 = _conv(rng, "cls_conv", "x", 3, 2, "cls_raw")
    nodes += n2
    inits += i2 + [
        numpy_helper.from_array(np.array(160.0, np.float32), "scale_px"),
        numpy_helper.from_array(np.array(160.0, np.float32), "offset_px"),
        numpy_helper.from_array(np.array([1, 0, 64], np.int64), "flat"),
    ]
    nodes += [
        helper.make_node("Tanh", ["box_raw"], ["box_t"], name="box_tanh"),
        helper.make_node("Mul", ["box_t", "scale_px"], ["box_s"], name="box_scale"),
        helper.make_node("Add", ["box_s", "offset_px"], ["boxes"], name="box_offset"),
        helper.make_node("Sigmoid", ["cls_raw"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Reshape", ["boxes", "flat"], ["boxes_f"], name="boxes_flat"),
        helper.make_node("Reshape", ["scores", "flat"], ["scores_f"], name="scores_flat"),
        helper.make_node("Concat", ["boxes_f", "scores_f"], ["y"], name="head_concat", axis=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 64])],
        inits,
    )


def feeds(
    model: onnx.ModelProto, n: int, seed: int = 1, batch: int = 1, shape: tuple[int, ...] | None = None
) -> list[dict[str, np.ndarray]]:
    """Deterministic image-like feeds for the single float input."""
    rng = np.random.default_rng(seed)
    (inp,) = model.graph.input
    dims = shape or tuple(d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim)
    return [{inp.name: rng.uniform(0, 1, dims).astype(np.float32)} for _ in range(n)]


def outlier_intermediate(seed: int = 0) -> onnx.ModelProto:
    """A tensor that carries a huge constant spike and takes it back out: no 8-bit grid of its range
    keeps the small signal riding on it (what transformer internals and badly scaled heads do)."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv(rng, "conv", "x", 3, 4, "c")
    spike = np.zeros((1, 4, 8, 8), np.float32)
    spike[0, 0, 0, 0] = 1e4
    inits += [numpy_helper.from_array(spike, "spike")]
    nodes += [
        helper.make_node("Add", ["c", "spike"], ["lifted"], name="lift"),
        helper.make_node("Sub", ["lifted", "spike"], ["back"], name="drop"),
        helper.make_node("Relu", ["back"], ["y"], name="relu"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )


def float_min_attention_mask(seed: int = 0) -> onnx.ModelProto:
    """HF-style attention: scores + (1 - mask) * float32 min -> Softmax -> MatMul (unidic_tagger's ALBERT)."""
    rng = np.random.default_rng(seed)
    wq = (rng.standard_normal((8, 8)) * 0.5).astype(np.float32)
    wk = (rng.standard_normal((8, 8)) * 0.5).astype(np.float32)
    keep = np.ones((1, 1, 6), np.float32)
    keep[..., 4:] = 0  # the last two positions are padding
    inits = [
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(wk, "wk"),
        numpy_helper.from_array(keep, "keep"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "f32_min"),
        numpy_helper.from_array(np.array([0, 2, 1], np.int64), "perm"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Sub", ["one", "keep"], ["pad"], name="pad"),
        helper.make_node("Mul", ["pad", "f32_min"], ["bias"], name="bias"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "x"], ["y"], name="context"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])],
        inits,
    )


def log_power_spectrum(seed: int = 0) -> onnx.ModelProto:
    """DNSMOS-style front end: STFT as a MatMul, power = re^2 + im^2, log10(max(power, 1e-12)), then a layer."""
    rng = np.random.default_rng(seed)
    n = np.arange(16)
    k = np.arange(9)[:, None]
    re = np.cos(2 * np.pi * k * n / 16).T.astype(np.float32)
    im = np.sin(2 * np.pi * k * n / 16).T.astype(np.float32)
    w = (rng.standard_normal((9, 4)) * 0.3).astype(np.float32)
    inits = [
        numpy_helper.from_array(re, "dft_re"),
        numpy_helper.from_array(im, "dft_im"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
        numpy_helper.from_array(np.array(np.log(10), np.float32), "ln10"),
        numpy_helper.from_array(w, "w"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "dft_re"], ["re"], name="stft_re"),
        helper.make_node("MatMul", ["x", "dft_im"], ["im"], name="stft_im"),
        helper.make_node("Mul", ["re", "re"], ["re2"], name="re2"),
        helper.make_node("Mul", ["im", "im"], ["im2"], name="im2"),
        helper.make_node("Add", ["re2", "im2"], ["power"], name="power"),
        helper.make_node("Max", ["power", "eps"], ["floored"], name="floor"),
        helper.make_node("Log", ["floored"], ["ln"], name="log"),
        helper.make_node("Div", ["ln", "ln10"], ["logpow"], name="log10"),
        helper.make_node("MatMul", ["logpow", "w"], ["y"], name="dense"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 20, 4])],
        inits,
    )


def log_features_front_end(seed: int = 0) -> onnx.ModelProto:
    """``log_power_spectrum`` whose log features a small first layer reads (36 of 4,420 weights, as DNSMOS's
    first Conv), then a large one: logpow -> MatMul(w1) -> Relu -> MatMul(w2). The first layer takes
    differences of neighbouring bins (a spectral slope, as an edge filter on a spectrogram): small next
    to the features' range, so their rounding shows."""
    base = log_power_spectrum(seed)
    rng = np.random.default_rng(seed + 1)
    graph = base.graph
    slope = np.zeros((9, 4), np.float32)
    for j in range(4):
        slope[2 * j, j], slope[2 * j + 1, j] = 1.0, -1.0
    w1 = next(t for t in graph.initializer if t.name == "w")
    w1.CopyFrom(numpy_helper.from_array(slope, "w"))
    dense = next(n for n in graph.node if n.name == "dense")
    dense.output[0] = "h"
    graph.node.extend(
        [
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="wide"),
        ]
    )
    graph.initializer.append(numpy_helper.from_array((rng.standard_normal((4, 1024)) * 0.5).astype(np.float32), "w2"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 20, 1024]))
    onnx.checker.check_model(base)
    return base


def quiet_audio_feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Frames of audio whose loudness spans 60 dB: most powers are far below one 8-bit step of the loudest."""
    rng = np.random.default_rng(seed)
    gain = np.logspace(-3, 0, 20, dtype=np.float32)[None, :, None]
    return [{"x": (rng.standard_normal((1, 20, 16)).astype(np.float32) * gain)} for _ in range(n)]


def identity_and_noop_casts(seed: int = 0) -> onnx.ModelProto:
    """ALBERT-style shared weight reached through Identity (unidic_tagger), and float->float Casts
    around every layer (open_nsfw's export): x -> MatMul(w) -> Cast(float) -> Relu -> MatMul(Identity(w))."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((8, 8)) * 0.4).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm0"),
        helper.make_node("Cast", ["h"], ["h_cast"], name="noop_cast", to=TensorProto.FLOAT),
        helper.make_node("Relu", ["h_cast"], ["r"], name="relu"),
        helper.make_node("Identity", ["w"], ["w_shared"], name="share"),
        helper.make_node("MatMul", ["r", "w_shared"], ["m1"], name="mm1"),
        helper.make_node("Cast", ["m1"], ["y"], name="output_cast", to=TensorProto.FLOAT),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(w, "w")],
    )


def transposed_batchnorm_layers(seed: int = 0) -> onnx.ModelProto:
    """open_nsfw's export (a TensorFlow model through PyTorch): each Conv writes NCHW, a Transpose
    makes it NHWC, the bias and batch norm follow as Add(b) -> Sub(mean) -> Mul(gamma/std) ->
    Add(beta) with [C] constants, then Relu and a Transpose back: two such layers, then a Softmax
    over channels as the output (a probability the model returns)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate(((3, 8), (8, 8))):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        consts = {
            "b": rng.standard_normal(cout) * 0.1,
            "mean": rng.standard_normal(cout) * 0.5,
            "scale": rng.uniform(0.5, 2.0, cout),
            "beta": rng.standard_normal(cout) * 0.2,
        }
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits += [numpy_helper.from_array(v.astype(np.float32), f"{k}{i}") for k, v in consts.items()]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("Transpose", [f"c{i}"], [f"t{i}"], name=f"to_nhwc{i}", perm=[0, 2, 3, 1]),
            helper.make_node("Add", [f"t{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}"),
            helper.make_node("Sub", [f"a{i}", f"mean{i}"], [f"s{i}"], name=f"sub_mean{i}"),
            helper.make_node("Mul", [f"s{i}", f"scale{i}"], [f"m{i}"], name=f"mul_scale{i}"),
            helper.make_node("Add", [f"m{i}", f"beta{i}"], [f"n{i}"], name=f"add_beta{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Transpose", [f"r{i}"], [f"h{i}"], name=f"to_nchw{i}", perm=[0, 3, 1, 2]),
        ]
        x = f"h{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probs"], name="softmax", axis=1))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 8, 8, 8])],
        inits,
    )


def regression_head(seed: int = 0) -> onnx.ModelProto:
    """DNSMOS-style score head: features -> Relu -> MatMul (2-D, pooled features) -> bias Add -> the score
    the model returns. The head weighs the two features +1 / -1: where the calibration data has them
    move together (see ``correlated_feeds``), its scores span almost nothing, while a real input with
    each feature inside its calibrated range scores far beyond that."""
    rng = np.random.default_rng(seed)
    w1 = (np.eye(2) + 0.01 * rng.standard_normal((2, 2))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="features"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "head_w"], ["m"], name="head"),
        helper.make_node("Add", ["m", "head_b"], ["score"], name="head_bias"),
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32), "head_w"),
        numpy_helper.from_array(np.array([2.0], np.float32), "head_b"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        inits,
    )


def correlated_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for ``regression_head``: both features equal, in [0, 1]."""
    rng = np.random.default_rng(seed)
    return [{"x": np.repeat(rng.uniform(0, 1, (8, 1)), 2, axis=1).astype(np.float32)} for _ in range(n)]


def long_tail_tanh(seed: int = 0, *, with_peak: bool = False) -> onnx.ModelProto:
    """A pre-activation whose rare rows run 12x wider than the rest, read by Tanh (which saturates
    anyway): min-max spends the 8-bit grid on the tail, the bulk gets a coarse step (``tail_feeds``).
    ``with_peak``: a second output, the row maximum of that tensor, which lives on the tail."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((16, 8)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["t"], name="mm1"),
        helper.make_node("Tanh", ["t"], ["th"], name="tanh"),
        helper.make_node("MatMul", ["th", "w2"], ["y"], name="mm2"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])]
    if with_peak:
        nodes.append(helper.make_node("ReduceMax", ["t"], ["peak"], name="peak", axes=[1], keepdims=0))
        outputs.append(helper.make_tensor_value_info("peak", TensorProto.FLOAT, ["n"]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        outputs,
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )


def tail_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of 64 rows for ``long_tail_tanh``: normal rows, 2% of them 12x wider."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((64, 16)).astype(np.float32)
        x[rng.random(64) < 0.02] *= 12.0
        out.append({"x": x})
    return out
