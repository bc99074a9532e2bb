"""Where a distillation micro-batch (x_n, x_{n−1}, prompt embeddings) comes from.

Two sources behind one small interface, chosen by ``training.source``:

- ``CachedSource``: teacher ODE trajectories solved once from noise (the ``trajectories`` stage);
  x_n and x_{n−1} are consecutive stored points, no teacher forward during training.  From an
  exact (fp32) store x_n − x_{n−1} is the solver's fp32 teacher step (METHODS.md, Precision).
- ``OnlineSource``: the official DCM mode: a real data latent x0 of a training row (rendered by the
  shapes world, encoded by the backbone) noised to x_n = (1−σ_n)·x0 + σ_n·ε with fresh ε, and
  x_{n−1} = x_n + (σ_{n−1} − σ_n)·v_T by ONE guided teacher Euler step (CFG).

Both draw any randomness from the generator the loop passes in, so a resumed run replays exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.schedule import TeacherGrid, noised


@dataclass
class SourceBatch:
    x_n: torch.Tensor  # (B, C, T, H, W) at σ_n
    x_prev: torch.Tensor  # (B, C, T, H, W) at σ_{n−1}: the teacher's next point
    cond: PromptEmbeds
    counts: dict[str, int] = field(default_factory=dict)  # samples per origin (MCM's mix), logged by the loop


def _row_prompt(row) -> str:
    return row["prompt"] if isinstance(row, dict) else row[1]


def _row_seed(row) -> int:
    return int(row["seed"] if isinstance(row, dict) else row[2])


class CachedSource:
    """Consecutive points of stored teacher trajectories (``dcm.data.trajectories.TrajectoryStore``).

    The prompt embeddings of every stored row are computed once with the frozen teacher prompt
    encoder and kept: the encoder never runs inside the loop.  x_n and x_{n−1} are read together
    (``TrajectoryStore.pair``) and only moved to the device, never recomputed or re-rounded, so from
    an exact store their difference is the fp32 teacher step.  A rounded (bf16/fp16) store is read
    with a warning.
    """

    kind = "cached"

    def __init__(self, store, backbone: Backbone, device: torch.device | str = "cpu"):
        self.store = store
        self.exact_steps = bool(getattr(store, "exact_steps", False))
        if not self.exact_steps:
            dtype = getattr(store, "index", {}).get("dtype", "rounded")
            warnings.warn(f"trajectory store {getattr(store, 'root', store)} holds {dtype} "
                          "points: the teacher step x_n − x_{n−1} it gives is rounded, not the fp32 step "
                          "(METHODS.md, Precision); set trajectories.dtype: fp32 and re-run "
                          "`dcm run trajectories`", RuntimeWarning, stacklevel=2)
        self.device = torch.device(device)
        self.grid_sigmas = np.asarray(store.grid_sigmas, dtype=np.float64)
        prompts = [_row_prompt(r) for r in store.rows]
        unique = sorted(set(prompts))
        with torch.no_grad():
            embeds = backbone.encode_prompts(unique)
        slot = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([slot[p] for p in prompts], dtype=torch.long)
        self.embeds = embeds.index(index).to(self.device)

    def __len__(self) -> int:
        return len(self.store)

    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator) -> SourceBatch:
        x_n, x_prev = self.store.pair(rows.tolist(), n.tolist())
        return SourceBatch(x_n.to(self.device), x_prev.to(self.device),
                           self.embeds.index(rows.to(self.device)))

    # read-only look-ups (DetE's real="trajectory": a trajectory's own point at the phase end)
    def points(self, rows: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """float32 (B, C, T, H, W) on the device: stored trajectory rows[i] at grid index n[i]
        (−1 = σ_min)."""
        return self.store.latents(rows.tolist(), n.tolist()).to(self.device)

    def grid_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) long: the grid index (−1 = σ_min) of each σ in ``sigma`` (the loop's float32 grid values)."""
        s = sigma.detach().double().cpu().numpy().reshape(-1, 1)
        position = np.abs(self.grid_sigmas[None, :] - s).argmin(axis=1)
        off = np.abs(self.grid_sigmas[position] - s[:, 0])
        if (off > 1e-6).any():
            raise ValueError(f"σ {s[off > 1e-6, 0].tolist()[:3]} not on the store's grid")
        return torch.as_tensor(position - 1, dtype=torch.long)


class OnlineSource:
    """Noised data latents and one guided teacher Euler step per micro-batch (the official mode).

    ``rows`` are the ``train`` rows of ``data/prompts.json``; a row's data latent is the encoded
    render of ``sample_scene(default_rng(seed), size, frames, caption=prompt, jitter=jitter)``, made once
    and kept.
    """

    kind = "online"

    def __init__(self, rows: Sequence[dict], backbone: Backbone, grid: TeacherGrid, size: int, frames: int,
                 quality: str = "clean", device: torch.device | str = "cpu",
                 jitter: float | None = None):
        from dcm.worlds import shapes

        if not rows:
            raise ValueError("the online source needs at least one training row")
        self.backbone = backbone
        self.device = torch.device(device)
        self.grid_sigmas = grid.extended
        prompts = [_row_prompt(r) for r in rows]
        scenes = [shapes.sample_scene(np.random.default_rng(_row_seed(r)), size, frames, caption=p,
                                      jitter=jitter)
                  for r, p in zip(rows, prompts, strict=True)]
        videos = shapes.render_batch(scenes, size, frames)
        if quality == "low":  # MCM's low-quality video data, degraded deterministically per row
            videos = torch.stack([shapes.degrade(v[None], np.random.default_rng(_row_seed(r)))[0]
                                  for v, r in zip(videos, rows, strict=True)])
        with torch.no_grad():
            self.x0 = backbone.encode_video(videos).float().to(self.device)
            unique = sorted(set(prompts))
            embeds = backbone.encode_prompts(unique)
            slot = {p: i for i, p in enumerate(unique)}
            self.embeds = embeds.index(torch.tensor([slot[p] for p in prompts])).to(self.device)
            self.null = backbone.null_prompts(1).to(self.device)

    def __len__(self) -> int:
        return self.x0.shape[0]

    @torch.no_grad()
    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator) -> SourceBatch:
        return self.batch_from_x0(self.x0[rows.to(self.device)], rows, n, generator)

    @torch.no_grad()
    def batch_from_x0(self, x0: torch.Tensor, rows: torch.Tensor, n: torch.Tensor,
                      generator: torch.Generator) -> SourceBatch:
        """x0 noised to x_n with fresh ε, then one guided teacher Euler step to x_{n−1} (rows give the
        prompts)."""
        eps = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma_n = torch.as_tensor(self.grid_sigmas[(n + 1).numpy()], dtype=torch.float32, device=self.device)
        sigma_prev = torch.as_tensor(self.grid_sigmas[n.numpy()], dtype=torch.float32, device=self.device)
        s = sigma_n.view(-1, 1, 1, 1, 1)
        x_n = noised(x0, eps, s)
        cond = self.embeds.index(rows.to(self.device))
        uncond = PromptEmbeds(self.null.hidden.expand(len(rows), -1, -1))
        v_teacher = self.backbone.guided_velocity(self.backbone.transformer, x_n, sigma_n, cond, uncond)
        x_prev = x_n + (sigma_prev - sigma_n).view(-1, 1, 1, 1, 1) * v_teacher.float()
        return SourceBatch(x_n, x_prev, cond)
