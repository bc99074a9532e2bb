"""MLflow, kept thin: one run per stage execution, tagged with what reproduces it.

sqlite by default (MLflow 3's file store is gone); a server URI on clusters.  ``ensure_experiment``
creates the database and experiment once, before jobs fan out (parallel first-time creation races).
Set ``DCM_TRACKING=off`` to run without MLflow (the stage still writes its files).

A stage stopped by SIGINT or SIGTERM (Ctrl-C, ``scancel``, a SLURM time limit) exits 130 or 143 and
leaves its run marked KILLED.  Signals are deferred while MLflow writes: an exception raised inside a
SQLAlchemy transaction would leave the sqlite database locked, and closing the run would then fail
with "database is locked".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dcm.config import Params

_ENV_TAGS = {"DVC_STAGE": "dvc.stage", "DVC_EXP_NAME": "dvc.exp_name", "DVC_ROOT": "dvc.root",
             "SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
             "SLURM_STEP_ID": "slurm.step_id", "DCM_PARENT_RUN_ID": "mlflow.parentRunId"}


# ------------------------------------------------------------------------------- stop signals


class Terminated(SystemExit):
    """SIGTERM as an exception (exit status 143, the shell's 128 + 15), so that cleanup runs."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class _Deferral:
    depth = 0  # nesting of ``_signals_deferred`` sections
    pending: int | None = None  # a signal that arrived inside one


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def _on_stop_signal(signum: int, _frame) -> None:
    # Python runs handlers in the main thread between bytecodes; inside a deferred section the signal
    # waits for the section's end (whichever thread of the process the kernel delivered it to)
    if _Deferral.depth:
        _Deferral.pending = _Deferral.pending or signum
        return
    _raise_for(signum)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if not _Deferral.depth and _Deferral.pending is not None:
            signum, _Deferral.pending = _Deferral.pending, None
            _raise_for(signum)


@contextmanager
def stop_signals_handled() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated`, both deferred while MLflow
    writes.  A signal this process ignores (a background job's SIGINT) stays ignored."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            previous[signum] = signal.signal(signum, _on_stop_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------ MLflow


def enabled() -> bool:
    """Tracking is on unless DCM_TRACKING=off; in a multi-rank job only rank 0 logs."""
    from dcm import distributed

    return (os.environ.get("DCM_TRACKING", "on").lower() not in ("off", "0", "false", "no")
            and distributed.is_main())


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


def ensure_experiment(params: Params) -> str | None:
    """Create the tracking database and the experiment if needed; returns the experiment id."""
    if not enabled():
        return None
    import mlflow

    with _signals_deferred():
        mlflow.set_tracking_uri(tracking_uri(params))
        exp = mlflow.get_experiment_by_name(params.tracking.experiment)
        return exp.experiment_id if exp else mlflow.create_experiment(params.tracking.experiment)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _tags(params: Params, stage: str, method: str | None = None) -> dict[str, str]:
    """What reproduces a run: stage, experiment, method, git commit and the DVC / SLURM context."""
    tags = {"dcm.stage": stage, "dcm.experiment": params.experiment}
    if method:
        tags["dcm.method"] = method
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update({tag: os.environ[var] for var, tag in _ENV_TAGS.items() if os.environ.get(var)})
    if "torch" in sys.modules:  # float reductions round by the number of threads they are split over
        tags["dcm.torch_threads"] = str(sys.modules["torch"].get_num_threads())
    return tags


def start_pipeline_run(params: Params, name: str | None = None) -> str | None:
    """Create the parent run of one pipeline execution (its stage runs nest under it through
    DCM_PARENT_RUN_ID) and the experiment, before any job fans out; returns the run id."""
    if not enabled():
        return None
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(params)
    tags = {k: v for k, v in _tags(params, "pipeline").items() if k != "mlflow.parentRunId"}
    with _signals_deferred():
        run = MlflowClient(tracking_uri(params)).create_run(
            experiment_id, run_name=name or f"pipeline-{params.experiment}", tags=tags)
    return run.info.run_id


def finish_pipeline_run(params: Params, run_id: str, exit_status: int = 0) -> None:
    if enabled() and run_id:
        from mlflow.tracking import MlflowClient

        with _signals_deferred():
            MlflowClient(tracking_uri(params)).set_terminated(run_id, _status(exit_status))


def _status(exit_status: int) -> str:
    """MLflow's run status for a process exit status (130/143: stopped by SIGINT/SIGTERM)."""
    if exit_status == 0:
        return "FINISHED"
    return "KILLED" if exit_status in (128 + signal.SIGINT, 128 + signal.SIGTERM) else "FAILED"


class StageRun:
    """Handle a stage logs through; a no-op when tracking is off."""

    def __init__(self, mlflow_module=None):
        self._mlflow = mlflow_module

    @property
    def run_id(self) -> str | None:
        if self._mlflow is None:
            return None
        run = self._mlflow.active_run()
        return run.info.run_id if run else None

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            with _signals_deferred():
                self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def metric_steps(self, rows: Sequence[tuple[int, Mapping[str, float], float]]) -> None:
        """Several steps' metrics in one MLflow call: ``(step, values, unix time in s)`` rows.  A training
        loop buffers its steps and sends them every ``log_every`` steps: one sqlite transaction per
        step costs ~12 ms, 5% of a shapes-world student step."""
        if self._mlflow is not None and rows:
            from mlflow.entities import Metric

            batch = [Metric(k, float(v), int(t * 1000), step) for step, values, t in rows
                     for k, v in values.items()]
            with _signals_deferred():
                client = self._mlflow.MlflowClient()
                for start in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
                    client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def artifact(self, path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            with _signals_deferred():
                if os.path.isdir(path):
                    self._mlflow.log_artifacts(str(path), artifact_path)
                else:
                    self._mlflow.log_artifact(str(path), artifact_path)

    def child(self, name: str, metrics: Mapping[str, float], tags: Mapping[str, Any] | None = None) -> None:
        """A nested run under this one (the report: one child per method, compared in the MLflow UI)."""
        if self._mlflow is not None:
            with _signals_deferred():
                parent = self._mlflow.active_run()  # same experiment as the parent (not MLflow's Default)
                with self._mlflow.start_run(run_name=name, nested=True,
                                            experiment_id=parent.info.experiment_id,
                                            tags={k: str(v) for k, v in (tags or {}).items()}):
                    self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def tags(self, values: Mapping[str, Any]) -> None:
        if self._mlflow is not None:
            with _signals_deferred():
                self._mlflow.set_tags({k: str(v) for k, v in values.items()})


@contextmanager
def stage_run(params: Params, stage: str, method: str | None = None,
              param_keys: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """One MLflow run for one stage execution, with params and reproducibility tags; it ends FINISHED,
    KILLED (SIGINT, SIGTERM) or FAILED (any other exception)."""
    if not enabled():
        yield StageRun(None)
        return
    import mlflow

    experiment_id = ensure_experiment(params)
    name = f"{stage}[{method}]" if method else stage
    with _signals_deferred():
        mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=_tags(params, stage, method))
        logged = flatten(param_keys if param_keys is not None else params.to_dict())
        for start in range(0, len(logged), 90):  # MLflow caps a batch at 100 params
            chunk = dict(list(logged.items())[start:start + 90])
            mlflow.log_params({k: str(v)[:500] for k, v in chunk.items()})
    status = "FAILED"
    try:
        yield StageRun(mlflow)
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        with _signals_deferred():
            mlflow.end_run(status)
