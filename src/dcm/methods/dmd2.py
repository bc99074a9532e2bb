"""``kind: dmd2``: DMD2 (Yin et al., arXiv 2405.14867; ``dcm.distill.dmd2``).  A generator at the row's
sampling steps, fed by backward simulation of its own samples, trained by distribution matching against
the guided teacher with an online fake score (no consistency loss, no target network); sampled with
LCM's x0-then-re-noise sampler at the same fixed steps."""

from __future__ import annotations

from dcm import distill
from dcm.config import Params
from dcm.distill import dmd2
from dcm.methods import Training, schedule_for, single_student, student_velocities

velocities = student_velocities


def schedule(params: Params, method: str):
    """The generator's fixed timesteps: the same steps train (``dcm.distill.dmd2``) and sample; evenly spaced
    training timesteps on the unshifted scale, shifted (``dmd2.generator_schedule``)."""
    g = params.grid
    return dmd2.generator_schedule(g.num_train_timesteps, g.shift, params.method(method).sample_steps)


def lcm_end_sigma(params: Params, method: str) -> float:
    """The σ its LCM sampler denoises to: 0, the generator's x0 (DMD2 trains x0 itself)."""
    return 0.0


def train(params: Params, method: str, stage: str) -> Training:
    backbone = distill.load_backbone(params)
    student = distill.full_parameter_student(backbone)
    source, space, objectives, phases = dmd2.build(params, method, backbone, student,
                                                   schedule_for(params, method), distill.device())
    return single_student(params, method, backbone, student, source, phases, target="online",
                          objectives=objectives, space=space)
