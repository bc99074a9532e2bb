"""``dcm launch <stage>``: run a stage through the configured launcher (``params.launcher``).

- ``local``: in this process, exactly ``dcm run``; a data-parallel stage on a machine with several GPUs as
  one rank per GPU under PyTorch's elastic launcher (``dcm.pipeline.ranks``; ``DCM_LOCAL_RANKS``).
- ``debug``: through submitit's debug executor (same pickled call as on SLURM, in this process).
- ``slurm``: one submitit job with the stage's resources from ``slurm/resources.yaml`` (nodes ×
  tasks per node, one torch.distributed rank per task, one per GPU unless the row says); streams
  the job's log here while it runs and returns its exit status (non-zero, with the log tail, when
  it fails).  The job re-reads the same params file and preset, sets up torch.distributed's
  environment from submitit's ``JobEnvironment``, and requeues itself on preemption or timeout
  (the stages resume from their own checkpoints).  The preemption signal is SIGUSR1 (sbatch
  ``--signal=USR1@90``); set ``SUBMITIT_PREEMPT_SIGNAL=USR2`` where NCCL or the site claims USR1.

Before a real family's stage goes to SLURM, its plan (``dcm.plan.whole``: FLOPs on meta tensors at an
assumed MFU, the memory plan) must say it fits its row's time limit and GPUs; otherwise a ConfigError names
the numbers and nothing is submitted (``--no-plan-check`` or ``DCM_NO_PLAN_CHECK=1`` skips the check; a row
with ``gpus: 0``, the local test cluster's, is not planned).

Inside an allocation (an sbatch script, an salloc shell) ``slurm`` runs the stage as a job step of it
(``srun`` with its row, capped by the allocation: ``dcm.pipeline.ranks``), and inside a job step (srun's
tasks) in this process: never a nested job.  Snakemake's rules call ``dcm run``.
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
from dcm.pipeline import dag, ranks

LOG_FOLDER = Path("slurm/logs/%j")  # job-array safe (%j, not %A_%a)
POLL_SECONDS = 1.0
TAIL_LINES = 40
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
NO_PLAN_CHECK_ENV = "DCM_NO_PLAN_CHECK"  # set (not 0): submit without the plan's check (dvc repro's escape)
TIMEOUT_REQUEUES = 3  # submitit's AutoExecutor(max_num_timeout=3): requeues of a job that timed out


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
        if int(env.get("WORLD_SIZE", "1")) > 1 and not table.get(self.stage).data_parallel:
            # a rank-0 stage on a multi-task row: the other tasks end here and rank 0 works in a world of
            # one (in a group of every task, rank 0's collectives, e.g. analyze's training loop, would wait
            # on ranks that never join them)
            if env["RANK"] != "0":
                print(f"{self.stage}: rank {env['RANK']} idle (the stage runs on rank 0 only)", flush=True)
                return
            env = {**env, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
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


def stage_runs(params: Params, resources: str | os.PathLike | None = None, stage: str | None = None,
               method: str | None = None) -> list:
    """The runs the plan looks at (``dcm.plan.whole.StageRun``), each with its SLURM row: every run of the
    DAG of these params (``dag.runs``), or the one run ``stage`` [``method``] that a launch submits."""
    from dcm.pipeline import table
    from dcm.plan import whole

    todo = dag.runs(params) if stage is None else [(table.get(stage), method)]
    path = Path(resources) if resources else dag.resources_path()
    out = []
    for s, m in todo:
        r = dag.load_resources(s.name, path)
        row = whole.Row(source=f"{path}:{s.name}", gpus=r.gpus, nodes=r.nodes,
                        ranks=r.nodes * r.tasks_per_node, gpu_type=r.gpu_type, time_min=r.time_min)
        out.append(whole.StageRun(s.name, m, row, data_parallel=s.data_parallel, resumable=s.resumable,
                                  requeues=TIMEOUT_REQUEUES))
    return out


def check_plan(params: Params, stage: str, methods: list[str | None]) -> None:
    """Refuse (ConfigError, with the numbers) a real family's run whose plan does not fit its SLURM row,
    before anything is submitted; the toy world, a CPU row (``gpus: 0``) and ``DCM_NO_PLAN_CHECK`` are not
    checked."""
    if params.backbone.family == "toy" or os.environ.get(NO_PLAN_CHECK_ENV, "") not in ("", "0"):
        return
    from dcm.plan import whole

    planner = None
    for run in (r for m in methods for r in stage_runs(params, stage=stage, method=m)):
        if run.row.total_gpus == 0:
            print(f"dcm launch: {run.label} not planned ({run.row.source}: gpus 0)", file=sys.stderr)
            continue
        if planner is None:
            whole.quiet_diffusers()
            planner = whole.Planner(params)
        plan = planner.plan(run)
        print(f"dcm launch: plan of {run.label}: {whole.summary(plan)}", file=sys.stderr, flush=True)
        refused = whole.refusal(plan, run, planner.options)
        if refused is not None:
            raise refused


def launch(params: Params, stage: str, method: str | None, params_path: str = "params.yaml",
           preset: str | None = None, plan_check: bool = True) -> int:
    from dcm.pipeline import table

    stage_row = table.get(stage)  # unknown stage: ConfigError before anything is submitted
    if params.launcher == "local":
        count = ranks.local_ranks(stage_row)
        if count > 1:  # a data-parallel stage, one rank per GPU: PyTorch's elastic launcher
            ranks.check_ranks(params, stage_row, count)
            return ranks.run_elastic(stage, method, params_path, preset, count)
        stage_row.run(params, method)
        return 0
    job = StageJob(stage, method, str(Path(params_path).resolve()), preset, str(Path.cwd()))
    name = f"dcm-{stage}" + (f"-{method}" if method else "")
    if params.launcher == "debug":
        executor = submitit.AutoExecutor(folder=Path("slurm/logs/debug"), cluster="debug")
        executor.update_parameters(name=name, timeout_min=dag.load_resources(stage).time_min)
        return _wait(executor.submit(job), stream=False)
    if params.launcher == "slurm":
        if ranks.in_step():  # already a task of a job step (srun): here, never a nested job
            print(f"dcm launch: {stage} inside SLURM job step {os.environ['SLURM_JOB_ID']}."
                  f"{os.environ['SLURM_STEP_ID']}: run here", file=sys.stderr, flush=True)
            stage_row.run(params, method)
            return 0
        if plan_check:  # before a job step or a job is started
            check_plan(params, stage, [method])
        allocation = ranks.allocation()
        if allocation is not None:  # an sbatch script or an salloc shell: a job step of that allocation
            return ranks.run_step(params, stage_row, method, params_path, preset, allocation)
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
    """``--methods lcm,pcm`` or ``--methods all`` (every method of the stage in the DAG of these params: the
    default experiment's, and the opt-in rows ``pipeline`` switches on), checked."""
    from dcm.pipeline import table

    row = table.get(stage)
    allowed = row.methods(params, include_ablations=True)
    if not row.per_method:
        raise ConfigError("--methods", methods, f"stage {stage} takes no method")
    names = row.dag_methods(params) if methods == "all" else [m for m in methods.split(",") if m]
    unknown = [m for m in names if m not in allowed]
    if unknown or not names:
        raise ConfigError("--methods", methods, f"'all' or a comma list of {allowed}")
    return names


def launch_array(params: Params, stage: str, methods: list[str], params_path: str = "params.yaml",
                 preset: str | None = None, plan_check: bool = True) -> int:
    """One stage for several methods: a SLURM job array (one task per method), or one after another."""
    from dcm.pipeline import table

    stage_row = table.get(stage)
    # inside an allocation or a job step: one method after another in it (no nested job array)
    if params.launcher != "slurm" or ranks.in_step() or ranks.allocation() is not None:
        return max((launch(params, stage, m, params_path, preset, plan_check) for m in methods), default=0)
    if plan_check:  # every task of the array, before any is submitted
        check_plan(params, stage, list(methods))
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
