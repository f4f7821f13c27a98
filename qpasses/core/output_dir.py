"""An output folder is written as a set: complete, or left as it was.

Every file is written into a temporary sibling folder (same filesystem, unique name, so
concurrent writers never share a temp file); only when all of them are written are they renamed
into place. A failure while writing (full disk, file-size limit, interrupt) leaves the previous
complete set, or nothing, and no temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output_dir(outdir: str | os.PathLike[str]) -> Iterator[Path]:
    """``with staged_output_dir(out) as tmp: write files into tmp`` -> moved into ``out`` on success."""
    out = Path(outdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)  # renames only: nothing left to fail for lack of space
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
