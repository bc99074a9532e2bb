"""Flow-matching pretraining of the toy teacher on the shapes world (rectified flow, velocity target).

Each step renders a fresh batch of random scenes (seeds from the training range only), encodes them
to latents x0, draws ε ~ N(0, I) and σ, and regresses the network velocity onto the target:

    x_σ = (1 − σ)·x0 + σ·ε,    v = ε − x0,    L = ‖v_θ(x_σ, σ, c) − v‖²

with the caption replaced by the null prompt "" with probability ``cfg_dropout`` (classifier-free
guidance).  Both the transformer and the prompt encoder train.  Deterministic from ``params.seed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from dcm import schedule
from dcm.backbones.base import Backbone
from dcm.config import Params
from dcm.data.prompts import TRAIN_SEED_LIMIT
from dcm.distill import losses
from dcm.distill.optim import adamw
from dcm.worlds import shapes

# σ ~ mixture: with this probability a logit-normal σ (mass at mid noise, where layout and
# colour are decided), otherwise a uniformly indexed shifted training sigma (the sampler's grid).
LOGIT_NORMAL_SHARE = 0.5
MAX_GRAD_NORM = 1.0


@dataclass
class TrainingLog:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each logging window
    wall_s: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def scene_batch(rng: np.random.Generator, batch: int, size: int, frames: int, quality: str,
                jitter: float | None = None, open_share: float = 0.0,
                open_attributes: Sequence[str] = shapes.ATTRIBUTES) -> tuple[torch.Tensor, list[str]]:
    """Videos (B, 3, T, H, W) and captions of ``batch`` random scenes, each from its own training seed.

    A scene is ``sample_scene(default_rng(seed), jitter=jitter)`` as in the prompts contract; seeds lie in
    [0, TRAIN_SEED_LIMIT), so the evaluation seeds are never seen.  ``quality == "low"`` degrades
    the videos (MCM's low-quality video data).  With ``open_share`` > 0 that share of the captions leaves
    attributes open (``shapes.coarsen_caption``, drawn from the seed): the world's multimodal prompts, whose
    unnamed attributes the scenes draw uniformly.
    """
    seeds = rng.integers(0, TRAIN_SEED_LIMIT, size=batch)
    scenes = [shapes.sample_scene(np.random.default_rng(int(s)), size, frames, jitter=jitter) for s in seeds]
    videos = shapes.render_batch(scenes, size, frames)
    if quality == "low":
        videos = shapes.degrade(videos, rng)
    return videos, [shapes.coarsen_caption(s.caption, int(seed), open_share, open_attributes)
                    for s, seed in zip(scenes, seeds, strict=True)]


def sample_sigmas(batch: int, train_sigmas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """σ per sample: a mix of uniformly indexed shifted training sigmas and logit-normal(0, 1) draws."""
    grid = train_sigmas[torch.randint(len(train_sigmas), (batch,), generator=generator)]
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    use_logit = torch.rand(batch, generator=generator) < LOGIT_NORMAL_SHARE
    return torch.where(use_logit, logit_normal, grid).clamp(float(train_sigmas[0]), 1.0)


def flow_matching_loss(backbone: Backbone, model: torch.nn.Module, x0: torch.Tensor, eps: torch.Tensor,
                       sigma: torch.Tensor, cond) -> torch.Tensor:
    """``losses.flow_matching`` of the model's velocity at x_σ = (1 − σ)·x0 + σ·ε."""
    x_sigma = schedule.noised(x0, eps, sigma.view(-1, *([1] * (x0.dim() - 1))))
    return losses.flow_matching(backbone.predict(model, x_sigma, sigma, cond), x0, eps)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """lr factor: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_teacher(backbone: Backbone, params: Params,
                  log: Callable[[dict[str, float], int], None] | None = None) -> TrainingLog:
    """Pretrain ``backbone.transformer`` and its prompt encoder in place; returns the loss history."""
    cfg, world = params.teacher, params.world
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    rng = np.random.default_rng([params.seed, 2])  # scene stream, apart from prepare's streams
    train_sigmas = torch.from_numpy(
        schedule.training_sigmas(params.grid.num_train_timesteps, params.grid.shift)).float()

    model, encoder = backbone.transformer, backbone.prompt_encoder
    model.train().requires_grad_(True)
    encoder.train().requires_grad_(True)
    trainable = [p for m in (model, encoder) for p in m.parameters()]
    optimizer = adamw(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.train_steps))

    history = TrainingLog()
    window: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.train_steps), desc="teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        videos, captions = scene_batch(rng, cfg.batch_size, world.size, world.frames, world.quality,
                                        world.position_jitter, world.open_share, world.open_attributes)
        drop = torch.rand(len(captions), generator=generator) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = backbone.encode_video(videos)
        eps = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(x0.shape[0], train_sigmas, generator)

        loss = flow_matching_loss(backbone, model, x0, eps, sigma, backbone.encode_prompts(captions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()

        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.train_steps:
            mean = float(np.mean(window))
            window.clear()
            history.losses.append(mean)
            bar.set_postfix(loss=f"{mean:.4f}")
            if log is not None:
                log({"loss": mean, "lr": scheduler.get_last_lr()[0]}, step + 1)
    history.steps = cfg.train_steps
    history.wall_s = time.perf_counter() - start
    model.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    return history
