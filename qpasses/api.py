"""The stable public API for embedding qpasses in a compiler or another tool (``API_VERSION``).

Import from here, not from the modules behind it: those may move (``qpasses.x`` into
subpackages), these names stay.

Stable (semantic versioning on ``API_VERSION``, independent of the package version):

- quantizing: ``quantize_model``, ``QuantConfig``, ``QuantizeResult`` (``.graph``, ``.model``,
  ``.encodings``, ``.report``, ``.save``), ``quantize_onnx_ir``;
- the pipeline: ``build_quantize_pipeline``, ``QuantizeOptions``, ``QuantizePipeline``, ``STAGES``
  (the extension points, in order: structural, annotate, encode, calibrate, lower, check),
  ``PassSpec``, ``parse_pipeline``;
- writing and running passes: ``Pass`` (``name``, an ``Options`` dataclass,
  ``run(graph, ctx) -> PassResult``, ``self.remarks``, ``self.result``), ``PassResult``,
  ``PassContext`` (run inputs ``target`` / ``calibration_data``, ``analyses``, ``artifacts``),
  ``Artifacts`` (typed results passes leave for later ones, keyed by class), ``Analysis`` (subclass it
  for your own cached facts; ``reads_precisions`` when it reads precision annotations), ``PassManager``,
  ``Registry``, ``default_registry``, ``registry_with``, ``pin_precision``;
- statistics a pass declares (``Pass.statistics``, measured for the passes ahead in one read of the
  data): ``RangeRequest``, ``HistogramRequest``, ``ChannelMeanRequest``, ``SampleExtremesRequest``,
  ``CaptureRequest``; ``measure`` (``measure(graph, ctx, requests)[request]``: ``{tensor: result}``);
- artifacts the built-in flow reads or leaves: ``Overrides`` (an encodings file object to apply,
  instead of a path), ``EncodingsFile`` (what ``quantize`` exports);
- the IR: ``Graph``, ``Op``, ``Tensor`` (with the ``encoding`` and ``precision`` slots),
  ``load_model``, ``save_model``, ``from_onnx``, ``to_onnx``;
- bridges: ``from_onnx_ir`` / ``to_onnx_ir`` (``onnx_ir``, optional extra ``qpasses[onnx-ir]``;
  annotations under ``ENCODING_KEY`` / ``PRECISION_KEY`` / ``META_KEY``), ``from_graphsurgeon`` /
  ``to_graphsurgeon``;
- encodings: ``Encoding``, ``Precision``, ``EncodingsFile``, ``PrecisionOverride``,
  ``load_encodings``, ``save_encodings``;
- errors: ``QPassesError`` (every user error) and its subclasses ``ModelLoadError``,
  ``GraphError``, ``PassError``, ``PipelineError``, ``VerificationError``, ``EncodingError``,
  ``CalibrationDataError``, ``TargetError``; ``InternalError`` is a qpasses bug.

A minor version (1.x) only adds names and keyword arguments with defaults; removing or renaming
a name, or changing what one means, makes a major version (2.0). Internal, and free to change in
any release: every module not re-exported here, the built-in passes inside each stage and their
options, artifact classes not named here, ``Tensor.meta`` keys, report and remark text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graph_ir.elements import Op, Tensor
from graph_ir.graph import Graph
from graph_ir.graphsurgeon_bridge import from_graphsurgeon, to_graphsurgeon
from graph_ir.onnx_bridge import from_onnx, to_onnx
from graph_ir.onnx_bridge import load as load_model
from graph_ir.onnx_bridge import save as save_model
from qpasses.core.analyses import Analysis
from qpasses.core.artifacts import Artifacts
from qpasses.core.context import PassContext
from qpasses.core.errors import (
    CalibrationDataError,
    EncodingError,
    GraphError,
    InternalError,
    ModelLoadError,
    PassError,
    PipelineError,
    QPassesError,
    TargetError,
    VerificationError,
)
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.pass_manager import PassManager
from qpasses.core.pipeline import PassSpec, parse_pipeline
from qpasses.core.registry import Registry
from qpasses.data.statistics import (
    CaptureRequest,
    ChannelMeanRequest,
    HistogramRequest,
    RangeRequest,
    SampleExtremesRequest,
    measure,
)
from qpasses.interop.onnx_ir_bridge import ENCODING_KEY, META_KEY, PRECISION_KEY, from_onnx_ir, to_onnx_ir
from qpasses.passes import default_registry
from qpasses.passes.quantize.apply_overrides import Overrides
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import EncodingsFile, PrecisionOverride
from qpasses.quant.encodings_io import load as load_encodings
from qpasses.quant.encodings_io import save as save_encodings
from qpasses.quant.precision_type import Precision
from qpasses.quantize import QuantizeResult, quantize_model
from qpasses.quantize_pipeline import STAGES, QuantizeOptions, QuantizePipeline, build_quantize_pipeline

if TYPE_CHECKING:
    import onnx_ir

API_VERSION = "1.0"


def registry_with(*passes: type[Pass]) -> Registry:
    """The default registry plus ``passes``, for ``quantize_model(..., registry=...)``."""
    registry = default_registry()
    for cls in passes:
        registry.add_pass(cls)
    return registry


def pin_precision(graph: Graph, name: str, precision: Precision | str) -> None:
    """Fix tensor ``name``'s precision as an override would (``"int16"``, ``"float16"``...).

    Call it from a pass at the ``structural`` extension point: ``annotate-precision`` keeps it and
    applies the spec's rules around it (an op is all-int or all-float, converts where it differs).
    """
    tensor = graph.tensor(name)
    tensor.precision = Precision.parse(precision) if isinstance(precision, str) else precision
    tensor.meta["precision_source"] = "override"


def quantize_onnx_ir(
    model: onnx_ir.Model, calibration_data: Any = None, config: QuantConfig | None = None, **options: Any
) -> tuple[onnx_ir.Model, EncodingsFile]:
    """``quantize_model`` on an ``onnx_ir.Model``: the QDQ model (as ``onnx_ir``, each value's
    annotations in its ``meta``/``metadata_props``) and the encodings by tensor name. ``options``
    are ``quantize_model``'s (``extensions``, ``registry``, ``target``...)."""
    result = quantize_model(from_onnx_ir(model), calibration_data, config, **options)
    return to_onnx_ir(result.graph), result.encodings


__all__ = [
    "API_VERSION",
    "Analysis",
    "Artifacts",
    "CalibrationDataError",
    "CaptureRequest",
    "ChannelMeanRequest",
    "ENCODING_KEY",
    "Encoding",
    "EncodingError",
    "EncodingsFile",
    "Graph",
    "GraphError",
    "HistogramRequest",
    "InternalError",
    "META_KEY",
    "ModelLoadError",
    "Op",
    "Overrides",
    "PRECISION_KEY",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PassSpec",
    "PipelineError",
    "Precision",
    "PrecisionOverride",
    "QPassesError",
    "QuantConfig",
    "QuantizeOptions",
    "QuantizePipeline",
    "QuantizeResult",
    "RangeRequest",
    "Registry",
    "STAGES",
    "SampleExtremesRequest",
    "TargetError",
    "Tensor",
    "VerificationError",
    "build_quantize_pipeline",
    "default_registry",
    "from_graphsurgeon",
    "from_onnx",
    "from_onnx_ir",
    "load_encodings",
    "load_model",
    "measure",
    "parse_pipeline",
    "pin_precision",
    "quantize_model",
    "quantize_onnx_ir",
    "registry_with",
    "save_encodings",
    "save_model",
    "to_graphsurgeon",
    "to_onnx",
    "to_onnx_ir",
]
