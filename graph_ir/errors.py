"""The IR's errors. graph_ir is a leaf: it imports nothing from qpasses.

``InputError`` is the root of every error caused by the user's input; qpasses re-exports it as
``QPassesError`` (the same class), so ``except QPassesError`` also catches what the IR raises.
"""


class InputError(Exception):
    """Root of all errors caused by user input (models, data, options)."""


class ModelLoadError(InputError):
    """The model file is missing, truncated, or not ONNX."""


class GraphError(InputError):
    """The graph is malformed or an edit would break it (unknown tensor, cycle...)."""
