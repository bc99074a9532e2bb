"""Launches that use what the user has (dcm.pipeline.ranks): ``launcher: local`` starts one rank per GPU
under PyTorch's elastic launcher, ``launcher: slurm`` inside an allocation runs a job step of it, and
``training.global_batch_size`` keeps the global batch whatever the rank count (grad_accum derived), with a
rank count that cannot give it refused before any model loads.  The rank runs are real processes (gloo);
the step inside a real allocation is in test_slurm.py (it needs the local SLURM cluster)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dcm import config
from dcm.parallel import fsdp
from dcm.pipeline import dag, launch, ranks, table
from helpers import REPO

BIN = Path(sys.executable).parent
LOSS_RTOL = 1e-5


def global_batch_params(global_batch: int | None = 6, batch_size: int = 1, launcher: str = "local",
                        **training) -> config.Params:
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["training"].update(batch_size=batch_size, global_batch_size=global_batch, **training)
    return config.parse({**raw, "launcher": launcher})


# ------------------------------------------------------------------------------ the global batch


@pytest.mark.parametrize(("world", "cp", "accum"), [(1, 1, 6), (2, 1, 3), (3, 1, 2), (6, 1, 1), (4, 2, 3)])
def test_grad_accum_is_derived_from_the_global_batch_at_each_rank_count(world, cp, accum):
    params = global_batch_params(6, parallel={"strategy": "fsdp", "context_parallel": cp})
    dims = fsdp.check_world(params, world)
    assert params.training.accumulation(dims.dp_size) == accum
    assert params.training.batch_size * dims.dp_size * accum == 6


def test_without_a_global_batch_grad_accum_is_the_configured_one():
    params = global_batch_params(None, batch_size=2, grad_accum=3)
    assert params.training.accumulation(1) == params.training.accumulation(8) == 3


def test_a_rank_count_that_cannot_give_the_global_batch_fails_naming_key_value_layout_and_counts():
    params = global_batch_params(6)
    with pytest.raises(config.ConfigError) as err:
        fsdp.check_world(params, 4)
    assert err.value.key == "training.global_batch_size" and err.value.value == 6
    assert "1 per rank × 4 (4 ranks / context_parallel 1) = 4" in err.value.allowed
    assert "[1, 2, 3, 6]" in err.value.allowed  # the rank counts that would give it
    with pytest.raises(config.ConfigError, match=r"\[2, 4, 6, 12\]"):  # context parallel 2: pairs of ranks
        fsdp.check_world(global_batch_params(6, parallel={"strategy": "fsdp", "context_parallel": 2}), 16)


@pytest.mark.parametrize(("training", "key", "allowed"), [
    ({"global_batch_size": 6, "batch_size": 4}, "training.global_batch_size",
     "a multiple of training.batch_size"),
    ({"global_batch_size": 6, "batch_size": 1, "grad_accum": 2}, "training.grad_accum",
     "derived from the global batch"),
])
def test_a_global_batch_no_layout_can_give_fails_when_the_params_are_read(training, key, allowed):
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["training"].update(training)
    with pytest.raises(config.ConfigError, match=allowed) as err:
        config.parse(raw)
    assert err.value.key == key


def test_an_impossible_rank_count_fails_before_any_model_loads(tmp_path, monkeypatch):
    """In an empty folder (no teacher, no trajectories): the global batch is what fails, in the stage's
    checks and in `dcm launch` before it starts any rank."""
    from dcm import distill

    monkeypatch.chdir(tmp_path)
    params = global_batch_params(6)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(config.ConfigError, match="global_batch_size"):
        distill.check_inputs(params)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(ranks.LOCAL_RANKS_ENV, "4")
    started = []
    monkeypatch.setattr(ranks, "run_elastic", lambda *a: started.append(a) or 0)
    with pytest.raises(config.ConfigError, match="global_batch_size"):
        launch.launch(params, "train_seme", "dcm")
    assert not started


def test_the_real_presets_keep_the_papers_global_batch():
    hunyuan = config.load_raw(REPO / "params.yaml", "hunyuan")["training"]
    wan = config.load_raw(REPO / "params.yaml", "wan")["training"]
    assert hunyuan["global_batch_size"] == 6 and wan["global_batch_size"] == 1  # METHODS.md
    assert hunyuan.get("grad_accum", 1) == wan.get("grad_accum", 1) == 1  # derived, not set


# ------------------------------------------------------------------------------ where the ranks come from


def test_launcher_local_starts_one_rank_per_gpu_for_data_parallel_stages_only(monkeypatch):
    import torch

    monkeypatch.delenv(ranks.LOCAL_RANKS_ENV, raising=False)
    for key in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert ranks.local_ranks(table.get("train_seme")) == 4
    assert ranks.local_ranks(table.get("sample")) == 4
    assert ranks.local_ranks(table.get("teacher")) == 1  # not data parallel: one process
    monkeypatch.setenv(ranks.LOCAL_RANKS_ENV, "2")
    assert ranks.local_ranks(table.get("train_seme")) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one rank of a torchrun job: no second launcher
    assert ranks.local_ranks(table.get("train_seme")) == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv(ranks.LOCAL_RANKS_ENV)
    assert ranks.local_ranks(table.get("train_seme")) == 1  # no GPU: one process, as before
    monkeypatch.setenv(ranks.LOCAL_RANKS_ENV, "two")
    with pytest.raises(config.ConfigError, match="a positive integer") as err:
        ranks.local_ranks(table.get("train_seme"))
    assert err.value.key == ranks.LOCAL_RANKS_ENV


# what `sbatch -n 2` gave a batch script on the local cluster (no SLURM_STEP_ID there; srun's tasks have one)
SBATCH = {"SLURM_JOB_ID": "41", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2",
          "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}
SALLOC = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8",
          "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_JOB_CPUS_PER_NODE": "32(x2)"}


def test_the_allocation_comes_from_sbatch_or_salloc_and_a_job_step_is_not_one():
    assert ranks.allocation(SBATCH) == ranks.Allocation("41", 1, 2, None, 2)
    assert ranks.allocation(SALLOC) == ranks.Allocation("42", 2, 8, 4, 32)
    assert ranks.allocation({**SBATCH, "SLURM_STEP_ID": "0"}) is None  # srun's task: a step would nest
    assert ranks.in_step({**SBATCH, "SLURM_STEP_ID": "0"}) and not ranks.in_step(SBATCH)
    assert ranks.allocation({}) is None and not ranks.in_step({})
    total = {"SLURM_JOB_ID": "43", "SLURM_GPUS": "16", "SLURM_NNODES": "2"}  # --gpus: the job's total
    assert ranks.allocation(total).gpus_per_node == 8


def test_a_step_takes_its_rows_geometry_capped_by_the_allocation():
    row = dag.Resources("gpu", None, gpus=8, gpu_type="a100", nodes=3, cpus_per_task=10, mem_gb=512,
                        time_min=60)
    step = ranks.step_for(row, ranks.allocation(SALLOC), "resources.yaml:train_seme")
    assert (step.nodes, step.tasks_per_node, step.gpus, step.cpus, step.ranks) == (2, 4, 4, 8, 8)
    assert step.capped == ("nodes 3 → 2", "GPUs per node 8 → 4", "CPUs per task 10 → 8")
    assert ranks.srun_command(step, "dcm-x", ["python"]) == [
        "srun", "--job-name=dcm-x", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8",
        "--gpus-per-node=4", "--kill-on-bad-exit=1", "python"]
    small = dag.Resources("gpu", None, gpus=1, gpu_type="a100", nodes=1, cpus_per_task=8, mem_gb=64,
                          time_min=60)
    assert ranks.step_for(small, ranks.allocation(SALLOC), "r").ranks == 1  # the row's, not the allocation's
    with pytest.raises(config.ConfigError, match="has none") as err:
        ranks.step_for(row, ranks.Allocation("44", 1, None, 0, 8), "resources.yaml:train_seme")
    assert err.value.key == "resources.yaml:train_seme.gpus"


def _cpu_resources(tmp_path: Path, monkeypatch, **rows) -> None:
    table_ = yaml.safe_load((REPO / "slurm/resources.yaml").read_text())
    for entry in table_.values():
        entry.update({"gpus": 0, "cpus_per_task": 1, "mem_gb": 2})
    for stage, values in rows.items():
        table_.setdefault(stage, {}).update(values)
    (tmp_path / "resources.yaml").write_text(yaml.safe_dump(table_))
    monkeypatch.setenv("DCM_SLURM_RESOURCES", str(tmp_path / "resources.yaml"))


def test_launcher_slurm_inside_an_allocation_runs_an_srun_step_and_submits_nothing(tmp_path, monkeypatch):
    """With SLURM_JOB_ID and no SLURM_STEP_ID: srun with the row's 2 tasks, never submitit; the global
    batch checked at those 2 ranks first."""
    import submitit

    monkeypatch.chdir(tmp_path)
    _cpu_resources(tmp_path, monkeypatch, train_seme={"tasks": 2})
    for key, value in SBATCH.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.setattr(submitit, "AutoExecutor", lambda *a, **k: pytest.fail("submitted a new job"))
    commands = []

    class Srun:
        def __init__(self, command, **kwargs):
            commands.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(ranks.subprocess, "Popen", Srun)
    params = global_batch_params(None, batch_size=4, launcher="slurm")
    assert launch.launch(params, "train_seme", "dcm", "params.yaml") == 0
    (command,) = commands
    assert command[0] == "srun" and "--ntasks=2" in command and "--ntasks-per-node=2" in command
    assert command[command.index(sys.executable):] == [sys.executable, "-m", "dcm.cli", "run", "train_seme",
                                                       "--params", "params.yaml", "--method", "dcm"]
    assert launch.launch(params, "teacher", None, "params.yaml") == 0  # one task: not data parallel
    assert "--ntasks=1" in commands[-1]
    with pytest.raises(config.ConfigError, match="global_batch_size"):  # 2 tasks cannot give 3
        launch.launch(global_batch_params(3, launcher="slurm"), "train_seme", "dcm", "params.yaml")
    assert len(commands) == 2
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # inside a step: the stage runs here, no srun, no job
    ran = []
    monkeypatch.setattr(table.Stage, "run", lambda self, p, m=None: ran.append(self.name))
    assert launch.launch(params, "teacher", None, "params.yaml") == 0
    assert ran == ["teacher"] and len(commands) == 2


# ------------------------------------------------------------------------------ real ranks (gloo)


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """prepare → a random toy teacher → cached trajectories of the smoke preset, once."""
    from dcm import paths
    from dcm.backbones import create_teacher
    from dcm.pipeline.stages import prepare, trajectories

    root = tmp_path_factory.mktemp("ranks-base")
    here = Path.cwd()
    os.chdir(root)
    try:
        raw = config.load_raw(REPO / "params.yaml", preset="smoke")
        Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        params = config.parse(raw)
        prepare.run(params)
        create_teacher(params).save(paths.TEACHER)
        trajectories.run(params)
    finally:
        os.chdir(here)
    return root


def project(base: Path, folder: Path, seme_steps: int = 4, **training) -> Path:
    shutil.copytree(base, folder)
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["training"].update({"checkpoint_every": 100, "log_every": 2, **training})
    raw["methods"]["dcm"]["seme"]["train_steps"] = seme_steps
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def launch_env(local_ranks: int) -> dict[str, str]:
    env = {**os.environ, "DCM_TRACKING": "off", "OMP_NUM_THREADS": "1",
           ranks.LOCAL_RANKS_ENV: str(local_ranks), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                "SLURM_STEP_ID"):
        env.pop(key, None)
    return env


def dcm_launch(folder: Path, local_ranks: int, stage: str = "train_seme") -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dcm"), "launch", stage, "--method", "dcm"], cwd=folder,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=launch_env(local_ranks), timeout=600)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_same_global_batch_at_one_and_two_local_ranks_gives_the_same_history(base_project, tmp_path):
    """One params file (global batch 4, batch 1 per rank): `dcm launch` with launcher local in one process
    (grad_accum 4) and as 2 torch.distributed.run ranks (grad_accum 2): the same samples each step, the
    same losses and gradient norms."""
    one = project(base_project, tmp_path / "one", batch_size=1, global_batch_size=4, term_grad_norms=False)
    two = project(base_project, tmp_path / "two", batch_size=1, global_batch_size=4, term_grad_norms=False)
    for folder, count in ((one, 1), (two, 2)):
        out = dcm_launch(folder, count)
        assert out.returncode == 0, out.stdout[-4000:]
    assert "as 2 ranks on this machine" in out.stdout
    one, two = one / "checkpoints/dcm/seme", two / "checkpoints/dcm/seme"
    rows_one, rows_two = history(one), history(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [0, 1, 2, 3]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["n"] == b["n"] and len(a["n"]) == 4  # the same global batch, in the same order
        for key in ("loss", "consistency", "tc", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key)
    summaries = [json.loads((run / "train.json").read_text()) for run in (one, two)]
    assert [(s["world_size"], s["grad_accum"], s["global_batch_size"]) for s in summaries] == \
        [(1, 4, 4), (2, 2, 4)]
    assert json.loads((two / "distributed.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_launcher_local_fails_with_the_ranks_exit_status_and_passes_sigterm_on_to_every_rank(base_project,
                                                                                           tmp_path):
    """A rank's ConfigError (exit 2) is `dcm launch`'s status; SIGTERM to `dcm launch` reaches both ranks,
    which stop (143), and nothing is left running."""
    bad = project(base_project, tmp_path / "bad", batch_size=1, global_batch_size=4)
    shutil.rmtree(bad / "trajectories")  # the ranks' own input check fails (launch cannot see it)
    out = dcm_launch(bad, 2)
    assert out.returncode == 2 and "run `dcm run trajectories` first" in out.stdout, out.stdout[-3000:]

    long = project(base_project, tmp_path / "long", seme_steps=100000, log_every=1)
    stage = subprocess.Popen([str(BIN / "dcm"), "launch", "train_seme", "--method", "dcm"], cwd=long,
                             env=launch_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_history, deadline = long / "checkpoints/dcm/seme/history.jsonl", time.monotonic() + 300
    while not (run_history.is_file() and len(run_history.read_text().splitlines()) >= 2):
        assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()[0][-3000:]
        time.sleep(0.5)
    children = [int(p) for t in Path(f"/proc/{stage.pid}/task").iterdir()
                for p in (t / "children").read_text().split()]
    assert len(children) == 2, children  # the two ranks, started by the agent in this process
    stage.send_signal(signal.SIGTERM)
    output, _ = stage.communicate(timeout=120)
    assert stage.returncode == 143, output[-3000:]
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
