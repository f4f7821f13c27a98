"""Probabilities the model returns (a Softmax/Sigmoid graph output) stay float.

An 8-bit encoding of [0, 1] has steps of 1/255: every returned probability moves by up to 0.002,
whatever the rest of the model does, which is the whole error budget of a well-quantized classifier
(open_nsfw: P(nsfw) MAE 0.0027 with the output quantized, 0.0020 without) and shifts a detector's
probability map around its threshold. The quantizer on a graph output buys no integer compute (the
op that writes it has no MACs; its inputs stay quantized) and only rounds what the user reads. So
the output stays float32 (int16 on a target that runs only integer kernels), back through data
movement to the Softmax/Sigmoid. NNCF leaves graph outputs unquantized for the same reason.
"""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.keep_float import keep_float

PROBABILITY_OPS = frozenset({"Softmax", "Sigmoid"})


def probability_outputs(graph: Graph) -> list[list[str]]:
    """Per graph output that is a probability: the tensors from the Softmax/Sigmoid result to the output."""
    from qpasses.quant.plan import DATA_MOVEMENT

    found = []
    for name in graph.outputs:
        chain = [name]
        op = graph.producer(name)
        while op is not None and op.op_type in DATA_MOVEMENT and op.inputs and op.inputs[0]:
            chain.append(op.inputs[0])
            op = graph.producer(op.inputs[0])
        if op is not None and op.op_type in PROBABILITY_OPS and op.is_standard:
            found.append(chain)
    return found


class KeepProbabilityOutputsFloat(Pass):
    name = "keep-probability-outputs-float"
    description = "keep graph outputs that a Softmax/Sigmoid writes float: 8 bits round every probability by 1/255"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for chain in probability_outputs(graph):
            marked = keep_float(graph, chain, "a probability the model returns", ctx.target)
            if marked:
                self.remarks.applied(
                    f"kept output '{chain[0]}' float",
                    marked[:10],
                    reason="a Softmax/Sigmoid result the model returns: 8-bit steps of 1/255 would round "
                    "every probability, and its quantizer buys no integer compute",
                )
        return self.result(False)
