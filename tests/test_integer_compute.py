"""integer_mac_share: MACs after onnxruntime's optimization vs hand-computed MACs of small models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.runtime.integer_compute import integer_mac_share

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng() -> None:
    """Each test draws the same data whatever ran before it (xdist and -k change the order)."""
    global RNG
    RNG = np.random.default_rng(0)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _qdq(nodes: list, inits: list, src: str, dst: str, scale: float, zp: np.ndarray) -> None:
    """src -> QuantizeLinear -> DequantizeLinear -> dst (per-tensor)."""
    inits += [_init(f"{dst}.s", np.float32(scale)), _init(f"{dst}.z", zp)]
    nodes += [
        helper.make_node("QuantizeLinear", [src, f"{dst}.s", f"{dst}.z"], [f"{dst}.q"]),
        helper.make_node("DequantizeLinear", [f"{dst}.q", f"{dst}.s", f"{dst}.z"], [dst]),
    ]


def _qdq_conv(nodes: list, inits: list, x: str, name: str, cin: int, cout: int, k: int) -> str:
    """A QDQ Conv (int8 per-tensor weight, int32 bias at input scale x weight scale: onnxruntime fuses
    only then) + Relu whose output is quantized (uint8). The input scale must be 0.01."""
    w = RNG.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    inits += [
        _init(f"{name}.wq", w),
        _init(f"{name}.ws", np.float32(0.01)),
        _init(f"{name}.wz", np.int8(0)),
        _init(f"{name}.bq", RNG.integers(-100, 100, cout).astype(np.int32)),
        _init(f"{name}.bs", np.float32(0.01 * 0.01)),
        _init(f"{name}.bz", np.int32(0)),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", [f"{name}.wq", f"{name}.ws", f"{name}.wz"], [f"{name}.w"]),
        helper.make_node("DequantizeLinear", [f"{name}.bq", f"{name}.bs", f"{name}.bz"], [f"{name}.b"]),
        helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name),
        helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"]),
    ]
    _qdq(nodes, inits, f"{name}.r", f"{name}.out", 0.05, np.uint8(0))
    return f"{name}.out"


def _model(nodes: list, inits: list, x_shape: list, out: str, out_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _x(shape: list[int]) -> dict[str, np.ndarray]:
    return {"x": RNG.uniform(-1, 1, shape).astype(np.float32)}


def test_qdq_conv_relu_runs_all_macs_in_integers() -> None:
    nodes: list = []
    inits: list = []
    _qdq(nodes, inits, "x", "x.dq", 0.01, np.uint8(128))
    out = _qdq_conv(nodes, inits, "x.dq", "conv", cin=3, cout=4, k=3)
    ic = integer_mac_share(_model(nodes, inits, [1, 3, 8, 8], out, [1, 4, 6, 6]), _x([1, 3, 8, 8]))
    # 1x4x6x6 outputs, each 3*3*3 MACs
    assert ic.total_macs == 1 * 4 * 6 * 6 * 3 * 3 * 3 == 3888
    assert ic.integer_macs == ic.total_macs and ic.share == 1.0
    assert list(ic.by_op_type) == ["QLinearConv"] and not ic.float_ops


def test_one_float_conv_gives_the_hand_computed_share() -> None:
    nodes: list = []
    inits: list = []
    _qdq(nodes, inits, "x", "x.dq", 0.01, np.uint8(128))
    mid = _qdq_conv(nodes, inits, "x.dq", "conv1", cin=3, cout=4, k=3)
    inits.append(_init("conv2.w", RNG.standard_normal((2, 4, 3, 3)).astype(np.float32)))
    nodes.append(helper.make_node("Conv", [mid, "conv2.w"], ["y"], name="conv2"))  # float weight: stays float
    ic = integer_mac_share(_model(nodes, inits, ["N", 3, 8, 8], "y", ["N", 2, 4, 4]), _x([2, 3, 8, 8]))
    integer = 2 * 4 * 6 * 6 * 27  # batch 2 (a symbolic dim: shapes come from the run), 4x6x6 outputs x 27
    floating = 2 * 2 * 4 * 4 * 36  # 2x4x4 outputs x 4*3*3
    assert (ic.integer_macs, ic.total_macs) == (integer, integer + floating)
    assert ic.share == pytest.approx(7776 / (7776 + 2304))
    assert [n.name for n in ic.float_ops] == ["conv2"] and ic.float_ops[0].macs == floating


def test_matmul_gemm_and_conv_transpose_macs() -> None:
    """Float MatMul (batched), Gemm (transB) and ConvTranspose (group 2) MACs from their shapes."""
    nodes = [
        helper.make_node("MatMul", ["x", "m.w"], ["m"], name="matmul"),  # [2,3,5,6] x [6,4]
        helper.make_node("Reshape", ["m", "shape"], ["r"]),  # -> [30, 4]
        helper.make_node("Gemm", ["r", "g.w"], ["g"], name="gemm", transB=1),  # [30,4] x [7,4]^T
        helper.make_node("Reshape", ["g", "shape2"], ["g4"]),  # -> [1, 6, 5, 7]
        helper.make_node("ConvTranspose", ["g4", "t.w"], ["y"], name="deconv", group=2, strides=[2, 2]),
    ]
    inits = [
        _init("m.w", RNG.standard_normal((6, 4)).astype(np.float32)),
        _init("shape", np.array([30, 4], np.int64)),
        _init("g.w", RNG.standard_normal((7, 4)).astype(np.float32)),
        _init("shape2", np.array([1, 6, 5, 7], np.int64)),
        _init("t.w", RNG.standard_normal((6, 3, 2, 2)).astype(np.float32)),
    ]  # C_in 6, M/group 3, 2x2
    ic = integer_mac_share(_model(nodes, inits, [2, 3, 5, 6], "y", [1, 6, 10, 14]), input_shapes={"x": [2, 3, 5, 6]})
    matmul, gemm, deconv = 2 * 3 * 5 * 4 * 6, 30 * 7 * 4, (1 * 6 * 5 * 7) * (3 * 2 * 2)
    assert ic.total_macs == matmul + gemm + deconv and ic.integer_macs == 0 and ic.share == 0.0
    assert {n.name: n.macs for n in ic.nodes} == {"matmul": matmul, "gemm": gemm, "deconv": deconv}


def test_qdq_matmul_is_an_integer_kernel() -> None:
    nodes: list = []
    inits: list = []
    _qdq(nodes, inits, "x", "x.dq", 0.01, np.uint8(128))
    inits += [
        _init("w.q", RNG.integers(-127, 128, (8, 3)).astype(np.int8)),
        _init("w.s", np.float32(0.02)),
        _init("w.z", np.int8(0)),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.z"], ["w"]),
        helper.make_node("MatMul", ["x.dq", "w"], ["m"], name="matmul"),
    ]
    _qdq(nodes, inits, "m", "y", 0.05, np.uint8(128))
    ic = integer_mac_share(_model(nodes, inits, [4, 8], "y", [4, 3]), _x([4, 8]))
    assert ic.total_macs == 4 * 3 * 8 and ic.share == 1.0
    assert ic.nodes[0].op_type in ("QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat")


def test_model_with_external_data(tmp_path) -> None:
    """A model file whose weights live in external data (as khmer_segmenter's do) gives the same MACs."""
    nodes: list = []
    inits: list = []
    _qdq(nodes, inits, "x", "x.dq", 0.01, np.uint8(128))
    mid = _qdq_conv(nodes, inits, "x.dq", "conv1", cin=3, cout=4, k=3)
    inits.append(_init("conv2.w", RNG.standard_normal((2, 4, 3, 3)).astype(np.float32)))
    nodes.append(helper.make_node("Conv", [mid, "conv2.w"], ["y"], name="conv2"))
    model = _model(nodes, inits, [1, 3, 8, 8], "y", [1, 2, 4, 4])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").exists()
    ic = integer_mac_share(str(path), _x([1, 3, 8, 8]))
    assert (ic.integer_macs, ic.total_macs) == (3888, 3888 + 1152)
