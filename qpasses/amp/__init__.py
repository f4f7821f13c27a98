"""Automatic mixed precision (AMP): choose int8/int16/float16 per quantizer group under an accuracy target.

``choose_mixed_precision`` runs AIMET's three phases (sensitivity, pareto search, convert-op
reduction) or a demotion search; ``qpasses amp`` is its command line. Module map:

- ``groups``: quantizer groups from the IR; ``candidates``: candidate parsing, ordering, target filter;
- ``bitops``: MACs and BitOps; ``statistics``: what calibration gives once; ``simulation``: the
  one-session fake-quant model; ``overrides``: an assignment as overrides, lowered for real;
- ``evaluation``: ready callbacks; ``evaluators``: scoring an assignment; ``executors``: where phase 1 runs;
- ``sensitivity`` (phase 1), ``proxy`` (phase 1 without the metric), ``search`` + ``pareto`` (phase 2),
  ``blockers`` (phase 2 on a proxy-ranked list), ``convert_reduction`` (phase 3), ``demotion``;
  ``cache``, ``results``; ``mixed_precision``: the flow, in steps: ``preparation`` (the graph, kernels,
  the run), ``run_state`` (what a run carries), ``reference_points`` (FP32 / all-high / all-low scores),
  ``sensitivity_phase`` (phase 1 mode), ``selection`` (phase 2 / demotion), ``final_check`` (step 4);
  ``simulation_graph`` builds the fake-quant model ``simulation`` runs.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names -> defining module; imported on first use so `qpasses --help` stays light.
_EXPORTS = {
    "AmpError": "errors",
    "AmpWarning": "errors",
    "AmpResult": "results",
    "Candidate": "candidates",
    "parse_candidate": "candidates",
    "parse_candidates": "candidates",
    "EvalCallbackFactory": "evaluation",
    "ScriptFunction": "evaluation",
    "sqnr": "evaluation",
    "top1_accuracy": "evaluation",
    "GroupPartition": "groups",
    "QuantizerGroup": "groups",
    "find_groups": "groups",
    "choose_mixed_precision": "mixed_precision",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qpasses.amp' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qpasses.amp.{_EXPORTS[name]}"), name)
