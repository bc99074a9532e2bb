"""``sample --method M``: the shared evaluation (prompt, seed) rows, sampled with the method's schedule.

Writes ``samples/<M>/``: one mp4 per row, ``latents.safetensors``, ``videos.safetensors`` (decoded,
float16) and ``samples.json`` (schedule, NFE, seconds per video) — the same rows and noise for every
method, so every comparison downstream is paired.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dcm import io, paths, tracking
from dcm.backbones import load_teacher
from dcm.config import ConfigError, Params
from dcm.sampling import nfe, sample, student_velocity, teacher_velocity
from dcm.schedule import (
    SamplingStep,
    expert_schedule,
    pcm_phases,
    phase_schedule,
    teacher_grid,
    uniform_schedule,
)
from dcm.stages import weights_paths
from dcm.trajectories import initial_noise
from dcm.video import write_mp4

BATCH = 8


def schedule_for(params: Params, method: str) -> list[SamplingStep]:
    """The (σ, expert) steps a method samples with, derived from params."""
    m = params.method(method)
    g = params.grid
    grid = teacher_grid(g.steps, g.shift, g.num_train_timesteps)
    if m.kind == "teacher":
        return uniform_schedule(grid, m.sample_steps, "teacher")
    if m.kind == "dcm":
        return expert_schedule(grid, g.kappa, m.sample_steps)
    source = params.method(m.checkpoint_from) if m.checkpoint_from else m
    if source.phases == m.sample_steps:
        return phase_schedule(grid, pcm_phases(g.steps, source.phases))
    return uniform_schedule(grid, m.sample_steps, "student")


def _experts(params: Params, method: str, backbone) -> tuple[dict, dict]:
    """Velocity functions per expert name, and the forwards each costs (CFG teacher: 2)."""
    m = params.method(method)
    if m.kind == "teacher":
        cfg_forwards = 2 if backbone.guidance_mode == "cfg" and backbone.guidance_scale != 1.0 else 1
        return {"teacher": teacher_velocity(backbone, None)}, {"teacher": cfg_forwards}
    if m.kind == "dcm":
        from dcm.distill.experts import load_method_experts

        return load_method_experts(params, method, backbone), {}
    folder = paths.checkpoint(m.checkpoint_from or method) / "transformer"
    student = type(backbone.transformer).from_pretrained(folder).eval().requires_grad_(False)
    student.to(next(backbone.transformer.parameters()).device)
    return {"student": student_velocity(backbone, student)}, {}


def generate(params: Params, method: str, backbone, rows: list[dict], desc: str | None = None):
    """Sample ``rows`` (prompt, seed) with the method's schedule: (latents, decoded videos, s/video, steps, NFE).

    The noise of a row is ``initial_noise(seed)``, so every method sees the same start for the same row.
    """
    device = next(backbone.transformer.parameters()).device
    steps = schedule_for(params, method)
    latent_shape = backbone.video_latent_shape(params)
    experts, forwards = _experts(params, method, backbone)
    latents, videos, seconds = [], [], 0.0
    for start in tqdm(range(0, len(rows), BATCH), desc=desc or f"sample[{method}]", unit="batch"):
        chunk = rows[start:start + BATCH]
        noise = torch.stack([initial_noise(r["seed"], latent_shape) for r in chunk]).to(device)
        cond = backbone.encode_prompts([r["prompt"] for r in chunk])
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample(experts, steps, noise, cond)
            video = backbone.decode_latents(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        latents.append(x.cpu())
        videos.append(video.cpu())
    return torch.cat(latents), torch.cat(videos), seconds / len(rows), steps, nfe(steps, forwards)


def run(params: Params, method: str) -> None:
    missing = [p for p in [str(paths.PROMPTS), *weights_paths(params, method)] if not Path(p).exists()]
    if missing:
        raise ConfigError(f"sample --method {method}", missing, "existing inputs: run the upstream stages first")
    rows = io.read_json(paths.PROMPTS)["eval"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher(params, paths.TEACHER).to(device)
    with tracking.stage_run(params, "sample", method) as run_, io.atomic_dir(paths.samples(method)) as out:
        latents_t, videos_t, seconds_per_video, steps, cost = generate(params, method, backbone, rows)
        for i, (row, video) in enumerate(zip(rows, videos_t)):
            write_mp4(out / f"{i:03d}_{row['prompt_id']}_{row['seed']}.mp4", video)
        save_file({"latents": latents_t.contiguous()}, str(out / "latents.safetensors"))
        save_file({"videos": videos_t.to(torch.float16).contiguous()}, str(out / "videos.safetensors"))
        record = {"method": method, "kind": params.method(method).kind,
                  "steps": [[s.sigma, s.expert] for s in steps], "num_steps": len(steps),
                  "nfe": cost, "seconds_per_video": seconds_per_video, "rows": rows}
        io.write_json_atomic(out / "samples.json", record)
        run_.metrics({"seconds_per_video": record["seconds_per_video"], "nfe": record["nfe"]})
    print(f"sample[{method}]: {len(rows)} videos, {record['seconds_per_video']:.3f} s/video, NFE {record['nfe']}"
          f" → {paths.samples(method)}")
