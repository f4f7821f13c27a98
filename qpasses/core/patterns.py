"""Anchored, declarative op-chain patterns with near-miss reasons.

A pattern is a sequence of steps over op types, matched from an anchor op by walking
producer -> single consumer along the data input (slot 0 unless a step allows others)::

    CONV_ACT_CONV = Pattern("conv-act-conv", (
        Step("conv1", ("Conv",)),
        Step("act", ("Relu", "Clip"), optional=True, where=relu_like),  # where: (graph, op) -> reason | None
        Step("conv2", ("Conv",)),
    ))
    result = CONV_ACT_CONV.match(graph, op)   # Match | NearMiss | None

Anchored walks are linear in the pattern length, so scanning a 100k-node graph costs one
short walk per candidate anchor; generic subgraph isomorphism does not scale to that.

Why a failure is reported matters as much as the match: a ``NearMiss`` says where and
why the walk stopped, with a ``kind`` so callers report only interesting misses:

- ``"mismatch"``: the next op has another type (or the walk ran out of ops) — usually
  just a different graph shape, not worth a remark;
- ``"rejected"``: a step's ``where`` predicate or the pattern's ``check`` said no
  (e.g. an unsupported activation, a non-constant weight);
- ``"branch"``: an intermediate tensor has several readers, a second output in use, or
  is a graph output, so rewriting it would change other paths.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from graph_ir import Graph, Op

# A predicate returns None when the op is acceptable, else the reason it is not.
Predicate = Callable[[Graph, Op], "str | None"]
MissKind = Literal["mismatch", "rejected", "branch"]


@dataclass(frozen=True)
class Step:
    """One position of a pattern.

    ``optional`` steps may be skipped; ``repeat`` steps match as many consecutive ops as
    fit (zero or more when optional, one or more otherwise). ``where`` refines the type
    test; when the type fits but ``where`` rejects, the walk stops with that reason
    instead of skipping the step, so a ``Clip(0, 3)`` is reported as such. With
    ``strict=False`` a rejection counts as a plain type mismatch (an optional step is then
    skipped), for steps like "an Add that happens to be a bias". ``slots`` are the input
    slots through which the walked tensor may enter (default: the data input 0).
    """

    role: str
    op_types: Collection[str]
    optional: bool = False
    repeat: bool = False
    where: Predicate | None = None
    strict: bool = True
    slots: Collection[int] = (0,)
    domains: Collection[str] = ("", "ai.onnx")

    def fits(self, op: Op) -> bool:
        return op.op_type in self.op_types and op.domain in self.domains


@dataclass
class Match:
    pattern: Pattern
    ops: list[Op]
    roles: dict[str, list[Op]] = field(default_factory=dict)

    def one(self, role: str) -> Op | None:
        ops = self.roles.get(role)
        return ops[0] if ops else None

    def all(self, role: str) -> list[Op]:
        return list(self.roles.get(role, ()))

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.ops]


@dataclass
class NearMiss:
    """Where a walk stopped: ``ops`` are the ops walked, then the offending op if any."""

    pattern: Pattern
    ops: list[Op]
    step: int
    kind: MissKind
    reason: str

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.ops]


@dataclass(frozen=True)
class Pattern:
    """A named step sequence plus an optional whole-match ``check`` returning a reason."""

    name: str
    steps: tuple[Step, ...]
    check: Callable[[Graph, Match], str | None] | None = None

    def match(self, graph: Graph, anchor: Op) -> Match | NearMiss | None:
        """Match starting at ``anchor``; None when the anchor's type does not fit step 0."""
        first = self.steps[0]
        if not first.fits(anchor):
            return None
        walked = [anchor]
        if first.where is not None and (why := first.where(graph, anchor)):
            return NearMiss(self, walked, 0, "rejected", why)
        roles: dict[str, list[Op]] = {first.role: [anchor]}
        current = anchor
        i = 0 if first.repeat else 1
        reader: tuple[Op, int] | None = None
        while i < len(self.steps):
            done = all(s.optional or (s.repeat and s.role in roles) for s in self.steps[i:])
            if reader is None:
                reader, kind, why = _single_reader(graph, current)
                if reader is None:
                    if done:
                        break
                    return NearMiss(self, walked, i, kind, why)
            nxt, slot = reader
            step = self.steps[i]
            fits = step.fits(nxt) and slot in step.slots
            if fits and step.where is not None and (why := step.where(graph, nxt)):
                if step.strict:
                    return NearMiss(self, [*walked, nxt], i, "rejected", why)
                fits = False
            if fits:
                roles.setdefault(step.role, []).append(nxt)
                walked.append(nxt)
                current, reader = nxt, None
                if not step.repeat:
                    i += 1
                continue
            if step.optional or (step.repeat and step.role in roles):
                i += 1  # skip it (or end the repetition) and try the same op on the next step
                continue
            if done:
                break
            expected = "/".join(sorted(step.op_types))
            why = (
                f"'{nxt.name}' reads it at input {slot}"
                if step.fits(nxt) and slot not in step.slots
                else f"{nxt.op_type} '{nxt.name}' where {expected} ({step.role}) was expected"
            )
            return NearMiss(self, [*walked, nxt], i, "mismatch", why)
        match = Match(self, walked, roles)
        if self.check is not None and (why := self.check(graph, match)):
            return NearMiss(self, walked, len(self.steps), "rejected", why)
        return match

    def find_all(self, graph: Graph, anchors: Iterable[Op] | None = None) -> tuple[list[Match], list[NearMiss]]:
        """Match at every anchor (default: every op in topological order)."""
        matches: list[Match] = []
        misses: list[NearMiss] = []
        for op in graph.ops if anchors is None else anchors:
            result = self.match(graph, op)
            if isinstance(result, Match):
                matches.append(result)
            elif isinstance(result, NearMiss):
                misses.append(result)
        return matches, misses


def _single_reader(graph: Graph, op: Op) -> tuple[tuple[Op, int] | None, MissKind, str]:
    """(op, slot) of the one reader of ``op``'s first output, or why there is none.

    A graph output with no reader is the end of the network (a plain mismatch); a graph
    output that is also read inside is a branch.
    """
    out = op.outputs[0] if op.outputs else ""
    for extra in op.outputs[1:]:
        if extra and (graph.uses(extra) or graph.is_graph_output(extra)):
            return None, "branch", f"'{op.name}' has another output in use ({extra})"
    if not out:
        return None, "mismatch", f"'{op.name}' has no output"
    uses = graph.uses(out)
    if not uses:
        return None, "mismatch", f"output {out} of '{op.name}' is not read"
    if graph.is_graph_output(out):
        return None, "branch", f"output {out} of '{op.name}' is a graph output"
    if len(uses) > 1:
        names = ", ".join(r.name for r in graph.consumers(out))
        return None, "branch", f"output {out} of '{op.name}' is read {len(uses)} times ({names})"
    return uses[0], "mismatch", ""


def single_reader(graph: Graph, op: Op) -> Op | None:
    """The op that alone reads ``op``'s first output at data slot 0 (None if branching or absent)."""
    reader = _single_reader(graph, op)[0]
    return reader[0] if reader is not None and reader[1] == 0 else None


__all__ = ["Match", "MissKind", "NearMiss", "Pattern", "Predicate", "Step", "single_reader"]
