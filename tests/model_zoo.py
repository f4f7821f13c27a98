"""Small generated ONNX models that reproduce the messiness of real-world exports.

Every pass must survive these: weights in Constant nodes, empty optional inputs,
outer-scope captures in subgraphs, local functions, external data, old opsets,
symbolic dims, fp16, integer inputs, pre-existing QDQ and rich metadata.
Everything is built with ``onnx.helper`` and fixed seeds so tests are reproducible
and need no network or torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT

# The IR version we stamp on models: the minimum the opsets need, and never above 10
# so that older onnxruntime releases used downstream can still load them.
MAX_IR_VERSION = 10

LOCAL_DOMAIN = "qpasses.test"

# Size used for symbolic non-batch dims by ``random_feeds``; 8 keeps 3x3 convs and
# strided convs valid while staying fast.
SYMBOLIC_DIM_SIZE = 8


# --------------------------------------------------------------------------- helpers


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _const(output: str, array: np.ndarray, name: str | None = None) -> onnx.NodeProto:
    """A ``Constant`` node, as PaddlePaddle and some TF exporters emit for weights."""
    return helper.make_node("Constant", [], [output], name=name or f"{output}_const", value=_init(output, array))


def _vi(name: str, shape: Sequence[int | str | None] | None, elem: int = FLOAT, doc: str = "") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape, doc_string=doc)


def _model(
    graph: onnx.GraphProto,
    opset: int,
    *,
    extra_opsets: Sequence[tuple[str, int]] = (),
    functions: Sequence[onnx.FunctionProto] = (),
    min_ir: int = 3,
    **kwargs: object,
) -> onnx.ModelProto:
    """Wrap ``graph`` with the lowest IR version its opsets (and features) need."""
    opsets = [helper.make_opsetid("", opset)]
    ir = min(MAX_IR_VERSION, max(min_ir, helper.find_min_ir_version_for(opsets)))
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]  # custom domains: no IR rule
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=ir,
        functions=list(functions),
        producer_name="qpasses-model-zoo",
        **kwargs,
    )
    return model


def _conv_bn_relu_nodes(
    rng: np.random.Generator,
    x: str,
    prefix: str,
    cin: int,
    cout: int,
    *,
    stride: int = 1,
) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Conv(3x3) -> BatchNormalization -> Relu with all parameters as initializers."""
    w = _f32(rng, cout, cin, 3, 3, scale=1.0 / np.sqrt(cin * 9))
    inits = [
        _init(f"{prefix}.conv.weight", w),
        _init(f"{prefix}.conv.bias", _f32(rng, cout, scale=0.1)),
        _init(f"{prefix}.bn.scale", (1.0 + _f32(rng, cout, scale=0.1))),
        _init(f"{prefix}.bn.bias", _f32(rng, cout, scale=0.1)),
        _init(f"{prefix}.bn.mean", _f32(rng, cout, scale=0.1)),
        _init(f"{prefix}.bn.var", (1.0 + np.abs(_f32(rng, cout, scale=0.2)))),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            [x, f"{prefix}.conv.weight", f"{prefix}.conv.bias"],
            [f"{prefix}.conv"],
            name=f"{prefix}/Conv",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[stride] * 2,
        ),
        helper.make_node(
            "BatchNormalization",
            [f"{prefix}.conv", f"{prefix}.bn.scale", f"{prefix}.bn.bias", f"{prefix}.bn.mean", f"{prefix}.bn.var"],
            [f"{prefix}.bn"],
            name=f"{prefix}/BatchNormalization",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", [f"{prefix}.bn"], [f"{prefix}.relu"], name=f"{prefix}/Relu"),
    ]
    return nodes, inits, f"{prefix}.relu"


def _head_nodes(
    rng: np.random.Generator, x: str, cin: int, classes: int, out: str
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """GlobalAveragePool -> Flatten -> Gemm(transB=1), the classic classifier head."""
    inits = [
        _init("fc.weight", _f32(rng, classes, cin, scale=1.0 / np.sqrt(cin))),
        _init("fc.bias", _f32(rng, classes, scale=0.1)),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="GlobalAveragePool"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="Flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], [out], name="Gemm", transB=1),
    ]
    return nodes, inits


# --------------------------------------------------------------------------- models


def conv_bn_relu(opset: int = 17) -> onnx.ModelProto:
    """Two Conv->BN->Relu blocks and a GAP/Flatten/Gemm head; dynamic batch ``N``."""
    rng = _rng(0)
    n1, i1, h = _conv_bn_relu_nodes(rng, "input", "block1", 3, 8)
    n2, i2, h = _conv_bn_relu_nodes(rng, h, "block2", 8, 16, stride=2)
    n3, i3 = _head_nodes(rng, h, 16, 10, "logits")
    graph = helper.make_graph(
        n1 + n2 + n3,
        "conv_bn_relu",
        [_vi("input", ["N", 3, 16, 16])],
        [_vi("logits", ["N", 10])],
        i1 + i2 + i3,
    )
    return _model(graph, opset)


def constant_node_weights() -> onnx.ModelProto:
    """Like :func:`conv_bn_relu` but every parameter is a ``Constant`` node (no initializers)."""
    model = conv_bn_relu(opset=13)
    graph = model.graph
    consts = [_const(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
    nodes = consts + list(graph.node)
    new_graph = helper.make_graph(
        nodes,
        "constant_node_weights",
        [_vi("input", [1, 3, 16, 16])],
        [_vi("logits", [1, 10])],
        [],
    )
    return _model(new_graph, 13)


def optional_empty_inputs() -> onnx.ModelProto:
    """Bias-less Conv, Resize with an empty ``roi`` slot, Clip with an empty ``min`` slot."""
    rng = _rng(1)
    inits = [
        _init("conv.weight", _f32(rng, 4, 3, 3, 3, scale=0.3)),
        _init("resize.scales", np.array([1.0, 1.0, 2.0, 2.0], np.float32)),
        _init("clip.max", np.array(6.0, np.float32)),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "conv.weight"], ["conv"], name="Conv_nobias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        # Resize(X, roi="", scales) -- optional input omitted in the middle; sizes omitted.
        helper.make_node("Resize", ["conv", "", "resize.scales"], ["resized"], name="Resize", mode="nearest"),
        # Clip(X, min="", max) -- upper bound only.
        helper.make_node("Clip", ["resized", "", "clip.max"], ["output"], name="Clip_max_only"),
    ]
    graph = helper.make_graph(
        nodes,
        "optional_empty_inputs",
        [_vi("input", [1, 3, 8, 8])],
        [_vi("output", [1, 4, 16, 16])],
        inits,
    )
    return _model(graph, 13)


def mul_same_input() -> onnx.ModelProto:
    """``Mul(x, x)`` and ``Add(y, y)``: one tensor feeding both inputs of a node."""
    rng = _rng(2)
    inits = [_init("fc.weight", _f32(rng, 16, 8, scale=0.25))]
    nodes = [
        helper.make_node("MatMul", ["input", "fc.weight"], ["x"], name="MatMul"),
        helper.make_node("Mul", ["x", "x"], ["y"], name="Square"),
        helper.make_node("Add", ["y", "y"], ["output"], name="Double"),
    ]
    graph = helper.make_graph(
        nodes,
        "mul_same_input",
        [_vi("input", ["batch", 16])],
        [_vi("output", ["batch", 8])],
        inits,
    )
    return _model(graph, 17)


def if_outer_scope() -> onnx.ModelProto:
    """An ``If`` whose branches capture an outer weight and activation.

    The then-branch also owns an initializer, the else-branch a Constant node, so a
    pass must look inside subgraphs to find every weight.
    """
    rng = _rng(3)
    outer_inits = [
        _init("fc0.weight", _f32(rng, 4, 8, scale=0.5)),
        _init("shared.weight", _f32(rng, 8, 8, scale=0.35)),
        _init("reduce.axes", np.array([1], np.int64)),
        _init("zero", np.array(0.0, np.float32)),
    ]
    then_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["hidden", "shared.weight"], ["then_mm"], name="then/MatMul"),
            helper.make_node("Add", ["then_mm", "then.bias"], ["then_out"], name="then/Add"),
        ],
        "then_branch",
        [],
        [_vi("then_out", [1, 8])],
        [_init("then.bias", _f32(rng, 8, scale=0.1))],
    )
    else_graph = helper.make_graph(
        [
            _const("else.scale", np.full((8,), 0.5, np.float32), name="else/Constant"),
            helper.make_node("MatMul", ["hidden", "shared.weight"], ["else_mm"], name="else/MatMul"),
            helper.make_node("Mul", ["else_mm", "else.scale"], ["else_out"], name="else/Mul"),
        ],
        "else_branch",
        [],
        [_vi("else_out", [1, 8])],
    )
    nodes = [
        helper.make_node("MatMul", ["input", "fc0.weight"], ["fc0"], name="fc0/MatMul"),
        helper.make_node("Relu", ["fc0"], ["hidden"], name="fc0/Relu"),
        helper.make_node("ReduceSum", ["input", "reduce.axes"], ["sum"], name="ReduceSum", keepdims=0),
        helper.make_node("Squeeze", ["sum"], ["sum_scalar"], name="Squeeze"),
        helper.make_node("Greater", ["sum_scalar", "zero"], ["cond"], name="Greater"),
        helper.make_node("If", ["cond"], ["output"], name="If", then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes,
        "if_outer_scope",
        [_vi("input", [1, 4])],
        [_vi("output", [1, 8])],
        outer_inits,
    )
    return _model(graph, 13)


def loop_model() -> onnx.ModelProto:
    """A ``Loop`` (3 trips) whose body captures an outer weight and an outer activation."""
    rng = _rng(4)
    inits = [
        _init("trip_count", np.array(3, np.int64)),
        _init("keep_going", np.array(True)),
        _init("proj.weight", _f32(rng, 8, 8, scale=0.3)),
        _init("loop.weight", _f32(rng, 8, 8, scale=0.3)),
    ]
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["v_in", "loop.weight"], ["body_mm"], name="body/MatMul"),
            helper.make_node("Add", ["body_mm", "offset"], ["body_add"], name="body/Add"),
            helper.make_node("Tanh", ["body_add"], ["v_out"], name="body/Tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/cond"),
            helper.make_node("Identity", ["v_out"], ["scan_out"], name="body/scan"),
        ],
        "loop_body",
        [
            _vi("iter", [], TensorProto.INT64),
            _vi("cond_in", [], TensorProto.BOOL),
            _vi("v_in", [1, 8]),
        ],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", [1, 8]), _vi("scan_out", [1, 8])],
    )
    nodes = [
        helper.make_node("MatMul", ["input", "proj.weight"], ["offset"], name="proj/MatMul"),
        helper.make_node("Loop", ["trip_count", "keep_going", "input"], ["final", "scans"], name="Loop", body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "loop_model",
        [_vi("input", [1, 8])],
        [_vi("final", [1, 8]), _vi("scans", [3, 1, 8])],
        inits,
    )
    return _model(graph, 13)


def local_function() -> onnx.ModelProto:
    """Two calls to a model-local ``LinearAct`` function with an attribute reference."""
    rng = _rng(5)
    alpha_ref = helper.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT)
    leaky = helper.make_node("LeakyRelu", ["Y"], ["Z"])
    leaky.attribute.append(alpha_ref)
    fn = helper.make_function(
        LOCAL_DOMAIN,
        "LinearAct",
        ["X", "W", "B"],
        ["Z"],
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"]), leaky],
        opset_imports=[helper.make_opsetid("", 17)],
        attributes=["alpha"],
        doc_string="MatMul + Add + LeakyRelu; alpha is supplied by the caller.",
    )
    inits = [
        _init("l1.weight", _f32(rng, 8, 16, scale=0.35)),
        _init("l1.bias", _f32(rng, 16, scale=0.1)),
        _init("l2.weight", _f32(rng, 16, 4, scale=0.25)),
        _init("l2.bias", _f32(rng, 4, scale=0.1)),
    ]
    nodes = [
        helper.make_node(
            "LinearAct", ["input", "l1.weight", "l1.bias"], ["h"], name="layer1", domain=LOCAL_DOMAIN, alpha=0.1
        ),
        helper.make_node(
            "LinearAct", ["h", "l2.weight", "l2.bias"], ["output"], name="layer2", domain=LOCAL_DOMAIN, alpha=0.2
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "local_function",
        [_vi("input", ["N", 8])],
        [_vi("output", ["N", 4])],
        inits,
    )
    return _model(graph, 17, extra_opsets=[(LOCAL_DOMAIN, 1)], functions=[fn], min_ir=8)


def external_data(tmpdir: str | os.PathLike[str]) -> Path:
    """Save :func:`conv_bn_relu` to ``tmpdir/model.onnx`` with weights in ``model.onnx.data``.

    Returns the model path; load it by path so the external data resolves.
    """
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save(
        conv_bn_relu(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=64,
    )
    return path


def _conv_relu_graph(name: str, seed: int, inits_as_inputs: bool = False) -> onnx.GraphProto:
    rng = _rng(seed)
    inits = [
        _init("conv1.weight", _f32(rng, 8, 3, 3, 3, scale=0.3)),
        _init("conv1.bias", _f32(rng, 8, scale=0.1)),
        _init("conv2.weight", _f32(rng, 8, 8, 3, 3, scale=0.15)),
        _init("conv2.bias", _f32(rng, 8, scale=0.1)),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["c1"],
            name="Conv_0",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu_1"),
        helper.make_node(
            "Conv",
            ["r1", "conv2.weight", "conv2.bias"],
            ["c2"],
            name="Conv_2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["c2"], ["output"], name="Relu_3"),
    ]
    inputs = [_vi("input", [1, 3, 16, 16])]
    if inits_as_inputs:
        # Old exporters (keep_initializers_as_inputs=True) list weights as graph inputs too.
        inputs += [_vi(t.name, list(t.dims)) for t in inits]
    return helper.make_graph(nodes, name, inputs, [_vi("output", [1, 8, 8, 8])], inits)


def opset11_model() -> onnx.ModelProto:
    """Conv/Relu at opset 11, with initializers also listed as graph inputs (IR 6 style)."""
    return _model(_conv_relu_graph("opset11_model", 6, inits_as_inputs=True), 11)


def opset12_model() -> onnx.ModelProto:
    """Conv/Relu at opset 12."""
    return _model(_conv_relu_graph("opset12_model", 7), 12)


def _clip_graph(
    name: str, seed: int, clip_nodes: Callable[[str, str, int], list[onnx.NodeProto]], extra_inits: list[TensorProto]
) -> onnx.GraphProto:
    rng = _rng(seed)
    inits = [
        _init("conv1.weight", _f32(rng, 8, 3, 3, 3, scale=0.5)),
        _init("conv1.bias", _f32(rng, 8, scale=0.1)),
        _init("conv2.weight", _f32(rng, 8, 8, 1, 1, scale=0.5)),
        _init("conv2.bias", _f32(rng, 8, scale=0.1)),
        *extra_inits,
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["c1"],
            name="Conv_0",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        *clip_nodes("c1", "r1", 0),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="Conv_1", kernel_shape=[1, 1]),
        *clip_nodes("c2", "output", 1),
    ]
    return helper.make_graph(
        nodes,
        name,
        [_vi("input", [1, 3, 8, 8])],
        [_vi("output", [1, 8, 8, 8])],
        inits,
    )


def clip_relu6_inputs() -> onnx.ModelProto:
    """ReLU6 as ``Clip(x, min, max)`` with min/max initializer inputs (opset 13)."""

    def clip(x: str, y: str, i: int) -> list[onnx.NodeProto]:
        return [helper.make_node("Clip", [x, "relu6.min", "relu6.max"], [y], name=f"Clip_{i}")]

    extra = [_init("relu6.min", np.array(0.0, np.float32)), _init("relu6.max", np.array(6.0, np.float32))]
    return _model(_clip_graph("clip_relu6_inputs", 8, clip, extra), 13)


def clip_relu6_attrs() -> onnx.ModelProto:
    """ReLU6 as opset-10 ``Clip`` with ``min``/``max`` attributes."""

    def clip(x: str, y: str, i: int) -> list[onnx.NodeProto]:
        return [helper.make_node("Clip", [x], [y], name=f"Clip_{i}", min=0.0, max=6.0)]

    return _model(_clip_graph("clip_relu6_attrs", 9, clip, []), 10)


def conv_no_group_attr() -> onnx.ModelProto:
    """Convs that omit ``group`` (and kernel_shape) next to a depthwise Conv with group=C."""
    rng = _rng(10)
    inits = [
        _init("pw1.weight", _f32(rng, 8, 3, 1, 1, scale=0.5)),
        _init("dw.weight", _f32(rng, 8, 1, 3, 3, scale=0.3)),
        _init("dw.bias", _f32(rng, 8, scale=0.1)),
        _init("pw2.weight", _f32(rng, 4, 8, 1, 1, scale=0.35)),
        _init("pw2.bias", _f32(rng, 4, scale=0.1)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "pw1.weight"], ["pw1"], name="pointwise1"),
        helper.make_node("Relu", ["pw1"], ["pw1_relu"], name="relu1"),
        helper.make_node(
            "Conv",
            ["pw1_relu", "dw.weight", "dw.bias"],
            ["dw"],
            name="depthwise",
            group=8,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["dw"], ["dw_relu"], name="relu2"),
        helper.make_node("Conv", ["dw_relu", "pw2.weight", "pw2.bias"], ["output"], name="pointwise2"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_no_group_attr",
        [_vi("input", [1, 3, 8, 8])],
        [_vi("output", [1, 4, 8, 8])],
        inits,
    )
    return _model(graph, 13)


def dynamic_dims() -> onnx.ModelProto:
    """Fully convolutional model with symbolic ``N``, ``H`` and ``W``."""
    rng = _rng(11)
    n1, i1, h = _conv_bn_relu_nodes(rng, "input", "block1", 3, 8)
    inits = i1 + [_init("head.weight", _f32(rng, 2, 8, 1, 1, scale=0.35))]
    nodes = n1 + [helper.make_node("Conv", [h, "head.weight"], ["output"], name="head/Conv")]
    graph = helper.make_graph(
        nodes,
        "dynamic_dims",
        [_vi("input", ["N", 3, "H", "W"])],
        [_vi("output", ["N", 2, "H", "W"])],
        inits,
    )
    return _model(graph, 17)


def float16_model() -> onnx.ModelProto:
    """Conv->Relu->Conv->Add with float16 input, weights and output."""
    rng = _rng(12)
    f16 = TensorProto.FLOAT16
    inits = [
        _init("conv1.weight", _f32(rng, 8, 3, 3, 3, scale=0.3).astype(np.float16)),
        _init("conv1.bias", _f32(rng, 8, scale=0.1).astype(np.float16)),
        _init("conv2.weight", _f32(rng, 4, 8, 3, 3, scale=0.15).astype(np.float16)),
        _init("residual.bias", _f32(rng, 4, 1, 1, scale=0.1).astype(np.float16)),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["c1"],
            name="Conv_0",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu_0"),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["c2"], name="Conv_1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "residual.bias"], ["output"], name="Add_0"),
    ]
    graph = helper.make_graph(
        nodes,
        "float16_model",
        [_vi("input", ["N", 3, 8, 8], f16)],
        [_vi("output", ["N", 4, 8, 8], f16)],
        inits,
    )
    return _model(graph, 17)


EMBEDDING_ROWS = 20


def int_input_model() -> onnx.ModelProto:
    """int64 token ids gathered from an embedding table, plus a float feature input."""
    rng = _rng(13)
    inits = [
        _init("embedding.weight", _f32(rng, EMBEDDING_ROWS, 8, scale=1.0)),
        _init("fc.weight", _f32(rng, 8, 4, scale=0.35)),
        _init("fc.bias", _f32(rng, 4, scale=0.1)),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding.weight", "ids"], ["emb"], name="Gather", axis=0),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], name="ReduceMean", axes=[1], keepdims=0),
        helper.make_node("Add", ["pooled", "features"], ["mixed"], name="Add"),
        helper.make_node("MatMul", ["mixed", "fc.weight"], ["mm"], name="MatMul"),
        helper.make_node("Add", ["mm", "fc.bias"], ["output"], name="Bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "int_input_model",
        [_vi("ids", ["N", 6], TensorProto.INT64), _vi("features", ["N", 8])],
        [_vi("output", ["N", 4])],
        inits,
    )
    return _model(graph, 13)


def already_quantized() -> onnx.ModelProto:
    """A QDQ model: activation Q/DQ pairs and an int8 per-channel weight behind a DQ."""
    rng = _rng(14)
    w = _f32(rng, 4, 3, 3, 3, scale=0.3)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127.0).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        _init("input.scale", np.array(0.02, np.float32)),
        _init("input.zero_point", np.array(0, np.uint8)),
        _init("conv.weight_quantized", w_q),
        _init("conv.weight_scale", w_scale),
        _init("conv.weight_zero_point", np.zeros(4, np.int8)),
        _init("conv.bias", _f32(rng, 4, scale=0.1)),
        _init("relu.scale", np.array(0.01, np.float32)),
        _init("relu.zero_point", np.array(0, np.uint8)),
    ]
    nodes = [
        helper.make_node(
            "QuantizeLinear", ["input", "input.scale", "input.zero_point"], ["input_q"], name="input_QuantizeLinear"
        ),
        helper.make_node(
            "DequantizeLinear",
            ["input_q", "input.scale", "input.zero_point"],
            ["input_dq"],
            name="input_DequantizeLinear",
        ),
        helper.make_node(
            "DequantizeLinear",
            ["conv.weight_quantized", "conv.weight_scale", "conv.weight_zero_point"],
            ["conv.weight_dq"],
            name="weight_DequantizeLinear",
            axis=0,
        ),
        helper.make_node(
            "Conv",
            ["input_dq", "conv.weight_dq", "conv.bias"],
            ["conv"],
            name="Conv",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv"], ["relu"], name="Relu"),
        helper.make_node(
            "QuantizeLinear", ["relu", "relu.scale", "relu.zero_point"], ["relu_q"], name="relu_QuantizeLinear"
        ),
        helper.make_node(
            "DequantizeLinear", ["relu_q", "relu.scale", "relu.zero_point"], ["output"], name="relu_DequantizeLinear"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "already_quantized",
        [_vi("input", [1, 3, 8, 8])],
        [_vi("output", [1, 4, 8, 8])],
        inits,
    )
    return _model(graph, 13)


def metadata_rich() -> onnx.ModelProto:
    """Doc strings, metadata_props, value_info, every attribute kind, ordered outputs.

    Attribute kinds: float (LeakyRelu.alpha), int (Flatten.axis), string (Conv.auto_pad,
    RNN.direction), tensor (Constant.value), floats (Constant.value_floats),
    ints (Conv.kernel_shape/pads), strings (RNN.activations). Outputs are declared in
    non-topological order and one of them is also consumed inside the graph.
    """
    rng = _rng(15)
    hidden = 5
    inits = [
        _init("conv.weight", _f32(rng, 4, 3, 3, 3, scale=0.3)),
        _init("conv.bias", _f32(rng, 4, scale=0.1)),
        _init("fc.weight", _f32(rng, 6, 4, scale=0.5)),
        _init("fc.bias", _f32(rng, 6, scale=0.1)),
        _init("rnn.W", _f32(rng, 1, hidden, 6, scale=0.4)),
        _init("rnn.R", _f32(rng, 1, hidden, hidden, scale=0.4)),
        _init("rnn.B", _f32(rng, 1, 2 * hidden, scale=0.1)),
    ]

    def node(op: str, ins: list[str], outs: list[str], name: str, **attrs: object) -> onnx.NodeProto:
        return helper.make_node(op, ins, outs, name=name, doc_string=f"{op} node {name}", **attrs)

    nodes = [
        node(
            "Conv",
            ["input", "conv.weight", "conv.bias"],
            ["conv_out"],
            "conv",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            dilations=[1, 1],
            group=1,
            auto_pad="NOTSET",
        ),
        node("LeakyRelu", ["conv_out"], ["act"], "leaky", alpha=0.1),
        node("GlobalAveragePool", ["act"], ["gap"], "gap"),
        node("Flatten", ["gap"], ["flat"], "flatten", axis=1),
        node("Gemm", ["flat", "fc.weight", "fc.bias"], ["feat"], "fc", alpha=1.0, beta=1.0, transA=0, transB=1),
        node("Constant", [], ["seq_shape"], "seq_shape", value=_init("seq_shape", np.array([1, 1, 6], np.int64))),
        node("Reshape", ["feat", "seq_shape"], ["seq"], "to_sequence"),
        node(
            "RNN",
            ["seq", "rnn.W", "rnn.R", "rnn.B"],
            ["rnn_y", "rnn_h"],
            "rnn",
            hidden_size=hidden,
            activations=["Tanh"],
            direction="forward",
        ),
        node("Constant", [], ["rnn_offset"], "rnn_offset", value_floats=[0.1, -0.1, 0.2, -0.2, 0.0]),
        node("Add", ["rnn_h", "rnn_offset"], ["rnn_out"], "rnn_offset_add"),
    ]
    value_info = [
        _vi("act", [1, 4, 8, 8], doc="LeakyRelu output"),
        _vi("flat", [1, 4]),
        _vi("seq", [1, 1, 6]),
        _vi("rnn_h", [1, 1, hidden]),
    ]
    graph = helper.make_graph(
        nodes,
        "metadata_rich",
        [_vi("input", [1, 3, 8, 8], doc="NCHW image")],
        [  # deliberately not in topological order; conv_out is also used internally
            _vi("rnn_out", [1, 1, hidden], doc="final RNN state"),
            _vi("feat", [1, 6], doc="Gemm features"),
            _vi("conv_out", [1, 4, 8, 8], doc="first conv"),
        ],
        inits,
        doc_string="Graph with every metadata field populated.",
        value_info=value_info,
    )
    model = _model(
        graph,
        17,
        doc_string="Model-level doc string.",
        domain="ai.qpasses.test",
        model_version=7,
        producer_version="1.2.3",
    )
    helper.set_model_props(model, {"author": "qpasses", "license": "MIT", "task": "test"})
    return model


ALL_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_relu": conv_bn_relu,
    "constant_node_weights": constant_node_weights,
    "optional_empty_inputs": optional_empty_inputs,
    "mul_same_input": mul_same_input,
    "if_outer_scope": if_outer_scope,
    "loop_model": loop_model,
    "local_function": local_function,
    "opset11_model": opset11_model,
    "opset12_model": opset12_model,
    "clip_relu6_inputs": clip_relu6_inputs,
    "clip_relu6_attrs": clip_relu6_attrs,
    "conv_no_group_attr": conv_no_group_attr,
    "dynamic_dims": dynamic_dims,
    "float16_model": float16_model,
    "int_input_model": int_input_model,
    "already_quantized": already_quantized,
    "metadata_rich": metadata_rich,
}


# --------------------------------------------------------------------------- feeds


def _index_bound(model: onnx.ModelProto, name: str) -> int:
    """Exclusive upper bound for an integer input, from the Gather table it indexes.

    Falls back to 2 when no Gather consumes it, which is safe for masks and flags.
    """
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = shapes.get(node.input[0])
            if dims:
                return int(dims[axis])
    return 2


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that ``model`` accepts.

    Fixed dims are kept (so a fixed batch of 1 stays 1); a symbolic or unknown leading
    dim becomes ``batch`` and other symbolic dims ``SYMBOLIC_DIM_SIZE``, consistently per
    dim name. Integer inputs stay inside the Gather table they index.
    """
    rng = _rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    sizes: dict[str, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        ttype = inp.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        shape: list[int] = []
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
                continue
            default = batch if axis == 0 else SYMBOLIC_DIM_SIZE
            key = dim.dim_param or f"{inp.name}:{axis}"
            shape.append(sizes.setdefault(key, default))
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.random(shape) > 0.5
        else:
            high = _index_bound(model, inp.name)
            feeds[inp.name] = rng.integers(0, high, size=shape).astype(dtype)
    return feeds
