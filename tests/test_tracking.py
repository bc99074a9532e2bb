"""MLflow tracking against a real server on loopback: jobs logging at once lose nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dcm import config, tracking

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a sqlite backend, as a cluster's tracking URI would be."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not come up:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


JOB = textwrap.dedent("""
    import sys
    from dcm import config, tracking
    params = config.load(sys.argv[1], "smoke")
    with tracking.stage_run(params, "train_baseline", sys.argv[2]) as run:
        for step in range({steps}):
            run.metrics({{"loss": 1.0 / (step + 1), "grad_norm": float(step)}}, step=step)
        print("RUN_ID=" + run.run_id)
""")


@pytest.mark.slow
def test_two_jobs_logging_to_one_server_at_once_lose_no_metric(mlflow_server, tmp_path, monkeypatch):
    params = config.load(REPO / "params.yaml", "smoke")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracking.ensure_experiment(params)  # created once, before the jobs fan out
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = tmp_path / "job.py"
    script.write_text(JOB.format(steps=STEPS))
    jobs = [subprocess.Popen([sys.executable, str(script), str(REPO / "params.yaml"), method], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for method in ("lcm", "pcm")]
    outputs = [j.communicate(timeout=300) for j in jobs]
    for job, (_out, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-3000:]
    run_ids = [line.split("=", 1)[1] for out, _ in outputs for line in out.splitlines()
               if line.startswith("RUN_ID=")]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    for run_id, method in zip(run_ids, ("lcm", "pcm")):
        run = client.get_run(run_id)
        assert run.data.tags["dcm.method"] == method and run.info.status == "FINISHED"
        for key in ("loss", "grad_norm"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS)), (method, key)
        assert {m.value for m in client.get_metric_history(run_id, "grad_norm")} \
            == {float(s) for s in range(STEPS)}


def test_stage_runs_nest_under_the_pipeline_parent_run(monkeypatch, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    params = config.load(REPO / "params.yaml", "smoke")
    parent = tracking.start_pipeline_run(params, "pipeline-test")
    monkeypatch.setenv("DCM_PARENT_RUN_ID", parent)
    monkeypatch.setenv("DVC_STAGE", "train_baseline@lcm")
    with tracking.stage_run(params, "train_baseline", "lcm") as run:
        run.metrics({"loss": 0.5}, step=0)
        child = run.run_id
    tracking.finish_pipeline_run(params, parent, 0)
    client = MlflowClient(mlflow_sqlite)
    tags = client.get_run(child).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["dvc.stage"] == "train_baseline@lcm"
    assert tags["dcm.method"] == "lcm"
    import torch  # a stage imports it before its run starts: the run records its thread count

    assert tags["dcm.torch_threads"] == str(torch.get_num_threads())
    assert client.get_run(parent).info.status == "FINISHED"


def test_report_children_are_in_the_parents_experiment(mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    params = config.load(REPO / "params.yaml", "smoke")
    with tracking.stage_run(params, "report") as run:
        run.child("lcm", {"total": 0.5}, {"dcm.method": "lcm"})
        parent = run.run_id
    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [c.info.run_name for c in children] == ["lcm"]
    assert children[0].data.metrics["total"] == 0.5


def _runs(db: Path) -> list[tuple[str, str, int]]:
    """(name, status, metric rows) of every run in an MLflow sqlite database, read-only."""
    import sqlite3

    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as con:
            return con.execute("SELECT r.name, r.status, (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = "
                               "r.run_uuid) FROM runs r").fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or a write in progress
        return []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_stopped_stage_exits_128_plus_the_signal_and_its_run_is_marked_killed(tmp_path, signum):
    """Ctrl-C or SIGTERM (scancel, a time limit) while the teacher trains and logs every step: the stage
    exits 130/143, its MLflow run ends KILLED (never 'database is locked'), and nothing is written."""
    raw = config.load_raw(REPO / "params.yaml", "smoke")
    raw["teacher"].update(train_steps=100000, log_every=1)  # an MLflow write every step: signals land in them
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("DCM_TRACKING", "MLFLOW_TRACKING_URI")}
    dcm = [str(BIN / "dcm"), "run"]
    assert subprocess.run([*dcm, "prepare"], cwd=tmp_path, env=env, capture_output=True).returncode == 0
    stage = subprocess.Popen([*dcm, "teacher"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    db, deadline = tmp_path / "mlflow.db", time.monotonic() + 300
    while not any(name == "teacher" and metrics >= 20 for name, _, metrics in _runs(db)):
        assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()[1][-3000:]
        time.sleep(0.2)
    stage.send_signal(signum)
    _, err = stage.communicate(timeout=120)
    assert stage.returncode == 128 + signum, err[-3000:]
    assert "database is locked" not in err
    assert [status for name, status, _ in _runs(db) if name == "teacher"] == ["KILLED"]
    assert not (tmp_path / "models" / "teacher").exists()
