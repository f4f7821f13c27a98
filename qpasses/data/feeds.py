"""A run's calibration data as validated feeds, normalised once per run.

``calibration_feeds`` normalises any supported source (``CalibrationData.from_source``) or says clearly
that there is none. ``context_feeds`` reads the pass context's source: when the normalised data does not
depend on the batch size (every source but an ``.npz`` split into batches), it replaces the context's
source, so every later reader of the run (the other passes, the runtime parity check) iterates that one
object and a one-shot source is recorded once, by its owner, and read once.
"""

from __future__ import annotations

from typing import Any

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError
from qpasses.data.sources import CalibrationData


def calibration_feeds(source: Any, graph: Graph, batch_size: int) -> CalibrationData:
    """The calibration data as validated feeds, or a clear error when there is none."""
    if source is None:
        raise CalibrationDataError(
            "no calibration data: set PassContext.calibration_data (an iterable or callable of "
            "{input name: array} feeds, an .npz file or a QNN input list), or use --calib on the command line"
        )
    return CalibrationData.from_source(source, graph, batch_size=batch_size)


def context_feeds(ctx: PassContext, graph: Graph, batch_size: int) -> CalibrationData:
    """The context's calibration data, normalised (and kept in the context when the batch size does not shape it)."""
    data = calibration_feeds(ctx.calibration_data, graph, batch_size)
    if data is not ctx.calibration_data and data.batch_size is None:
        ctx.calibration_data = data
    return data
