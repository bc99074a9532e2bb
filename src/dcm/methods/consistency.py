"""``kind: consistency``: LCM (one phase, every n maps to σ_min, EMA target) and PCM (``phases`` K,
starts floor(linspace(0, N, K, endpoint=False)), online target), a full-parameter student of the teacher
trained by the one loop on the batch source ``training.source`` names."""

from __future__ import annotations

from dcm import distill
from dcm.config import Params
from dcm.methods import Training, single_student, student_velocities
from dcm.schedule import pcm_phases, phase_schedule, uniform_schedule

velocities = student_velocities


def schedule(params: Params, method: str):
    """PCM's phase ends when it samples as many steps as it was trained phases, else uniform steps."""
    m, grid = params.method(method), params.teacher_grid()
    trained = params.method(m.checkpoint_from) if m.checkpoint_from else m
    if trained.phases == m.sample_steps:
        return phase_schedule(grid, pcm_phases(params.grid.steps, trained.phases))
    return uniform_schedule(grid, m.sample_steps, "student")


def lcm_end_sigma(params: Params, method: str) -> float:
    """Where the LCM sampler (``sampler: lcm``) takes each step's output: σ_min, the end of the phase the
    loop trains the lowest steps to (LCM's boundary, its smallest training timestep), so the sampler returns
    the trained endpoint x + (σ_min − σ)·v rather than extrapolating it to σ = 0."""
    return params.teacher_grid().sigma_min


def train(params: Params, method: str, stage: str) -> Training:
    backbone = distill.load_backbone(params)
    student = distill.full_parameter_student(backbone)
    phases = pcm_phases(params.grid.steps, params.method(method).phases)
    return single_student(params, method, backbone, student, distill.make_source(params, backbone), phases)
