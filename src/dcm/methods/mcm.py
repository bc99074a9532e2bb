"""``kind: mcm``: the Motion Consistency Model (Zhai et al., arXiv 2406.06890; ``dcm.distill.mcm``).
LCM's phases and target on the world's low-quality videos (noised data + one teacher step), mixed with
the student's own x0, the consistency loss on a motion representation, and an image discriminator on
high-quality stills; sampled as a consistency student."""

from __future__ import annotations

from dcm import distill
from dcm.config import Params
from dcm.distill import mcm
from dcm.methods import Training, single_student
from dcm.methods.consistency import lcm_end_sigma, schedule, velocities  # noqa: F401 (sampled as LCM/PCM are)
from dcm.schedule import pcm_phases


def train(params: Params, method: str, stage: str) -> Training:
    m = params.method(method)
    backbone = distill.load_backbone(params)
    student = distill.full_parameter_student(backbone)
    videos = distill.make_source(params, backbone, source="online", quality=m.mcm.video_quality)
    source, space, objectives = mcm.build(params, method, backbone, student, videos, distill.device())
    return single_student(params, method, backbone, student, source, pcm_phases(params.grid.steps, m.phases),
                          # + the learnt motion head
                          objectives=objectives, space=space, save_extra=space.save)
