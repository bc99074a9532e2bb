"""Shared test set-up and fixtures: one real MLflow sqlite database per session, no analytics, scratch
projects. The helpers that are not fixtures are in helpers.py, which test files import."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from helpers import BUILDERS, REPO, deterministic_metrics, run_dvc, smoke_dvc_repo, smoke_params

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


@pytest.fixture(scope="session")
def dvc_smoke_repo(tmp_path_factory):
    """A temporary git + DVC repo of this project with the smoke params, after one ``dvc repro``.

    Returns (repo, stdout of that repro, its metrics less timing) -- the metrics are read right away,
    so tests that change the repo afterwards don't affect what others compare against.
    """
    repo = smoke_dvc_repo(tmp_path_factory.mktemp("dvc-smoke"))
    first = run_dvc(repo, "repro", "report")  # the default DAG one stage at a time (`make demo JOBS=1`)
    return repo, first.stdout, deterministic_metrics(repo / "metrics")


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A tiny random Wan 2.1 pipeline folder saved by diffusers' own save_pretrained (one per test module)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-wan")
    BUILDERS["wan"](folder)
    return folder
