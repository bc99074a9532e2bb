"""`dcm launch` through submitit on SLURM, and Snakemake's slurm profile, on the one-node local
cluster (slurm/local-cluster/start.sh).  The torch.distributed mapping is a plain unit test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import yaml

from dcm import config, launch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def _cluster_answers() -> bool:
    """A controller that answers sinfo with an idle or mixed node (DCM_SLURM_TESTS=1 forces the tests)."""
    if os.environ.get("DCM_SLURM_TESTS"):
        return True
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


needs_cluster = pytest.mark.skipif(
    not _cluster_answers(),
    reason="no SLURM cluster answers here: run slurm/local-cluster/start.sh (or set DCM_SLURM_TESTS=1)")


def test_distributed_env_maps_submitit_job_environment(monkeypatch):
    """Task 5 of a 2-node x 4-GPU job: global rank 5, local rank 1 on node 1, master = first host."""
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5",
                       "SLURM_LOCALID": "1", "_TEST_CLUSTER_": "slurm"}.items():
        monkeypatch.setenv(key, value)
    env = launch.distributed_env(submitit.JobEnvironment())
    assert env == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(launch.PORT_BASE + 4242 % launch.PORT_SPAN),
                   "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1"}


def test_stage_job_requeues_the_same_call_on_preemption():
    job = launch.StageJob("teacher", None, "/x/params.yaml", "smoke", "/x")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert vars(again.function) == vars(job)


@pytest.fixture
def cluster_project(tmp_path, monkeypatch):
    """A smoke project with launcher: slurm and a resources file for the GPU-less local node."""
    monkeypatch.chdir(tmp_path)
    raw = config.load_raw(REPO / "params.yaml", "smoke")
    raw["launcher"] = "slurm"
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    table = yaml.safe_load((REPO / "slurm/resources.yaml").read_text())
    for entry in table.values():
        entry.update({"gpus": 0, "cpus_per_task": 1, "mem_gb": 2})
    Path("resources.yaml").write_text(yaml.safe_dump(table))
    monkeypatch.setenv("DCM_SLURM_RESOURCES", str(tmp_path / "resources.yaml"))
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    return tmp_path


@pytest.mark.slow
@needs_cluster
def test_launch_submits_prepare_and_returns_zero(cluster_project):
    params = config.load("params.yaml")
    assert launch.launch(params, "prepare", None, "params.yaml", None) == 0
    assert Path("data/prompts.json").is_file()
    assert list(Path("slurm/logs").glob("*/*_log.out"))


@pytest.mark.slow
@needs_cluster
def test_launch_returns_nonzero_when_the_stage_fails(cluster_project, capsys):
    params = config.load("params.yaml")
    assert launch.launch(params, "teacher", None, "params.yaml", None) != 0  # no data/prompts.json
    assert "prepare" in capsys.readouterr().err


@pytest.mark.slow
@needs_cluster
def test_snakemake_slurm_profile_runs_prepare_then_teacher(cluster_project):
    for name in ("Snakefile", "workflow"):
        src = REPO / name
        shutil.copytree(src, name) if src.is_dir() else shutil.copy(src, name)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["launcher"] = "local"
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run(
        [str(BIN / "snakemake"), "--profile", "workflow/profiles/slurm", "--default-resources",
         "slurm_partition=gpu", "gres=none", "mem_mb=2048", "cpus_per_task=1", "--", "models/teacher"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**os.environ, "DCM_TRACKING": "off"})
    assert out.returncode == 0, out.stdout[-3000:]
    assert Path("data/prompts.json").is_file() and Path("models/teacher").is_dir()
