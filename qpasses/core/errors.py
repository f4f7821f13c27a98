"""One exception hierarchy for every user-facing failure.

The CLI catches ``QPassesError`` and prints its message on one line with exit code 2;
anything else is a bug in qpasses: one line "internal error ..." with exit code 1, the full
traceback written to a file.
"""

from graph_ir.errors import GraphError, InputError, InternalError, ModelLoadError

__all__ = [
    "QPassesError",
    "ModelLoadError",
    "GraphError",
    "PassError",
    "PipelineError",
    "VerificationError",
    "EncodingError",
    "CalibrationDataError",
    "TargetError",
    "InternalError",
    "NumericCheckUnavailable",
]

# The IR defines the root and its own two errors (it imports nothing from qpasses); they are ours too.
QPassesError = InputError
"""Root of all errors caused by user input (models, data, options)."""


class PassError(QPassesError):
    """A pass failed, was unknown, or was given bad options."""


class PipelineError(QPassesError):
    """A pipeline string or file cannot be parsed."""


class VerificationError(QPassesError):
    """A pass left a model that fails onnx.checker or numerical equivalence."""


class EncodingError(QPassesError):
    """Bad bitwidth, range, or encodings/overrides file entry."""


class CalibrationDataError(QPassesError):
    """Calibration data does not match the model (names, shapes, files)."""


class TargetError(QPassesError):
    """Unknown target or a target descriptor that cannot be loaded."""


class NumericCheckUnavailable(Exception):
    """onnxruntime cannot run the model a pass started from (custom ops...): nothing to compare."""
