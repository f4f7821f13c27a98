"""Checks a pass manager can run after each pass: onnx.checker and FP32 equivalence."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from qpasses.core.errors import NumericCheckUnavailable, VerificationError


def check_model(model: onnx.ModelProto, after: str) -> None:
    """onnx.checker (full, with shape inference) or a VerificationError naming the pass."""
    try:
        if model.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"model is invalid after pass '{after}': {str(exc).splitlines()[0]}") from None


def random_feeds(
    model: onnx.ModelProto,
    *,
    batch: int = 2,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    extent: int | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (symbolic dims become ``batch``, those past the first ``extent``
    when given; ``shapes`` gives some inputs' shapes)."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        shape = list((shapes or {}).get(vi.name, ())) or [
            d.dim_value
            if d.HasField("dim_value") and d.dim_value > 0
            else (batch if extent is None or axis == 0 else extent)
            for axis, d in enumerate(tt.shape.dim)
        ]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def session_options(*, intra_op_threads: int = 0, optimize: bool = True, silent: bool = False) -> ort.SessionOptions:
    """Quiet CPU session options (onnxruntime's warnings about unused initializers are noise here;
    ``silent``: its errors too, for runs whose failure the caller reports itself)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4 if silent else 3
    opts.intra_op_num_threads = intra_op_threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def session(
    model: onnx.ModelProto | str | bytes, *, optimize: bool = True, intra_op_threads: int = 0, silent: bool = False
) -> ort.InferenceSession:
    """A CPU session; ``optimize=False`` gives exact QDQ semantics (see ``exact_session``)."""
    source: str | bytes
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source,
        session_options(optimize=optimize, intra_op_threads=intra_op_threads, silent=silent),
        providers=["CPUExecutionProvider"],
    )


def exact_session(model: onnx.ModelProto | str | bytes, *, intra_op_threads: int = 0) -> ort.InferenceSession:
    """Exact QDQ semantics: graph optimizations off, so Q/DQ run as written and no fused integer
    kernel (whose results depend on the CPU) replaces them. What every reference comparison uses."""
    return session(model, optimize=False, intra_op_threads=intra_op_threads)


def runtime_session(model: onnx.ModelProto | str | bytes, *, intra_op_threads: int = 0) -> ort.InferenceSession:
    """The session a user gets by default: all graph optimizations, QDQ fused into integer kernels."""
    return session(model, optimize=True, intra_op_threads=intra_op_threads)


_LARGER_EXTENT = 64


def _quiet_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``run`` with onnxruntime's error log silent (its errors come back as the exception)."""
    return session(model, optimize=False, silent=True).run(None, feeds)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs with exact semantics (the same on every CPU: no fused integer kernels)."""
    return exact_session(model).run(None, feeds)


# Relative tolerance by the least precise float type a model computes in.
_TYPE_RTOL = {onnx.TensorProto.FLOAT16: 2e-2, onnx.TensorProto.BFLOAT16: 5e-2}


def model_rtol(model: onnx.ModelProto, rtol: float) -> float:
    """``rtol``, widened for float16/bfloat16 models (their own precision is ~1e-3 / ~8e-3)."""
    types = {vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    types |= {t.data_type for t in model.graph.initializer}
    return max([rtol, *(_TYPE_RTOL[t] for t in types if t in _TYPE_RTOL)])


def _inputs_to_try(
    model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """The real feeds, then random inputs with symbolic dims of 2, then of 64."""
    yield from (dict(f) for f in feeds)
    for extent in (None, _LARGER_EXTENT):
        yield random_feeds(model, seed=seed, extent=extent)


@dataclass
class ReferenceRun:
    """A model's outputs on the inputs it ran on: what the next rewrite is compared with (a pass manager
    keeps the last verified pass's run, so a chain of rewrites runs each model once)."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def reference_run(
    model: onnx.ModelProto, *, seed: int = 0, feeds: Sequence[Mapping[str, np.ndarray]] = ()
) -> ReferenceRun:
    """``model``'s outputs on ``feeds`` (real inputs: tried first) or random inputs.

    Raises ``NumericCheckUnavailable`` when onnxruntime cannot run it (custom-domain ops, missing kernels).
    """
    # Symbolic dims of 2 suit most models; an image model whose pyramid needs more than 2x2 pixels (PP-OCR's
    # detector) runs at 64; a model whose Reshapes need real shapes, or whose ids index a table, runs on real
    # inputs only. onnxruntime's own error log stays quiet: a failure is reported here.
    error = ""
    for inputs in _inputs_to_try(model, feeds, seed):
        try:
            return ReferenceRun(inputs, _quiet_run(model, inputs))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no useful base class
            error = str(exc).splitlines()[0][:160]
    raise NumericCheckUnavailable(f"onnxruntime cannot run the model before the pass ({error})")


def compare_with(
    reference: ReferenceRun, after: onnx.ModelProto, after_pass: str, *, rtol: float = 1e-4
) -> tuple[float, ReferenceRun]:
    """Run ``after`` on the reference's inputs: the worst relative error of its outputs, and its run.

    ``rtol`` is widened for float16 models; a difference beyond it is a ``VerificationError``."""
    try:
        got = _quiet_run(after, reference.inputs)
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(
            f"pass '{after_pass}' left a model onnxruntime cannot run: {str(exc).splitlines()[0][:200]}"
        ) from None
    rtol = model_rtol(after, rtol)
    worst = 0.0
    for i, (r, g) in enumerate(zip(reference.outputs, got, strict=True)):
        if r.shape != g.shape:
            raise VerificationError(f"pass '{after_pass}' changed output {i} shape {r.shape} -> {g.shape}")
        if not np.issubdtype(r.dtype, np.floating):
            if not np.array_equal(r, g):
                raise VerificationError(f"pass '{after_pass}' changed integer output {i}")
            continue
        finite = np.isfinite(r)
        if not np.array_equal(finite, np.isfinite(g)):
            raise VerificationError(f"pass '{after_pass}' changed which values of output {i} are finite")
        rf, gf = r[finite].astype(np.float64), g[finite].astype(np.float64)
        scale = max(float(np.max(np.abs(rf))) if rf.size else 0.0, 1e-12)
        err = float(np.max(np.abs(rf - gf))) / scale if rf.size else 0.0
        worst = max(worst, err)
        if err > rtol:
            raise VerificationError(f"pass '{after_pass}' changed FP32 output {i}: relative error {err:.3g} > {rtol:g}")
    return worst, ReferenceRun(reference.inputs, got)


def assert_equivalent(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    after_pass: str,
    *,
    rtol: float = 1e-4,
    seed: int = 0,
    feeds: Sequence[Mapping[str, np.ndarray]] = (),
) -> float:
    """Compare outputs on ``feeds`` (real inputs: tried first) or random inputs; returns the worst relative error.

    Raises ``NumericCheckUnavailable`` when onnxruntime cannot run ``before`` (custom-domain ops,
    missing kernels): nothing to compare against. ``rtol`` is widened for float16 models.
    """
    reference = reference_run(before, seed=seed, feeds=feeds)
    return compare_with(reference, after, after_pass, rtol=model_rtol(before, rtol))[0]
