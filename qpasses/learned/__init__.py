"""Learned weight quantization (AdaRound, AdaScale): what the passes share.

- ``torch_ops``: IR ops evaluated with torch functions (``TorchProgram``), so a layer or a block
  of the graph can be trained with autograd without converting the model to a torch module;
- ``layers``: which weights can be learned, their starting encodings, block discovery (no torch);
- ``training``: captured layer/block data, differentiable fake quantization, the optimisation loop.

torch is an optional extra (``pip install "qpasses[learn]"``): nothing here imports it at module
import time except ``torch_ops`` and ``training``, which only the passes' ``run`` imports, after
``require_torch`` has given a clear error when it is missing.
"""

from __future__ import annotations

from types import ModuleType

from qpasses.errors import PassError

INSTALL_HINT = 'pip install "qpasses[learn]"'


def require_torch(pass_name: str) -> ModuleType:
    """Import torch, or raise a PassError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise PassError(f"pass '{pass_name}' needs PyTorch for its gradients, which is not installed "
                        f"({exc}): {INSTALL_HINT}") from None
    return torch


__all__ = ["INSTALL_HINT", "require_torch"]
