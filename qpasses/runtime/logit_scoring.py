"""What the automatic fallback scores when a model's outputs are softmax probabilities: their logits.

The SQNR of a probability output counts argmax flips more than quantization noise: where two
classes are close, a one-step change upstream moves the probability mass from one to the other,
and on a few checked samples those positions dominate the error. On PP-OCR's recognizer (softmax
over 6625 characters, 8 checked samples) re-rounding the int32 biases of an otherwise identical
model moved the output SQNR by 2 dB (16.0 -> 14.0) while its logits moved by 0.1 dB (12.9 -> 12.7);
the fallback's choices (each must buy 0.5 or 1 dB) followed that noise. Its logits (the Softmax's
input) carry the same quantization noise smoothly, so the fallback ranks quantizers on them
(``logit_views``). Whether to act at all is still decided on the outputs themselves.
"""

from __future__ import annotations

import onnx

from qpasses.data.sessions import with_outputs

PASS_THROUGH = frozenset({"Identity", "QuantizeLinear", "DequantizeLinear"})


def softmax_inputs(model: onnx.ModelProto) -> list[str | None]:
    """Per graph output, the input of the Softmax that computes it (through Identity and Q/DQ); None
    for an output computed otherwise."""
    producers = {o: n for n in model.graph.node for o in n.output if o}
    found: list[str | None] = []
    for output in model.graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type in PASS_THROUGH and node.input:
            node = producers.get(node.input[0])
        softmax = node is not None and node.op_type == "Softmax" and node.domain in ("", "ai.onnx")
        found.append(node.input[0] if node is not None and softmax else None)
    return found


def scoring_view(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``outputs`` alone (``with_outputs``' copy, the others dropped)."""
    view = with_outputs(model, outputs)
    wanted = {vi.name: onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in view.graph.output}
    del view.graph.output[:]
    view.graph.output.extend(wanted[name] for name in outputs)
    return view


def logit_views(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto] | None:
    """(``quantized``, ``fp32``) with each output replaced by its logits, when every output of both is
    a Softmax's (a model that also returns boxes or a regression keeps one SQNR scale: None)."""
    q, f = softmax_inputs(quantized), softmax_inputs(fp32)
    if not q or len(q) != len(f) or any(n is None for n in [*q, *f]):
        return None
    return scoring_view(quantized, [n for n in q if n]), scoring_view(fp32, [n for n in f if n])
