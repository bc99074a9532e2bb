"""The teacher diagnostics scripts run on a smoke project and print one parsable line per setting."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO

FIGURE = re.compile(r"match\(colour\+shape\+direction\) ([0-9.]+) \| (.*)")


def run_script(name: str, *args: str) -> str:
    cmd = [sys.executable, str(REPO / "benchmarks" / name), "--preset", "smoke", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def parse(line: str) -> dict[str, float]:
    match = FIGURE.search(line)
    assert match, line
    values = dict(re.findall(r"(\w+) ([0-9.]+)", match.group(2)))
    figures = {"match": float(match.group(1)), **{k: float(v) for k, v in values.items()}}
    assert set(figures) == {"match", "shape", "colour", "texture", "direction", "speed"}
    assert all(0.0 <= v <= 1.0 for v in figures.values())
    return figures


def test_teacher_accuracy_prints_each_step_count(smoke):
    out = run_script("teacher_accuracy.py", "--limit", "4", "--steps", "10", "4")
    lines = [line for line in out.splitlines() if "steps:" in line]
    assert [int(line.split()[0]) for line in lines] == [10, 4]
    for line in lines:
        parse(line)


def test_teacher_restart_prints_each_start(smoke):
    out = run_script("teacher_restart.py", "--limit", "4", "--starts", "0.5", "1.0")
    lines = [line for line in out.splitlines() if line.startswith("start σ")]
    assert len(lines) == 2
    assert float(lines[-1].split()[2]) == 1.0  # start σ 1 is ordinary sampling from the full grid
    for line in lines:
        parse(line)


def test_teacher_restart_rejects_a_start_outside_the_grid(smoke):
    cmd = [sys.executable, str(REPO / "benchmarks" / "teacher_restart.py"), "--preset", "smoke",
           "--starts", "0.0001"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--starts [0.0001]: each start σ must lie in" in done.stderr


def test_validate_scores_methods_on_rows_disjoint_from_train_and_eval(smoke):
    """benchmarks/validate.py: teacher + the named methods on the validation split, one table row each."""
    from dcm import config, io, paths
    from dcm.data.prompts import validation_rows

    params = config.load("params.yaml", preset="smoke")
    rows = validation_rows(params)
    sets = io.read_json(paths.PROMPTS)
    assert len(rows) == len(sets["eval"]) and len({r["seed"] for r in rows}) == len(rows)
    assert not {r["seed"] for r in rows} & {r["seed"] for key in ("train", "eval") for r in sets[key]}
    assert rows == validation_rows(params)  # deterministic from params.seed

    out = run_script("validate.py", "--methods", "euler4")
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in table] == ["teacher", "euler4"]
    teacher_diff = table[0].split("|")[3].strip()
    assert teacher_diff.startswith("+0.0")  # the teacher's paired difference to itself
    for line in table:
        total = float(line.split("|")[2].split()[0])
        assert 0.0 <= total <= 100.0


def test_validate_refuses_an_untrained_method(smoke):
    cmd = [sys.executable, str(REPO / "benchmarks" / "validate.py"), "--preset", "smoke", "--methods", "pcm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--methods pcm" in done.stderr and "run its training stages first" in done.stderr
