"""Name -> pass / target lookup, and third-party entry points.

The registry with the built-in passes is ``qpasses.passes.default_registry`` (the core does not
import the passes).

Third-party packages declare, in their own pyproject.toml::

    [project.entry-points."qpasses.passes"]
    my-pass = "mypkg.passes:MyPass"          # a Pass subclass (or a list of them)
    [project.entry-points."qpasses.targets"]
    my-npu = "mypkg.targets:MY_NPU"          # a TargetDescriptor (or a list of them)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from qpasses.core.errors import PassError, TargetError
from qpasses.core.pass_base import Pass


@dataclass
class Registry:
    passes: dict[str, type[Pass]] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)

    def add_pass(self, cls: type[Pass]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Pass) and cls.name):
            raise PassError(f"{cls!r} is not a named Pass subclass")
        self.passes[cls.name] = cls

    def add_target(self, target: Any) -> None:
        self.targets[target.name] = target

    def pass_class(self, name: str) -> type[Pass]:
        try:
            return self.passes[name]
        except KeyError:
            raise PassError(f"unknown pass '{name}'{_suggest(name, self.passes)}") from None

    def create_pass(self, name: str, **options: Any) -> Pass:
        return self.pass_class(name)(**options)

    def target(self, name: str) -> Any:
        try:
            return self.targets[name]
        except KeyError:
            raise TargetError(f"unknown target '{name}'{_suggest(name, self.targets)}") from None


def _suggest(name: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    if close:
        return f" (did you mean {', '.join(close)}?)"
    return f" (known: {', '.join(sorted(known))})"


def load_entry_points(group: str) -> list[Any]:
    loaded: list[Any] = []
    for ep in entry_points(group=group):
        obj = ep.load()
        if callable(obj) and not isinstance(obj, type) and not hasattr(obj, "name"):
            obj = obj()
        loaded.extend(obj if isinstance(obj, (list, tuple)) else [obj])
    return loaded
