"""The AMP cache in ``results_dir/.cache``: every score measured, plus the phase-1 and pareto lists.

Scores are keyed by phase and assignment, so a re-run with ``clean_start=False`` (``--resume``)
evaluates nothing it already knows: a different ``allowed_accuracy_drop`` re-reads the same phase-1
list and pareto points and only scores points it never visited. A fingerprint guards the cache:
the model's sha256, the eval callbacks' identity (``evaluation.callback_identity``: the script's
sha256 for the CLI), the qpasses version, the candidates and quantization options. Resuming from a
cache whose fingerprint differs, or whose files are damaged (not JSON, a score that is not a number,
NaN), is refused with an ``AmpError`` naming what differs: the user asked to reuse those scores, and
silently recomputing (or trusting them) would hide it. The final verification of the chosen model
is never cached (``mixed_precision`` measures it on every run), so a hand-edited score can steer
the search but not the score reported. Files are JSON, written atomically after every new score,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qpasses.amp.errors import AmpError

CACHE_DIR = ".cache"
UNCACHED = ("verify|", "verify-exact|")
"""Key prefixes of older caches' final-verification scores: dropped on read, measured again."""
INFINITE_OK = ("fp32|", "proxy")
"""Key prefixes whose scores may be +-inf (SQNR of FP32 against itself, the proxy); NaN never."""
FIELD_NAMES = {
    "model_sha256": "model",
    "eval_callbacks": "eval script / callbacks",
    "qpasses_version": "qpasses version",
    "config": "quantization options",
}


def qpasses_version() -> str:
    """The installed qpasses version (``qpasses.__version__`` when not installed as a distribution)."""
    try:
        return importlib.metadata.version("qpasses")
    except importlib.metadata.PackageNotFoundError:
        import qpasses

        return str(getattr(qpasses, "__version__", "unknown"))


def fingerprint(model: bytes, **fields: Any) -> dict[str, Any]:
    """What the cached scores depend on: the model's sha256, the qpasses version and ``fields`` (JSON-able)."""
    return {
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "qpasses_version": qpasses_version(),
        **json.loads(json.dumps(fields, default=str)),
    }


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The fields that differ, named (short values shown as ``old -> new``)."""
    out = []
    for key in sorted({*old, *new}):
        if old.get(key) == new.get(key):
            continue
        name = FIELD_NAMES.get(key, key.replace("_", " "))
        a, b = old.get(key, "none recorded"), new.get(key, "none recorded")
        if key != "model_sha256" and all(isinstance(v, (str, int, float, bool)) and len(str(v)) <= 40 for v in (a, b)):
            name += f" ({a} -> {b})"
        out.append(name)
    return out


def _valid_score(key: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return math.isfinite(value) or key.startswith(INFINITE_OK)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class AmpCache:
    """Scores and lists of earlier runs; ``messages`` says what was reused or discarded."""

    def __init__(self, results_dir: str | os.PathLike[str], stamp: Mapping[str, Any], clean_start: bool) -> None:
        self.dir = Path(results_dir) / CACHE_DIR
        self.messages: list[str] = []
        self.scores: dict[str, float] = {}
        self.hits = 0
        if clean_start:
            if self.dir.is_dir() and not self.dir.is_symlink():
                shutil.rmtree(self.dir)
                self.messages.append(f"clean start: removed the cache in {self.dir}")
            elif self.dir.exists() or self.dir.is_symlink():
                self.dir.unlink()
                self.messages.append(f"clean start: removed {self.dir} (not a cache folder)")
        elif self.dir.exists():
            self._resume(dict(stamp))
        else:
            self.messages.append(f"no cache in {self.dir} yet: computing everything")
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "fingerprint.json", dict(stamp))

    def _refuse(self, why: str) -> AmpError:
        return AmpError(
            f"cannot resume from the cache in {self.dir}: {why}; run without --resume (clean_start=True) to start fresh"
        )

    def _resume(self, stamp: dict[str, Any]) -> None:
        """Reuse the scores of a cache made for the same fingerprint; refuse anything else."""
        if not self.dir.is_dir():
            raise self._refuse("it is not a folder")
        if not (self.dir / "fingerprint.json").exists():
            if any(self.dir.iterdir()):
                raise self._refuse("fingerprint.json is missing")
            self.messages.append(f"the cache in {self.dir} is empty: computing everything")
            return
        old = self._strict("fingerprint.json")
        if not isinstance(old, dict):
            raise self._refuse(f"fingerprint.json holds a {type(old).__name__}, not an object")
        changed = _differences(old, stamp)
        if changed:
            raise self._refuse(f"it was made for another {', '.join(changed)}")
        scores = self._strict("scores.json") if (self.dir / "scores.json").exists() else {}
        if not isinstance(scores, dict):
            raise self._refuse(f"scores.json holds a {type(scores).__name__}, not an object of scores")
        for key, value in scores.items():
            if not _valid_score(key, value):
                raise self._refuse(
                    f"scores.json: {key!r} is {value!r}, not a finite number (a damaged or hand-edited cache)"
                )
        self.scores = {k: float(v) for k, v in scores.items() if not k.startswith(UNCACHED)}
        self.messages.append(f"reusing cached results from {self.dir} ({len(self.scores)} scores)")

    def _strict(self, name: str) -> Any:
        """A cache file's JSON, or an ``AmpError`` naming it."""
        path = self.dir / name
        try:
            return json.loads(path.read_text())
        except OSError as exc:
            raise self._refuse(f"cannot read {name}: {exc.strerror or exc}") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise self._refuse(f"{name} is not valid JSON ({' '.join(str(exc).split())})") from None

    def _read(self, name: str) -> Any:
        path = self.dir / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def get(self, key: str) -> float | None:
        value = self.scores.get(key)
        if value is not None:
            self.hits += 1
        return value

    def put(self, key: str, value: float) -> None:
        self.scores[key] = value
        _write_json(self.dir / "scores.json", self.scores)

    def put_many(self, values: Mapping[str, float]) -> None:
        """Several scores, one write (a batch that arrives at once)."""
        if values:
            self.scores.update(values)
            _write_json(self.dir / "scores.json", self.scores)

    def save(self, name: str, data: Any) -> None:
        _write_json(self.dir / name, data)

    def load(self, name: str) -> Any:
        return self._read(name)
