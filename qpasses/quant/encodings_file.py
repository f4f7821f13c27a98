"""The in-memory form of an encodings/overrides file: what ``encodings_io`` reads and writes.

Kept apart from the reader and writer so the entry parser (``encodings_entries``) and the passes
that apply overrides share these types without importing the file formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qpasses.quant.encodings import Encoding, Role


@dataclass(frozen=True)
class PrecisionOverride:
    """A bitwidth/dtype choice without a range: the tensor stays float, or gets calibrated at this bitwidth."""

    bitwidth: int
    dtype: Literal["int", "float"] = "float"


Entry = Encoding | PrecisionOverride


@dataclass(frozen=True)
class TensorSpec:
    """What the model knows about a tensor, to validate an override against it.

    ``channels`` is the length of the per-channel ``axis`` (None: per-channel count not checked).
    ``per_channel`` False: a weight whose readers put their output channels on different axes, which
    is quantized per tensor (``quant_plan.weight_axes``).
    """

    role: Role
    channels: int | None = None
    axis: int = 0
    per_channel: bool = True


@dataclass
class EncodingsFile:
    """Encodings by tensor name, for activations (op outputs and graph inputs) and parameters."""

    activations: dict[str, Entry] = field(default_factory=dict)
    params: dict[str, Entry] = field(default_factory=dict)
