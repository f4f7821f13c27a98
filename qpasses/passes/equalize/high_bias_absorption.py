"""High-bias absorption (Nagel et al. 2019), run by ``cle`` on its equalized links.

It moves ``c`` (per channel) out of ``b1`` into ``b2 += W2 . c``, where
``c = max(0, beta - 3|gamma|)`` if a Relu sits between and ``c = beta`` otherwise, from the
folded BN's ``(gamma, beta)`` (kept in the ``FoldedBatchNorms`` artifact, scaled with the layer); into a
Gemm it is ``b2 += alpha W2 . c`` (Gemm computes ``alpha W2 x + beta C``).
Exactness: through linear glue (pools, Flatten, Identity) it is exact. Through a Relu it
is exact for every input whose pre-activation stays >= ``c`` in its channel. DFQ (and AIMET)
assume a Gaussian pre-activation and take ``c = beta - 3|gamma|``: 0.13% of the values of every
channel fall below it, and on a real model that is not a rounding (PP-OCR's classifier: 33 dB
SQNR vs FP32 on real images). So through a Relu, ``c`` is also capped per channel at the
pre-activation minimum the calibration data shows (``minima``: exact on that data), and without
calibration data nothing is absorbed there (``through_relu="always"``: DFQ's amount as is). It is
never exact into a zero-padded Conv or a ConvTranspose (border outputs see fewer taps): AIMET
absorbs there anyway; we skip those with a remark unless ``absorb_into_padded`` asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.remarks import RemarkCollector
from qpasses.passes.equalize.cle_links import Link, is_relu, is_relu6
from qpasses.passes.equalize.linear_layer import LinearLayer


def dfq_amount(graph: Graph, l1: LinearLayer, glue: list[Op]) -> tuple[np.ndarray, bool] | None:
    """DFQ's amount to move out of ``l1``'s bias across ``glue`` and whether it crosses a Relu/Relu6;
    None without folded BN statistics."""
    if l1.stats is None:
        return None
    gamma, beta = l1.stats
    through_relu = any(is_relu(graph, op) or is_relu6(graph, op) for op in glue)
    return (np.maximum(0.0, beta - 3 * np.abs(gamma)) if through_relu else beta.copy()), through_relu


def absorb_high_biases(
    graph: Graph,
    links: list[Link],
    remarks: RemarkCollector,
    *,
    absorb_into_padded: bool,
    minima: Callable[[LinearLayer], np.ndarray | None] | None = None,
) -> list[Callable[[], None]]:
    """Absorb high biases; returns the remarks to emit once layers are committed (and named).
    ``minima(layer)``: the per-channel minimum of the layer's output on the calibration data (caps
    what crosses a Relu); None absorbs DFQ's amount through a Relu as is."""
    pending: list[Callable[[], None]] = []
    no_stats: list[LinearLayer] = []
    for link in links:
        for l1, glue, l2 in zip(link.layers[:-1], link.glue, link.layers[1:], strict=True):
            amount = dfq_amount(graph, l1, glue)
            if amount is None or l1.stats is None:
                no_stats.append(l1)
                continue
            gamma, beta = l1.stats
            c, through_relu = amount
            capped = False
            if through_relu and minima is not None and np.any(c):
                low = minima(l1)
                if low is None or np.shape(low) != np.shape(c):
                    c = np.zeros_like(c)
                else:
                    capped = bool(np.any(c > np.maximum(low, 0.0)))
                    c = np.minimum(c, np.maximum(low, 0.0))
            if not np.any(c):
                continue
            padded = l2.pads_input or any(
                op.op_type == "AveragePool" and int(op.attr("count_include_pad", 0)) and any(op.attr("pads", []) or [])
                for op in glue
            )
            if padded and not absorb_into_padded:
                pending.append(
                    _remark(
                        remarks,
                        "missed",
                        "high bias not absorbed",
                        l1,
                        glue,
                        l2,
                        f"'{l2.op.name}' zero-pads its input, so absorption would change "
                        "border outputs (absorb_into_padded=true allows it)",
                    )
                )
                continue
            l1.add_bias(-c)
            # Gemm computes alpha * W2 . x + beta * C; LinearLayer's bias is already beta * C,
            # but its weight is W2 without alpha, so the shift W2 . c reaches the output times alpha.
            l2.add_bias(_gemm_alpha(l2) * l2.response(c))
            # beta - c, written so that a second run computes c = 0 exactly (idempotence)
            if capped:
                l1.stats = (gamma, beta - c)
            else:
                l1.stats = (gamma, np.minimum(beta, 3 * np.abs(gamma)) if through_relu else np.zeros_like(beta))
            how = "beta, no activation"
            if through_relu:
                how = "beta - 3|gamma| through Relu" + (", capped at the calibration minimum" if capped else "")
            pending.append(
                _remark(
                    remarks,
                    "applied",
                    "absorbed high bias",
                    l1,
                    glue,
                    l2,
                    f"{np.count_nonzero(c)} channels, max {float(np.max(np.abs(c))):.3g} ({how})",
                )
            )
    if no_stats:
        pending.append(
            lambda: remarks.missed(
                "high-bias absorption skipped",
                [x.op.name for x in no_stats],
                reason="no folded BatchNormalization statistics for these layers",
            )
        )
    return pending


def _remark(
    remarks: RemarkCollector, kind: str, message: str, l1: LinearLayer, glue: list[Op], l2: LinearLayer, reason: str
) -> Callable[[], None]:
    def emit() -> None:
        nodes = [l1.op.name, *(op.name for op in glue), l2.op.name]
        text = f"{message} from '{l1.op.name}' into '{l2.op.name}'"
        (remarks.applied if kind == "applied" else remarks.missed)(text, nodes, reason=reason)

    return emit


def _gemm_alpha(layer: LinearLayer) -> float:
    """The factor a layer applies to ``W . x`` beyond its weight: Gemm's ``alpha``, 1 for the others."""
    return float(layer.op.attr("alpha", 1.0)) if layer.op.op_type == "Gemm" else 1.0
