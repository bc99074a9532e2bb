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


def test_no_test_file_imports_another_test_file_or_conftest():
    """What test files share lives in tests/helpers.py and fixtures in conftest.py: a test file that imports
    another test file (``test_*``) or ``conftest`` depends on that file's body and on pytest's rootdir on
    sys.path."""
    import ast

    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[0] == "conftest" or name.split(".")[0].startswith("test_")]
    assert not offenders, offenders


def test_the_code_passes_ruff_at_the_configured_line_length():
    """pyproject.toml's ruff rules, E501 (line length 110) included, over src, tests and benchmarks."""
    out = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", "--no-cache", "src", "tests",
                          "benchmarks"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
