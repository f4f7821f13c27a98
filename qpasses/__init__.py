"""qpasses: quantize FP32 ONNX models through a pipeline of compiler passes.

The common entry points are importable from the package; they load lazily so that
``graph_ir`` (which imports ``qpasses.core.errors``) and the CLI start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "quantize_model": "qpasses.quantize",
    "QuantizeResult": "qpasses.quantize",
    "QuantConfig": "qpasses.quant.config",
    "PassManager": "qpasses.core.pass_manager",
    "PassContext": "qpasses.core.context",
    "Pass": "qpasses.core.pass_base",
    "PassResult": "qpasses.core.pass_base",
    "default_registry": "qpasses.passes",
    "QPassesError": "qpasses.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qpasses' has no attribute {name!r}")
    return getattr(import_module(module), name)
