"""Shared test set-up: one real MLflow sqlite database per session, no analytics, repo paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcm.distill.loop import Objective

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# The tiny test models gain nothing from intra-op threads, and on a loaded 2-core machine threads
# oversubscribe badly (100× slower forwards were seen); subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_MININTERVAL", "5")


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def mlflow_sqlite(tmp_path_factory):
    """Every stage run in the tests logs to a real sqlite MLflow store (created once, before fan-out)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    yield f"sqlite:///{db}"
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def params():
    """The smoke preset, validated."""
    from dcm import config

    return config.load(REPO / "params.yaml", preset="smoke")


@pytest.fixture(scope="module")
def backbone(params):
    """A random-weight toy teacher, frozen as ``load_teacher`` leaves it."""
    from dcm.backbones.toy import ToyBackbone

    bb = ToyBackbone.create(params.backbone.toy, params.backbone.guidance_scale, seed=0)
    bb.transformer.requires_grad_(False)
    bb.prompt_encoder.requires_grad_(False)
    return bb


def smoke_params(**training):
    """The smoke preset, with ``training`` keys overridden."""
    from dcm import config

    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["training"].update(training)
    return config.parse(raw)


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    """A scratch smoke project: prompts.json and a random (untrained) teacher saved to models/teacher."""
    from dcm import paths
    from dcm.backbones import create_teacher
    from dcm.pipeline.stages import prepare

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCM_TRACKING", "off")
    params = smoke_params()
    prepare.run(params)
    create_teacher(params).save(paths.TEACHER)
    return tmp_path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project directory with the repo's params.yaml, as cwd."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Metrics keys that measure wall time (differ between any two runs); everything else is deterministic.
TIMING_KEYS = {"latency_s"}


def deterministic_metrics(folder: Path) -> dict[str, dict]:
    """metrics/<method>.json of a run, less the wall-time keys, for comparing two runs of one DAG."""
    return {f.stem: {k: v for k, v in json.loads(f.read_text()).items() if k not in TIMING_KEYS}
            for f in sorted(Path(folder).glob("*.json"))}


def run_dvc(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = env if env is not None else os.environ
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(bin_dir / "dvc"), *args], cwd=repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def smoke_dvc_repo(repo: Path) -> Path:
    """``repo`` (an empty folder) made a git + DVC repo of this project's DAG with the smoke params."""
    for name in ("Snakefile", "dvc.yaml", "workflow"):
        src = REPO / name
        shutil.copytree(src, repo / name) if src.is_dir() else shutil.copy(src, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    run_dvc(repo, "init", "-q")
    subprocess.run([str(Path(sys.executable).parent / "dcm"), "params", "--params", str(REPO / "params.yaml"),
                    "--preset", "smoke", "-o", "params.yaml"], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="session")
def dvc_smoke_repo(tmp_path_factory):
    """A temporary git + DVC repo of this project with the smoke params, after one ``dvc repro``.

    Returns (repo, stdout of that repro, its metrics less timing) -- the metrics are read right away,
    so tests that change the repo afterwards don't affect what others compare against.
    """
    repo = smoke_dvc_repo(tmp_path_factory.mktemp("dvc-smoke"))
    first = run_dvc(repo, "repro", "report")  # the default DAG, as `make demo` runs it
    return repo, first.stdout, deterministic_metrics(repo / "metrics")


class FailAt(Objective):
    """A training objective that injects a failure at one step: a NaN loss term (``kind="nan"``), or, while
    ``armed``, an interruption (a killed job); the requeued run passes the step."""

    name = "fail"

    def __init__(self, step: int, kind: str = "interrupt", armed: bool = False):
        self.step, self.kind, self.armed = step, kind, armed

    def generator_loss(self, batch):
        if batch.step != self.step:
            return {}
        if self.kind == "nan":
            return {"fail": torch.tensor(float("nan"))}
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt("simulated preemption")
        return {}


def perturbed_dete(backbone, params, rank: int = 4, alpha: float = 8.0):
    """A LoRA DetE on a copy of the teacher transformer with lora_B moved off zero (so the adapter's
    gradients flow through A too and DetE differs from SemE); returns (dual, teacher grid)."""
    import copy

    from dcm import schedule
    from dcm.distill.experts import make_dete

    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    dual = make_dete(copy.deepcopy(backbone.transformer), backbone, rank, alpha, kappa=params.grid.kappa,
                     sigma_kappa=grid.sigma(params.grid.kappa))
    with torch.no_grad():
        for name, p in dual.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    return dual, grid
