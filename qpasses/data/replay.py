"""Recording a one-shot source (a generator) as it is first read, so that every later read replays it: the
source is read exactly once; past ``REPLAY_MEMORY_BYTES`` recorded feeds spill to disk.

The record belongs to the ``CalibrationData`` that wraps the source (one per run: the pass context keeps the
normalised data), never to a module-level registry."""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPLAY_MEMORY_BYTES = 256 << 20
"""Bytes of a one-shot source's recorded feeds kept in memory; later feeds are spilled to disk."""


def _copied(raw: Any) -> Any:
    """A feed's arrays copied (the source may reuse its buffers); anything odd is kept for validation to report."""
    if not isinstance(raw, Mapping):
        return raw
    try:
        return {k: np.array(v) for k, v in raw.items()}
    except (ValueError, TypeError):
        return raw


def _nbytes(feed: Any) -> int:
    if not isinstance(feed, Mapping):
        return 0
    return sum(v.nbytes for v in feed.values() if isinstance(v, np.ndarray))


def _spillable(feed: Any) -> bool:
    return isinstance(feed, Mapping) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) and not v.dtype.hasobject for k, v in feed.items()
    )


class Replay:
    """A one-shot iterator of feeds, recorded as it is read so that it can be read again any number of times.

    Iterations may interleave: each replays the record up to where it is, then pulls the next feed
    from the source (recording it). The source is dropped once it is exhausted.
    """

    def __init__(self, source: Iterator[Any]) -> None:
        self._source: Iterator[Any] | None = source
        self._items: list[Any] = []  # feeds in memory, or the Path of a spilled one
        self._in_memory = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.complete = False

    @property
    def directory(self) -> Path | None:
        return None if self._tmp is None else Path(self._tmp.name)

    def __len__(self) -> int:
        return len(self._items)

    def _pull(self) -> bool:
        """Read and record the source's next feed; False once it is exhausted."""
        if self._source is None:
            return False
        try:
            raw = next(self._source)
        except StopIteration:
            self.complete = True
            self._source = None  # nothing more to read
            return False
        feed = _copied(raw)
        size = _nbytes(feed)
        if self._in_memory + size > REPLAY_MEMORY_BYTES and _spillable(feed):
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="qpasses-calib-replay-")
                weakref.finalize(self, self._tmp.cleanup)
            path = Path(self._tmp.name) / f"feed_{len(self._items):06d}.npz"
            np.savez(path, **feed)
            self._items.append(path)
        else:
            self._in_memory += size
            self._items.append(feed)
        return True

    def _item(self, i: int) -> Any:
        item = self._items[i]
        if isinstance(item, Path):
            with np.load(item, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        return item

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while i < len(self._items) or (not self.complete and self._pull()):
            yield self._item(i)
            i += 1
