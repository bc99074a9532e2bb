"""Euler sampling over an explicit list of (σ, expert) steps, the last step to σ = 0, no re-noising.

The same code runs the 50-step teacher with CFG, plain few-step Euler, LCM/PCM multistep sampling at
phase edges and DCM with expert switching: what differs is the list of steps and which network each
expert name resolves to.  x ← x + (σ_next − σ)·v  (METHODS.md, Inference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.schedule import SamplingStep

# velocity(x, sigma (B,), cond) for one expert; guidance is applied inside if the expert needs it
Velocity = Callable[[torch.Tensor, torch.Tensor, PromptEmbeds], torch.Tensor]


def teacher_velocity(backbone: Backbone, uncond: PromptEmbeds | None, scale: float | None = None,
                     model: nn.Module | None = None) -> Velocity:
    """The guided teacher (CFG or embedded guidance) as a velocity function.

    With CFG and no ``uncond`` given, the null prompt is encoded once per batch size and reused.
    """
    net = backbone.transformer if model is None else model
    null_by_batch: dict[int, PromptEmbeds] = {}

    def velocity(x, sigma, cond):
        null = uncond
        if null is None and backbone.guidance_mode == "cfg":
            if len(cond) not in null_by_batch:
                null_by_batch[len(cond)] = backbone.null_prompts(len(cond))
            null = null_by_batch[len(cond)]
        return backbone.guided_velocity(net, x, sigma, cond, null, scale)

    return velocity


def student_velocity(backbone: Backbone, model: nn.Module) -> Velocity:
    """A distilled student: guidance is baked in, one forward per step."""
    return lambda x, sigma, cond: backbone.predict(model, x, sigma, cond)


@torch.no_grad()
def sample(experts: Mapping[str, Velocity], steps: Sequence[SamplingStep], noise: torch.Tensor, cond: PromptEmbeds,
           final_sigma: float = 0.0, keep_trajectory: bool = False):
    """Integrate from ``noise`` (at steps[0].sigma) through every step to ``final_sigma``.

    Returns the final latents, or with ``keep_trajectory`` the list of latents at every σ visited
    (len(steps) + 1 tensors, the first being the noise).
    """
    if not steps:
        raise ValueError("a sampling schedule needs at least one step")
    unknown = sorted({s.expert for s in steps} - set(experts))
    if unknown:
        raise KeyError(f"schedule names experts {unknown} but only {sorted(experts)} are loaded")
    sigmas = [s.sigma for s in steps] + [final_sigma]
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sampling sigmas must decrease strictly, got {sigmas}")
    x = noise
    path = [x] if keep_trajectory else None
    batch = x.shape[0]
    for step, sigma_next in zip(steps, sigmas[1:]):
        sigma = torch.full((batch,), step.sigma, dtype=torch.float32, device=x.device)
        v = experts[step.expert](x, sigma, cond)
        x = x + (sigma_next - step.sigma) * v.to(x.dtype)
        if path is not None:
            path.append(x)
    return path if keep_trajectory else x


def nfe(steps: Sequence[SamplingStep], guidance_forwards: Mapping[str, int] | None = None) -> int:
    """Network forward evaluations: one per step, two per step for a CFG teacher."""
    per = guidance_forwards or {}
    return sum(per.get(s.expert, 1) for s in steps)
