"""``teacher``: pretrain the toy teacher by flow matching on the shapes world, save it to ``models/teacher``.

The folder is a saved backbone (``backbone.save``: transformer/, prompt_encoder/, backbone.json)
plus ``training.json`` (steps, final loss, wall time, loss curve); ``load_teacher(params,
"models/teacher")`` reads it back.  A real family (wan, hunyuan, hunyuan15, cogvideox) does not train: the
folder at ``backbone.path`` is checked and recorded (backbone.json with its absolute path and a
digest of its config files; ``record_teacher``); the ``preprocess`` stage then encodes the prompts.
"""

from __future__ import annotations

import torch

from dcm import io, paths, tracking
from dcm.backbones import create_teacher, record_teacher
from dcm.config import ConfigError, Params
from dcm.data.prompts import TRAIN_SEED_LIMIT
from dcm.distill.teacher_pretraining import train_teacher


def _check_inputs(params: Params) -> None:
    """The eval seeds must lie outside the training range the teacher draws its scenes from."""
    rows = io.read_json(paths.PROMPTS).get("eval", [])
    leaked = [r["seed"] for r in rows if r["seed"] < TRAIN_SEED_LIMIT]
    if leaked:
        raise ConfigError("data/prompts.json eval seeds", leaked[:3],
                          f">= {TRAIN_SEED_LIMIT} (the teacher trains on seeds below): "
                          "re-run `dcm run prepare`")


def run(params: Params) -> None:
    _check_inputs(params)
    if params.backbone.family != "toy":
        return _record(params)
    backbone = create_teacher(params)
    with tracking.stage_run(params, "teacher") as run_log:
        history = train_teacher(backbone, params, log=run_log.metrics)
        summary = {"steps": history.steps, "final_loss": history.final_loss,
                   "wall_s": round(history.wall_s, 2),
                   "steps_per_s": round(history.steps / max(history.wall_s, 1e-9), 3),
                   "batch_size": params.teacher.batch_size, "torch_threads": torch.get_num_threads(),
                   "log_every": params.teacher.log_every, "loss_curve": history.losses}
        with io.atomic_dir(paths.TEACHER) as tmp:
            backbone.save(tmp)
            io.write_json_atomic(tmp / "training.json", summary)
        run_log.metrics({"final_loss": history.final_loss, "wall_s": history.wall_s,
                         "steps_per_s": summary["steps_per_s"]})
        run_log.artifact(paths.TEACHER / "training.json")
    print(f"teacher: {history.steps} steps in {history.wall_s:.0f} s "
          f"({summary['steps_per_s']} steps/s), final loss {history.final_loss:.4f} -> {paths.TEACHER}")


def _record(params: Params) -> None:
    """A real teacher: record the configured folder (the ``preprocess`` stage encodes the prompts)."""
    with tracking.stage_run(params, "teacher") as run_log:
        with io.atomic_dir(paths.TEACHER) as tmp:
            backbone = record_teacher(params, tmp)
        run_log.artifact(paths.TEACHER / "backbone.json")
    print(f"teacher: recorded {params.backbone.family} folder {backbone.path} -> {paths.TEACHER}")
