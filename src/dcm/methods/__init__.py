"""A method of the comparison in one place: what it samples from, with which schedule and velocity
functions, and how it generates the shared (prompt, seed) rows.

Kinds (``methods.<m>.kind``): ``teacher`` (the guided teacher, any step count), ``consistency``
(LCM = 1 phase, PCM = K phases), ``mcm`` (a consistency student trained MCM's way), ``dmd2`` (a DMD2
generator at fixed steps, sampled with LCM's re-noising sampler) and ``dcm`` (SemE + DetE).  The
``sample`` stage, ``benchmarks/`` and ``dcm export`` all go through here.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dcm import paths
from dcm.backbones.base import Backbone
from dcm.config import SCHEDULE_EXPERTS, Params
from dcm.data.trajectories import initial_noise
from dcm.distill.experts import load_dual_expert
from dcm.sampling import Velocity, nfe, sample, sample_lcm, student_velocity, teacher_velocity
from dcm.schedule import (
    SamplingStep,
    expert_schedule,
    explicit_schedule,
    pcm_phases,
    phase_schedule,
    uniform_schedule,
)

BATCH = 8  # rows per sampler call


def schedule_for(params: Params, method: str) -> list[SamplingStep]:
    """The (σ, expert) steps a method samples with: its explicit ``schedule`` (the official lists of the
    real presets), else derived from the grid (and κ for dcm)."""
    m = params.method(method)
    g = params.grid
    if m.schedule is not None:
        return explicit_schedule(m.schedule, g.num_train_timesteps, experts=SCHEDULE_EXPERTS[m.kind])
    grid = params.teacher_grid()
    if m.kind == "teacher":
        return uniform_schedule(grid, m.sample_steps, "teacher")
    if m.kind == "dcm":
        return expert_schedule(grid, g.kappa, m.sample_steps)
    if m.kind == "dmd2":  # the generator's fixed timesteps: the same steps train (dcm.distill.dmd2) and sample
        return uniform_schedule(grid, m.sample_steps, "student")
    source = params.method(m.checkpoint_from) if m.checkpoint_from else m
    if source.phases == m.sample_steps:
        return phase_schedule(grid, pcm_phases(g.steps, source.phases))
    return uniform_schedule(grid, m.sample_steps, "student")


def guidance_forwards(backbone: Backbone) -> int:
    """Forwards per teacher step: 2 with classifier-free guidance, 1 with embedded (or no) guidance."""
    return 2 if backbone.guidance_mode == "cfg" and backbone.guidance_scale != 1.0 else 1


def dcm_experts(params: Params, method: str, backbone: Backbone, merged: bool | None = None
                ) -> dict[str, Velocity]:
    """SemE and DetE of a dcm-kind method (checkpoint_from honoured) as velocity functions.

    merged (default: ``methods.<m>.merge_experts``): each name is its expert as a plain transformer
    (``materialize``: DetE's LoRA merged into a copy), so a step costs one forward of an ordinary
    model.  Otherwise both names map to the same ``DualExpert``, which routes every sample by its own
    σ through σ_κ: one set of weights in memory.
    """
    source = params.method(method).checkpoint_from or method
    dual = load_dual_expert(paths.checkpoint(source, "seme"), paths.checkpoint(source, "dete"), backbone)
    if params.method(method).merge_experts if merged is None else merged:
        return {e: student_velocity(backbone, dual.materialize(e).eval().requires_grad_(False))
                for e in ("seme", "dete")}
    velocity = student_velocity(backbone, dual)
    return {"seme": velocity, "dete": velocity}


def load_experts(params: Params, method: str, backbone: Backbone, merged: bool | None = None
                 ) -> tuple[dict[str, Velocity], dict[str, int]]:
    """Velocity functions per expert name of the method's schedule, and the forwards each step costs
    where it is not one (the CFG teacher: 2)."""
    m = params.method(method)
    if m.kind == "teacher":
        return {"teacher": teacher_velocity(backbone, None)}, {"teacher": guidance_forwards(backbone)}
    if m.kind == "dcm":
        return dcm_experts(params, method, backbone, merged), {}
    folder = paths.checkpoint(m.checkpoint_from or method) / "transformer"
    student = type(backbone.transformer).from_pretrained(folder).eval().requires_grad_(False)
    student.to(next(backbone.transformer.parameters()).device)
    return {"student": student_velocity(backbone, student)}, {}


def generate(params: Params, method: str, backbone: Backbone, rows: list[dict], desc: str | None = None):
    """Sample ``rows`` (prompt, seed) with the method's schedule and sampler (Euler, or LCM's multistep
    re-noising): (latents, decoded videos, s/video, steps, NFE).

    The noise of a row is ``initial_noise(seed)``, so every method sees the same start for the same row.
    """
    device = next(backbone.transformer.parameters()).device
    steps = schedule_for(params, method)
    latent_shape = backbone.video_latent_shape(params)
    experts, forwards = load_experts(params, method, backbone)
    lcm_sampler = params.method(method).sampler == "lcm"
    latents, videos, seconds = [], [], 0.0
    for start in tqdm(range(0, len(rows), BATCH), desc=desc or f"sample[{method}]", unit="batch"):
        chunk = rows[start:start + BATCH]
        noise = torch.stack([initial_noise(r["seed"], latent_shape) for r in chunk]).to(device)
        cond = backbone.encode_prompts([r["prompt"] for r in chunk])
        t0 = time.perf_counter()
        with torch.no_grad():
            if lcm_sampler:  # fresh re-noising per row, seeded from the row: paired across methods and batches
                x = sample_lcm(experts, steps, noise, cond, seeds=[r["seed"] for r in chunk])
            else:
                x = sample(experts, steps, noise, cond)
            video = backbone.decode_latents(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        latents.append(x.cpu())
        videos.append(video.cpu())
    return torch.cat(latents), torch.cat(videos), seconds / len(rows), steps, nfe(steps, forwards)
