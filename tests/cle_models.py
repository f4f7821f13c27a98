"""Small generated models for batch-norm folding and cross-layer equalization tests.

Each builder uses ``onnx.helper`` with a fixed seed; names are stable so tests can
look up nodes and weights. ``Builder`` keeps the boilerplate (weights as initializers
or Constant nodes, BN parameters, graph wrapping) out of the model definitions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


class Builder:
    def __init__(self, seed: int, *, constants: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.constants = constants  # weights as Constant nodes (PaddlePaddle style)

    def randn(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def weight(self, name: str, array: np.ndarray, *, constant: bool | None = None) -> str:
        if self.constants if constant is None else constant:
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(np.asarray(array), name)
                )
            )
        else:
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        group: int | None = 1,
        bias: bool = True,
        pad: bool = True,
        scale: float | None = None,
        transpose: bool = False,
        **attrs: object,
    ) -> str:
        g = group or 1
        shape = (cin, cout // g, k, k) if transpose else (cout, cin // g, k, k)
        w = self.weight(f"{name}.weight", self.randn(*shape, scale=scale or 1.0 / np.sqrt(cin // g * k * k)))
        ins = [x, w] + ([self.weight(f"{name}.bias", self.randn(cout, scale=0.1))] if bias else [])
        if group is not None:
            attrs["group"] = group
        if pad and k > 1:
            attrs["pads"] = [k // 2] * 4
        return self.node("ConvTranspose" if transpose else "Conv", ins, name, kernel_shape=[k, k], **attrs)

    def bn(
        self,
        x: str,
        name: str,
        c: int,
        *,
        beta: np.ndarray | None = None,
        gamma: np.ndarray | None = None,
        var: np.ndarray | None = None,
        **attrs: object,
    ) -> str:
        params = [
            gamma if gamma is not None else 1.0 + self.randn(c, scale=0.2),
            beta if beta is not None else self.randn(c, scale=0.2),
            self.randn(c, scale=0.2),
            var if var is not None else 0.5 + np.abs(self.randn(c, scale=0.5)),
        ]
        ins = [
            self.weight(f"{name}.{p}", np.asarray(a, np.float32))
            for p, a in zip(("scale", "bias", "mean", "var"), params, strict=True)
        ]
        return self.node("BatchNormalization", [x, *ins], name, epsilon=1e-5, **attrs)

    def model(
        self, name: str, inputs: list[tuple[str, list[int | str]]], outputs: list[str], opset: int = 13
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs],
            self.inits,
        )
        opsets = [helper.make_opsetid("", opset)]
        ir = min(8, helper.find_min_ir_version_for(opsets))
        model = helper.make_model(graph, opset_imports=opsets, ir_version=ir)
        # Output shapes come from shape inference, so builders only state input shapes.
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output
        for out, typed in zip(model.graph.output, inferred, strict=True):
            out.CopyFrom(typed)
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------- chains


def pair_100x() -> onnx.ModelProto:
    """Conv -> Relu -> Conv whose conv1 output-channel ranges span 100x (and conv2 compensates)."""
    b = Builder(20)
    factors = np.logspace(0, 2, 8).astype(np.float32)  # 1 .. 100
    w1 = b.randn(8, 4, 3, 3, scale=0.2) * factors[:, None, None, None]
    w2 = b.randn(6, 8, 1, 1, scale=0.3) / factors[None, :, None, None]
    b.node(
        "Conv",
        ["input", b.weight("conv1.weight", w1), b.weight("conv1.bias", b.randn(8, scale=0.1) * factors)],
        "conv1",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )
    b.node("Relu", ["conv1"], "relu1")
    b.node(
        "Conv",
        ["relu1", b.weight("conv2.weight", w2), b.weight("conv2.bias", b.randn(6, scale=0.1))],
        "output",
        kernel_shape=[1, 1],
    )
    return b.model("pair_100x", [("input", [1, 4, 8, 8])], ["output"])


def depthwise_chain(constants: bool = True) -> onnx.ModelProto:
    """Conv(no group attr, no bias)+BN+Relu -> depthwise+BN+Relu -> 1x1 Conv+BN+Relu -> grouped Conv.

    Weights in Constant nodes by default; covers the triple, biasless convs and a
    grouped conv at the end of the chain.
    """
    b = Builder(21, constants=constants)
    x = b.conv("input", "conv0", 3, 8, group=None, bias=False)
    x = b.node("Relu", [b.bn(x, "bn0", 8)], "relu0")
    x = b.conv(x, "dw", 8, 8, group=8)
    x = b.node("Relu", [b.bn(x, "bn1", 8)], "relu1")
    x = b.conv(x, "pw", 8, 16, k=1, bias=False)
    x = b.node("Relu", [b.bn(x, "bn2", 16)], "relu2")
    b.conv(x, "output", 16, 4, group=2)
    return b.model("depthwise_chain", [("input", ["N", 3, 8, 8])], ["output"])


def grouped_chain() -> onnx.ModelProto:
    """Grouped convs as first and second layer: Conv(g=2) -> Relu -> Conv(g=4) -> Relu -> Conv."""
    b = Builder(22)
    x = b.node("Relu", [b.conv("input", "conv0", 4, 8, group=2)], "relu0")
    x = b.node("Relu", [b.conv(x, "conv1", 8, 8, group=4)], "relu1")
    b.conv(x, "output", 8, 4, k=1)
    return b.model("grouped_chain", [("input", [2, 4, 6, 6])], ["output"])


def long_chain() -> onnx.ModelProto:
    """Five 3x3 convs in a row: overlapping pairs that need several sweeps to converge."""
    b = Builder(23)
    x, c = "input", 3
    for i, cout in enumerate((8, 12, 8, 16)):
        w = b.randn(cout, c, 3, 3, scale=0.3) * np.logspace(0, 1, cout)[:, None, None, None].astype(np.float32)
        b.node(
            "Conv",
            [x, b.weight(f"conv{i}.weight", w), b.weight(f"conv{i}.bias", b.randn(cout, scale=0.1))],
            f"conv{i}",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        )
        x, c = b.node("Relu", [f"conv{i}"], f"relu{i}"), cout
    b.conv(x, "output", c, 4)
    return b.model("long_chain", [("input", [1, 3, 8, 8])], ["output"])


def convtranspose_chain() -> onnx.ModelProto:
    """Conv+BN+Relu -> grouped ConvTranspose(stride 2)+BN+Relu -> Conv(1x1)."""
    b = Builder(24)
    x = b.node("Relu", [b.bn(b.conv("input", "conv0", 3, 8), "bn0", 8)], "relu0")
    x = b.conv(x, "deconv", 8, 6, group=2, transpose=True, pad=False, strides=[2, 2])
    x = b.node("Relu", [b.bn(x, "bn1", 6)], "relu1")
    b.conv(x, "output", 6, 4, k=1)
    return b.model("convtranspose_chain", [("input", [1, 3, 5, 5])], ["output"])


def gemm_mlp() -> onnx.ModelProto:
    """Gemm(transB=1)+BN+Relu -> Gemm(C [1, 24], alpha, beta=0.5)+BN+Relu -> Gemm(transB=1, no C)."""
    b = Builder(25)
    b.node(
        "Gemm",
        ["input", b.weight("fc0.weight", b.randn(32, 16, scale=0.3)), b.weight("fc0.bias", b.randn(32, scale=0.1))],
        "fc0",
        transB=1,
    )
    x = b.node("Relu", [b.bn("fc0", "bn0", 32)], "relu0")
    b.node(
        "Gemm",
        [x, b.weight("fc1.weight", b.randn(32, 24, scale=0.3)), b.weight("fc1.bias", b.randn(1, 24, scale=0.1))],
        "fc1",
        alpha=0.75,
        beta=0.5,
    )
    x = b.node("Relu", [b.bn("fc1", "bn1", 24)], "relu1")
    b.node("Gemm", [x, b.weight("fc2.weight", b.randn(10, 24, scale=0.3))], "output", transB=1)
    return b.model("gemm_mlp", [("input", ["N", 16])], ["output"])


def matmul_mlp() -> onnx.ModelProto:
    """MatMul+BN+Relu -> MatMul+Add(bias first)+BN+Relu -> MatMul (graph output, no bias).

    bn1 has a high beta (see ``hba_model``), so absorption must give the last MatMul a bias.
    """
    b = Builder(26)
    b.node("MatMul", ["input", b.weight("mm0.weight", b.randn(16, 32, scale=0.3))], "mm0")
    x = b.node("Relu", [b.bn("mm0", "bn0", 32)], "relu0")
    b.node("MatMul", [x, b.weight("mm1.weight", b.randn(32, 24, scale=0.3))], "mm1")
    b.node("Add", [b.weight("mm1.bias", b.randn(24, scale=0.1)), "mm1"], "mm1_add")
    x = b.node("Relu", [b.bn("mm1_add", "bn1", 24, **_high_bias(b, 24))], "relu1")
    b.node("MatMul", [x, b.weight("mm2.weight", b.randn(24, 10, scale=0.3))], "output")
    return b.model("matmul_mlp", [("input", [4, 16])], ["output"])


def shared_weight_bn_output() -> onnx.ModelProto:
    """Two convs share one weight; the first one's BN writes a graph output directly."""
    b = Builder(27)
    w = b.weight("shared.weight", b.randn(4, 3, 3, 3, scale=0.3))
    b.node("Conv", ["input", w], "conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.bn("conv_a", "out_a", 4)
    b.node("Conv", ["input", w], "out_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return b.model("shared_weight_bn_output", [("input", [1, 3, 6, 6])], ["out_a", "out_b"])


# --------------------------------------------------------------------------- near misses


def branching() -> onnx.ModelProto:
    """conv0 -> Relu feeds two convs (a fork), so conv0 cannot be equalized with either."""
    b = Builder(28)
    x = b.node("Relu", [b.conv("input", "conv0", 3, 8)], "relu0")
    left = b.conv(x, "left", 8, 4)
    right = b.conv(x, "right", 8, 4)
    b.node("Add", [left, right], "output")
    return b.model("branching", [("input", [1, 3, 6, 6])], ["output"])


def unsupported_activations() -> onnx.ModelProto:
    """conv -> Sigmoid -> conv -> LeakyRelu -> conv -> Clip(0, 3) -> conv: nothing is equalizable."""
    b = Builder(29)
    x = b.node("Sigmoid", [b.conv("input", "conv0", 3, 4)], "sigmoid")
    x = b.node("LeakyRelu", [b.conv(x, "conv1", 4, 4)], "leaky", alpha=0.1)
    lo, hi = b.weight("clip.min", np.array(0.0, np.float32)), b.weight("clip.max", np.array(3.0, np.float32))
    x = b.node("Clip", [b.conv(x, "conv2", 4, 4), lo, hi], "clip3")
    b.conv(x, "output", 4, 4)
    return b.model("unsupported_activations", [("input", [1, 3, 6, 6])], ["output"])


def unfoldable_bn() -> onnx.ModelProto:
    """BNs that must stay: conv output also read elsewhere, BN after an Add, BN scale a graph input."""
    b = Builder(30)
    c0 = b.conv("input", "conv0", 3, 4)
    bn_a = b.bn(c0, "bn_shared_input", 4)
    s = b.node("Add", [bn_a, c0], "add")  # conv0 is read by the BN and by the Add
    bn_b = b.bn(s, "bn_after_add", 4)
    c1 = b.conv(bn_b, "conv1", 4, 4)
    b.node("BatchNormalization", [c1, "gamma_in", "bn_dyn.bias", "bn_dyn.mean", "bn_dyn.var"], "output")
    for p, a in (
        ("bias", b.randn(4, scale=0.1)),
        ("mean", b.randn(4, scale=0.1)),
        ("var", 1 + np.abs(b.randn(4, scale=0.1))),
    ):
        b.weight(f"bn_dyn.{p}", a)
    return b.model("unfoldable_bn", [("input", [1, 3, 6, 6]), ("gamma_in", [4])], ["output"])


# --------------------------------------------------------------------------- exactness probes


def _high_bias(b: Builder, c: int) -> dict[str, np.ndarray]:
    """BN parameters with beta far above 3|gamma| and a huge variance.

    The normalized activation then stays within about +-1 for these test inputs, so the
    pre-activation never drops below beta - 3|gamma|: absorption through a Relu is exact.
    """
    gamma = (0.2 + 0.3 * b.rng.random(c)) * np.where(np.arange(c) % 3 == 0, -1, 1)
    return {
        "gamma": gamma.astype(np.float32),
        "beta": (2.0 + 2.0 * b.rng.random(c)).astype(np.float32),
        "var": np.full(c, 400.0, np.float32),
    }


def hba_model(*, relu: bool = True, padded: bool = False) -> onnx.ModelProto:
    """Conv+BN(+Relu, else MaxPool)->Conv with a high-bias BN (see ``_high_bias``)."""
    b = Builder(31)
    c = 8
    x = b.bn(b.conv("input", "conv1", 3, c, scale=0.2), "bn1", c, **_high_bias(b, c))
    if relu:
        x = b.node("Relu", [x], "relu1")
    else:
        x = b.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    b.conv(x, "output", c, 6, k=3 if padded else 1)
    return b.model("hba_model", [("input", [1, 3, 8, 8])], ["output"])


def relu6_small() -> onnx.ModelProto:
    """Conv -> Clip(0, 6) (constant inputs from Constant nodes) -> Conv with activations well below 6."""
    b = Builder(32)
    lo = b.weight("r6.min", np.array(0.0, np.float32), constant=True)
    hi = b.weight("r6.max", np.array(6.0, np.float32), constant=True)
    x = b.node("Clip", [b.conv("input", "conv0", 3, 8, scale=0.1), lo, hi], "relu6")
    b.conv(x, "output", 8, 4)
    return b.model("relu6_small", [("input", [1, 3, 6, 6])], ["output"])


EQUIVALENCE_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "pair_100x": pair_100x,
    "depthwise_chain_constants": depthwise_chain,
    "depthwise_chain_initializers": lambda: depthwise_chain(constants=False),
    "grouped_chain": grouped_chain,
    "long_chain": long_chain,
    "convtranspose_chain": convtranspose_chain,
    "gemm_mlp": gemm_mlp,
    "matmul_mlp": matmul_mlp,
    "shared_weight_bn_output": shared_weight_bn_output,
    "branching": branching,
    "unsupported_activations": unsupported_activations,
    "unfoldable_bn": unfoldable_bn,
    "hba_relu": hba_model,
    "hba_maxpool": lambda: hba_model(relu=False),
    "relu6_small": relu6_small,
}
