"""Sampling over an explicit list of (σ, expert) steps down to σ = 0.

``sample``: deterministic Euler, no re-noising, x ← x + (σ_next − σ)·v (METHODS.md, Inference).  The
same code runs the 50-step teacher with CFG, plain few-step Euler, PCM multistep sampling at phase
edges and DCM with expert switching: what differs is the list of steps and which network each expert
name resolves to.

``sample_lcm``: LCM's multistep sampler, which evaluates the student's consistency function at each step
and re-noises its output to the next σ with fresh noise: x̂ = x + (σ_end − σ)·v, x_next = (1 − σ_next)·x̂ +
σ_next·ε, the last step returning x̂ (diffusers' ``LCMScheduler``: ``denoised`` = the consistency function,
re-noised as if clean, returned at the last step).  σ_end is where the student was trained to end: σ_min
for LCM and MCM (their single phase ends at the smallest training sigma, as LCM's boundary is the smallest
DDPM timestep t = 0), 0 for DMD2 (its generator's x0); with σ_end = 0 it is diffusers'
``FlowMatchLCMScheduler`` (x̂ = x0̂ = x − σ·v).  The fresh noise is per row, from a generator seeded by
the row's seed (``renoise_generators``), so a row's sample does not depend on its batch or device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
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
def sample(experts: Mapping[str, Velocity], steps: Sequence[SamplingStep], noise: torch.Tensor,
           cond: PromptEmbeds, final_sigma: float = 0.0, keep_trajectory: bool = False):
    """Integrate from ``noise`` (at steps[0].sigma) through every step to ``final_sigma``.

    Returns the final latents, or with ``keep_trajectory`` the list of latents at every σ visited
    (len(steps) + 1 tensors, the first being the noise).
    """
    sigmas = _checked_sigmas(experts, steps, final_sigma)
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


def _checked_sigmas(experts: Mapping[str, Velocity], steps: Sequence[SamplingStep],
                    final_sigma: float) -> list[float]:
    if not steps:
        raise ValueError("a sampling schedule needs at least one step")
    unknown = sorted({s.expert for s in steps} - set(experts))
    if unknown:
        raise KeyError(f"schedule names experts {unknown} but only {sorted(experts)} are loaded")
    sigmas = [s.sigma for s in steps] + [final_sigma]
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sampling sigmas must decrease strictly, got {sigmas}")
    return sigmas


# "LCM": keeps a row's re-noising stream apart from its initial noise (same seed)
RENOISE_SALT = 0x4C434D


def renoise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row for LCM's fresh noise, derived from the row's seed.

    The seed is salted: ``initial_noise(seed)`` draws the starting noise from ``manual_seed(seed)``,
    and the first re-noising must not repeat it.  CPU generators, so the noise is the same on any
    device.
    """
    return [torch.Generator().manual_seed(
                int(np.random.SeedSequence([int(seed), RENOISE_SALT]).generate_state(1)[0]))
            for seed in seeds]


@torch.no_grad()
def sample_lcm(experts: Mapping[str, Velocity], steps: Sequence[SamplingStep], noise: torch.Tensor,
               cond: PromptEmbeds, seeds: Sequence[int] | None = None,
               generators: Sequence[torch.Generator] | None = None, final_sigma: float = 0.0,
               keep_trajectory: bool = False, end_sigma: float = 0.0):
    """LCM multistep sampling from ``noise`` (at steps[0].sigma): at each step the consistency function's
    output x̂ = x + (σ_end − σ)·v (σ_end = ``end_sigma``, where the student's training phase ends; 0: the
    x0 prediction x − σ·v) re-noised to the next σ with fresh per-row noise ε,
    x_next = (1 − σ_next)·x̂ + σ_next·ε; the last step (to ``final_sigma`` = 0) returns x̂.

    The noise of row i comes from ``generators[i]`` (CPU generators, consumed in step order, one
    ``randn`` of the row's shape per re-noising), or from ``renoise_generators(seeds)``.  Arithmetic
    follows diffusers' ``FlowMatchLCMScheduler.step`` (fp32 σ, x upcast to fp32) so the two agree step
    for step; no noise is drawn for a step to σ = 0.  Returns the final latents in the noise's dtype,
    or with ``keep_trajectory`` the latents at every σ visited (len(steps) + 1 tensors, noise first).
    """
    sigmas = _checked_sigmas(experts, steps, final_sigma)
    if not 0.0 <= end_sigma < steps[-1].sigma:
        raise ValueError(f"sample_lcm: end_sigma must lie in [0, {steps[-1].sigma}) (below the last step), "
                         f"got {end_sigma}")
    batch = noise.shape[0]
    if (seeds is None) == (generators is None):
        raise ValueError("sample_lcm needs exactly one of seeds or generators (one per row)")
    gens = list(generators) if generators is not None else renoise_generators(seeds)
    if len(gens) != batch:
        raise ValueError(f"sample_lcm: {batch} rows but {len(gens)} re-noising seeds/generators")
    x = noise
    path = [x] if keep_trajectory else None
    row_shape = (1, *noise.shape[1:])
    for step, sigma_next in zip(steps, sigmas[1:]):
        sigma_t = torch.full((batch,), step.sigma, dtype=torch.float32, device=x.device)
        v = experts[step.expert](x, sigma_t, cond)
        sigma = torch.tensor(step.sigma, dtype=torch.float32)
        if end_sigma == 0.0:
            x0 = x.float() - sigma * v  # x0̂ in fp32 (v promotes to fp32), as FlowMatchLCMScheduler
        else:  # the endpoint the student was trained to, x + (σ_end − σ)·v
            x0 = x.float() + (torch.tensor(end_sigma, dtype=torch.float32) - sigma) * v
        if sigma_next > 0:
            s_next = torch.tensor(sigma_next, dtype=torch.float32)
            eps = torch.cat([torch.randn(row_shape, generator=g, dtype=torch.float32)
                             for g in gens]).to(x.device)
            x0 = (1 - s_next) * x0 + s_next * eps
        x = x0.to(noise.dtype)
        if path is not None:
            path.append(x)
    return path if keep_trajectory else x


def nfe(steps: Sequence[SamplingStep], guidance_forwards: Mapping[str, int] | None = None) -> int:
    """Network forward evaluations: one per step, two per step for a CFG teacher."""
    per = guidance_forwards or {}
    return sum(per.get(s.expert, 1) for s in steps)
