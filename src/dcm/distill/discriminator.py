"""DetE's adversarial training: discriminator heads on frozen-teacher features, hinge GAN and feature matching.

METHODS.md (DetE), as the official code does it: real = the consistency target x̂_tgt, fake = the
student endpoint x̂; both are forward-diffused with the same noise ε′ from σ_end to σ_adv,

    σ_adv ~ U{σ_min, σ_0, …, σ_{κ−1}}           (sigmas_prev[U[0, κ+1)]: the x_{n−1} levels of DetE's n)
    x_adv = ((1 − σ_adv)·x + (σ_adv − σ_end)·ε′)/(1 − σ_end)

the frozen teacher at t_adv gives features from every 2nd block (under the training autocast); one
head per tap scores each frame's token grid; feature matching compares the taps after the teacher's
output head at t_adv (modulation included), unpatchified to latent space.  The loss equations live in
``dcm.distill.losses``:

    L_D = Σ_h [relu(1 + D_h(fake)) + relu(1 − D_h(real))] / H
    L_G = 0.1 · (5 · λ_gan · Σ_h relu(1 − D_h(fake)) / H + λ_fm · mse(feat_fake, feat_real))

Generator step then discriminator step (1:1); D: AdamW, betas (0, 0.999), clip 1.0.  The hinge term
(and D) is on when λ_gan > 0, feature matching when λ_fm > 0, independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dcm import distributed
from dcm.backbones.base import Backbone, TeacherFeatures, token_grid
from dcm.distill import losses
from dcm.distill.loop import ConsistencyBatch, Objective
from dcm.schedule import SIGMA_MIN_INDEX, TeacherGrid

DISC_BETAS = (0.0, 0.999)
HEAD_WIDTH = 1024  # official head width: min(C, 1024)
LEAKY_SLOPE = 0.01
CMAP_DIM = 64  # width of a text-conditioned head's projection (MCM / StyleGAN-T's cmap_dim)


def adversarial_sigmas(grid: TeacherGrid, kappa: int) -> list[float]:
    """The σ_adv DetE draws from: sigmas_prev[0..κ] = [σ_min, σ_0, …, σ_{κ−1}] (official: U[0, κ+1))."""
    return [grid.sigma(n) for n in range(SIGMA_MIN_INDEX, kappa)]


def group_count(channels: int, most: int = 32) -> int:
    """GroupNorm groups: 32, or the largest divisor of ``channels`` not above 32."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _conv_norm_act(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.GroupNorm(group_count(c_out), c_out), nn.LeakyReLU(LEAKY_SLOPE))


class DiscriminatorHead(nn.Module):
    """h = act(GN(conv(x))); h = h + act(GN(conv(h))); logit = conv(h): one logit per token (official widths).

    With ``cond_dim`` the head is text-conditioned, projection-discriminator style (MCM's heads):
    the last conv gives a ``CMAP_DIM`` vector per token and logit = ⟨it, W·c⟩/√CMAP_DIM for the
    prompt's pooled embedding c.
    """

    def __init__(self, dim: int, hidden: int | None = None, cond_dim: int | None = None):
        super().__init__()
        hidden = hidden or min(dim, HEAD_WIDTH)
        self.stem = _conv_norm_act(dim, hidden)
        self.residual = _conv_norm_act(hidden, hidden)
        self.to_logit = nn.Conv2d(hidden, CMAP_DIM if cond_dim else 1, 1)
        self.cond_map = nn.Linear(cond_dim, CMAP_DIM) if cond_dim else None

    def forward(self, grid: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stem(grid)
        out = self.to_logit(h + self.residual(h))
        if self.cond_map is None:
            return out
        if cond is None:
            raise ValueError("a text-conditioned discriminator head needs the prompts' pooled embeddings")
        cmap = self.cond_map(cond.float())[:, :, None, None]
        return (out * cmap).sum(1, keepdim=True) / math.sqrt(CMAP_DIM)


def head_parameter_count(dim: int, hidden: int | None = None) -> int:
    """Parameters of one unconditioned head: C·h + h (stem conv) + h² + h (residual conv) + 2·2h (two
    GroupNorms) + h + 1 (logit conv) = C·h + h² + 7h + 1, with h = min(C, 1024)."""
    h = hidden or min(dim, HEAD_WIDTH)
    return dim * h + h * h + 7 * h + 1


class Discriminator(nn.Module):
    """One ``DiscriminatorHead`` per feature tap; the token grid comes from each call's latent shape."""

    def __init__(self, dim: int, num_taps: int, patch_size: Sequence[int], hidden: int | None = None,
                 cond_dim: int | None = None):
        super().__init__()
        if num_taps < 1:
            raise ValueError(f"a discriminator needs at least one feature tap, got {num_taps}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.heads = nn.ModuleList(DiscriminatorHead(dim, hidden, cond_dim) for _ in range(num_taps))

    def forward(self, features: Sequence[torch.Tensor], latent_thw: Sequence[int],
                cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per head the logits (B, T'·H'·W'), one per token; ``features`` are (B, tokens, dim) block outputs,
        ``cond`` (B, cond_dim) the prompts' pooled embeddings for text-conditioned heads."""
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature taps for {len(self.heads)} discriminator heads")
        t, h, w = token_grid(latent_thw, self.patch_size)
        frame_cond = cond.repeat_interleave(t, dim=0) if cond is not None else None  # each frame its prompt
        logits = []
        for head, feat in zip(self.heads, features):
            b, tokens, dim = feat.shape
            if tokens != t * h * w:
                raise ValueError(f"features have {tokens} tokens but the latent grid is {t}×{h}×{w} = {t * h * w}")
            # tokens are ordered (frame, row, column): each frame's tokens become a (dim, H', W') image
            frames = feat.float().reshape(b, t, h, w, dim).permute(0, 1, 4, 2, 3).reshape(b * t, dim, h, w)
            logits.append(head(frames, frame_cond).reshape(b, t * h * w))
        return logits


@contextmanager
def frozen(module: nn.Module):
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

    ``adv_sigmas``: the σ_adv to draw from (``adversarial_sigmas(grid, κ)``); σ_end is each sample's
    phase end (σ_min for DetE).  ``gan_weight`` = λ_gan scales the hinge term (1 → the paper's 0.1·5)
    and switches it and the discriminator on (> 0); ``fm_weight`` = λ_fm likewise for feature matching.
    σ_adv and ε′ come from the global torch RNG (which the loop's resume state restores).
    """

    name = "gan"

    def __init__(self, backbone: Backbone, teacher: nn.Module, adv_sigmas: Sequence[float], *, gan_weight: float,
                 fm_weight: float, disc_lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        if not len(adv_sigmas):
            raise ValueError("GanFeatureMatching needs at least one σ_adv to draw from")
        if gan_weight <= 0 and fm_weight <= 0:
            raise ValueError(f"GanFeatureMatching with gan_weight {gan_weight} and fm_weight {fm_weight}: "
                             "nothing to train (one of them must be > 0)")
        self.backbone, self.teacher = backbone, teacher
        self.gan_weight, self.fm_weight, self.max_grad_norm = gan_weight, fm_weight, max_grad_norm
        self.adv_sigmas = torch.as_tensor(list(adv_sigmas), dtype=torch.float32)
        self.discriminator = self.optimizer = None
        if gan_weight > 0:
            device = next(teacher.parameters()).device
            taps = len(backbone.feature_block_indices(teacher))
            self.discriminator = Discriminator(backbone.feature_dim(teacher), taps,
                                               backbone.token_patch(teacher)).to(device)
            self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=disc_lr, betas=DISC_BETAS,
                                               weight_decay=weight_decay)
        self._pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def draw(self, batch: ConsistencyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_adv (B,), ε′): one level per sample from ``adv_sigmas``, one noise shared by real and fake."""
        x = batch.x_end_pred
        pick = torch.randint(len(self.adv_sigmas), (x.shape[0],))
        return self.adv_sigmas[pick].to(x.device), torch.randn(x.shape).to(x.device)

    def adversarial_features(self, batch: ConsistencyBatch, drawn: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[TeacherFeatures, TeacherFeatures]:
        """Teacher features of real (x̂_tgt, no grad) and fake (x̂, with grad), both diffused with one ε′ from
        σ_end to one σ_adv per sample (``drawn``, or a fresh ``draw``), in the training autocast."""
        x_real, x_fake = batch.x_end_target.detach(), batch.x_end_pred
        sigma_adv, eps = drawn if drawn is not None else self.draw(batch)
        x_adv_real = losses.adversarial_noising(x_real, eps, sigma_adv, batch.sigma_end)
        x_adv_fake = losses.adversarial_noising(x_fake, eps, sigma_adv, batch.sigma_end)
        with batch.autocast():
            with torch.no_grad():
                _, feat_real = self.backbone.predict(self.teacher, x_adv_real, sigma_adv, batch.cond, features=True)
            _, feat_fake = self.backbone.predict(self.teacher, x_adv_fake, sigma_adv, batch.cond, features=True)
        return feat_real.detach(), feat_fake

    def grad_networks(self) -> list[nn.Module]:
        return [self.teacher]  # the fake features' forward runs with grad

    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        feat_real, feat_fake = self.adversarial_features(batch)
        L_hinge = L_FM = None
        if self.discriminator is not None:
            self._pending[id(batch)] = (feat_real.taps, feat_fake.detach().taps)
            with frozen(self.discriminator):
                L_hinge = losses.generator_hinge(self.discriminator(feat_fake, feat_fake.latent_thw))
        if self.fm_weight > 0:
            with batch.autocast():
                proj_fake = self.backbone.project_features(self.teacher, feat_fake)
                with torch.no_grad():
                    proj_real = self.backbone.project_features(self.teacher, feat_real)
            L_FM = losses.feature_matching(proj_fake, proj_real)
        return losses.dete_generator_loss(L_hinge, L_FM, self.gan_weight, self.fm_weight)

    def after_generator_step(self, batch: ConsistencyBatch) -> dict[str, float]:
        """One D step on the batch's real features and its detached fakes (hinge, clip 1.0, AdamW)."""
        if self.discriminator is None:
            return {}
        pending = self._pending.pop(id(batch), None)
        if pending is None:
            with torch.no_grad():
                feat_real, feat_fake = self.adversarial_features(batch)
            pending = (feat_real.taps, feat_fake.detach().taps)
        feat_real, feat_fake = pending
        thw = batch.x_end_pred.shape[2:]
        self.optimizer.zero_grad(set_to_none=True)
        D_real = self.discriminator(feat_real, thw)
        D_fake = self.discriminator(feat_fake, thw)
        loss = losses.discriminator_hinge(D_real, D_fake)
        loss.backward()
        distributed.average_gradients(list(self.discriminator.parameters()))
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return {"d_loss": float(loss.detach()),
                "d_real": float(torch.stack([r.detach().mean() for r in D_real]).mean()),
                "d_fake": float(torch.stack([f.detach().mean() for f in D_fake]).mean())}

    def state_dict(self) -> dict:
        if self.discriminator is None:
            return {}
        return {"heads": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state or self.discriminator is None:
            return
        self.discriminator.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])


def dete_objective(backbone: Backbone, dete, grid: TeacherGrid, kappa: int, training) -> GanFeatureMatching | None:
    """The adversarial objective of ``methods.<m>.dete`` (``DeteConfig``) on the frozen teacher: the hinge
    term when ``gan_weight > 0``, feature matching when ``fm_weight > 0``; None when both are 0 (the
    ablation rows od, od_pe, od_pe_tc)."""
    if dete.gan_weight <= 0 and dete.fm_weight <= 0:
        return None
    return GanFeatureMatching(backbone, backbone.transformer, adversarial_sigmas(grid, kappa),
                              gan_weight=dete.gan_weight, fm_weight=dete.fm_weight, disc_lr=dete.disc_lr,
                              weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm)
