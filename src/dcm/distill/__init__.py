"""Consistency distillation: losses, batch sources, the one training loop, and the wiring the
``train_*`` stages share (inputs checked before any work, student construction, one MLflow run)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from dcm import io, paths, tracking
from dcm.backbones import load_teacher
from dcm.backbones.base import Backbone
from dcm.config import ConfigError, Params
from dcm.distill.data import CachedSource, OnlineSource
from dcm.distill.loop import (
    ConsistencyBatch,
    DistillSpec,
    Objective,
    TemporalCoherence,
    TrainingDiverged,
    TrainResult,
    save_transformer,
    train,
)
from dcm.parallel import fsdp as parallel

__all__ = ["ConsistencyBatch", "DistillSpec", "Objective", "TemporalCoherence", "TrainingDiverged",
           "TrainResult", "train", "save_transformer", "CachedSource", "OnlineSource", "device",
           "check_inputs", "load_backbone", "make_source", "full_parameter_student", "run_distillation"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_inputs(params: Params, source: str | None = None) -> None:
    """Fail before any model is loaded if the batch source ``training.source`` (or ``source``: a kind's own,
    ``online`` videos or ``generated`` samples, both from the prompt sets) needs is not complete (the
    trajectories stage resumes, so its folder can exist half-written), or if ``training.parallel`` does
    not fit this job's world size."""
    parallel.check_world(params)
    if (source or params.training.source) == "cached":
        if not (paths.TRAJECTORIES / "index.json").is_file():
            raise ConfigError("training.source", "cached",
                              f"needs the trajectory store in {paths.TRAJECTORIES}/: run "
                              "`dcm run trajectories` "
                              "(or set training.source: online)")
    elif not paths.PROMPTS.is_file():
        raise ConfigError("training.source", source or params.training.source,
                          f"needs {paths.PROMPTS}: run `dcm run prepare` first")
    elif (source or params.training.source) == "online" and params.backbone.family != "toy":
        if not params.data.videos:
            raise ConfigError("data.videos", None, "a captioned video set: training.source online noises "
                              "real video latents (or set training.source: cached)")
        if not (paths.VIDEO_STORE / "index.json").is_file():
            raise ConfigError("training.source", "online",
                              f"needs the video latents in {paths.VIDEO_STORE}/: run `dcm run preprocess`")


def load_backbone(params: Params) -> Backbone:
    backbone = load_teacher(params, paths.TEACHER)
    return backbone.to(device())


def make_source(params: Params, backbone: Backbone, source: str | None = None, quality: str | None = None):
    """The batch source ``training.source`` (or ``source``) names: the cached trajectory store, or online
    teacher steps on the data videos: a real family's preprocessed latents (``data.videos``), the shapes
    world's videos of ``world.quality`` (or ``quality``: MCM's low-quality data)."""
    if (source or params.training.source) == "cached":
        from dcm.data.trajectories import TrajectoryStore

        # sizes checked at open, each shard's fingerprint when first read; the sha256s were taken when
        # the shards were written (a full re-hash of a multi-hundred-GB store on every rank at every start
        # is what TrajectoryStore.verify would cost)
        return CachedSource(TrajectoryStore(paths.TRAJECTORIES), backbone, device())
    grid = params.teacher_grid()
    if params.backbone.family != "toy":
        from dcm.data.preprocess import VideoLatents

        return OnlineSource.from_videos(VideoLatents(paths.VIDEO_STORE), backbone, grid, device())
    rows = io.read_json(paths.PROMPTS)["train"]
    return OnlineSource(rows, backbone, grid, params.world.size, params.world.frames,
                        quality or params.world.quality,
                        device(), jitter=params.world.position_jitter)


def full_parameter_student(backbone: Backbone, expert: str | None = None) -> nn.Module:
    """A full-parameter student initialised from the teacher transformer (a deep copy; the teacher stays
    frozen): the whole teacher (both experts of a two-expert teacher), or the one DCM's ``expert`` starts
    from (``Backbone.expert_transformer``)."""
    init = backbone.transformer if expert is None else backbone.expert_transformer(expert)
    student = copy.deepcopy(init).requires_grad_(True)
    return student.train()


def run_distillation(params: Params, stage: str, method: str, spec: DistillSpec, backbone: Backbone, source,
                     out_dir: str | Path) -> TrainResult:
    """One MLflow run around the loop; the run's files (weights, history, train.json) land in ``out_dir``."""
    out_dir = Path(out_dir)
    with tracking.stage_run(params, stage, method) as tracker:
        result = train(spec, backbone, source, params, out_dir, tracker)
        tracker.metrics({"wall_s": result.wall_s, "steps": result.steps})
        tracker.artifact(out_dir / "train.json")
        tracker.artifact(out_dir / "history.jsonl")
    print(f"{stage}[{method}]: {result.steps} steps in {result.wall_s:.1f} s -> {out_dir}")
    return result
