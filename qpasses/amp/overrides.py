"""An assignment as the mixed-precision overrides JSON, lowered by the real pipeline.

The overrides name each group's activations (op outputs, input quantizers) and weights with the
candidate's precision; ``quantize_model`` then annotates, calibrates and lowers them, and
``insert-converts`` adds the conversions between groups. Data-movement outputs follow their
input, biases keep the configured bias bitwidth (float candidates make the whole op float, bias
included, by the annotation's rule). The file is what ``qpasses quantize --overrides`` takes.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graph_ir import Graph
from qpasses.amp.candidates import Assignment
from qpasses.amp.groups import GroupPartition
from qpasses.quant.config import QuantConfig
from qpasses.quantize import QuantizeResult, quantize_model


def precision_overrides(partition: GroupPartition, assignment: Assignment) -> dict[str, Any]:
    """``{"activation_encodings": {...}, "param_encodings": {...}}`` with bitwidth/dtype entries."""
    acts: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, list[dict[str, Any]]] = {}
    for group in partition:
        c = assignment[group.name]
        for name in group.activations:
            acts[name] = [{"bitwidth": c.act.bitwidth, "dtype": c.act.dtype}]
        for name in group.weights:
            params[name] = [{"bitwidth": c.param.bitwidth, "dtype": c.param.dtype}]
        if c.is_float:
            for name in group.biases:
                params[name] = [{"bitwidth": c.param.bitwidth, "dtype": "float"}]
    return {"version": "0.6.1", "activation_encodings": acts, "param_encodings": params}


def quantize_assignment(
    graph: Graph,
    partition: GroupPartition,
    assignment: Assignment,
    feeds: Sequence[Mapping[str, Any]],
    config: QuantConfig,
    *,
    target: Any = None,
    bias_correction: bool = True,
    batch_size: int = 16,
) -> QuantizeResult:
    """The real QDQ model of an assignment (``graph`` is already prepared: batch norms folded, CLE done)."""
    with tempfile.TemporaryDirectory(prefix="qpasses-amp-") as tmp:
        path = Path(tmp) / "overrides.json"
        path.write_text(json.dumps(precision_overrides(partition, assignment)))
        return quantize_model(
            graph,
            list(feeds),
            config,
            overrides=path,
            fold_batchnorm=False,
            cle=False,  # the prepared graph is equalized already where AMP's run asked for it
            target=target,
            bias_correction=bias_correction,
            batch_size=batch_size,
            progress=False,
        )
