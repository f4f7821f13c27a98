"""Decomposed normalization and activation blocks recognized with the pattern matcher: LayerNorm and
RMSNorm from primitives, GELU from Erf or tanh/x^3, Softmax from Exp/ReduceSum/Div, HardSwish from
Mul/Clip (or HardSigmoid*x). ``find_blocks`` returns each match with its constants checked, and the
near misses worth a remark; ``decomposed_blocks`` (the pass) keeps their internals float or fuses them.

Which recognizer lives where: ``norm_block_patterns`` (LayerNorm/RMSNorm, Softmax),
``activation_block_patterns`` (GELU, HardSwish); what they share is ``block_matching``'s.
"""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.analyses import Shapes
from qpasses.core.patterns import NearMiss, Pattern
from qpasses.passes.fallback.activation_block_patterns import (
    GELU_ERF,
    GELU_TANH,
    HARDSIGMOID_MUL,
    HARDSWISH,
    analyze_gelu_erf,
    analyze_gelu_tanh,
    analyze_hardsigmoid_mul,
    analyze_hardswish,
)
from qpasses.passes.fallback.block_matching import Analyzer, Block
from qpasses.passes.fallback.norm_block_patterns import analyze_norm, analyze_softmax, norm_pattern, softmax_pattern

# Ops that make a walk look like one of the blocks (a ReduceSum -> Div or Mul -> Mul alone does not).
SIGNATURE_OPS = frozenset({"ReduceMean", "Erf", "Tanh", "Clip", "Exp", "HardSigmoid"})


def _worth_reporting(miss: NearMiss) -> bool:
    """A near miss that got into a block (past its anchor, through a signature op), not a type mismatch."""
    return miss.kind != "mismatch" and len(miss.ops) >= 2 and any(op.op_type in SIGNATURE_OPS for op in miss.ops)


def find_blocks(graph: Graph, shapes: Shapes | None = None) -> tuple[list[Block], list[NearMiss]]:
    """Every decomposed block (no op in two), and the near misses worth a remark."""
    analyzers: list[tuple[Pattern, Analyzer]] = [
        (norm_pattern(shapes), analyze_norm(shapes)),
        (GELU_ERF, analyze_gelu_erf),
        (GELU_TANH, analyze_gelu_tanh),
        (softmax_pattern(shapes), analyze_softmax(shapes)),
        (HARDSWISH, analyze_hardswish),
        (HARDSIGMOID_MUL, analyze_hardsigmoid_mul),
    ]
    blocks: list[Block] = []
    misses: list[NearMiss] = []
    claimed: set[int] = set()
    position = {op.id: i for i, op in enumerate(graph.ops)}
    for op in graph.ops:
        if op.id in claimed:
            continue
        for pattern, analyze in analyzers:
            result = pattern.match(graph, op)
            if isinstance(result, NearMiss):
                if _worth_reporting(result):
                    misses.append(result)
                continue
            if result is None:
                continue
            block = analyze(graph, result)
            assert isinstance(block, Block)
            if any(o.id in claimed for o in block.ops):
                continue
            block.ops.sort(key=lambda o: position[o.id])
            claimed.update(o.id for o in block.ops)
            blocks.append(block)
            break
    return blocks, misses
