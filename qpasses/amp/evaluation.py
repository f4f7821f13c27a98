"""Evaluation callbacks: ``eval_fn(session) -> float``, higher is better.

AMP hands each callback an ``onnxruntime.InferenceSession`` of the candidate model, or the
simulation's ``SimulatedSession`` (same ``run``/``get_inputs``/``get_outputs``). Ready-made
callbacks cover the usual cases: top-1 accuracy on labelled data and SQNR (dB) of the outputs
against the FP32 model. They are plain picklable objects, so process and Ray workers can run
them; so is ``ScriptFunction``, the CLI's ``evaluate(session)`` loaded from a file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qpasses.amp.errors import AmpError

EvalFn = Callable[[Any], float]
Feed = dict[str, np.ndarray]


def _input_name(session: Any) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise AmpError(f"the model has {len(inputs)} inputs: give data as {{input name: array}} dicts")
    return inputs[0].name


def _feed(session: Any, x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {_input_name(session): x}


def labelled_batches(
    data: Any, *, label_key: str = "labels", batch_size: int = 64, limit: int | None = None
) -> list[tuple[Any, np.ndarray | None]]:
    """(inputs, labels) batches from an ``.npz`` (arrays by input name + ``label_key``) or an iterable.

    An iterable yields ``(inputs, labels)`` pairs (inputs: an array or ``{name: array}``) or bare
    inputs (labels None, for SQNR). ``limit`` keeps the first samples only (e.g. a phase-1 subset).
    """
    if isinstance(data, (str, os.PathLike)):
        with np.load(data) as npz:
            arrays = {k: npz[k] for k in npz.files}
        labels = arrays.pop(label_key, None)
        if not arrays:
            raise AmpError(f"{data}: no input arrays besides {label_key!r}")
        n = len(next(iter(arrays.values())))
        n = min(n, limit) if limit is not None else n
        out: list[tuple[Any, np.ndarray | None]] = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            out.append(({k: v[start:stop] for k, v in arrays.items()}, None if labels is None else labels[start:stop]))
        return out
    if not isinstance(data, Iterable):
        raise AmpError(f"evaluation data must be an .npz path or an iterable of batches, got {type(data).__name__}")
    out, seen = [], 0
    for item in data:
        x, y = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        out.append((x, None if y is None else np.asarray(y)))
        seen += len(np.asarray(y)) if y is not None else 1
        if limit is not None and seen >= limit:
            break
    if not out:
        raise AmpError("evaluation data is empty")
    return out


@dataclass
class TopOneAccuracy:
    """Fraction of samples whose argmax (last axis of output ``output``) equals the label."""

    batches: list[tuple[Any, np.ndarray | None]]
    output: int = 0

    def __call__(self, session: Any) -> float:
        correct = total = 0
        names = [o.name for o in session.get_outputs()]
        for x, y in self.batches:
            if y is None:
                raise AmpError("top-1 accuracy needs labels")
            logits = session.run([names[self.output]], dict(_feed(session, x)))[0]
            correct += int((logits.reshape(len(y), -1).argmax(-1) == y.reshape(-1)).sum())
            total += len(y)
        return correct / total


@dataclass
class Sqnr:
    """Signal-to-quantization-noise ratio (dB) of an output against the FP32 model's, over all batches.

    The FP32 outputs are computed once per process (the first call), from ``reference`` (model bytes).
    """

    batches: list[tuple[Any, np.ndarray | None]]
    reference: bytes
    output: int = 0
    _expected: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_expected": None}

    def _reference_outputs(self) -> list[np.ndarray]:
        if self._expected is None:
            sess = ort.InferenceSession(self.reference, providers=["CPUExecutionProvider"])
            name = sess.get_outputs()[self.output].name
            self._expected = [sess.run([name], dict(_feed(sess, x)))[0] for x, _ in self.batches]
        return self._expected

    def __call__(self, session: Any) -> float:
        signal = noise = 0.0
        name = session.get_outputs()[self.output].name
        for (x, _), ref in zip(self.batches, self._reference_outputs(), strict=True):
            out = session.run([name], dict(_feed(session, x)))[0]
            signal += float(np.sum(ref.astype(np.float64) ** 2))
            noise += float(np.sum((ref.astype(np.float64) - out) ** 2))
        if noise == 0.0:
            return math.inf
        return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def top1_accuracy(
    data: Any, *, label_key: str = "labels", batch_size: int = 64, limit: int | None = None, output: int = 0
) -> TopOneAccuracy:
    """Top-1 accuracy callback on labelled data (see ``labelled_batches``)."""
    return TopOneAccuracy(labelled_batches(data, label_key=label_key, batch_size=batch_size, limit=limit), output)


def sqnr(
    data: Any,
    reference: str | os.PathLike[str] | onnx.ModelProto | bytes,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    output: int = 0,
    label_key: str = "labels",
) -> Sqnr:
    """SQNR (dB) callback against the FP32 ``reference`` model's outputs."""
    if isinstance(reference, onnx.ModelProto):
        blob = reference.SerializeToString()
    elif isinstance(reference, bytes):
        blob = reference
    else:
        blob = Path(reference).read_bytes()
    return Sqnr(labelled_batches(data, label_key=label_key, batch_size=batch_size, limit=limit), blob, output)


@dataclass
class EvalCallbackFactory:
    """AIMET's factory shape: one data source, several ready callbacks."""

    data: Any
    batch_size: int = 64
    label_key: str = "labels"

    def top1(self, limit: int | None = None) -> TopOneAccuracy:
        return top1_accuracy(self.data, label_key=self.label_key, batch_size=self.batch_size, limit=limit)

    def sqnr(self, reference: Any, limit: int | None = None) -> Sqnr:
        return sqnr(self.data, reference, batch_size=self.batch_size, limit=limit, label_key=self.label_key)


@dataclass
class ScriptFunction:
    """A function of a Python file, loaded on first call in each process (picklable by path and name)."""

    path: str
    name: str
    _fn: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "_fn": None}

    def __call__(self, session: Any) -> Any:
        """The function's return value as is: the scorers check it is a number (``evaluators.check_score``)."""
        if self._fn is None:
            self._fn = getattr(load_script(self.path), self.name)
        return self._fn(session)


def load_script(path: str | os.PathLike[str]) -> ModuleType:
    """Import a Python file as a module (its directory is importable from it, as for a script)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise AmpError(f"evaluation script not found: {path}")
    name = f"qpasses_amp_eval_{abs(hash(str(file)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise AmpError(f"cannot load evaluation script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise AmpError(f"evaluation script {path} failed to load: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(file.parent))
    sys.modules[name] = module
    return module


def script_callbacks(path: str | os.PathLike[str]) -> tuple[ScriptFunction, ScriptFunction]:
    """(phase-1, phase-2) callbacks of an eval script: ``evaluate`` and optional ``evaluate_phase1``."""
    module = load_script(path)
    if not callable(getattr(module, "evaluate", None)):
        raise AmpError(f"evaluation script {path} must define evaluate(session) -> float")
    phase2 = ScriptFunction(str(Path(path).resolve()), "evaluate")
    has_phase1 = callable(getattr(module, "evaluate_phase1", None))
    phase1 = ScriptFunction(phase2.path, "evaluate_phase1") if has_phase1 else phase2
    return phase1, phase2


def callback_name(fn: Any) -> str:
    """How messages name a callback: ``evaluate() in /path/eval.py``, or ``module.qualname``."""
    if isinstance(fn, ScriptFunction):
        return f"{fn.name}() in {fn.path}"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


def callback_identity(fn: Any) -> str:
    """What the AMP cache records of a callback, so ``clean_start=False`` (``--resume``) can refuse another one.

    A script function (the CLI's): its name and the sha256 of the script file. A Python callable:
    ``module.qualname`` and the sha256 of its source when ``inspect`` finds it (of its class for a
    callable object); for the built-in metrics (``top1_accuracy``, ``sqnr``) also of their pickled data.
    Other objects' state is left out (a pickle of a set is not stable across processes: a resume
    would be refused for nothing), as are globals and files a function reads: after changing those,
    start clean.
    """
    if isinstance(fn, ScriptFunction):
        try:
            digest = hashlib.sha256(Path(fn.path).read_bytes()).hexdigest()
        except OSError as exc:
            raise AmpError(f"cannot read evaluation script {fn.path}: {exc.strerror or exc}") from None
        return f"{fn.name}() in script sha256:{digest}"
    parts = [callback_name(fn)]
    plain = inspect.isfunction(fn) or inspect.ismethod(fn)
    try:
        source = inspect.getsource(fn if plain else type(fn))
        parts.append(f"source sha256:{hashlib.sha256(source.encode()).hexdigest()}")
    except (OSError, TypeError):
        pass
    if isinstance(fn, (TopOneAccuracy, Sqnr)):  # arrays and bytes: a stable pickle
        parts.append(f"data sha256:{hashlib.sha256(pickle.dumps(fn)).hexdigest()}")
    return " ".join(parts)
