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


class InternalError(Exception):
    """A bug in qpasses, not the user's input: a pass crashed or left an invalid model.

    Deliberately not an ``InputError``: it must never be reported as the user's mistake.
    """

    def __init__(self, message: str, pass_name: str | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
