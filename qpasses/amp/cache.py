"""The AMP cache in ``results_dir/.cache``: every score measured, plus the phase-1 and pareto lists.

Scores are keyed by phase and assignment, so a re-run with ``clean_start=False`` evaluates nothing
it already knows: a different ``allowed_accuracy_drop`` re-reads the same phase-1 list and
pareto points and only scores points it never visited. A fingerprint of the model, candidates
and quantization options guards the cache: when it differs the cache is set aside (AIMET leaves
that check to the user). Files are JSON, written atomically after every new score, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CACHE_DIR = ".cache"


def fingerprint(model: bytes, **fields: Any) -> dict[str, Any]:
    """What the cached scores depend on (besides the eval callbacks, which are the user's to keep fixed)."""
    return {"model_sha256": hashlib.sha256(model).hexdigest(), **json.loads(json.dumps(fields, default=str))}


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
            if self.dir.exists():
                shutil.rmtree(self.dir)
                self.messages.append(f"clean start: removed the cache in {self.dir}")
        elif self.dir.exists():
            old = self._read("fingerprint.json")
            if old != dict(stamp):
                changed = sorted(k for k in {*dict(stamp), *(old or {})} if (old or {}).get(k) != stamp.get(k))
                self.messages.append(f"cache in {self.dir} not reused: {', '.join(changed) or 'unreadable'} changed")
                shutil.rmtree(self.dir)
            else:
                self.scores = {k: float(v) for k, v in (self._read("scores.json") or {}).items()}
                self.messages.append(f"reusing cached results from {self.dir} ({len(self.scores)} scores)")
        else:
            self.messages.append(f"no cache in {self.dir} yet: computing everything")
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "fingerprint.json", dict(stamp))

    def _read(self, name: str) -> Any:
        path = self.dir / name
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
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
