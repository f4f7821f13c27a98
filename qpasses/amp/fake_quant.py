"""The fake quantizer AMP's simulation is made of, and the numpy side of it: weight grids, dequantized
values and the (scale, zero point, clamp) inputs that set a quantizer to a bitwidth; plus the session
that feeds them (``qpasses.amp.simulation`` builds the model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from qpasses.quant.encodings import Encoding, Mode, quantize
from qpasses.quant.range_search import compute

QUANTIZER_INPUT_SUFFIXES = ("scale", "zp", "lo", "hi")
LAYOUT_IDENTITY = 0  # a layout entry: the quantizer passes its input through
LAYOUT_GENERIC = -1  # a layout entry: kept as Clip(DQ(Q(x))) on the 16-bit type (bitwidths other than 8 and 16)
Layout = tuple[int, ...]
"""Per quantizer of ``SimulationModel.quantizers``: 0 (identity), 8 or 16 (native Q -> DQ), or -1 (generic)."""


@dataclass(frozen=True)
class FakeQuantizer:
    """One ``Clip(DQ(Q(x)))`` of the simulation model: its ops, tensors and parameter inputs."""

    prefix: str
    ops: tuple[str, str, str]
    """Names of the QuantizeLinear, DequantizeLinear and Clip ops."""
    x: str
    y: str
    edge: tuple[str, str] | None = None
    """(source tensor, reading group) of a convert; None for an activation quantizer."""
    follows: bool = False
    """A data-movement output re-quantized on its input's grid: the identity for every assignment."""


def weight_encoding(data: np.ndarray, bitwidth: int, axis: int | None, *, per_channel: bool, mode: Mode) -> Encoding:
    """The encoding ``encode-weights`` gives a weight (same mode rules; axis None: per tensor, as there)."""
    if per_channel and axis is not None:
        return compute(data, bitwidth, "tf" if mode in ("symmetric", "adjusted") else mode, axis=axis, role="weight")
    mode = mode if mode != "adjusted" or bitwidth == 8 else "symmetric"
    return compute(data, bitwidth, mode, role="weight")


def dequantized(data: np.ndarray, enc: Encoding) -> np.ndarray:
    """What onnxruntime's DequantizeLinear returns for the stored integers: float32 ``(q - zp) * s``."""
    qp = enc.qparams()
    q = quantize(data, enc).astype(np.int64)
    axis = 0 if enc.axis is not None and data.ndim == 1 else enc.axis
    shape = [1] * data.ndim
    if axis is not None:
        shape[axis] = -1
    zp = qp.zero_point.astype(np.int64).reshape(shape)
    scale = qp.scale.astype(np.float32).reshape(shape)
    return ((q - zp).astype(np.float32) * scale).astype(np.float32)


def quantizer_inputs(enc: Encoding) -> tuple[np.ndarray, ...]:
    """(scale, 16-bit zero point, low, high) of ``enc``: low/high are the dequantized clamp bounds.

    Computed as onnxruntime dequantizes, ``float32(q - zp) * scale``, so the Clip bounds are exactly
    the values the b-bit DequantizeLinear produces at ``qmin``/``qmax``.
    """
    qp = enc.qparams()
    levels = 2**enc.bitwidth
    qmin, qmax = (-(levels // 2), levels // 2 - 1) if enc.symmetric else (0, levels - 1)
    scale = np.float32(qp.scale.reshape(-1)[0])
    zp = int(qp.zero_point.reshape(-1)[0])
    return (
        np.array(scale, np.float32),
        np.array(zp, np.int16 if enc.symmetric else np.uint16),
        np.array(np.float32(qmin - zp) * scale, np.float32),
        np.array(np.float32(qmax - zp) * scale, np.float32),
    )


@dataclass(eq=False)
class SimulatedSession:
    """An ``InferenceSession`` look-alike for eval callbacks: the model's own inputs and outputs only.

    ``run`` adds the quantizer feeds of the current assignment; ``get_inputs``/``get_outputs``
    hide them, so an eval written for the real QDQ model runs unchanged. The feeds are bound once
    per assignment (``io_binding``): ``InferenceSession.run`` would convert and check thousands of
    them on every call (its input check is quadratic in their number: ~90 ms a call on a YOLOv8n,
    more than the model itself on one image).
    """

    session: ort.InferenceSession
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    accepts: frozenset[str] | None = None
    """The session's inputs (a pruned model reads fewer than the feeds give); None: all of them."""
    narrow: Mapping[str, Any] = field(default_factory=dict)
    """Zero-point inputs stored on 8 bits in a pruned model -> their numpy type."""
    _binding: Any = field(default=None, repr=False)
    _bound: Any = field(default=None, repr=False)  # the ``extra`` the binding holds
    _bound_values: dict[str, Any] = field(default_factory=dict, repr=False)
    _held: list[Any] = field(default_factory=list, repr=False)  # arrays the binding points into

    def set_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The quantizer feeds of an assignment, adapted to this session's model."""
        if self.accepts is None:
            self.extra = dict(feeds)
            return
        self.extra = {
            k: (v.astype(self.narrow[k]) if k in self.narrow else v) for k, v in feeds.items() if k in self.accepts
        }

    def run(
        self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None
    ) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in input_feed]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed ({list(input_feed)}).")
        if self._binding is None:
            self._binding = self.session.io_binding()
        if self._bound is not self.extra:  # rebind what changed (feeds are memoized: most values are the same)
            for name, value in self.extra.items():
                if self._bound_values.get(name) is not value:
                    self._binding.bind_cpu_input(name, value)
                    self._bound_values[name] = value
            self._bound = self.extra
        binding = self._binding
        held = []
        for name, value in input_feed.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                array = np.ascontiguousarray(value)
                binding.bind_cpu_input(name, array)
            held.append(value if isinstance(value, ort.OrtValue) else array)
        self._held = held
        binding.clear_binding_outputs()
        for name in list(output_names) if output_names else self.output_names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding, run_options)
        return binding.copy_outputs_to_cpu()

    def get_inputs(self) -> list[Any]:
        return [i for i in self.session.get_inputs() if i.name in self.input_names]

    def get_outputs(self) -> list[Any]:
        return [o for o in self.session.get_outputs() if o.name in self.output_names]

    def get_modelmeta(self) -> Any:
        return self.session.get_modelmeta()

    def get_providers(self) -> list[str]:
        return self.session.get_providers()
