"""``dcm launch <stage>``: run a stage through the configured launcher (``params.launcher``).

- ``local``: in this process, exactly ``dcm run``.
- ``debug``: through submitit's debug executor (same pickled call as on SLURM, in this process).
- ``slurm``: one submitit job with the stage's resources from ``slurm/resources.yaml`` (nodes ×
  tasks per node, one torch.distributed rank per task, one per GPU unless the row says); streams
  the job's log here while it runs and returns its exit status (non-zero, with the log tail, when
  it fails).  The job re-reads the same params file and preset, sets up torch.distributed's
  environment from submitit's ``JobEnvironment``, and requeues itself on preemption or timeout
  (the stages resume from their own checkpoints).  The preemption signal is SIGUSR1 (sbatch
  ``--signal=USR1@90``); set ``SUBMITIT_PREEMPT_SIGNAL=USR2`` where NCCL or the site claims USR1.

Never called from inside a Snakemake SLURM job: Snakemake's rules call ``dcm run`` (no nested
submission).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmJobEnvironment

from dcm import config
from dcm.config import ConfigError, Params
from dcm.pipeline import dag

LOG_FOLDER = Path("slurm/logs/%j")  # job-array safe (%j, not %A_%a)
POLL_SECONDS = 1.0
TAIL_LINES = 40
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def use_preempt_signal(name: str | None = None) -> str:
    """The signal SLURM sends before preemption/timeout (default USR1) for this process and its jobs.

    submitit reads SUBMITIT_PREEMPT_SIGNAL when it is imported; set both the class attribute (sbatch's
    ``--signal``, already imported here) and the variable (the job's own submitit, via sbatch's export).
    """
    name = name or os.environ.get(PREEMPT_SIGNAL_ENV) or "USR1"
    os.environ[PREEMPT_SIGNAL_ENV] = name
    SlurmJobEnvironment.USR_SIG = name
    return name


class StageJob(submitit.helpers.Checkpointable):
    """The submitted callable: ``dcm run <stage> [--method M]`` inside the job."""

    def __init__(self, stage: str, method: str | None, params_path: str, preset: str | None, workdir: str):
        self.stage = stage
        self.method = method
        self.params_path = params_path
        self.preset = preset
        self.workdir = workdir

    def __call__(self) -> None:
        from dcm.pipeline import table

        os.chdir(self.workdir)
        try:
            from dcm.distributed import distributed_env

            env = distributed_env(submitit.JobEnvironment())
        except RuntimeError:  # the debug executor runs outside any cluster environment
            env = {}
        os.environ.update(env)
        params = config.load(self.params_path, self.preset)
        table.get(self.stage).run(params, self.method)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Preempted or timed out: requeue the same call; the stage resumes from its checkpoints."""
        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.method, self.params_path, self.preset, self.workdir), *args, **kwargs)


def slurm_parameters(resources: dag.Resources, job_name: str) -> dict:
    """submitit ``update_parameters`` keys for one stage's resources.

    ``nodes`` × ``tasks_per_node`` tasks, each one torch.distributed rank started by submitit's srun
    (``StageJob`` maps SLURM's variables to RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).  srun
    takes no CPU count from sbatch's environment (SLURM >= 22.05), so it is passed to srun too.
    """
    out = {
        "name": job_name,
        "slurm_partition": resources.partition,
        "nodes": resources.nodes,
        "tasks_per_node": resources.tasks_per_node,
        "cpus_per_task": resources.cpus_per_task,
        "mem_gb": resources.mem_gb,
        "timeout_min": resources.time_min,
        "slurm_srun_args": [f"--cpus-per-task={resources.cpus_per_task}"],
    }
    if resources.gpus:
        out["gpus_per_node"] = resources.gpus
    if resources.account:
        out["slurm_account"] = resources.account
    return out


def launch(params: Params, stage: str, method: str | None, params_path: str = "params.yaml",
           preset: str | None = None) -> int:
    from dcm.pipeline import table

    stage_row = table.get(stage)  # unknown stage: ConfigError before anything is submitted
    if params.launcher == "local":
        stage_row.run(params, method)
        return 0
    job = StageJob(stage, method, str(Path(params_path).resolve()), preset, str(Path.cwd()))
    name = f"dcm-{stage}" + (f"-{method}" if method else "")
    if params.launcher == "debug":
        executor = submitit.AutoExecutor(folder=Path("slurm/logs/debug"), cluster="debug")
        executor.update_parameters(name=name, timeout_min=dag.load_resources(stage).time_min)
        return _wait(executor.submit(job), stream=False)
    if params.launcher == "slurm":
        use_preempt_signal()
        resources = dag.load_resources(stage)
        executor = submitit.AutoExecutor(folder=Path.cwd() / LOG_FOLDER, cluster="slurm")
        executor.update_parameters(**slurm_parameters(resources, name))
        submitted = executor.submit(job)
        print(f"dcm launch: {name} submitted as SLURM job {submitted.job_id} "
              f"(partition {resources.partition}, {resources.nodes} node(s) x {resources.gpus} GPU(s), "
              f"{resources.tasks_per_node} task(s) per node); "
              f"log: {submitted.paths.stdout}", file=sys.stderr, flush=True)
        return _wait(submitted, stream=True)
    raise ConfigError("launcher", params.launcher, "one of local, slurm, debug")


def resolve_methods(params: Params, stage: str, methods: str) -> list[str]:
    """``--methods lcm,pcm`` or ``--methods all`` (every default-DAG method of the stage), checked."""
    from dcm.pipeline import table

    row = table.get(stage)
    allowed = row.methods(params, include_ablations=True)
    if not row.per_method:
        raise ConfigError("--methods", methods, f"stage {stage} takes no method")
    names = row.methods(params) if methods == "all" else [m for m in methods.split(",") if m]
    unknown = [m for m in names if m not in allowed]
    if unknown or not names:
        raise ConfigError("--methods", methods, f"'all' or a comma list of {allowed}")
    return names


def launch_array(params: Params, stage: str, methods: list[str], params_path: str = "params.yaml",
                 preset: str | None = None) -> int:
    """One stage for several methods: a SLURM job array (one task per method), or one after another."""
    from dcm.pipeline import table

    stage_row = table.get(stage)
    if params.launcher != "slurm":
        return max((launch(params, stage, m, params_path, preset) for m in methods), default=0)
    use_preempt_signal()
    resources = dag.load_resources(stage)
    executor = submitit.AutoExecutor(folder=Path.cwd() / LOG_FOLDER, cluster="slurm")
    executor.update_parameters(**slurm_parameters(resources, f"dcm-{stage}-array"))
    workdir, path = str(Path.cwd()), str(Path(params_path).resolve())
    for m in methods:  # the whole array is checked before anything is submitted
        if not stage_row.runs_for(params, m):
            raise ConfigError("--methods", m, f"one of {stage_row.methods(params, include_ablations=True)}")
    with executor.batch():
        jobs = [executor.submit(StageJob(stage, m, path, preset, workdir)) for m in methods]
    print(f"dcm launch: {stage} for {methods} submitted as SLURM job array {jobs[0].job_id.split('_')[0]}; "
          f"logs: {Path(str(jobs[0].paths.stdout)).parent}", file=sys.stderr, flush=True)
    statuses = [_wait(job, stream=False) for job in jobs]
    for m, status in zip(methods, statuses):
        print(f"dcm launch: {stage}[{m}] {'done' if status == 0 else 'FAILED'}", file=sys.stderr)
    return max(statuses)


class _LogFollower:
    """Prints what a file gained since the last look (the job's log, while it runs)."""

    def __init__(self, path: Path, out):
        self.path, self.out, self.offset = path, out, 0

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        if chunk:
            self.offset += len(chunk)
            self.out.write(chunk.decode(errors="replace"))
            self.out.flush()


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
RESULT_GRACE_SECONDS = 10.0  # a job SLURM calls finished must leave submitit's result file by then


def squeue_state(job_id: str) -> str | None:
    """The job's state from squeue (clusters without accounting: sacct, submitit's source, fails)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _wait(job: submitit.Job, stream: bool) -> int:
    followers = ([_LogFollower(job.paths.stdout, sys.stdout), _LogFollower(job.paths.stderr, sys.stderr)]
                 if stream else [])
    ended_at = None
    try:
        while not job.done():
            for f in followers:
                f.poll()
            if (stream and squeue_state(job.job_id) in TERMINAL_STATES
                    and not job.paths.result_pickle.exists()):
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > RESULT_GRACE_SECONDS:  # killed before submitit could report
                    for f in followers:
                        f.poll()
                    state = squeue_state(job.job_id)
                    print(f"dcm launch: job {job.job_id} ended {state} without a result", file=sys.stderr)
                    print(_tail(_read(job.paths.stderr), TAIL_LINES), file=sys.stderr)
                    return 1
            time.sleep(POLL_SECONDS)
        for f in followers:
            f.poll()
        job.results()  # every task of a multi-task job
    except KeyboardInterrupt:
        print(f"dcm launch: interrupted; cancelling job {job.job_id}", file=sys.stderr)
        job.cancel(check=False)
        return 130
    except Exception as e:  # submitit's FailedJobError / UncompletedJobError, or the stage's own
        print(f"dcm launch: job {job.job_id} failed ({job.state}): {type(e).__name__}", file=sys.stderr)
        print(_tail(str(e), TAIL_LINES), file=sys.stderr)
        return 1
    return 0


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])
