"""A method is one registered kind: its declaration (``dcm.config.METHOD_KINDS``) and its module in
``dcm.methods``.  The stage table, the sample stage and export read them; nothing branches on a kind's
name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from dcm import config
from dcm.config import KIND_NAMES, METHOD_KINDS
from dcm.pipeline.table import STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_method_kind_is_one_module_with_the_methods_protocol(kind):
    declared = METHOD_KINDS[kind]
    module = importlib.import_module(f"dcm.methods.{declared.module}")
    assert callable(module.schedule) and callable(module.velocities)
    assert callable(getattr(module, "train", None)) == bool(declared.trains)
    for stage in declared.trains:
        assert STAGES[stage].trains and STAGES[stage].per_method


def test_training_stages_run_for_the_methods_whose_kind_they_train():
    params = config.load(REPO / "params.yaml", "smoke")
    for stage in (s for s in STAGES.values() if s.trains):
        expected = [m for m, c in params.methods.items()
                    if stage.name in METHOD_KINDS[c.kind].trains and c.checkpoint_from is None]
        assert stage.methods(params, include_ablations=True) == expected
    every = list(params.methods)
    assert STAGES["sample"].methods(params, include_ablations=True) == every


def _kind_comparisons(path: Path) -> list[str]:
    """``<x>.kind == "dcm"``-style tests: a comparison of a ``.kind`` attribute with a method kind's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)}
        if any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides) and names & set(KIND_NAMES):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_module_branches_on_the_name_of_a_method_kind():
    found = [hit for path in sorted((REPO / "src" / "dcm").rglob("*.py")) for hit in _kind_comparisons(path)]
    assert found == []
