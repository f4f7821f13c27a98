"""Learned weight quantization (AdaRound, AdaScale): what the passes share.

- ``torch_ops``: IR ops evaluated with torch functions (``TorchProgram``), so a layer or a block
  of the graph can be trained with autograd without converting the model to a torch module; the op
  tables live in ``torch_op_base``, ``torch_conv_ops``, ``torch_math_ops``, ``torch_shape_ops``;
- ``layers``: which weights can be learned and their starting encodings; ``blocks``: block discovery
  for AdaScale (neither imports torch);
- ``training``: captured layer/block data, differentiable fake quantization, the optimisation loop.

torch is an optional extra (``pip install "qpasses[learn]"``): nothing here imports it at module
import time except ``torch_ops`` (with its op tables) and ``training``, which only the passes' ``run`` imports, after
``require_torch`` has given a clear error when it is missing.
"""

from __future__ import annotations

import typing
from types import ModuleType
from typing import Any

from qpasses.core.errors import PassError
from qpasses.quant.config import WeightMode
from qpasses.quant.encodings import validate_bitwidth

INSTALL_HINT = 'pip install "qpasses[learn]"'
INPUTS = ("quantized", "fp32")
WEIGHT_MODES = typing.get_args(WeightMode)


def check_common_options(pass_name: str, o: Any, counts: tuple[str, ...]) -> None:
    """The options AdaRound and AdaScale share: where layer inputs come from, positive counts,
    the weight encoding mode and bitwidth, the torch thread count."""
    if o.input_from not in INPUTS:
        raise PassError(
            f"pass '{pass_name}': unknown input_from {o.input_from!r} (expected one of {', '.join(INPUTS)})"
        )
    for key in counts:
        if getattr(o, key) < 1:
            raise PassError(f"pass '{pass_name}': {key} must be >= 1, got {getattr(o, key)}")
    if o.mode not in WEIGHT_MODES:
        raise PassError(f"pass '{pass_name}': unknown mode {o.mode!r} ({', '.join(WEIGHT_MODES)})")
    if o.threads < 0:
        raise PassError(f"pass '{pass_name}': threads must be >= 0, got {o.threads}")
    validate_bitwidth(o.weight_bw, "weight")


def require_torch(pass_name: str) -> ModuleType:
    """Import torch, or raise a PassError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise PassError(
            f"pass '{pass_name}' needs PyTorch for its gradients, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return torch


__all__ = ["INPUTS", "INSTALL_HINT", "WEIGHT_MODES", "check_common_options", "require_torch"]
