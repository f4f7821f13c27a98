"""The pass contract: a small object with a name, typed options, and ``run``.

    class MyPass(Pass):
        name = "my-pass"
        @dataclass
        class Options:
            threshold: float = 1.0
        def run(self, graph, ctx) -> PassResult: ...

Options arrive as keyword arguments (from Python, pipeline text or pipeline files) and
are checked against the ``Options`` dataclass: unknown names and values of the wrong
type are errors that name the pass and the option.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graph_ir import Graph
from qpasses.core.analyses import Analysis
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.remarks import Remark, RemarkCollector
from qpasses.core.statistics import StatisticRequest


@dataclass
class PassResult:
    modified: bool
    remarks: list[Remark] = field(default_factory=list)
    # False when a pass that normally preserves FP32 outputs applied a documented approximation
    # this time (e.g. CLE turning Relu6 into Relu): numeric verification is then skipped.
    exact: bool = True
    # The analyses still valid after this run (None: the pass's declared ``preserves``). Only
    # consulted when the graph changed: an unchanged graph keeps every analysis anyway.
    preserves: tuple[type[Analysis], ...] | None = None


class Pass:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Analyses the pass reads: the manager computes them (or finds them cached) before ``run``.
    uses: ClassVar[tuple[type[Analysis], ...]] = ()
    # Analyses the pass's edits leave valid (LLVM's PreservedAnalyses); everything else is recomputed.
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()
    # True when the pass must leave FP32 outputs unchanged (checked numerically on request).
    preserves_semantics: ClassVar[bool] = False
    # True when the pass may change tensor values or the structure (graph.version): the manager then
    # measures no statistics of the passes after it ahead of it. A hint for cost only: statistics are
    # keyed on graph.version, so an unmarked pass that changes values wastes a collection, never
    # serves a stale one.
    modifies_values: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(self.name, self.Options, options)
        self.remarks = RemarkCollector(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        """Run outside a PassManager (fresh remarks each call)."""
        self.remarks = RemarkCollector(self.name)
        return self.run(graph, ctx or PassContext())

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[StatisticRequest]:
        """The statistics of the calibration data ``run`` would read now (``qpasses.data.statistics``); none by default.

        Cheap and side-effect free; ``run`` reads its results from ``ctx.statistics`` (what it asks
        for beyond them is measured on demand).
        """
        return ()

    def statistics_ahead(self, graph: Graph, ctx: PassContext) -> Sequence[StatisticRequest]:
        """What ``run`` could read once the passes before it have run: asked by the manager from an earlier
        pass, on the same values but maybe not the same annotations. Default: ``statistics``; override it
        with a superset when what the pass reads depends on annotations (calibrate: every float
        activation, not the ones the plan will quantize)."""
        return self.statistics(graph, ctx)

    def result(
        self, modified: bool, *, exact: bool = True, preserves: tuple[type[Analysis], ...] | None = None
    ) -> PassResult:
        """Wrap up: the remarks collected during ``run`` go with the result."""
        out = PassResult(modified, list(self.remarks.remarks), exact, preserves)
        self.remarks = RemarkCollector(self.name)
        return out


def parse_options(pass_name: str, options_cls: type, given: dict[str, Any]) -> Any:
    """Build the Options dataclass, coercing text values (from pipeline strings) to field types."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values: dict[str, Any] = {}
    for key, value in given.items():
        norm = key.replace("-", "_")
        if norm not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise PassError(f"pass '{pass_name}' has no option '{key}' (options: {known})")
        try:
            values[norm] = _coerce(value, hints[norm])
        except (TypeError, ValueError) as exc:
            raise PassError(f"pass '{pass_name}': bad value {value!r} for option '{key}': {exc}") from None
    return options_cls(**values)


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ValueError(f"expected one of {list(allowed)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.replace(";", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        items = [_coerce(v, item) for v in value]
        return items if origin is list else tuple(items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise TypeError(f"expected a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(f"expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    return value
