"""Shared test set-up: one real MLflow sqlite database per session, no analytics, repo paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project directory with the repo's params.yaml, as cwd."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path
