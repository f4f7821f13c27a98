"""onnxruntime sessions that return chosen tensors as extra outputs (what calibration and captures run)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence

import onnx
import onnxruntime as ort

from qpasses.core.errors import ModelLoadError
from qpasses.core.verification import session_options

# Protobuf refuses to serialize 2 GiB; bigger models reach onnxruntime through a file with external data.
_PROTO_LIMIT = 2**31 - 2**20
# Graph transformers whose decisions span the whole graph (see ``tap_session``).
_DISABLED_OPTIMIZERS = ["NchwcTransformer"]

# --- the model's interface ---------------------------------------------------------------------------


def unavailable_tensors(model: onnx.ModelProto, tensors: Iterable[str]) -> dict[str, str]:
    """Requested tensors a session cannot expose, each with the reason (for 'missed' remarks)."""
    produced = {o for node in model.graph.node for o in node.output if o}
    inputs = {vi.name for vi in model.graph.input}
    constants = {t.name for t in model.graph.initializer}
    constants |= {node.output[0] for node in model.graph.node if node.op_type == "Constant" and node.output}
    missing: dict[str, str] = {}
    for name in tensors:
        if name in constants:
            missing[name] = "a constant, not an activation"
        elif name not in produced and name not in inputs:
            missing[name] = "not produced by any node of the main graph"
    return missing


# --- the session ---------------------------------------------------------------------------------------


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names``."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    typed = {vi.name: vi for vi in extended.graph.value_info}
    for name in names:
        if name in present:
            continue
        vi = onnx.ValueInfoProto()
        if name in typed:
            vi.CopyFrom(typed[name])
        else:
            vi.name = name  # onnxruntime infers the type itself
        extended.graph.output.append(vi)
    return extended


def tap_session(
    model: onnx.ModelProto, intra_op_threads: int
) -> tuple[ort.InferenceSession, tempfile.TemporaryDirectory[str] | None]:
    """CPU session with every graph optimization on but the NCHWc layout; models over 2 GiB go through a file.

    The NCHWc layout is decided across the whole graph (an op after a cut would run on another
    layout, with another rounding), so without it a segment of the model computes exactly what the
    whole model does. With every activation a graph output it gains little (~10% on a YOLO).
    """
    options = session_options(intra_op_threads=intra_op_threads)  # all graph optimizations on
    # Idle pool threads must not spin between runs: the statistics need that CPU time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No arena: each session's arena would keep its own high-water mark (outputs included) for good,
    # so the segments of a capped run would add up; through malloc they reuse the same memory.
    options.enable_cpu_mem_arena = False
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            source: bytes | str = model.SerializeToString()
        else:
            tmp = tempfile.TemporaryDirectory(prefix="qpasses-calib-")
            source = os.path.join(tmp.name, "model.onnx")
            onnx.save(model, source, save_as_external_data=True, location="model.onnx.data")
        session = ort.InferenceSession(
            source, options, providers=["CPUExecutionProvider"], disabled_optimizers=_DISABLED_OPTIMIZERS
        )
        return session, tmp
    except Exception as exc:
        if tmp is not None:
            tmp.cleanup()
        raise ModelLoadError(f"onnxruntime cannot load the model for calibration: {exc}") from None


def calibration_session(model: onnx.ModelProto, intra_op_threads: int = 0) -> ort.InferenceSession:
    """A session configured as calibration's own (for references that must match it bit for bit)."""
    session, tmp = tap_session(model, intra_op_threads)
    if tmp is not None:  # onnxruntime has read the file by now
        tmp.cleanup()
    return session
