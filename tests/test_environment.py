"""A stage run by a Python without the project's packages says so in one line, with the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["fetch", "train_sft", "report"])
def test_wrong_python_gets_one_line_and_the_fix(stage):
    # -S: no site-packages, as the system Python that `dvc repro` finds when the venv is not active
    out = subprocess.run([sys.executable, "-S", "-m", f"stages.{stage}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: ") and "lacks the project's packages" in lines[0]
    assert "scikit-learn" in lines[0] and "source .venv/bin/activate" in lines[0]
