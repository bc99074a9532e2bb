"""``kind: teacher``: the guided teacher itself, Euler at any step count (teacher-50, and the Euler-k
controls: the same ODE at k steps, no distillation)."""

from __future__ import annotations

from dcm.backbones.base import Backbone
from dcm.config import Params
from dcm.methods import guidance_forwards
from dcm.sampling import teacher_velocity
from dcm.schedule import uniform_schedule


def schedule(params: Params, method: str):
    return uniform_schedule(params.teacher_grid(), params.method(method).sample_steps, "teacher")


def velocities(params: Params, method: str, backbone: Backbone, merged: bool | None = None):
    return {"teacher": teacher_velocity(backbone, None)}, {"teacher": guidance_forwards(backbone)}
