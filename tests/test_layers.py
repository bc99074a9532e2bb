"""The layer contract (.importlinter): checked by import-linter on the package's own source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--config", str(REPO / ".importlinter"), "--no-cache"],
                          cwd=src, env=env, capture_output=True, text=True)


def test_package_keeps_its_layer_contract():
    out = lint(REPO / "src")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_an_import_that_reaches_up_breaks_the_contract(tmp_path):
    """A cycle hidden inside a function (the kind this contract was written against) still fails."""
    shutil.copytree(REPO / "src" / "dcm", tmp_path / "dcm", ignore=shutil.ignore_patterns("__pycache__"))
    schedule = tmp_path / "dcm" / "schedule.py"
    schedule.write_text(schedule.read_text() + "\n\ndef _stage_table():\n    from dcm.pipeline import table\n"
                        "\n    return table\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "dcm.schedule is not allowed to import dcm.pipeline" in out.stdout
