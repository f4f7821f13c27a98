"""IR ops as torch functions: evaluate a region of the graph with autograd.

``TorchProgram(graph, ops, inputs, outputs)`` runs the given ops (in order) on torch tensors, reading
constants from the IR and letting the caller swap any constant (a weight) for a tensor computed
from trainable parameters. Each op type maps to one function of ``(op, args, opset)`` written from
the ONNX spec; attributes and layouts torch has no direct form for (asymmetric pads, SAME
padding, ONNX's pre-13 Softmax, AveragePool's divisor with padding) are handled explicitly, and
what is not handled raises ``Unsupported`` naming the op, so a pass can skip that layer or block
with a reason instead of training on wrong numbers. The tests hold every mapping to onnxruntime.

The mappings are ``torch_conv_ops``', ``torch_math_ops``' and ``torch_shape_ops``' (joined in
``OPS`` here), what they share ``torch_op_base``'s; this module runs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from graph_ir import Graph, Op
from qpasses.learned.torch_conv_ops import CONV_OPS
from qpasses.learned.torch_math_ops import MATH_OPS
from qpasses.learned.torch_op_base import OpFn, Unsupported, Value, to_torch
from qpasses.learned.torch_shape_ops import SHAPE_OPS

OPS: dict[str, OpFn] = {**CONV_OPS, **MATH_OPS, **SHAPE_OPS}
"""Every mapped op type (its ``OpFn``), from the three mapping modules."""


def supported_op_types() -> list[str]:
    return sorted(OPS)


class TorchProgram:
    """Ops of an IR region run with torch: ``program(feeds, weights) -> [outputs]``.

    ``ops`` in a topological order; ``inputs`` the region's activation inputs (fed each call);
    every other tensor an op reads must be computed in the region or be a constant of the graph
    (read once, as torch tensors). ``weights`` swaps constants for given tensors per call (the
    fake-quantized weights being trained). Ops no output depends on are left out. Raises
    ``Unsupported`` at construction for an op type, attribute or extra output the mapping does not cover.
    """

    def __init__(
        self,
        graph: Graph,
        ops: Sequence[Op],
        inputs: Sequence[str],
        outputs: Sequence[str],
        *,
        opset: int | None = None,
    ) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.opset = opset if opset is not None else (graph.opset("") or 1)
        # Only the ops an output depends on: a region may end with ops the loss never reads (an ArgMax
        # after the logits a block is cut at), which need no mapping and no time.
        wanted = set(self.outputs)
        needed: list[Op] = []
        for op in reversed(list(ops)):
            if any(n in wanted for n in op.outputs if n) and not (op.op_type == "Constant" and op.is_standard):
                needed.append(op)
                wanted.update(n for n in op.inputs if n)
        self.ops = needed[::-1]
        self.constants: dict[str, Value] = {}
        produced = set(self.inputs)
        used = set(self.outputs) | {n for op in self.ops for n in op.inputs if n}
        for op in self.ops:
            if not op.is_standard or op.op_type not in OPS:
                domain = f" (domain {op.domain})" if not op.is_standard else ""
                raise Unsupported(f"no torch mapping for {op.op_type}{domain} '{op.name}'")
            for i, name in enumerate(op.outputs[1:], 1):
                if name and name in used:
                    raise Unsupported(f"{op.op_type} '{op.name}': output {i} ('{name}') is not supported")
            for name in op.inputs:
                if not name or name in produced or name in self.constants:
                    continue
                t = graph.tensors[name]
                data = t.data if t.is_constant else None
                if data is None:
                    raise Unsupported(
                        f"{op.op_type} '{op.name}' reads '{name}', which is neither a region input, "
                        "computed in the region, nor a constant"
                    )
                self.constants[name] = to_torch(data)
            produced.update(n for n in op.outputs[:1] if n)
        missing = [n for n in self.outputs if n not in produced]
        if missing:
            raise Unsupported(f"outputs {missing} are not computed by the region")

    def __call__(self, feeds: Mapping[str, Value], weights: Mapping[str, Value] | None = None) -> list[Value]:
        env: dict[str, Value] = dict(self.constants)
        if weights:
            env.update(weights)
        env.update(feeds)
        for op in self.ops:
            args = [env[name] if name else None for name in op.inputs]
            env[op.outputs[0]] = OPS[op.op_type](op, args, self.opset)
        return [env[name] for name in self.outputs]

    def macs(self, feeds: Mapping[str, Value], weights: Mapping[str, Value] | None = None) -> int:
        """Multiply-accumulates of one call on ``feeds`` (Conv, ConvTranspose, Gemm, MatMul), measured by running it."""
        total = 0
        env: dict[str, Value] = dict(self.constants)
        env.update(weights or {})
        env.update(feeds)
        with torch.no_grad():
            for op in self.ops:
                args: list[Any] = [env[name] if name else None for name in op.inputs]  # as OpFn reads them
                out = OPS[op.op_type](op, args, self.opset)
                env[op.outputs[0]] = out
                if op.op_type == "Conv":
                    total += out.numel() * math.prod(args[1].shape[1:])
                elif op.op_type == "ConvTranspose":
                    total += args[0].numel() * math.prod(args[1].shape[1:])
                elif op.op_type in ("Gemm", "MatMul"):
                    a = args[0]
                    inner = a.shape[0] if op.op_type == "Gemm" and op.attr("transA", 0) else a.shape[-1]
                    total += out.numel() * int(inner)
        return int(total)


def whole_graph(graph: Graph) -> TorchProgram:
    """The program of the whole graph: inputs are the non-constant graph inputs."""
    inputs = [n for n in graph.inputs if not graph.tensors[n].is_constant]
    return TorchProgram(graph, graph.topological_order(), inputs, graph.outputs)


__all__ = ["OPS", "TorchProgram", "Unsupported", "supported_op_types", "whole_graph"]
