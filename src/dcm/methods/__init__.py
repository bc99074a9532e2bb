"""A method of the comparison: its declaration (``dcm.config.METHOD_KINDS``) and the module here that
implements it.  Each module of a kind defines

- ``schedule(params, method)``: the (σ, expert) steps it samples with, when ``methods.<m>.schedule`` does
  not list them;
- ``velocities(params, method, backbone, merged)``: a velocity function per expert of that schedule and
  the forwards a step costs where it is not one (the CFG teacher: 2);
- ``train(params, method, stage)``, for a kind that trains: what that training stage hands the one loop
  (a :class:`Training`);
- optionally ``lcm_end_sigma(params, method)``: the σ its LCM sampler (``sampler: lcm``) denoises to, where
  its training ends (default 0: the x0 prediction).

Adding a method is one module here plus its ``MethodKind`` row in ``dcm.config``; the stage table, the
``sample`` stage, ``dcm export`` and ``benchmarks/`` go through this package.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from tqdm import tqdm

from dcm import distill, paths
from dcm.backbones.base import Backbone, inference_precision
from dcm.config import METHOD_KINDS, ConfigError, MethodKind, Params
from dcm.data.trajectories import initial_noise
from dcm.sampling import Velocity, nfe, sample, sample_lcm, student_velocity
from dcm.schedule import SamplingStep, explicit_schedule

BATCH = 8  # rows per sampler call


def kind_of(params: Params, method: str) -> MethodKind:
    return METHOD_KINDS[params.method(method).kind]


def implementation(params: Params, method: str) -> ModuleType:
    """The module of ``dcm.methods`` that implements the method's kind."""
    return importlib.import_module(f"dcm.methods.{kind_of(params, method).module}")


# ------------------------------------------------------------------------------------ training


@dataclass
class Training:
    """What one training stage of a method hands the loop: the spec, the teacher, the batch source and
    the folder of its outputs; ``finish`` runs after the loop (e.g. DetE's summary of its discriminator)."""

    spec: distill.DistillSpec
    backbone: Backbone
    source: object
    out_dir: Path
    finish: Callable[[], None] | None = None


def train(params: Params, method: str, stage: str) -> None:
    """Run training stage ``stage`` of ``method``: inputs checked before anything loads, then the loop."""
    kind = kind_of(params, method)
    if stage not in kind.trains:
        raise ConfigError("--method", method, f"a method that {stage} trains (kind {kind.name} trains in "
                          f"{list(kind.trains) or 'no stage'})")
    m = params.method(method)
    if m.checkpoint_from is not None:
        raise ConfigError("--method", method, f"a method that trains its own weights ({method} samples "
                          f"{m.checkpoint_from}'s: run {stage} --method {m.checkpoint_from})")
    distill.check_inputs(params, kind.source)
    run = implementation(params, method).train(params, method, stage)
    distill.run_distillation(params, stage, method, run.spec, run.backbone, run.source, run.out_dir)
    if run.finish is not None:
        run.finish()


def single_student(params: Params, method: str, backbone: Backbone, student: torch.nn.Module, source,
                   phases, *, target: str | None = None, objectives=(), space=None,
                   save_extra: Callable[[Path], None] | None = None) -> Training:
    """A full-parameter student of the teacher's size (LCM, PCM, MCM, DMD2): trained whole, saved as a
    diffusers transformer in ``checkpoints/<method>/transformer``; its kind's sections are part of the
    resume identity."""
    m = params.method(method)
    save_weights = distill.save_transformer(student)

    def save(out_dir: Path) -> None:
        save_weights(out_dir)
        if save_extra is not None:
            save_extra(out_dir)

    sections = {s: dataclasses.asdict(getattr(m, s)) for s in kind_of(params, method).sections}
    spec = distill.DistillSpec(
        name=method, student=student, trainable=list(student.parameters()), phases=phases,
        target=target or m.target, lr=m.lr, train_steps=m.train_steps, objectives=list(objectives), save=save,
        consistency_space=space, settings={"kind": m.kind, "phases": m.phases, **sections},
        prompt_dropout=params.prompt_dropout(method))
    return Training(spec, backbone, source, paths.checkpoint(method))


# ------------------------------------------------------------------------------------ sampling


def schedule_for(params: Params, method: str) -> list[SamplingStep]:
    """The (σ, expert) steps a method samples with: its explicit ``schedule`` (the official lists of the
    real presets), else its kind's (derived from the grid, and κ for dcm)."""
    m = params.method(method)
    if m.schedule is not None:
        return explicit_schedule(m.schedule, params.grid.num_train_timesteps,
                                 experts=kind_of(params, method).experts)
    return implementation(params, method).schedule(params, method)


def lcm_end_sigma(params: Params, method: str) -> float:
    """The σ the method's LCM sampler takes each step's consistency output at (``sample_lcm``'s
    ``end_sigma``): its kind's ``lcm_end_sigma``, else 0."""
    end = getattr(implementation(params, method), "lcm_end_sigma", None)
    return 0.0 if end is None else float(end(params, method))


def guidance_forwards(backbone: Backbone) -> int:
    """Forwards per teacher step: 2 with classifier-free guidance, 1 with embedded (or no) guidance."""
    return 2 if backbone.guidance_mode == "cfg" and backbone.guidance_scale != 1.0 else 1


def load_experts(params: Params, method: str, backbone: Backbone, merged: bool | None = None
                 ) -> tuple[dict[str, Velocity], dict[str, int]]:
    """Velocity functions per expert name of the method's schedule, and the forwards each step costs
    where it is not one (the CFG teacher: 2)."""
    return implementation(params, method).velocities(params, method, backbone, merged)


def student_velocities(params: Params, method: str, backbone: Backbone, merged: bool | None = None
                       ) -> tuple[dict[str, Velocity], dict[str, int]]:
    """One trained transformer (``checkpoints/<method or checkpoint_from>/transformer``) as the student."""
    m = params.method(method)
    folder = paths.checkpoint(m.checkpoint_from or method) / "transformer"
    student = type(backbone.transformer).from_pretrained(folder).eval().requires_grad_(False)
    student.to(next(backbone.transformer.parameters()).device)
    return {"student": student_velocity(backbone, student)}, {}


class Sampler:
    """One method's sampling, loaded once: its schedule, its experts and its sampler (Euler, or LCM's
    multistep re-noising).  ``rows(chunk)`` samples a batch of (prompt, seed) rows; the noise of a row
    is ``initial_noise(seed)``, so every method sees the same start for the same row.  The transformer
    forwards run in the inference precision (bf16 autocast on GPUs); decoding runs the VAE as loaded."""

    def __init__(self, params: Params, method: str, backbone: Backbone):
        self.backbone = backbone
        self.device = next(backbone.transformer.parameters()).device
        self.steps = schedule_for(params, method)
        self.latent_shape = backbone.video_latent_shape(params)
        self.experts, forwards = load_experts(params, method, backbone)
        self.nfe = nfe(self.steps, forwards)
        self.lcm = params.method(method).sampler == "lcm"
        self.lcm_end = lcm_end_sigma(params, method) if self.lcm else 0.0

    def rows(self, chunk: list[dict]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(latents, decoded videos) of the rows on the CPU, and the seconds the batch took."""
        noise = torch.stack([initial_noise(r["seed"], self.latent_shape) for r in chunk]).to(self.device)
        cond = self.backbone.encode_prompts([r["prompt"] for r in chunk])
        t0 = time.perf_counter()
        with torch.no_grad():
            with inference_precision(self.device):
                # LCM: fresh re-noising per row, seeded from the row (paired across methods and batches)
                if self.lcm:
                    x = sample_lcm(self.experts, self.steps, noise, cond, seeds=[r["seed"] for r in chunk],
                                   end_sigma=self.lcm_end)
                else:
                    x = sample(self.experts, self.steps, noise, cond)
            video = self.backbone.decode_latents(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return x.cpu(), video.cpu(), time.perf_counter() - t0


def generate(params: Params, method: str, backbone: Backbone, rows: list[dict], desc: str | None = None):
    """Sample ``rows`` (prompt, seed) in batches of ``BATCH`` with the method's schedule and sampler:
    (latents, decoded videos, s/video, steps, NFE)."""
    sampler = Sampler(params, method, backbone)
    latents, videos, seconds = [], [], 0.0
    for start in tqdm(range(0, len(rows), BATCH), desc=desc or f"sample[{method}]", unit="batch"):
        x, video, took = sampler.rows(rows[start:start + BATCH])
        latents.append(x)
        videos.append(video)
        seconds += took
    return torch.cat(latents), torch.cat(videos), seconds / len(rows), sampler.steps, sampler.nfe
