"""`dcm launch` through submitit on SLURM, and Snakemake's slurm profile, on the one-node local
cluster (slurm/local-cluster/start.sh).  The torch.distributed mapping is a plain unit test."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml

from dcm import config, distributed
from dcm.pipeline import launch
from helpers import cluster_answers

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


needs_cluster = pytest.mark.skipif(
    not cluster_answers(),
    reason="no SLURM cluster answers here: run slurm/local-cluster/start.sh (or set DCM_SLURM_TESTS=1)")


def test_distributed_env_maps_submitit_job_environment(monkeypatch):
    """Task 5 of a 2-node x 4-GPU job: global rank 5, local rank 1 on node 1, master = first host."""
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5",
                       "SLURM_LOCALID": "1", "_TEST_CLUSTER_": "slurm"}.items():
        monkeypatch.setenv(key, value)
    env = distributed.distributed_env(submitit.JobEnvironment())
    assert env == {"MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(distributed.PORT_BASE + 4242 % distributed.PORT_SPAN), "RANK": "5",
                   "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1"}


def test_stage_job_requeues_the_same_call_on_preemption():
    job = launch.StageJob("teacher", None, "/x/params.yaml", "smoke", "/x")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert vars(again.function) == vars(job)


def test_snakemake_resources_ask_for_every_rank_and_start_them_with_srun(tmp_path, monkeypatch):
    """A multi-task row is a Snakemake MPI job (sbatch gets the geometry, the rule's line starts the ranks);
    a GPU row never states `tasks` (the executor reads it as tasks per GPU)."""
    table = {"default": {"partition": "gpu", "account": None, "gpus": 8, "gpu_type": "a100", "nodes": 3,
                         "cpus_per_task": 10, "mem_gb": 960, "time_min": 60},
             "prepare": {"gpus": 0, "nodes": 1, "cpus_per_task": 1},
             "teacher": {"gpus": 1, "nodes": 2}}
    (tmp_path / "resources.yaml").write_text(yaml.safe_dump(table))
    monkeypatch.setenv("DCM_SLURM_RESOURCES", str(tmp_path / "resources.yaml"))
    train = launch.dag.snakemake_resources("train_seme")
    assert train["mpi"] == "srun --nodes=3 --ntasks-per-node=8 --cpus-per-task=10"
    assert train["nodes"] == 3 and train["tasks_per_node"] == 8 and train["gres"] == "gpu:a100:8"
    assert "tasks" not in train
    assert launch.slurm_parameters(launch.dag.load_resources("train_seme"), "x")["tasks_per_node"] == 8
    one_gpu_per_node = launch.dag.snakemake_resources("teacher")
    assert one_gpu_per_node["tasks"] == 2 and one_gpu_per_node["tasks_per_gpu"] == 1
    assert "mpi" not in launch.dag.snakemake_resources("prepare")


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


# the executor plugin waits 40 s before its first squeue and 10 s between them (a busy cluster's pace); the
# one-node test cluster answers at once
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1")


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
        [str(BIN / "snakemake"), "--profile", "workflow/profiles/slurm", *FAST_POLLING, "--default-resources",
         "slurm_partition=gpu", "gres=none", "mem_mb=2048", "cpus_per_task=1", "--", "models/teacher"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**os.environ, "DCM_TRACKING": "off"})
    assert out.returncode == 0, out.stdout[-3000:]
    assert Path("data/prompts.json").is_file() and Path("models/teacher").is_dir()


def _prepare_training_inputs(params_path: str = "params.yaml") -> None:
    """prepare → teacher → preprocess → trajectories in this process (the inputs of a training stage)."""
    from dcm.pipeline import table

    params = config.load(params_path)
    local = config.parse({**config.load_raw(params_path), "launcher": "local"})
    assert params.launcher == "slurm"
    for name in ("prepare", "teacher", "preprocess", "trajectories"):
        table.get(name).run(local)


@pytest.fixture(scope="module")
def training_inputs(tmp_path_factory):
    """prepare → teacher → preprocess → trajectories of the smoke preset, built once in this process
    (launcher local)."""
    folder = tmp_path_factory.mktemp("slurm-inputs")
    raw = config.load_raw(REPO / "params.yaml", "smoke")
    raw["launcher"] = "local"
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    here = Path.cwd()
    os.chdir(folder)
    try:
        from dcm.pipeline import table

        params = config.load("params.yaml")
        for name in ("prepare", "teacher", "preprocess", "trajectories"):
            table.get(name).run(params)
    finally:
        os.chdir(here)
    return folder


def _copy_training_inputs(folder: Path) -> None:
    """The inputs of a training stage into this project (copied with their times: nothing upstream reruns)."""
    for name in ("data", "models", "trajectories"):
        shutil.copytree(folder / name, name)


def _use_fsdp() -> None:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["training"]["parallel"] = {"strategy": "fsdp"}
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _assert_trained_as_two_fsdp2_ranks(run: Path, batch_size: int) -> None:
    """distributed.json / train.json of a 2-rank FSDP2 run: each rank held its half of every weight."""
    record = json.loads((run / "distributed.json").read_text())
    assert record["world_size"] == 2
    assert record["parallel"]["strategy"] == "fsdp" and record["parallel"]["dp_shard"] == 2
    first, second = record["parameter_digests"]
    assert first == second  # the consolidated weights agree on both ranks
    mine, theirs = record["local_numel"]
    for name, shape in record["shapes"].items():  # fully_shard splits dim 0: rank 0 holds ceil(rows / 2) rows
        numel, rows = math.prod(shape), (shape[0] if shape else 1)
        assert mine[name] == -(-rows // 2) * (numel // max(rows, 1)) \
            and mine[name] + theirs[name] == numel, name
    assert 0.45 < sum(mine.values()) / (sum(mine.values()) + sum(theirs.values())) < 0.55
    summary = json.loads((run / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"]["strategy"] == "fsdp"
    assert summary["global_batch_size"] == 2 * batch_size


def _set_resources(stage: str, **values) -> None:
    table = yaml.safe_load(Path("resources.yaml").read_text())
    table.setdefault(stage, {}).update(values)
    Path("resources.yaml").write_text(yaml.safe_dump(table))


def _set_method(method: str, **values) -> None:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["methods"][method].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _student_weights(method: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(f"checkpoints/{method}/transformer").glob("*.safetensors"))
    assert files, f"no saved student in checkpoints/{method}/transformer"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
@needs_cluster
def test_launch_trains_as_a_two_task_gloo_job_with_identical_ranks(cluster_project):
    """train_baseline as 2 SLURM tasks: gloo process group, gradients averaged, rank 0 writes."""
    from dcm import distributed
    from dcm.backbones import load_teacher

    _prepare_training_inputs()
    _set_resources("train_baseline", tasks=2, cpus_per_task=1)
    params = config.load("params.yaml")
    assert launch.launch(params, "train_baseline", "lcm", "params.yaml", None) == 0

    record = json.loads(Path("checkpoints/lcm/distributed.json").read_text())
    assert record["world_size"] == 2
    first, second = record["parameter_digests"]
    assert first == second  # every rank took the same optimiser steps
    teacher = load_teacher(params, "models/teacher")
    # and training moved them
    assert first != distributed.parameter_digest(list(teacher.transformer.parameters()))
    summary = json.loads(Path("checkpoints/lcm/train.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * params.training.batch_size


@pytest.mark.slow
@needs_cluster
def test_sigusr1_mid_training_requeues_and_finishes_with_the_uninterrupted_weights(cluster_project):
    from dcm.pipeline import table

    _prepare_training_inputs()
    _set_method("lcm", train_steps=36)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["training"]["checkpoint_every"] = 3
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    # the uninterrupted run, in this process
    reference = Path("reference")
    reference.mkdir()
    for name in ("params.yaml", "data", "models", "trajectories"):
        src = Path(name)
        shutil.copytree(src, reference / name) if src.is_dir() else shutil.copy(src, reference / name)
    here = Path.cwd()
    os.chdir(reference)
    try:
        table.get("train_baseline").run(config.parse({**config.load_raw("params.yaml"),
                                                      "launcher": "local"}), "lcm")
        expected = _student_weights("lcm")
    finally:
        os.chdir(here)

    # the same run as a SLURM job, preempted with SIGUSR1 once it has checkpointed
    assert config.load("params.yaml").launcher == "slurm"
    signal_name = launch.use_preempt_signal()
    assert signal_name == "USR1"
    resources = launch.dag.load_resources("train_baseline")
    executor = submitit.AutoExecutor(folder=Path.cwd() / launch.LOG_FOLDER, cluster="slurm")
    executor.update_parameters(**launch.slurm_parameters(resources, "dcm-preempt-test"))
    job = executor.submit(launch.StageJob("train_baseline", "lcm", str(Path("params.yaml").resolve()), None,
                                          str(Path.cwd())))
    state = Path("checkpoints/lcm/resume/state.pt")
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert time.monotonic() < deadline, "the job never checkpointed"
        assert launch.squeue_state(job.job_id) not in launch.TERMINAL_STATES
        time.sleep(0.5)
    history = Path("checkpoints/lcm/history.jsonl")
    steps_before = len(history.read_text().splitlines())
    assert steps_before < 36, "the job finished before it could be preempted: raise train_steps"
    subprocess.run(["scancel", "--signal=USR1", str(job.job_id)], check=True)
    assert launch._wait(job, stream=False) == 0
    log = Path(str(job.paths.stderr)).read_text() + Path(str(job.paths.stdout)).read_text()
    assert "Caught signal SIGUSR1" in log and "preempted" in log
    assert "resuming from step" in log
    summary = json.loads(Path("checkpoints/lcm/train.json").read_text())
    assert summary["resumed_from"] > 0 and summary["steps"] == 36
    got = _student_weights("lcm")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.slow
@needs_cluster
def test_methods_of_one_stage_go_out_as_one_job_array(cluster_project):
    _prepare_training_inputs()
    params = config.load("params.yaml")
    methods = launch.resolve_methods(params, "train_baseline", "lcm,pcm")
    assert launch.launch_array(params, "train_baseline", methods, "params.yaml", None) == 0
    for m in methods:
        assert Path(f"checkpoints/{m}/transformer/config.json").is_file()
    array_logs = sorted(p.name for p in Path("slurm/logs").glob("*/*_log.out"))
    array_ids = {name.split("_")[0] for name in array_logs}
    assert len(array_ids) == 1 and len(array_logs) == 2, array_logs  # one array, one task per method
    with pytest.raises(config.ConfigError, match="--methods"):
        launch.resolve_methods(params, "train_baseline", "lcm,nonesuch")


@needs_cluster
def test_launch_trains_seme_as_a_two_task_fsdp2_job(cluster_project, training_inputs):
    """`dcm launch train_seme` with a 2-task row: submitit's srun starts 2 ranks that shard SemE with
    FSDP2."""
    _copy_training_inputs(training_inputs)
    _set_resources("train_seme", tasks=2, cpus_per_task=1)
    _use_fsdp()
    params = config.load("params.yaml")
    assert launch.launch(params, "train_seme", "dcm", "params.yaml", None) == 0
    _assert_trained_as_two_fsdp2_ranks(Path("checkpoints/dcm/seme"), params.training.batch_size)
    task_logs = sorted(p.name for p in Path("slurm/logs").glob("*/*_log.out"))
    assert len(task_logs) == 2 and {name.split("_")[1] for name in task_logs} == {"0", "1"}, task_logs


@pytest.mark.slow
@needs_cluster
def test_snakemake_slurm_profile_trains_seme_as_a_two_task_fsdp2_job(cluster_project, training_inputs):
    """The same row through `snakemake --profile workflow/profiles/slurm`: an MPI-style job whose shell line
    starts the 2 ranks with srun (resources `mpi`), each mapping SLURM's variables to torch.distributed's."""
    for name in ("Snakefile", "workflow"):
        src = REPO / name
        shutil.copytree(src, name) if src.is_dir() else shutil.copy(src, name)
    _copy_training_inputs(training_inputs)
    _set_resources("train_seme", tasks=2, cpus_per_task=1)
    _use_fsdp()
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["launcher"] = "local"  # the rule calls `dcm run` inside its own SLURM job (no nested submission)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run(
        [str(BIN / "snakemake"), "--profile", "workflow/profiles/slurm", *FAST_POLLING, "--default-resources",
         "slurm_partition=gpu", "gres=none", "mem_mb=2048", "cpus_per_task=1", "--allowed-rules",
         "train_seme", "--", "checkpoints/dcm/seme"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        env={**os.environ, "DCM_TRACKING": "off"})
    assert out.returncode == 0, out.stdout[-4000:]
    assert len(re.findall(r"has been submitted with SLURM jobid", out.stdout)) == 1, out.stdout[-3000:]
    assert ("${SLURM_JOB_ID:+srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1} "
            "dcm run train_seme --method dcm") in out.stdout
    _assert_trained_as_two_fsdp2_ranks(Path("checkpoints/dcm/seme"),
                                       config.load("params.yaml").training.batch_size)


def _jobs_started_in(folder: Path) -> list[str]:
    """Ids of the jobs the controller still knows (MinJobAge) whose working directory is ``folder``."""
    out = subprocess.run(["scontrol", "show", "jobs", "-o"], capture_output=True, text=True, timeout=30)
    return [re.search(r"JobId=(\d+)", line).group(1) for line in out.stdout.splitlines()
            if f"WorkDir={folder} " in f"{line} "]


@pytest.mark.slow
@needs_cluster
def test_launch_inside_an_allocation_runs_the_stage_as_a_two_task_step_of_it(cluster_project,
                                                                              training_inputs):
    """`dcm launch train_seme` (launcher: slurm) inside `salloc -n 2`: no job submitted (no submitit log
    folder; the controller knows one job started here, the allocation), the stage ran as step 0 of the
    allocation with 2 tasks (its MLflow run's SLURM tags; 2 FSDP2 ranks in distributed.json)."""
    import sqlite3

    _copy_training_inputs(training_inputs)
    _set_resources("train_seme", tasks=2, cpus_per_task=1)
    _use_fsdp()
    db = Path("mlflow.db").resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DCM_TRACKING"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    out = subprocess.run(["salloc", "--ntasks=2", "--cpus-per-task=1", "--mem=4G", "--time=20",
                          str(BIN / "dcm"), "launch", "train_seme", "--method", "dcm"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:]
    job_id = re.search(r"Granted job allocation (\d+)", out.stdout).group(1)
    assert f"train_seme as a step of SLURM job {job_id}, 2 task(s)" in out.stdout, out.stdout[-3000:]
    assert not Path("slurm/logs").exists()  # submitit never ran
    assert _jobs_started_in(Path.cwd()) == [job_id]
    with sqlite3.connect(db) as con:
        tags = dict(con.execute("SELECT t.key, t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                                "WHERE r.name = 'train_seme[dcm]'").fetchall())
    assert tags["slurm.job_id"] == job_id and tags["slurm.step_id"] == "0"
    _assert_trained_as_two_fsdp2_ranks(Path("checkpoints/dcm/seme"),
                                       config.load("params.yaml").training.batch_size)


@pytest.mark.slow
@needs_cluster
def test_sigterm_to_launch_inside_an_allocation_stops_the_steps_tasks_gracefully(cluster_project):
    """SIGTERM to `dcm launch teacher` inside `salloc`: the step's task gets SIGTERM (scancel --signal, not
    srun's SIGKILL), exits 143 with its MLflow run KILLED, and so does `dcm launch`."""
    import signal
    import sqlite3

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["teacher"].update(train_steps=100000, log_every=1)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    db = Path("mlflow.db").resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DCM_TRACKING"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    dcm = str(BIN / "dcm")
    subprocess.run([dcm, "run", "prepare"], env={**env, "DCM_TRACKING": "off"}, capture_output=True,
                   check=True)

    def teacher_runs() -> list[tuple[str, int]]:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as con:
                return con.execute("SELECT r.status, (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = "
                                   "r.run_uuid) FROM runs r WHERE r.name = 'teacher'").fetchall()
        except sqlite3.OperationalError:  # not created yet, or a write in progress
            return []

    salloc = subprocess.Popen(["salloc", "--ntasks=1", "--cpus-per-task=1", "--mem=2G", "--time=20", dcm,
                               "launch", "teacher"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(metrics >= 10 for _, metrics in teacher_runs()):
        assert salloc.poll() is None and time.monotonic() < deadline, salloc.communicate()[0][-3000:]
        time.sleep(0.5)
    launcher = [int(pid) for task in Path(f"/proc/{salloc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    assert len(launcher) == 1, launcher  # `dcm launch teacher`, salloc's child
    os.kill(launcher[0], signal.SIGTERM)
    out, _ = salloc.communicate(timeout=180)
    assert salloc.returncode == 143, out[-3000:]
    assert "SIGTERM: sent to step" in out and "Exited with exit code 143" in out, out[-3000:]
    assert [status for status, _ in teacher_runs()] == ["KILLED"]
