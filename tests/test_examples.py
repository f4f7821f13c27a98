"""Every script in ``examples/`` runs to completion (each checks its own results and exits non-zero otherwise)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_examples_exist() -> None:
    assert "embed_in_compiler.py" in {p.name for p in EXAMPLES}


@functools.cache
def _run(script: Path) -> subprocess.CompletedProcess[str]:
    # The checkout under test, not whatever copy of qpasses the environment has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    pytest.importorskip("onnx_ir")  # the examples embed qpasses in an onnx_ir-based compiler
    proc = _run(script)
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip()


def test_embed_in_compiler_shows_the_custom_pass() -> None:
    pytest.importorskip("onnx_ir")
    proc = _run(ROOT / "examples" / "embed_in_compiler.py")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # at the structural extension point
    assert "fold-batchnorm,fold-matmul-bias,first-last-int16,keep-nonfinite-float" in out
    assert "features.0.act_out: 16 bits" in out and "features.1.act_out: 8 bits" in out
