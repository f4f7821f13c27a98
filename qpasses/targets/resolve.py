"""Turn what a user typed after ``--target`` into a descriptor: a registered name or a file."""

from __future__ import annotations

import os
from typing import Any

from qpasses.core.registry import Registry, load_entry_points
from qpasses.targets.builtin import BUILTIN_TARGETS
from qpasses.targets.descriptor import TargetDescriptor, load_target_file

_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def resolve_target(
    spec: str | os.PathLike[str] | TargetDescriptor | None,
    registry: Any = None,
) -> TargetDescriptor | None:
    """``"htp"`` (registry name, entry points included), ``"my_npu.yaml"`` (file), or a descriptor."""
    if spec is None or isinstance(spec, TargetDescriptor):
        return spec
    text = os.fspath(spec)  # not str(): a PathLike other than Path need not print as its path
    if not isinstance(spec, str) or text.endswith(_FILE_SUFFIXES) or "/" in text:
        return load_target_file(text)
    if registry is None:
        registry = target_registry()
    return registry.target(text)


def target_registry() -> Registry:
    """The built-in targets plus those installed packages register (no passes: targets sit below them)."""
    registry = Registry()
    for target in (*BUILTIN_TARGETS, *load_entry_points("qpasses.targets")):
        registry.add_target(target)
    return registry
