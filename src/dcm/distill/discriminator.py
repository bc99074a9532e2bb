"""DetE's adversarial training: discriminator heads on frozen-teacher features, hinge GAN and feature
matching.

METHODS.md (DetE), as the official code does it: real = the consistency target x̂_tgt, fake = the
student endpoint x̂; both are forward-diffused with the same noise ε′ from σ_end to σ_adv,

    σ_adv ~ U{σ_min, σ_0, …, σ_{κ−1}}     (sigmas_prev[U[0, κ+1)]: the x_{n−1} levels of DetE's n)
    x_adv = ((1 − σ_adv)·x + (σ_adv − σ_end)·ε′)/(1 − σ_end)

the frozen teacher at t_adv gives features from every 2nd block (under the training autocast); one
head per tap scores each frame's token grid; feature matching compares the taps after the teacher's
output head at t_adv (modulation included), unpatchified to latent space.  The loss equations live in
``dcm.distill.losses``:

    L_D = Σ_h [relu(1 + D_h(fake)) + relu(1 − D_h(real))] / H
    L_G = 0.1 · (5 · λ_gan · Σ_h relu(1 − D_h(fake)) / H + λ_fm · mse(feat_fake, feat_real))

Generator step then discriminator step (1:1); D: AdamW, betas (0, 0.999), gradient clipped at
``training.max_grad_norm`` (official: 1.0).  The hinge term
(and D) is on when λ_gan > 0, feature matching when λ_fm > 0, independently.

Variants (``DeteConfig``, issue 15; each default is the paper's, and leaves the path above bit for bit):

- ``disc_warmup`` W: for steps < W only D trains; the generator's hinge term is off (FM as configured).
- ``disc_steps`` k: k D optimiser steps per generator step (per micro-batch).  The first uses the
  generator pass's features; each further one re-noises the same real and (detached) fake endpoints
  with a fresh σ_adv and ε′ and runs the teacher again (no grad).
- ``hinge_margin`` τ: the generator's hinge switches on, and stays on, once D's margin m exceeds τ.
  m is a running mean over D steps of Δ = mean_h [mean D_h(real) − mean D_h(fake)] (logits averaged
  over samples and tokens, i.e. the logged ``d_real − d_fake``), measured on each D step's own batch
  before its update: m₁ = Δ₁, m_j = 0.9·m_{j−1} + 0.1·Δ_j (``MARGIN_DECAY``); at step s the gate
  reads m after all D steps of steps < s.
- ``real``: what D calls real and feature matching pulls toward.  ``target`` (paper): x̂_tgt.
  ``ema``: the endpoint of an EMA copy of DetE's trainable parameters from the fake's own x_n,
  x̂_EMA = x_n + (σ_end − σ_n)·v_θEMA(x_n, t_n), θ_EMA ← decay·θ_EMA + (1 − decay)·θ after
  each generator step (decay = ``training.ema_decay``; θ_EMA starts at θ and is resume state).
  ``trajectory``: the cached teacher trajectory's point at σ_end (σ_min for DetE) of the batch's
  trajectory, re-noised with the same σ_adv and ε′ as the fake (``training.source: cached`` only).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dcm import distributed
from dcm.backbones.base import Backbone, TeacherFeatures, token_grid
from dcm.config import ConfigError
from dcm.distill import losses
from dcm.distill.loop import ConsistencyBatch, Objective
from dcm.distill.optim import adamw
from dcm.parallel.context import gather_taps
from dcm.schedule import SIGMA_MIN_INDEX, TeacherGrid

DISC_BETAS = (0.0, 0.999)
# the official head width is 1024 whatever C (Vchitect/DCM fastvideo/distill/discriminator*.py:
# inner_channel = 1024); here min(C, 1024): 1024 on every real backbone (C = 1536 Wan 1.3B, 3072 HunyuanVideo,
# 1920/3072 CogVideoX), C on a narrower model (the shapes toy: C = 384, heads no wider than their input)
HEAD_WIDTH = 1024
LEAKY_SLOPE = 0.01
CMAP_DIM = 64  # width of a text-conditioned head's projection (MCM / StyleGAN-T's cmap_dim)
REALS = ("target", "ema", "trajectory")  # DeteConfig.real
MARGIN_DECAY = 0.9  # running mean of D's margin (hinge_margin)


def adversarial_sigmas(grid: TeacherGrid, kappa: int) -> list[float]:
    """The σ_adv DetE draws from: sigmas_prev[0..κ] = [σ_min, σ_0, …, σ_{κ−1}] (official:
    U[0, κ+1))."""
    return [grid.sigma(n) for n in range(SIGMA_MIN_INDEX, kappa)]


def group_count(channels: int, most: int = 32) -> int:
    """GroupNorm groups: 32, or the largest divisor of ``channels`` not above 32."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _conv_norm_act(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.GroupNorm(group_count(c_out), c_out),
                         nn.LeakyReLU(LEAKY_SLOPE))


class DiscriminatorHead(nn.Module):
    """h = act(GN(conv(x))); h = h + act(GN(conv(h))); logit = conv(h): one logit per token; width
    min(C, 1024) (official: 1024, the same for every C ≥ 1024; ``HEAD_WIDTH``).

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
        """Per head the logits (B, T'·H'·W'), one per token; ``features`` are (B, tokens, dim) block
        outputs, ``cond`` (B, cond_dim) the prompts' pooled embeddings for text-conditioned heads."""
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature taps for {len(self.heads)} discriminator heads")
        t, h, w = token_grid(latent_thw, self.patch_size)
        frame_cond = cond.repeat_interleave(t, dim=0) if cond is not None else None  # each frame its prompt
        logits = []
        for head, feat in zip(self.heads, features):
            b, tokens, dim = feat.shape
            if tokens != t * h * w:
                raise ValueError(f"features have {tokens} tokens but the latent grid is {t}×{h}×{w} = "
                                 f"{t * h * w}")
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


# |mean L_D − 2| and |mean D(real) − D(fake)| below this: the heads do not separate
CHANCE_TOLERANCE = 0.05


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

    The variants (module docstring): ``disc_warmup``, ``disc_steps``, ``hinge_margin`` (need the
    discriminator, gan_weight > 0) and ``real``; ``real="ema"`` needs the student (``bind_student``, or
    ``student=`` here), ``real="trajectory"`` the cached batch source wrapped by ``watch_source``.

    Over ranks (``training.parallel``): σ_adv and ε′ are drawn for the whole global batch from the global
    torch RNG, which every rank seeds and advances alike, and each rank keeps its micro-batch's rows
    (``ConsistencyBatch.data_rank``), so a run's draws do not depend on the number of ranks and one
    process draws exactly what it always drew.  Under context parallelism the teacher's taps are
    gathered, so the heads and feature matching see the whole token grid; D's margin (``hinge_margin``)
    is the global batch's.
    """

    name = "gan"
    supports_context_parallel = True

    def __init__(self, backbone: Backbone, teacher: nn.Module, adv_sigmas: Sequence[float], *,
                 gan_weight: float, fm_weight: float, disc_lr: float, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0, disc_warmup: int = 0, disc_steps: int = 1,
                 hinge_margin: float | None = None, real: str = "target", student: nn.Module | None = None,
                 trainable: Sequence[nn.Parameter] | None = None, ema_decay: float = 0.95):
        if not len(adv_sigmas):
            raise ValueError("GanFeatureMatching needs at least one σ_adv to draw from")
        if gan_weight <= 0 and fm_weight <= 0:
            raise ValueError(f"GanFeatureMatching with gan_weight {gan_weight} and fm_weight {fm_weight}: "
                             "nothing to train (one of them must be > 0)")
        if real not in REALS:
            raise ValueError(f"GanFeatureMatching real must be one of {REALS}, got {real!r}")
        if disc_steps < 1 or disc_warmup < 0:
            raise ValueError(f"GanFeatureMatching needs disc_steps >= 1 and disc_warmup >= 0, got "
                             f"{disc_steps}, {disc_warmup}")
        variants = {"disc_warmup": (disc_warmup, 0), "disc_steps": (disc_steps, 1),
                    "hinge_margin": (hinge_margin, None)}
        moved = {k: v for k, (v, default) in variants.items() if v != default}
        if gan_weight <= 0 and moved:
            raise ValueError(f"GanFeatureMatching with gan_weight {gan_weight} has no discriminator: {moved} "
                             "would change nothing")
        self.backbone, self.teacher = backbone, teacher
        self.gan_weight, self.fm_weight, self.max_grad_norm = gan_weight, fm_weight, max_grad_norm
        self.disc_warmup, self.disc_steps, self.hinge_margin, self.real = (disc_warmup, disc_steps,
                                                                           hinge_margin, real)
        self.adv_sigmas = torch.as_tensor(list(adv_sigmas), dtype=torch.float32)
        self.discriminator = self.optimizer = None
        if gan_weight > 0:
            device = next(teacher.parameters()).device
            taps = len(backbone.feature_block_indices(teacher))
            self.discriminator = Discriminator(backbone.feature_dim(teacher), taps,
                                               backbone.token_patch(teacher)).to(device)
            self.optimizer = adamw(self.discriminator.parameters(), lr=disc_lr, betas=DISC_BETAS,
                                               weight_decay=weight_decay)
        # per micro-batch, from the generator pass to the D step: real and fake taps, real and fake endpoints
        self._pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor,
                                       torch.Tensor]] = {}
        self.margin: float | None = None  # D's running margin (hinge_margin)
        self.hinge_open = hinge_margin is None  # the margin gate, latched once open
        self._hinge_on_at: dict[int, bool] = {}  # per step: was the generator's hinge on
        self.student = None
        self.ema: dict[str, nn.Parameter] = {}  # real="ema": θ_EMA by the student's parameter names
        self.ema_decay = ema_decay
        self._trainable: list[tuple[str, nn.Parameter]] = []
        self._ema_step: int | None = None
        self._trajectories: TrajectoryEndpoints | None = None
        if student is not None:
            self.bind_student(student, trainable)

    # ------------------------------------------------------------------ the real side's sources
    def bind_student(self, student: nn.Module, trainable: Sequence[nn.Parameter] | None = None) -> None:
        """real="ema": the student whose trainable parameters (default: those with requires_grad) get an
        EMA copy, initialised to their current values."""
        if self.real != "ema":
            return
        wanted = (list(trainable) if trainable is not None
                  else [p for p in student.parameters() if p.requires_grad])
        names = {id(p): n for n, p in student.named_parameters()}
        missing = [i for i, p in enumerate(wanted) if id(p) not in names]
        if missing or not wanted:
            raise ValueError(f"real 'ema': trainable parameters {missing[:3]} are not parameters of the "
                             "student" if missing else "real 'ema': the student has no trainable parameters")
        self.student = student
        self._trainable = [(names[id(p)], p) for p in wanted]
        self.ema = {n: nn.Parameter(p.detach().clone(), requires_grad=False) for n, p in self._trainable}

    def watch_source(self, source):
        """The batch source to train with: ``source`` itself, or for real="trajectory" a
        ``TrajectoryEndpoints`` around it (a cached source; it records each micro-batch's trajectory
        rows)."""
        if self.real != "trajectory":
            return source
        self._trajectories = TrajectoryEndpoints(source)
        return self._trajectories

    def update_ema(self, step: int) -> None:
        """θ_EMA ← decay·θ_EMA + (1 − decay)·θ, once per generator step (after the student's optimiser
        step)."""
        if not self.ema or self._ema_step == step:
            return
        self._ema_step = step
        with torch.no_grad():
            for name, p in self._trainable:
                self.ema[name].lerp_(p.detach(), 1.0 - self.ema_decay)

    @torch.no_grad()
    def ema_endpoint(self, batch: ConsistencyBatch) -> torch.Tensor:
        """x̂_EMA = x_n + (σ_end − σ_n)·v_θEMA(x_n, t_n): the EMA student's endpoint from the fake's own
        x_n."""
        if self.student is None:
            raise RuntimeError("real 'ema' needs the student: GanFeatureMatching.bind_student(student, "
                               "trainable) (dete_objective(..., student=...))")
        with parameters_swapped(self.student, self.ema), batch.autocast():
            v = self.backbone.predict(self.student, batch.x_n, batch.sigma_n, batch.cond)
        return losses.euler_endpoint(batch.x_n, v.float(), batch.sigma_n, batch.sigma_end)

    def real_endpoint(self, batch: ConsistencyBatch) -> torch.Tensor:
        """The clean point D calls real (no grad): x̂_tgt, the EMA student's endpoint, or the trajectory's
        σ_end point."""
        if self.real == "ema":
            return self.ema_endpoint(batch)
        if self.real == "trajectory":
            if self._trajectories is None:
                raise RuntimeError("real 'trajectory' reads the cached trajectories: train with the source "
                                   "GanFeatureMatching.watch_source(source) returns")
            return self._trajectories.endpoints(batch)
        return batch.x_end_target.detach()

    def hinge_on(self, step: int) -> bool:
        """Is the generator's hinge term on at ``step``: past the warm-up and the margin gate open."""
        return self.discriminator is not None and step >= self.disc_warmup and self.hinge_open

    def check_parallel(self, dims) -> None:
        super().check_parallel(dims)
        if self.real == "ema" and dims.sharded:
            raise ConfigError("training.parallel.strategy", dims.strategy,
                              "'ddp' with dete.real 'ema': the EMA copy of DetE's parameters is kept whole "
                              "and swapped into the student, which a sharded (FSDP2) student does not allow")

    def draw(self, batch: ConsistencyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_adv (B,), ε′): one level per sample from ``adv_sigmas``, one noise shared by real and fake.
        Drawn for the global batch (``batch.data_size`` micro-batches of B), this rank's rows kept: the same
        draws at any number of ranks (the global RNG is seeded and advanced alike on every rank)."""
        x = batch.x_end_pred
        b, size = x.shape[0], batch.data_size
        pick = torch.randint(len(self.adv_sigmas), (b * size,))
        eps = torch.randn((b * size, *x.shape[1:]))
        if size > 1:
            rows = slice(batch.data_rank * b, (batch.data_rank + 1) * b)
            pick, eps = pick[rows], eps[rows]
        return self.adv_sigmas[pick].to(x.device), eps.to(x.device)

    def adversarial_features(self, batch: ConsistencyBatch,
                             drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
                             x_real: torch.Tensor | None = None, x_fake: torch.Tensor | None = None
                             ) -> tuple[TeacherFeatures, TeacherFeatures]:
        """Teacher features of real (``real_endpoint``, no grad) and fake (x̂, with grad), both diffused
        with one ε′ from σ_end to one σ_adv per sample (``drawn``, or a fresh ``draw``), in the training
        autocast.  ``x_real``/``x_fake`` replace the batch's endpoints (a further D step re-noises the same
        ones)."""
        x_real = self.real_endpoint(batch) if x_real is None else x_real
        x_fake = batch.x_end_pred if x_fake is None else x_fake
        sigma_adv, eps = drawn if drawn is not None else self.draw(batch)
        x_adv_real = losses.adversarial_noising(x_real, eps, sigma_adv, batch.sigma_end)
        x_adv_fake = losses.adversarial_noising(x_fake, eps, sigma_adv, batch.sigma_end)
        with batch.autocast():
            with torch.no_grad():
                _, feat_real = self.backbone.predict(self.teacher, x_adv_real, sigma_adv, batch.cond,
                                                     features=True)
                feat_real.taps = gather_taps(self.teacher, feat_real.taps)  # context parallel: the whole grid
            _, feat_fake = self.backbone.predict(self.teacher, x_adv_fake, sigma_adv, batch.cond,
                                                 features=True)
            feat_fake.taps = gather_taps(self.teacher, feat_fake.taps)
        return feat_real.detach(), feat_fake

    def grad_networks(self) -> list[nn.Module]:
        return [self.teacher]  # the fake features' forward runs with grad

    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        hinge = self.hinge_on(batch.step)
        self._hinge_on_at = {batch.step: hinge}
        x_real = self.real_endpoint(batch)
        if hinge or self.fm_weight > 0:
            feat_real, feat_fake = self.adversarial_features(batch, x_real=x_real)
        else:  # D warming up and no feature matching: nothing backpropagates through the fake pass
            with torch.no_grad():
                feat_real, feat_fake = self.adversarial_features(batch, x_real=x_real)
        L_hinge = L_FM = None
        if self.discriminator is not None:
            self._pending[id(batch)] = (feat_real.taps, feat_fake.detach().taps, x_real,
                                        batch.x_end_pred.detach())
            if hinge:
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
        """``disc_steps`` D steps on the batch's real features and its detached fakes (hinge, gradient clipped
        at ``max_grad_norm``, AdamW): the first on the generator pass's features, each further one on a
        fresh σ_adv and ε′.  Also the EMA of real="ema" (once per step) and the margin gate of
        ``hinge_margin``."""
        self.update_ema(batch.step)
        if self.discriminator is None:
            return {}
        pending = self._pending.pop(id(batch), None)
        if pending is None:
            with torch.no_grad():
                x_real = self.real_endpoint(batch)
                feat_real, feat_fake = self.adversarial_features(batch, x_real=x_real)
            pending = (feat_real.taps, feat_fake.detach().taps, x_real, batch.x_end_pred.detach())
        feat_real, feat_fake, x_real, x_fake = pending
        thw = batch.x_end_pred.shape[2:]
        steps = [self._discriminator_step(feat_real, feat_fake, thw)]
        for _ in range(self.disc_steps - 1):
            with torch.no_grad():
                real, fake = self.adversarial_features(batch, x_real=x_real, x_fake=x_fake)
            steps.append(self._discriminator_step(real.taps, fake.taps, thw))
        logged = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
        if self.disc_warmup > 0 or self.hinge_margin is not None:
            logged["g_hinge_on"] = float(self._hinge_on_at.get(batch.step, self.hinge_on(batch.step)))
        if self.hinge_margin is not None:
            logged["margin"] = self.margin
        return logged

    def _update_margin(self, delta: float) -> None:
        """m ← Δ (first D step), then m ← 0.9·m + 0.1·Δ; the gate latches open once m >
        hinge_margin."""
        if self.hinge_margin is None:
            return
        self.margin = (delta if self.margin is None
                       else MARGIN_DECAY * self.margin + (1 - MARGIN_DECAY) * delta)
        self.hinge_open = self.hinge_open or self.margin > self.hinge_margin

    def _discriminator_step(self, feat_real: list[torch.Tensor], feat_fake: list[torch.Tensor],
                            thw: Sequence[int]) -> dict[str, float]:
        """One D optimiser step on real and (detached) fake taps; the margin is measured before the update."""
        self.optimizer.zero_grad(set_to_none=True)
        D_real = self.discriminator(feat_real, thw)
        D_fake = self.discriminator(feat_fake, thw)
        loss = losses.discriminator_hinge(D_real, D_fake)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.max_grad_norm)
        self.optimizer.step()
        means = torch.stack([torch.stack([r.detach().mean() for r in D_real]).mean(),
                             torch.stack([f.detach().mean() for f in D_fake]).mean()])
        # the gate reads the global batch's margin; context-parallel ranks hold equal values, so the mean
        # over all ranks is the data ranks' mean; reduced on D's device (NCCL reduces CUDA tensors only)
        if self.hinge_margin is not None and distributed.world().size > 1:
            means = means.float()
            torch.distributed.all_reduce(means)
            means /= distributed.world().size
        d_real, d_fake = float(means[0]), float(means[1])
        self._update_margin(d_real - d_fake)
        return {"d_loss": float(loss.detach()), "d_real": d_real, "d_fake": d_fake}

    def state_dict(self) -> dict:
        """D's heads and optimiser; with hinge_margin the running margin and the gate; with real="ema"
        θ_EMA."""
        state = {}
        if self.discriminator is not None:
            state.update(heads=self.discriminator.state_dict(), optimizer=self.optimizer.state_dict())
        if self.hinge_margin is not None:
            state["margin"] = {"value": self.margin, "open": self.hinge_open}
        if self.real == "ema":
            state["ema"] = {n: p.detach().cpu().clone() for n, p in self.ema.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["heads"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.hinge_margin is not None and "margin" in state:
            self.margin, self.hinge_open = state["margin"]["value"], bool(state["margin"]["open"])
        if self.real == "ema" and "ema" in state:
            if set(state["ema"]) != set(self.ema):
                raise ValueError(f"real 'ema': the resume state's EMA has parameters "
                                 f"{sorted(state['ema'])[:3]}…, the student {sorted(self.ema)[:3]}…")
            with torch.no_grad():
                for name, value in state["ema"].items():
                    self.ema[name].copy_(value)


class TrajectoryEndpoints:
    """A cached batch source that remembers which stored trajectories each micro-batch came from, so the
    objective can read the trajectory's own point at the phase end (real="trajectory").

    Batches are recognised by their x_n tensor (the loop hands the source's ``x_n`` on in its
    ``ConsistencyBatch``); the last ``keep`` micro-batches are remembered.
    """

    def __init__(self, source, keep: int = 16):
        kind = getattr(source, "kind", None)
        if kind != "cached" or not hasattr(source, "points"):
            raise ConfigError("training.source", kind, "cached: real 'trajectory' reads the cached teacher "
                              "trajectories' σ_end points (the online source has none)")
        self.source, self.keep = source, keep
        self._rows: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator, **kwargs):
        data = self.source.batch(rows, n, generator, **kwargs)  # kwargs: the loop's prompt dropout
        self._rows[id(data.x_n)] = (data.x_n, rows.detach().cpu().clone())
        while len(self._rows) > self.keep:
            self._rows.popitem(last=False)
        return data

    def endpoints(self, batch: ConsistencyBatch) -> torch.Tensor:
        """float32 (B, C, T, H, W): each sample's stored trajectory point at its σ_end (DetE: σ_min)."""
        entry = self._rows.get(id(batch.x_n))
        if entry is None or entry[0] is not batch.x_n:
            raise RuntimeError("real 'trajectory': this batch's x_n did not come from the watched source "
                               "(train with the source GanFeatureMatching.watch_source returned)")
        index = self.source.grid_index(batch.sigma_end)
        return self.source.points(entry[1], index).to(batch.x_n.device)


@contextmanager
def parameters_swapped(module: nn.Module, values: dict[str, nn.Parameter]) -> Iterator[None]:
    """``module``'s parameters named in ``values`` replaced by those tensors for the block (the originals are
    untouched, so a graph that holds them stays valid), restored afterwards."""
    saved = []
    try:
        for name, value in values.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        yield
    finally:
        for owner, leaf, original in reversed(saved):
            owner._parameters[leaf] = original


def check_variants(dete, training, key: str = "dete") -> None:
    """Combinations of ``DeteConfig`` with other sections that cannot train (a ConfigError before any
    work)."""
    if dete.real == "trajectory" and training.source != "cached":
        raise ConfigError(f"{key}.real", dete.real,
                          f"'target' or 'ema' with training.source: {training.source} (the online source "
                          "noises data latents: there is no cached teacher trajectory whose σ_end point "
                          "could be the real; use training.source: cached)")
    if dete.gan_weight <= 0:
        for name, default in (("disc_warmup", 0), ("disc_steps", 1), ("hinge_margin", None)):
            if getattr(dete, name) != default:
                raise ConfigError(f"{key}.{name}", getattr(dete, name),
                                  f"{default!r} with gan_weight {dete.gan_weight} (no discriminator to "
                                  "warm up, step or gate)")
    if dete.gan_weight <= 0 and dete.fm_weight <= 0 and dete.real != "target":
        raise ConfigError(f"{key}.real", dete.real,
                          "'target' with gan_weight and fm_weight 0 (nothing reads the real)")


def dete_objective(backbone: Backbone, dete, grid: TeacherGrid, kappa: int, training,
                   student: nn.Module | None = None, trainable: Sequence[nn.Parameter] | None = None
                   ) -> GanFeatureMatching | None:
    """The adversarial objective of ``methods.<m>.dete`` (``DeteConfig``) on the frozen teacher: the hinge
    term when ``gan_weight > 0``, feature matching when ``fm_weight > 0``; None when both are 0 (the
    ablation rows od, od_pe, od_pe_tc).  The variants (``disc_warmup``, ``disc_steps``, ``hinge_margin``,
    ``real``) as configured; ``student``/``trainable`` feed real="ema" (``bind_student``), and the stage
    passes its batch source through ``watch_source`` (real="trajectory")."""
    check_variants(dete, training)
    if dete.gan_weight <= 0 and dete.fm_weight <= 0:
        return None
    return GanFeatureMatching(backbone, backbone.expert_transformer("dete"), adversarial_sigmas(grid, kappa),
                              gan_weight=dete.gan_weight, fm_weight=dete.fm_weight, disc_lr=dete.disc_lr,
                              weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm,
                              disc_warmup=dete.disc_warmup, disc_steps=dete.disc_steps,
                              hinge_margin=dete.hinge_margin, real=dete.real, student=student,
                              trainable=trainable, ema_decay=training.ema_decay)
