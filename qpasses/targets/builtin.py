"""The built-in targets: quantized-only Hexagon backends, float backends, onnxruntime CPU.

Per the QNN spec ("Choosing Between a Quantized or Non-Quantized Model"): CPU and GPU need a
non-quantized model; DSP, HTP and HTA need a quantized one. The kernel tables are what each
backend runs for every op it supports (its "supported kernels").
"""

from __future__ import annotations

import dataclasses
from itertools import product

from qpasses.quant.precision_type import Precision
from qpasses.targets.descriptor import ANY_OP, Kernel, TargetDescriptor


def _kernels(acts: tuple[int, ...], weights: tuple[int, ...], biases: tuple[int, ...]) -> tuple[Kernel, ...]:
    return tuple(
        Kernel(Precision("int", a), Precision("int", w), Precision("int", b))
        for a, w, b in product(acts, weights, biases)
    )


# Ops a Hexagon backend runs (after batch-norm folding); everything else is a finding.
_HEXAGON_OPS = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Concat",
    "Max",
    "Min",
    "PRelu",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Elu",
    "Clip",
    "AveragePool",
    "GlobalAveragePool",
    "MaxPool",
    "GlobalMaxPool",
    "Softmax",
    "LogSoftmax",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Resize",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "Split",
    "Expand",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "Tile",
    "Identity",
    "Sqrt",
    "Exp",
    "Abs",
    "Neg",
    "Gelu",
    "Erf",
    "Mean",
)

HTP = TargetDescriptor(
    name="htp",
    description="Hexagon Tensor Processor: quantized (A8/A16, W4/W8/W16, B8/B32), per-channel, fp16 ops",
    needs_quantized=True,
    ops=_HEXAGON_OPS,
    per_channel_weights=True,
    kernels={ANY_OP: _kernels((8, 16), (4, 8), (8, 32)) + _kernels((16,), (16,), (32,))},
    int32_ops=("Add", "Sub", "Mul", "Gather", "Reshape", "Concat", "Slice", "Transpose", "Squeeze", "Unsqueeze"),
    float_bitwidths=(16,),
    default_float_bw=16,
)
DSP = TargetDescriptor(
    name="dsp",
    description="Hexagon DSP: quantized-only, int8 activations and weights, per-channel",
    needs_quantized=True,
    ops=_HEXAGON_OPS,
    per_channel_weights=True,
    kernels={ANY_OP: _kernels((8,), (8,), (8, 32))},
    int32_ops=("Add", "Mul", "Gather", "Reshape"),
)
HTA = TargetDescriptor(
    name="hta",
    description="Hexagon Tensor Accelerator: quantized-only, int8, per-tensor weights",
    needs_quantized=True,
    ops=tuple(op for op in _HEXAGON_OPS if op not in ("LayerNormalization", "Gelu", "Erf")),
    per_channel_weights=False,
    kernels={ANY_OP: _kernels((8,), (8,), (32,))},
)
CPU = TargetDescriptor(
    name="cpu",
    description="float CPU backend (fp32; quantized models are incompatible)",
    needs_quantized=False,
    per_channel_weights=False,
    float_bitwidths=(32,),
    default_float_bw=32,
)
GPU = TargetDescriptor(
    name="gpu",
    description="float GPU backend (fp32/fp16; quantized models are incompatible)",
    needs_quantized=False,
    per_channel_weights=False,
    float_bitwidths=(16, 32),
    default_float_bw=32,
)
# What onnxruntime's CPU provider executes from a QDQ model: any op, int4..int16 weights,
# int8/int16 activations, float fallback in fp16 or fp32, and INT32 for the ops it has int32 kernels for.
# 8-bit tensors are stored as uint8 (portable: the same results on every CPU, see uint8_storage).
ORT = TargetDescriptor(
    name="ort",
    description="onnxruntime CPU QDQ, portable (uint8 storage: same results on every x86/ARM CPU): "
    "A8/A16, W4-W16, per-channel, float16/32 fallback, int32 ops",
    needs_quantized=False,
    per_channel_weights=True,
    kernels={ANY_OP: _kernels((8, 16), tuple(range(4, 17)), (8, 32))},
    int32_ops=(
        "Add",
        "Sub",
        "Mul",
        "Max",
        "Min",
        "Abs",
        "Neg",
        "Relu",
        "Clip",
        "Concat",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Gather",
        "Slice",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "Identity",
        "Expand",
        "Tile",
    ),
    float_bitwidths=(16, 32),
    default_float_bw=32,
    uint8_storage=True,
    mac_io_only=True,
)
# The same for deployments only on CPUs with VNNI (AVX512-VNNI / AVX-VNNI) or ARM: signed int8 weights
# (onnxruntime's u8s8 kernels, faster there); on x86 without VNNI they saturate and results collapse.
ORT_VNNI = dataclasses.replace(
    ORT,
    name="ort-vnni",
    uint8_storage=False,
    description="onnxruntime CPU QDQ with int8 weights, ONLY for x86 CPUs with VNNI or ARM "
    "(wrong results on x86 without VNNI): A8/A16, W4-W16, per-channel, float16/32, int32 ops",
)

BUILTIN_TARGETS = (HTP, DSP, HTA, CPU, GPU, ORT, ORT_VNNI)
