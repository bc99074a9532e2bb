"""MCM (Motion Consistency Model, Zhai et al., arXiv 2406.06890) as a method of the one distillation loop.

Video consistency distillation on low-quality videos whose frames an image discriminator pushes
toward a high-quality still-image set (METHODS.md, "MCM").  Three parts, each passed into the loop:

- Disentangled motion distillation (``MotionSpace``, the loop's ``ConsistencySpace``): the
  consistency loss compares a motion representation M of the endpoints, pseudo-Huber(M(x̂), M⁻(x̂_tgt)),
  so the low-quality *appearance* of the video data does not fight the discriminator.  ``cd_target``:
    raw    M(z) = z                                          (plain LCM: no disentangling)
    diff   M(z) = z[:, :, 1:] − z[:, :, :−1]                 temporal latent difference
    learn  M(z) = z + g(z), g per frame: SiLU → 1×1 conv C→64 → GroupNorm → SiLU → 1×1 conv 64→C,
           last conv zero-initialised (M = identity at start); g trains with the student, the
           target side M⁻ uses an EMA copy of the head (decay ``head_ema_decay``).
- Mixed trajectory distillation (``MixedTrajectorySource``): per sample, with probability p the
  data latent is replaced by the student's own one-step x0 from pure noise (σ = 1, the row's prompt,
  no grad), which is then noised to x_n and stepped once by the teacher as usual.  The released code
  draws once per step for the whole batch; per sample has the same expectation and a finer mix.
- Image discriminator (``ImageDiscriminator``, an ``Objective``): scores SINGLE frames (``frames``
  per video, one from each of as many temporal segments) of the student's x0 prediction against the
  shapes world's high-quality still images.  WGAN-style losses with an R1 penalty (METHODS.md;
  the equations in ``dcm.distill.losses``):
    L_G = −D(fake, c),   L_D = max(−1, −D(real, c)) + max(−1, D(fake, c)) + γ_R1 · ‖∂D(real)/∂feat_real‖²
  D = the DetE discriminator heads (``discriminator.Discriminator``), one per feature tap, text-conditioned
  as MCM's are (projection style: logit = ⟨head(feat), W·c⟩/√64, c the pooled prompt embedding): a fake
  frame with its video's prompt, a real still with its own caption.

Discriminator backbone (no DINO weights here): ``TeacherFrameFeatures`` = the frozen teacher run on
single latent frames at low noise σ_d (x = (1−σ_d)·f + σ_d·ε, null prompt), features from every 2nd
block.  ``FrameFeatures`` is the interface a DINO ViT from local weights would implement (decode the
frames with the backbone's VAE in ``video_frames``, keep pixels in ``real_frames``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from dcm.backbones.base import Backbone
from dcm.distill import losses
from dcm.distill.data import OnlineSource, SourceBatch
from dcm.distill.discriminator import DISC_BETAS, Discriminator, frozen, group_count
from dcm.distill.loop import ConsistencyBatch, ConsistencySpace, Objective
from dcm.distill.optim import adamw
from dcm.schedule import noised

MOTION_HIDDEN = 64  # width of the learnable motion head (the released code's hidden_dim)
MOTION_HEAD_FILE = "motion_head.safetensors"
CD_TARGETS = ("raw", "diff", "learn")


# ------------------------------------------------------------------------- motion representation


def temporal_difference(z: torch.Tensor) -> torch.Tensor:
    """M_diff(z) = z[:, :, 1:] − z[:, :, :−1] on latents (B, C, T, H, W): frame-to-frame change."""
    if z.shape[2] < 2:
        raise ValueError(f"the temporal difference needs >= 2 latent frames, got shape {tuple(z.shape)}")
    return z[:, :, 1:] - z[:, :, :-1]


class MotionHead(nn.Module):
    """M_learn(z) = z + g(z), g applied to every frame: SiLU → 1×1 conv C→64 → GroupNorm → SiLU →
    1×1 conv 64→C.

    The last conv starts at zero, so M is the identity at initialisation.
    """

    def __init__(self, channels: int, hidden: int = MOTION_HIDDEN):
        super().__init__()
        self.g = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, hidden, 1),
                               nn.GroupNorm(group_count(hidden), hidden), nn.SiLU(),
                               nn.Conv2d(hidden, channels, 1))
        nn.init.zeros_(self.g[-1].weight)
        nn.init.zeros_(self.g[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        frames = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        g = self.g(frames.float()).reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return z + g.to(z.dtype)


class MotionSpace(ConsistencySpace):
    """The consistency loss on a motion representation (``cd_target`` raw | diff | learn, see the module
    doc)."""

    def __init__(self, cd_target: str, channels: int, head_ema_decay: float = 0.95,
                 device: torch.device | str = "cpu"):
        if cd_target not in CD_TARGETS:
            raise ValueError(f"cd_target {cd_target!r} is not one of {CD_TARGETS}")
        self.cd_target, self.head_ema_decay = cd_target, head_ema_decay
        self.name = f"motion-{cd_target}"
        self.head = self.head_ema = None
        if cd_target == "learn":
            self.head = MotionHead(channels).to(device)
            self.head_ema = copy.deepcopy(self.head).requires_grad_(False)

    def student(self, x_end_pred: torch.Tensor) -> torch.Tensor:
        return self._apply(x_end_pred, self.head)

    def target(self, x_end_target: torch.Tensor) -> torch.Tensor:
        return self._apply(x_end_target, self.head_ema)

    def _apply(self, z: torch.Tensor, head: MotionHead | None) -> torch.Tensor:
        if self.cd_target == "diff":
            return temporal_difference(z)
        return head(z) if head is not None else z

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) if self.head is not None else []

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.head is not None:
            for p_ema, p in zip(self.head_ema.parameters(), self.head.parameters(), strict=True):
                p_ema.lerp_(p.detach(), 1.0 - self.head_ema_decay)

    def state_dict(self) -> dict:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "head_ema": self.head_ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.head is not None and state:
            self.head.load_state_dict(state["head"])
            self.head_ema.load_state_dict(state["head_ema"])

    def save(self, out_dir: str | Path) -> None:
        """The learnt head (student side) beside the weights, for inspection; nothing for raw/diff."""
        if self.head is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(tensors, str(Path(out_dir) / MOTION_HEAD_FILE))


# ---------------------------------------------------------------------------- mixed trajectories


class MixedTrajectorySource:
    """Wraps the online video source: per sample, with probability ``portion`` the data latent x0 is the
    student's own one-step prediction from pure noise, x0 = ε − 1·v_θ(ε, σ=1) (the row's prompt, no grad);
    then x_n = (1−σ_n)·x0 + σ_n·ε′ and one guided teacher Euler step, exactly as for a video latent.

    Every batch reports how many samples came from each domain (``counts``: video, student); the loop
    logs them per step and sums them into ``train.json``.  All draws come from the loop's generator.
    """

    kind = "mixed"

    def __init__(self, videos: OnlineSource, backbone: Backbone, student: nn.Module, portion: float):
        if not 0.0 <= portion <= 1.0:
            raise ValueError(f"mixed-trajectory portion must lie in [0, 1], got {portion}")
        self.videos, self.backbone, self.student, self.portion = videos, backbone, student, portion
        self.grid_sigmas = videos.grid_sigmas

    def __len__(self) -> int:
        return len(self.videos)

    @torch.no_grad()
    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator,
              drop: torch.Tensor | None = None) -> SourceBatch:
        device = self.videos.device
        x0 = self.videos.x0[rows.to(device)]
        from_student = torch.rand(len(rows), generator=generator) < self.portion
        k = int(from_student.sum())
        if k:
            eps = torch.randn((k, *x0.shape[1:]), generator=generator).to(device)
            sigma_max = torch.full((k,), float(self.grid_sigmas[-1]), device=device)  # σ = 1: pure noise
            cond = self.videos.embeds.index(rows[from_student].to(device))
            v = self.backbone.predict(self.student, eps, sigma_max, cond)
            x0 = x0.clone()
            x0[from_student.to(device)] = losses.x0_from_velocity(eps, v.float(), sigma_max)
        batch = self.videos.batch_from_x0(x0, rows, n, generator, drop)  # dropped: the empty prompt's step
        batch.counts = {"video": len(rows) - k, "student": k}
        return batch


# ----------------------------------------------------------------------------- image discriminator


class FrameFeatures(Protocol):
    """Frozen features of single frames for the image discriminator.

    Frames are (N, C, 1, H, W) in the extractor's own input space; features are (N, tokens, dim) per tap,
    tokens on the (1, H, W) / ``patch_size`` grid.  A DINO ViT from local weights implements it with
    ``video_frames`` decoding the student's latent frames to pixels and ``patch_size = (1, 14, 14)``.
    """

    dim: int
    num_taps: int
    patch_size: tuple[int, int, int]

    def real_frames(self, images: torch.Tensor) -> torch.Tensor:
        """High-quality still images (N, 3, H, W) in [-1, 1] → frames."""
        ...

    def video_frames(self, x0: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Frames ``index`` (B, F) of latent videos x0 (B, C, T, h, w) → (B·F, ...) frames, keeping the
        graph."""
        ...

    def __call__(self, frames: torch.Tensor) -> list[torch.Tensor]:
        ...


class TeacherFrameFeatures:
    """The frozen teacher as the image backbone: single latent frames noised to a low σ_d, null prompt,
    outputs of every 2nd block (the DetE taps).  Noise ε comes from the global torch RNG (in the resume
    state).

    A teacher whose tokens span ``t > 1`` latent frames (the shapes toy's temporal tubes) sees each
    frame as a still clip of ``t`` copies, noised independently; its token grid is still (1, H, W) / patch.
    """

    def __init__(self, backbone: Backbone, teacher: nn.Module, sigma: float):
        self.backbone, self.teacher, self.sigma = backbone, teacher, float(sigma)
        self.dim = backbone.feature_dim(teacher)
        self.num_taps = len(backbone.feature_block_indices(teacher))
        self.clip_frames, ph, pw = backbone.token_patch(teacher)
        self.patch_size = (1, ph, pw)
        with torch.no_grad():
            self.null = backbone.null_prompts(1)

    def real_frames(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.encode_video(images[:, :, None]).float()

    def video_frames(self, x0: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        b, c, _, h, w = x0.shape
        gather = index.to(x0.device)[:, None, :, None, None].expand(b, c, index.shape[1], h, w)
        frames = torch.gather(x0, 2, gather)  # (B, C, F, h, w)
        return frames.permute(0, 2, 1, 3, 4).reshape(-1, c, 1, h, w)

    def __call__(self, frames: torch.Tensor) -> list[torch.Tensor]:
        n = frames.shape[0]
        frames = frames.expand(-1, -1, self.clip_frames, -1, -1)  # a still clip filling one temporal patch
        sigma = torch.full((n,), self.sigma, device=frames.device)
        eps = torch.randn(frames.shape).to(frames.device)
        x = noised(frames, eps, self.sigma)
        cond = self.null.index([0] * n)
        _, feats = self.backbone.predict(self.teacher, x, sigma, cond, features=True)
        return feats.taps


def segment_frames(batch: int, frames: int, count: int) -> torch.Tensor:
    """(batch, count) frame indices: one uniform draw inside each of ``count`` equal temporal segments."""
    if not 1 <= count <= frames:
        raise ValueError(f"cannot sample {count} distinct frames from {frames}")
    edges = torch.div(torch.arange(count + 1) * frames, count, rounding_mode="floor")
    width = (edges[1:] - edges[:-1]).float()
    return edges[:-1] + (torch.rand(batch, count) * width).long()  # rand < 1: stays inside the segment


def student_x0(batch: ConsistencyBatch) -> torch.Tensor:
    """The student's clean-sample estimate x0 = x_n − σ_n·v, with v recovered from its endpoint (keeps the
    graph)."""
    s = lambda sig: sig.view(-1, *([1] * (batch.x_n.ndim - 1)))  # noqa: E731
    v = (batch.x_end_pred - batch.x_n) / (s(batch.sigma_end) - s(batch.sigma_n))
    return losses.x0_from_velocity(batch.x_n, v, batch.sigma_n)


class ImageDiscriminator(Objective):
    """MCM's image discriminator on single frames of the student's x0 vs high-quality still images.

    Generator term ``img_g`` = weight · L_G on ``frames`` segment-sampled frames per video; after the
    student's step one D step (L_D + γ_R1·R1, clip ``max_grad_norm``, AdamW betas (0, 0.999)) on as
    many real frames drawn from the image set and the detached fake features.  ``hq_text`` (N, D): the
    pooled prompt embedding of each still's caption (``PromptEmbeds.pooled``), the heads' condition
    (MCM's projection heads); ``conditioned=False`` builds unconditioned heads and never passes a prompt.
    """

    name = "img_gan"

    def __init__(self, features: FrameFeatures, hq_images: torch.Tensor, hq_text: torch.Tensor, *,
                 weight: float, disc_lr: float, r1_weight: float, frames: int, max_grad_norm: float = 1.0,
                 weight_decay: float = 0.0, conditioned: bool = True, device: torch.device | str = "cpu"):
        if len(hq_text) != len(hq_images):
            raise ValueError(f"{len(hq_images)} high-quality images but {len(hq_text)} caption embeddings")
        self.features, self.weight, self.r1_weight, self.frames = features, weight, r1_weight, frames
        self.max_grad_norm = max_grad_norm
        self.discriminator = Discriminator(features.dim, features.num_taps, features.patch_size,
                                           cond_dim=hq_text.shape[1] if conditioned else None).to(device)
        self.optimizer = adamw(self.discriminator.parameters(), lr=disc_lr, betas=DISC_BETAS,
                                           weight_decay=weight_decay)
        self.real_bank = features.real_frames(hq_images.to(device))
        self.real_text = hq_text.detach().float().to(device) if conditioned else None
        self._pending: dict[int, tuple[list[torch.Tensor], torch.Size, torch.Tensor]] = {}

    def grad_networks(self) -> list[nn.Module]:
        teacher = getattr(self.features, "teacher", None)  # TeacherFrameFeatures: the fake frames' forward
        return [teacher] if isinstance(teacher, nn.Module) else []

    def fake_frames(self, batch: ConsistencyBatch) -> torch.Tensor:
        x0 = student_x0(batch)
        return self.features.video_frames(x0, segment_frames(x0.shape[0], x0.shape[2], self.frames))

    def fake_text(self, batch: ConsistencyBatch) -> torch.Tensor | None:
        """Each fake frame's condition: its video's pooled prompt embedding (frames are video-major);
        None for unconditioned heads."""
        if self.real_text is None:
            return None
        return batch.cond.pooled().float().repeat_interleave(self.frames, dim=0)

    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        fake, text = self.fake_frames(batch), self.fake_text(batch)
        with batch.autocast():
            feats = self.features(fake)
        self._pending[id(batch)] = ([f.detach() for f in feats], fake.shape, text)
        with frozen(self.discriminator):
            D_fake = self.discriminator(feats, fake.shape[2:], text)
        return {"img_g": self.weight * losses.wgan_generator(D_fake)}

    def after_generator_step(self, batch: ConsistencyBatch) -> dict[str, float]:
        pending = self._pending.pop(id(batch), None)
        if pending is None:
            with torch.no_grad(), batch.autocast():
                fake = self.fake_frames(batch)
                pending = ([f.detach() for f in self.features(fake)], fake.shape, self.fake_text(batch))
        feat_fake, fake_shape, fake_text = pending
        pick = torch.randint(len(self.real_bank), (fake_shape[0],)).to(self.real_bank.device)
        real = self.real_bank[pick]
        real_text = None if self.real_text is None else self.real_text[pick]
        with torch.no_grad(), batch.autocast():
            feat_real = [f.detach().float().requires_grad_(True) for f in self.features(real)]
        self.optimizer.zero_grad(set_to_none=True)
        D_real = self.discriminator(feat_real, real.shape[2:], real_text)
        D_fake = self.discriminator(feat_fake, fake_shape[2:], fake_text)
        loss = losses.wgan_discriminator(D_real, D_fake)
        r1 = losses.r1_penalty(D_real, feat_real) if self.r1_weight > 0 else loss.new_zeros(())
        (loss + self.r1_weight * r1).backward()
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return {"d_loss": float(loss.detach()), "r1": float(r1.detach()),
                "d_real": float(torch.stack([r.detach().mean() for r in D_real]).mean()),
                "d_fake": float(torch.stack([f.detach().mean() for f in D_fake]).mean())}

    def state_dict(self) -> dict:
        return {"heads": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.discriminator.load_state_dict(state["heads"])
            self.optimizer.load_state_dict(state["optimizer"])


# ------------------------------------------------------------------------------------------ wiring


def hq_stills(n: int, seed: int, size: int, jitter: float | None = None, open_share: float = 0.0,
              open_attributes=None) -> tuple[torch.Tensor, list[str]]:
    """MCM's real images: the shapes world's high-quality stills with their captions, open as often as
    the world's (``shapes.hq_stills``)."""
    from dcm.worlds import shapes

    return shapes.hq_stills(n, seed, size, jitter, open_share, open_attributes or shapes.ATTRIBUTES)


def build(params, method: str, backbone: Backbone, student: nn.Module, videos: OnlineSource, device
          ) -> tuple[MixedTrajectorySource, MotionSpace, list[Objective]]:
    """The MCM parts for ``methods.<method>``: the mixed source over ``videos``, the motion space, the
    image discriminator on the shapes world's high-quality stills and their captions (seeded from
    params.seed)."""
    cfg = params.method(method).mcm
    channels = backbone.latent_shape(params.world.frames, params.world.size)[0]
    space = MotionSpace(cfg.cd_target, channels, cfg.head_ema_decay, device)
    source = MixedTrajectorySource(videos, backbone, student, cfg.mix_portion)
    objectives: list[Objective] = []
    if cfg.disc_weight > 0:
        features = TeacherFrameFeatures(backbone, backbone.teacher_at(cfg.disc_sigma), cfg.disc_sigma)
        world = params.world
        images, captions = hq_stills(cfg.hq_images, seed=params.seed + 1, size=world.size,
                                     jitter=world.position_jitter, open_share=world.open_share,
                                     open_attributes=world.open_attributes)
        with torch.no_grad():
            text = backbone.encode_prompts(captions).pooled()
        objectives.append(ImageDiscriminator(features, images, text, weight=cfg.disc_weight,
                                             disc_lr=cfg.disc_lr, r1_weight=cfg.disc_r1,
                                             frames=cfg.disc_frames, conditioned=cfg.disc_text,
                                             max_grad_norm=params.training.max_grad_norm, device=device))
    return source, space, objectives
