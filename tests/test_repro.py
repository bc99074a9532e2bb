"""`dcm repro -j N`: the DVC pipeline with several stage runs at a time (dcm.pipeline.repro)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dcm import config
from dcm.config import ConfigError
from dcm.pipeline import repro
from dcm.pipeline.table import switched
from helpers import REPO, deterministic_metrics, run_dvc, smoke_dvc_repo

BIN = Path(sys.executable).parent


def test_the_plan_holds_what_the_targets_need_each_run_after_what_it_reads():
    params = config.load(REPO / "params.yaml")
    runs = {r.name: r for r in repro.plan(params, ["report"])}
    assert {"prepare", "teacher", "trajectories", "train_seme@dcm", "train_dete@dcm", "sample@teacher",
            "evaluate@lcm", "report"} <= set(runs)
    assert "report_paper" not in runs and "mcm_setting" not in runs
    assert runs["teacher"].after == {"prepare"}
    # nothing runs beside the demo's teacher (every other run needs it): it keeps every core
    assert runs["prepare"].alone and runs["teacher"].alone and not runs["trajectories"].alone
    assert not any(r.alone for n, r in runs.items() if "@" in n)
    assert {"train_seme@dcm", "trajectories", "teacher"} <= runs["train_dete@dcm"].after
    assert runs["evaluate@lcm"].after == {"sample@lcm", "sample@teacher"}
    # a per-method stage's name stands for its runs, and brings only what they need
    sampled = {r.name for r in repro.plan(params, ["sample"])}
    assert {f"sample@{m}" for m in params.default_methods} <= sampled and "report" not in sampled
    assert not any(n.startswith("evaluate@") for n in sampled)


def test_the_run_with_the_most_work_downstream_starts_first():
    """The paper's DAG: the teachers (its own, MCM's setting's, the second ones) before the short student
    runs, which all wait for the main teacher."""
    runs = repro.plan(switched(config.load(REPO / "params.yaml"), paper=True))
    order = [r.name for r in runs]
    assert order[:2] == ["prepare", "teacher"]
    assert order.index("teachers") < order.index("mcm_setting") < order.index("train_baseline@lcm")
    assert [r.name for r in runs if r.alone] == []  # the teachers of the paper run side by side
    for r in runs:
        assert all(r.downstream < next(b for b in runs if b.name == a).downstream for a in r.after)


def test_an_unknown_target_is_refused_naming_the_runs():
    params = config.load(REPO / "params.yaml")
    with pytest.raises(ConfigError, match=r"target.*tacher.*report"):
        repro.plan(params, ["tacher"])
    with pytest.raises(ConfigError, match=r"--jobs"):
        repro.execute([], jobs=0, threads=1)


def test_a_folder_without_dvc_or_with_a_stale_dvc_yaml_is_refused_before_anything_runs(project):
    params = config.load("params.yaml")
    with pytest.raises(ConfigError, match=r"\.dvc.*dvc init"):
        repro.check_project(params)
    run_dvc(project, "init", "-q", "--no-scm")
    with pytest.raises(ConfigError, match=r"dvc.yaml = 'missing'.*python -m dcm.pipeline.dag"):
        repro.check_project(params)
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    repro.check_project(params)
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text().replace("train_seme", "train_semi"))
    with pytest.raises(ConfigError, match=r"dvc.yaml = 'stale'"):
        repro.check_project(params)


def _tiny_dvc_repo(path: Path, stages: dict) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    run_dvc(path, "init", "-q")
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return path


def _runs(stages: dict, weights: dict) -> list[repro.Run]:
    runs = [repro.Run(n, weights[n], s.get("deps", []), s.get("outs", [])) for n, s in stages.items()]
    for r in runs:
        r.after = {o.name for o in runs if set(o.writes) & set(r.reads)}
    return sorted(runs, key=lambda r: -r.weight)


def test_a_failed_run_stops_new_runs_lets_the_running_one_finish_and_shows_its_log(tmp_path, monkeypatch,
                                                                                   capsys):
    """Real `dvc repro --single-item` runs of a three-stage DAG: `slow` and `broken` start together; `broken`
    fails, `slow` finishes and DVC records it, `after` (which needs `broken`) never starts."""
    stages = {"slow": {"cmd": "sleep 3 && echo slow > slow.txt", "outs": ["slow.txt"]},
              "broken": {"cmd": "echo 'the error the stage printed' && exit 3", "outs": ["broken.txt"]},
              "after": {"cmd": "cat broken.txt > after.txt", "deps": ["broken.txt"], "outs": ["after.txt"]}}
    repo = _tiny_dvc_repo(tmp_path, stages)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    status = repro.execute(_runs(stages, {"slow": 2, "broken": 3, "after": 1}), jobs=2, threads=1,
                           dvc=str(BIN / "dvc"), poll=0.1)
    out = capsys.readouterr().out
    assert status != 0  # dvc repro exits 255 when a stage command fails
    assert "FAILED broken (exit" in out and "the error the stage printed" in out
    assert "start after" not in out and "done  slow" in out
    assert (repo / "slow.txt").is_file() and not (repo / "after.txt").exists()
    assert "slow" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert "1 runs done, 1 not run" in out
    assert "the error the stage printed" in (repo / "logs/repro/broken.log").read_text()


def test_runs_get_their_thread_count_and_what_is_done_is_skipped(tmp_path, monkeypatch, capsys):
    stages = {"threads": {"cmd": "echo $OMP_NUM_THREADS > threads.txt", "outs": ["threads.txt"]},
              "alone": {"cmd": "printenv OMP_NUM_THREADS > alone.txt || echo unset > alone.txt",
                        "outs": ["alone.txt"]}}
    repo = _tiny_dvc_repo(tmp_path, stages)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runs = _runs(stages, {"threads": 1, "alone": 1})
    next(r for r in runs if r.name == "alone").alone = True
    for _ in range(2):
        assert repro.execute(runs, jobs=1, threads=3, dvc=str(BIN / "dvc")) == 0
    assert (repo / "threads.txt").read_text().strip() == "3"
    assert (repo / "alone.txt").read_text().strip() == "unset"  # the environment's: torch's default
    assert "didn't change, skipping" in (repo / "logs/repro/threads.log").read_text()
    out = capsys.readouterr().out
    assert out.count("done  threads") == 2
    assert "start threads (3 threads)" in out and "start alone (alone)" in out


@pytest.mark.slow
def test_dcm_repro_builds_smoke_runs_two_at_a_time_as_dvc_repro_does(dvc_smoke_repo, tmp_path_factory):
    """LCM's and PCM's evaluations of the smoke DAG (and what they need) by `dcm repro -j 2` at the thread
    count `dvc repro` ran with: two runs at once, each recorded in dvc.lock (`dvc status` of the targets
    clean), each figure equal to the serial `dvc repro`'s."""
    _, _, serial = dvc_smoke_repo
    repo = smoke_dvc_repo(tmp_path_factory.mktemp("dcm-repro"))
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    targets = ["evaluate@lcm", "evaluate@pcm"]
    out = subprocess.run([str(BIN / "dcm"), "repro", "-j", "2", "--threads", threads, *targets], cwd=repo,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    running, most = 0, 0
    for event in re.findall(r"\] (start|done) ", out.stdout):
        running += 1 if event == "start" else -1
        most = max(most, running)
    assert most == 2, out.stdout
    assert "start report" not in out.stdout and "start train_seme@dcm" not in out.stdout
    assert json.loads(run_dvc(repo, "status", "--json", *targets).stdout) == {}
    assert deterministic_metrics(repo / "metrics") == {m: serial[m] for m in ("lcm", "pcm")}
    assert (repo / "logs/repro/train_baseline@lcm.log").is_file()
