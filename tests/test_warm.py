"""Warm start (``DCM_WARM_START=1``): a local ``dcm launch`` runs its stage in a fork of a server that
imported the libraries once, in the launcher's directory with its environment and streams; the
launcher returns the stage's exit status and passes signals on; the outputs are a fresh process's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, deterministic_metrics, run_dvc, smoke_dvc_repo
from dcm.pipeline import warm

BIN = Path(sys.executable).parent


def _warm_env():
    """The environment of a warm launcher, with a TMPDIR of its own (short enough for a socket path);
    the servers started under it are stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="dcmw", dir="/tmp"))
    env = {**os.environ, warm.ENV: "1", warm.IDLE_ENV: "120", "TMPDIR": str(tmp),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    yield env
    warm.stop(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


warm_env = pytest.fixture(scope="module")(_warm_env)  # one server for this module's launches
fresh_warm_env = pytest.fixture(_warm_env)  # a server of the test's own


def server_log(env: dict) -> str:
    return "".join(p.read_text() for p in Path(env["TMPDIR"]).glob("dcm-warm-*/*.log"))


def smoke_project(folder: Path, **teacher) -> Path:
    folder.mkdir()
    raw = yaml.safe_load(subprocess.run([str(BIN / "dcm"), "params", "--params", str(REPO / "params.yaml"),
                                         "--preset", "smoke"], capture_output=True, text=True, check=True).stdout)
    raw["teacher"].update(teacher)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def dcm(folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dcm"), *args], cwd=folder, env=env, capture_output=True, text=True)


def test_warm_launches_fork_the_stages_and_write_what_fresh_processes_write(tmp_path, warm_env):
    cold, hot = smoke_project(tmp_path / "cold"), smoke_project(tmp_path / "warm")
    for stage in ("prepare", "teacher"):
        assert dcm(cold, "run", stage).returncode == 0
        out = dcm(hot, "launch", stage, env=warm_env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"{stage}:" in out.stdout + out.stderr  # the stage's own output reached the launcher's streams
    log = server_log(warm_env)
    assert log.count("ready in") == 1  # the first launch started the server, the second reused it
    for stage in ("prepare", "teacher"):
        pid = re.search(rf"stage pid (\d+): dcm run {stage} --params params.yaml in {re.escape(str(hot))}\n", log)
        assert pid and f"stage pid {pid.group(1)}: exit status 0" in log, log
    files = sorted(p.relative_to(cold) for p in (cold / "models").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(hot) for p in (hot / "models").rglob("*") if p.is_file())
    for f in [*files, Path("data/prompts.json")]:
        assert _deterministic(cold / f) == _deterministic(hot / f), f


def _deterministic(path: Path):
    """A file's bytes; a JSON file's content less what measures the process (wall time, peak memory)."""
    if path.suffix != ".json":
        return path.read_bytes()
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("wall_s", "steps_per_s", "peak_rss_mb")} \
        if isinstance(data, dict) else data


def test_a_warm_launch_returns_the_stages_exit_status_and_error(tmp_path, warm_env):
    project = smoke_project(tmp_path / "p")
    out = dcm(project, "launch", "teacher", env=warm_env)  # no data/prompts.json yet
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and "run `dcm run prepare` first" in out.stderr, out.stderr
    pid = re.search(rf"stage pid (\d+): dcm run teacher --params params.yaml in {re.escape(str(project))}\n",
                    server_log(warm_env))
    assert pid and f"stage pid {pid.group(1)}: exit status 2" in server_log(warm_env)


def _stage_pid(env: dict, stage: str, folder: Path, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(rf"stage pid (\d+): dcm run {stage} .* in {re.escape(str(folder))}\n", server_log(env))
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    raise AssertionError(server_log(env))


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _interruptible() -> None:
    """A launcher that takes Ctrl-C, as in a terminal, even where these tests run with SIGINT ignored (a
    background job): the stage follows the launcher's disposition, not the server's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["interrupt", "kill"])
def test_a_signal_to_the_launcher_stops_its_stage(tmp_path, warm_env, how):
    """Ctrl-C (SIGINT) reaches the stage, which exits as a fresh process would (130); a launcher killed
    outright leaves no stage behind (the server stops it); either way nothing is written."""
    project = smoke_project(tmp_path / "p", train_steps=100000)
    assert dcm(project, "run", "prepare").returncode == 0
    launcher = subprocess.Popen([str(BIN / "dcm"), "launch", "teacher"], cwd=project, env=warm_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_interruptible)
    pid = _stage_pid(warm_env, "teacher", project)
    time.sleep(2.0)  # into the training loop
    if how == "interrupt":
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 130, err[-2000:]
        assert "KeyboardInterrupt" in err
    else:
        launcher.kill()
        launcher.wait(timeout=10)
    assert _gone(pid), f"stage pid {pid} still runs"
    if how == "kill":
        assert f"stage pid {pid}: launcher gone" in server_log(warm_env)
    assert not (project / "models/teacher").exists()


def test_the_server_key_follows_the_environment_but_not_what_differs_between_stages():
    base = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}
    assert warm.key(base) == warm.key({**base, "DVC_STAGE": "teacher", "PWD": "/x", "_": "/bin/dcm"})
    assert warm.key(base) != warm.key({**base, "OMP_NUM_THREADS": "1"})


def test_without_a_server_the_stage_runs_in_the_launchers_process(tmp_path, fresh_warm_env):
    folder = Path(fresh_warm_env["TMPDIR"]) / f"dcm-warm-{os.getuid()}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)  # not private: no socket is put there
    project = smoke_project(tmp_path / "p")
    out = dcm(project, "launch", "prepare", env=fresh_warm_env)
    assert out.returncode == 0, out.stderr
    assert "warm start unavailable" in out.stderr and "not private" in out.stderr
    assert (project / "data/prompts.json").is_file()


@pytest.mark.slow
def test_dvc_repro_with_warm_starts_gives_the_cold_runs_metrics(dvc_smoke_repo, tmp_path, fresh_warm_env):
    """The default DAG's LCM row through DVC, warm: the same metrics as the cold session run, bit for bit."""
    _, _, cold = dvc_smoke_repo
    repo = smoke_dvc_repo(tmp_path)
    run_dvc(repo, "repro", "evaluate@lcm", env=fresh_warm_env)
    assert deterministic_metrics(repo / "metrics") == {"lcm": cold["lcm"]}
    log = server_log(fresh_warm_env)
    assert log.count("ready in") == 1
    for stage in ("prepare", "teacher", "trajectories", "train_baseline --method lcm", "sample --method lcm",
                  "evaluate --method lcm"):
        assert f"dcm run {stage} " in log, (stage, log)


def test_stop_ends_the_servers_and_spares_a_reused_pid(tmp_path, fresh_warm_env):
    project = smoke_project(tmp_path / "p")
    assert dcm(project, "launch", "prepare", env=fresh_warm_env).returncode == 0
    folder = Path(fresh_warm_env["TMPDIR"]) / f"dcm-warm-{os.getuid()}"
    (folder / "0000000000000000.log").write_text(f"pid {os.getpid()} ready in 1.0 s\n")  # a stale log: our pid now
    (server,) = map(int, re.findall(r"pid (\d+) ready", server_log(fresh_warm_env).replace(f"pid {os.getpid()} ", "")))
    assert warm.stop(fresh_warm_env["TMPDIR"]) == [server]
    assert _gone(server) and not list(folder.glob("*.sock"))
