"""Accelerator descriptors. ``BUILTIN_TARGETS`` is what the registry loads."""

from qpasses.targets.builtin import BUILTIN_TARGETS
from qpasses.targets.descriptor import Kernel, TargetDescriptor, from_dict, load_target_file
from qpasses.targets.resolve import resolve_target

__all__ = ["BUILTIN_TARGETS", "Kernel", "TargetDescriptor", "from_dict", "load_target_file", "resolve_target"]
