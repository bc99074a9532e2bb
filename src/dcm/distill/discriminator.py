"""DetE's adversarial training: discriminator heads on frozen-teacher features, hinge GAN and feature matching.

METHODS.md (DetE): real = the consistency target x̂_tgt, fake = the student endpoint x̂; both are
forward-diffused with the same noise ε′ to σ_adv drawn from the DetE range of the teacher grid; the
frozen teacher at t_adv gives features from every 2nd block; one head per tap scores each frame's
token grid.  Losses, H heads, token-mean inside each term:

    L_D = Σ_h [relu(1 + D_h(fake)) + relu(1 − D_h(real))] / H
    L_G = 0.1 · (5 · Σ_h relu(1 − D_h(fake)) / H + λ_fm · mse(feat_fake, feat_real))

Generator step then discriminator step (1:1); D: AdamW, betas (0, 0.999), clip 1.0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dcm import distributed
from dcm.backbones.base import Backbone
from dcm.distill.loop import ConsistencyBatch, Objective

GENERATOR_SCALE = 0.1  # the outer 0.1 of L_G
HINGE_WEIGHT = 5.0  # the 5 in front of the generator hinge
DISC_BETAS = (0.0, 0.999)


def group_count(channels: int, most: int = 32) -> int:
    """GroupNorm groups: 32, or the largest divisor of ``channels`` not above 32."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.GroupNorm(group_count(channels), channels), nn.LeakyReLU(0.2)]


class DiscriminatorHead(nn.Module):
    """1×1 conv → GroupNorm → LeakyReLU → residual 1×1-conv block → 1×1 conv to one logit per token."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.stem = nn.Sequential(nn.Conv2d(dim, hidden, 1), *_norm_act(hidden))
        self.residual = nn.Sequential(nn.Conv2d(hidden, hidden, 1), *_norm_act(hidden), nn.Conv2d(hidden, hidden, 1))
        self.to_logit = nn.Conv2d(hidden, 1, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        h = self.stem(grid)
        return self.to_logit(h + self.residual(h))


def token_grid(latent_thw: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T', H', W') of the transformer's tokens: latent frames/height/width over the patch size."""
    t, h, w = latent_thw
    pt, ph, pw = patch_size
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent (T, H, W) = {tuple(latent_thw)} is not divisible by the patch size {tuple(patch_size)}")
    return t // pt, h // ph, w // pw


class Discriminator(nn.Module):
    """One ``DiscriminatorHead`` per feature tap; the token grid comes from each call's latent shape."""

    def __init__(self, dim: int, num_taps: int, patch_size: Sequence[int], hidden: int | None = None):
        super().__init__()
        if num_taps < 1:
            raise ValueError(f"a discriminator needs at least one feature tap, got {num_taps}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.heads = nn.ModuleList(DiscriminatorHead(dim, hidden) for _ in range(num_taps))

    def forward(self, features: Sequence[torch.Tensor], latent_thw: Sequence[int]) -> list[torch.Tensor]:
        """Per head the logits (B, T'·H'·W'), one per token; ``features`` are (B, tokens, dim) block outputs."""
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature taps for {len(self.heads)} discriminator heads")
        t, h, w = token_grid(latent_thw, self.patch_size)
        logits = []
        for head, feat in zip(self.heads, features):
            b, tokens, dim = feat.shape
            if tokens != t * h * w:
                raise ValueError(f"features have {tokens} tokens but the latent grid is {t}×{h}×{w} = {t * h * w}")
            # tokens are ordered (frame, row, column): each frame's tokens become a (dim, H', W') image
            frames = feat.float().reshape(b, t, h, w, dim).permute(0, 1, 4, 2, 3).reshape(b * t, dim, h, w)
            logits.append(head(frames).reshape(b, t * h * w))
        return logits


# ----------------------------------------------------------------------------------- losses


def discriminator_hinge(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_D = Σ_h [relu(1 + D_h(fake)) + relu(1 − D_h(real))] / H, each term a mean over tokens."""
    terms = [F.relu(1.0 + fake).mean() + F.relu(1.0 - real).mean() for real, fake in zip(real_logits, fake_logits)]
    return torch.stack(terms).sum() / len(terms)


def generator_hinge(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_h relu(1 − D_h(fake)) / H, each term a mean over tokens."""
    return torch.stack([F.relu(1.0 - fake).mean() for fake in fake_logits]).sum() / len(fake_logits)


def feature_matching(feat_fake: Sequence[torch.Tensor], feat_real: Sequence[torch.Tensor],
                     project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """mse(project(feat_fake), project(feat_real)), averaged over taps; ``project`` = the teacher's output head."""
    terms = [F.mse_loss(project(fake).float(), project(real).float()) for fake, real in zip(feat_fake, feat_real)]
    return torch.stack(terms).mean()


def generator_adversarial(fake_logits: Sequence[torch.Tensor], fm: torch.Tensor, fm_weight: float) -> torch.Tensor:
    """L_G = 0.1 · (5 · generator_hinge + λ_fm · FM)."""
    return GENERATOR_SCALE * (HINGE_WEIGHT * generator_hinge(fake_logits) + fm_weight * fm)


def output_projection(teacher: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Features → the teacher's ``proj_out(norm_out(·))``, without Wan's final shift/scale modulation.

    Wan modulates after ``norm_out`` with (shift, scale) from the timestep embedding; a block output
    alone carries no timestep, so the projection skips that modulation (norm_out is affine-free).
    """
    from dcm.backbones.toy import _unwrap

    model = _unwrap(teacher)
    return lambda feat: model.proj_out(model.norm_out(feat.float()).to(feat.dtype))


@contextmanager
def _frozen(module: nn.Module):
    """No gradients into ``module`` for the block (the generator pass through D)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


CHANCE_TOLERANCE = 0.05  # |mean L_D − 2| and |mean D(real) − D(fake)| below this: the heads do not separate


def discriminator_summary(rows: Sequence[dict], prefix: str = "gan/") -> dict | None:
    """How the discriminator did over the second half of a run's logged steps (``history.jsonl`` rows).

    Hinge L_D is 2 when D(real) = D(fake) = 0, i.e. at chance.  A run whose heads stay there gives the
    generator a term with no real/fake signal in it (its gradient only follows D's current random
    direction): ``at_chance`` flags it.  None when the rows carry no discriminator loss.
    """
    logged = [r for r in rows if f"{prefix}d_loss" in r]
    if not logged:
        return None
    late = logged[len(logged) // 2:]
    d_loss = sum(r[f"{prefix}d_loss"] for r in late) / len(late)
    margin = sum(r[f"{prefix}d_real"] - r[f"{prefix}d_fake"] for r in late) / len(late)
    return {"steps": [late[0]["step"], late[-1]["step"]], "d_loss": d_loss, "real_minus_fake": margin,
            "at_chance": abs(d_loss - 2.0) < CHANCE_TOLERANCE and abs(margin) < CHANCE_TOLERANCE}


# --------------------------------------------------------------------------------- objective


class GanFeatureMatching(Objective):
    """DetE's GAN + feature-matching terms, and the discriminator's own step after each generator step.

    ``gan_weight`` scales the hinge term (1 → the paper's 0.1·5), ``fm_weight`` is λ_fm.  σ_adv is drawn
    per sample uniformly from the DetE grid indices [0, κ] with the global torch RNG (which the loop's
    resume state restores), ε′ likewise.
    """

    name = "gan"

    def __init__(self, backbone: Backbone, teacher: nn.Module, dete_sigmas: Sequence[float], *, gan_weight: float,
                 fm_weight: float, disc_lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        if not len(dete_sigmas):
            raise ValueError("GanFeatureMatching needs at least one σ_adv to draw from")
        self.backbone, self.teacher = backbone, teacher
        self.gan_weight, self.fm_weight, self.max_grad_norm = gan_weight, fm_weight, max_grad_norm
        self.dete_sigmas = torch.as_tensor(list(dete_sigmas), dtype=torch.float32)
        dim = backbone.feature_dim(teacher)
        device = next(teacher.parameters()).device
        taps = len(backbone.feature_block_indices(teacher))
        self.discriminator = Discriminator(dim, taps, backbone.token_patch(teacher)).to(device)
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=disc_lr, betas=DISC_BETAS,
                                           weight_decay=weight_decay)
        self.project = backbone.feature_projection(teacher)
        self._pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def adversarial_features(self, batch: ConsistencyBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher features of real (x̂_tgt, no grad) and fake (x̂, with grad), both diffused with one ε′ to σ_adv."""
        x_real, x_fake = batch.x_end_target.detach(), batch.x_end_pred
        b = x_fake.shape[0]
        pick = torch.randint(len(self.dete_sigmas), (b,))
        sigma_adv = self.dete_sigmas[pick].to(x_fake.device)
        noise = torch.randn(x_fake.shape).to(x_fake.device)  # ε′, shared by real and fake
        s = sigma_adv.view(-1, *([1] * (x_fake.ndim - 1)))
        with torch.no_grad():
            _, feat_real = self.backbone.predict(self.teacher, (1 - s) * x_real + s * noise, sigma_adv, batch.cond,
                                                 features=True)
        _, feat_fake = self.backbone.predict(self.teacher, (1 - s) * x_fake + s * noise, sigma_adv, batch.cond,
                                             features=True)
        return [f.detach() for f in feat_real], feat_fake

    def grad_networks(self) -> list[nn.Module]:
        return [self.teacher]  # the fake features' forward runs with grad

    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        feat_real, feat_fake = self.adversarial_features(batch)
        self._pending[id(batch)] = (feat_real, [f.detach() for f in feat_fake])
        with _frozen(self.discriminator):
            fake_logits = self.discriminator(feat_fake, batch.x_end_pred.shape[2:])
        fm = feature_matching(feat_fake, feat_real, self.project)
        return {"gan_g": GENERATOR_SCALE * HINGE_WEIGHT * self.gan_weight * generator_hinge(fake_logits),
                "fm": GENERATOR_SCALE * self.fm_weight * fm}

    def after_generator_step(self, batch: ConsistencyBatch) -> dict[str, float]:
        """One D step on the batch's real features and its detached fakes (hinge, clip 1.0, AdamW)."""
        pending = self._pending.pop(id(batch), None)
        if pending is None:
            with torch.no_grad():
                feat_real, feat_fake = self.adversarial_features(batch)
            pending = (feat_real, [f.detach() for f in feat_fake])
        feat_real, feat_fake = pending
        thw = batch.x_end_pred.shape[2:]
        self.optimizer.zero_grad(set_to_none=True)
        real_logits = self.discriminator(feat_real, thw)
        fake_logits = self.discriminator(feat_fake, thw)
        loss = discriminator_hinge(real_logits, fake_logits)
        loss.backward()
        distributed.average_gradients(list(self.discriminator.parameters()))
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return {"d_loss": float(loss.detach()),
                "d_real": float(torch.stack([r.detach().mean() for r in real_logits]).mean()),
                "d_fake": float(torch.stack([f.detach().mean() for f in fake_logits]).mean())}

    def state_dict(self) -> dict:
        return {"heads": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.discriminator.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
