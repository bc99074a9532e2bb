"""Where a distillation micro-batch (x_n, x_{n−1}, prompt embeddings) comes from.

Two sources behind one small interface, chosen by ``training.source``:

- ``CachedSource``: teacher ODE trajectories solved once from noise (the ``trajectories`` stage);
  x_n and x_{n−1} are consecutive stored points, no teacher forward during training.  From an
  exact (fp32) store x_n − x_{n−1} is the solver's fp32 teacher step (METHODS.md, Precision).
- ``OnlineSource``: the official DCM mode: a real data latent x0 noised to x_n = (1−σ_n)·x0 + σ_n·ε with
  fresh ε, and x_{n−1} = x_n + (σ_{n−1} − σ_n)·v_T by ONE guided teacher Euler step.  x0 is a shapes-world
  render encoded by the backbone (the toy), or a real family's video latent from the ``preprocess`` stage
  (``OnlineSource.from_videos``: the captions are the prompts).

Prompt dropout (``drop``: the rows the loop drew to lose their prompt) gives a dropped row the empty
prompt's embedding for the student and its target, and the teacher step under the empty prompt: the online
source takes its one teacher step with the empty prompt (with CFG that is the unconditional velocity v_u,
as the official Wan code's dropped rows get), and the cached source, whose stored step was guided by the
row's prompt, replaces it for the dropped rows by one teacher step from the same x_n under the empty prompt.
A dropped row never pairs the empty prompt with a step guided by its prompt.

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


def drop_prompts(cond: PromptEmbeds, null: PromptEmbeds, drop: torch.Tensor) -> PromptEmbeds:
    """Prompt dropout (official Wan recipe 10%): the rows where ``drop`` is set get the empty prompt's
    embedding (every tensor of it: hidden states, masks, pooled)."""
    def pick(mine: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        if mine.shape != empty.shape:
            raise ValueError(f"prompt dropout: empty-prompt embedding {tuple(empty.shape)} does not match "
                             f"the batch's {tuple(mine.shape)}")
        return torch.where(drop.to(mine.device).view(-1, *[1] * (mine.dim() - 1)), empty.to(mine.dtype), mine)

    hidden = pick(cond.hidden, null.hidden)
    extra = {k: pick(v, (null.extra or {})[k]) for k, v in (cond.extra or {}).items()} or None
    return PromptEmbeds(hidden, extra)


def repeat_rows(row: PromptEmbeds, count: int) -> PromptEmbeds:
    """One prompt's embedding (batch 1) as ``count`` rows."""
    return PromptEmbeds.cat([row] * count) if count else row.index(slice(0, 0))


@torch.no_grad()
def teacher_step(backbone: Backbone, x_n: torch.Tensor, sigma_n: torch.Tensor, sigma_prev: torch.Tensor,
                 cond: PromptEmbeds, uncond: PromptEmbeds) -> torch.Tensor:
    """One guided teacher Euler step x_{n−1} = x_n + (σ_{n−1} − σ_n)·v_T (CFG with ``uncond``, or the
    embedded guidance), in fp32."""
    v_teacher = backbone.guided_velocity(backbone.transformer, x_n, sigma_n, cond, uncond)
    return x_n + (sigma_prev - sigma_n).view(-1, 1, 1, 1, 1) * v_teacher.float()


class CachedSource:
    """Consecutive points of stored teacher trajectories (``dcm.data.trajectories.TrajectoryStore``).

    The prompt embeddings of every stored row are looked up once (the toy's frozen prompt encoder, a real
    family's preprocessed store) and kept: no text encoder runs inside the loop.  x_n and x_{n−1} are read
    together (``TrajectoryStore.pair``) and only moved to the device, never recomputed or re-rounded, so
    from an exact store their difference is the fp32 teacher step; a dropped row's x_{n−1} is the one
    teacher step under the empty prompt instead.  A rounded (bf16/fp16) store is read with a warning.
    """

    kind = "cached"

    def __init__(self, store, backbone: Backbone, device: torch.device | str = "cpu"):
        self.store = store
        self.backbone = backbone
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
        self._null: PromptEmbeds | None = None  # the empty prompt's embedding, on first dropout

    def __len__(self) -> int:
        return len(self.store)

    def null(self) -> PromptEmbeds:
        if self._null is None:
            with torch.no_grad():
                self._null = self.backbone.null_prompts(1).to(self.device)
        return self._null

    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator,
              drop: torch.Tensor | None = None) -> SourceBatch:
        x_n, x_prev = self.store.pair(rows.tolist(), n.tolist())
        x_n, x_prev = x_n.to(self.device), x_prev.to(self.device)
        cond = self.embeds.index(rows.to(self.device))
        if drop is not None and bool(drop.any()):
            empty = repeat_rows(self.null(), len(rows))
            cond = drop_prompts(cond, empty, drop)
            picked = drop.to(self.device)
            k = int(drop.sum())
            sigma = torch.as_tensor(self.grid_sigmas, dtype=torch.float32, device=self.device)
            sigma_n, sigma_prev = sigma[(n + 1).to(self.device)][picked], sigma[n.to(self.device)][picked]
            x_prev = x_prev.clone()
            x_prev[picked] = teacher_step(self.backbone, x_n[picked], sigma_n, sigma_prev,
                                          repeat_rows(self.null(), k), repeat_rows(self.null(), k))
        return SourceBatch(x_n, x_prev, cond)

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


class _StoredLatents:
    """A preprocessed video store's latents indexed like a tensor of x0s (``x0[rows]`` on the device), read
    row by row from its shards: a real set is not held in memory."""

    def __init__(self, videos, device: torch.device):
        self.videos, self.device = videos, device
        self.shape = (len(videos), *videos.latent_shape)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.videos.latents(rows.reshape(-1).tolist()).to(self.device)


class OnlineSource:
    """Noised data latents and one guided teacher Euler step per micro-batch (the official mode).

    The toy: ``rows`` are the ``train`` rows of ``data/prompts.json``; a row's data latent is the encoded
    render of ``sample_scene(default_rng(seed), size, frames, caption=prompt, jitter=jitter)``, made once
    and kept.  A real family: ``from_videos``, the preprocessed video latents and their captions.
    """

    kind = "online"

    def __init__(self, rows: Sequence[dict], backbone: Backbone, grid: TeacherGrid, size: int, frames: int,
                 quality: str = "clean", device: torch.device | str = "cpu",
                 jitter: float | None = None):
        from dcm.worlds import shapes

        if not rows:
            raise ValueError("the online source needs at least one training row")
        prompts = [_row_prompt(r) for r in rows]
        scenes = [shapes.sample_scene(np.random.default_rng(_row_seed(r)), size, frames, caption=p,
                                      jitter=jitter)
                  for r, p in zip(rows, prompts, strict=True)]
        videos = shapes.render_batch(scenes, size, frames)
        if quality == "low":  # MCM's low-quality video data, degraded deterministically per row
            videos = torch.stack([shapes.degrade(v[None], np.random.default_rng(_row_seed(r)))[0]
                                  for v, r in zip(videos, rows, strict=True)])
        device = torch.device(device)
        with torch.no_grad():
            x0 = backbone.encode_video(videos).float().to(device)
        self._setup(x0, prompts, backbone, grid, device)

    @classmethod
    def from_videos(cls, videos, backbone: Backbone, grid: TeacherGrid,
                    device: torch.device | str = "cpu") -> OnlineSource:
        """A real family's source: ``videos`` (``dcm.data.preprocess.VideoLatents``), the preprocessed VAE
        latents of the video set, read lazily; a row's prompt is its caption."""
        if not len(videos):
            raise ValueError("the online source needs at least one video")
        source = cls.__new__(cls)
        device = torch.device(device)
        source._setup(_StoredLatents(videos, device), list(videos.captions), backbone, grid, device)
        return source

    def _setup(self, x0, prompts: list[str], backbone: Backbone, grid: TeacherGrid,
               device: torch.device) -> None:
        self.backbone, self.device, self.grid_sigmas, self.x0 = backbone, device, grid.extended, x0
        with torch.no_grad():
            unique = sorted(set(prompts))
            embeds = backbone.encode_prompts(unique)
            slot = {p: i for i, p in enumerate(unique)}
            self.embeds = embeds.index(torch.tensor([slot[p] for p in prompts])).to(self.device)
            self.null = backbone.null_prompts(1).to(self.device)

    def __len__(self) -> int:
        return len(self.x0)

    @torch.no_grad()
    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator,
              drop: torch.Tensor | None = None) -> SourceBatch:
        return self.batch_from_x0(self.x0[rows.to(self.device)], rows, n, generator, drop)

    @torch.no_grad()
    def batch_from_x0(self, x0: torch.Tensor, rows: torch.Tensor, n: torch.Tensor,
                      generator: torch.Generator, drop: torch.Tensor | None = None) -> SourceBatch:
        """x0 noised to x_n with fresh ε, then one guided teacher Euler step to x_{n−1} (rows give the
        prompts; dropped rows take the step under the empty prompt)."""
        eps = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma_n = torch.as_tensor(self.grid_sigmas[(n + 1).numpy()], dtype=torch.float32, device=self.device)
        sigma_prev = torch.as_tensor(self.grid_sigmas[n.numpy()], dtype=torch.float32, device=self.device)
        x_n = noised(x0, eps, sigma_n.view(-1, 1, 1, 1, 1))
        cond = self.embeds.index(rows.to(self.device))
        uncond = repeat_rows(self.null, len(rows))
        if drop is not None and bool(drop.any()):
            cond = drop_prompts(cond, uncond, drop)
        x_prev = teacher_step(self.backbone, x_n, sigma_n, sigma_prev, cond, uncond)
        return SourceBatch(x_n, x_prev, cond)
