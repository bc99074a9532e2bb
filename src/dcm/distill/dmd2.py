"""DMD2 (Improved Distribution Matching Distillation, Yin et al., arXiv 2405.14867) on the one distillation
loop.

A few-step generator G (the student, initialised from the teacher) at fixed timesteps t_0 > … > t_{K−1}
(the row's sampling schedule: ``generator_schedule``, evenly spaced training timesteps on the unshifted
scale, then shifted, as DMD2 and FastVideo place them), trained so that the distribution of its samples
matches the guided teacher's.  The parts, each passed into the loop as its data:

- Backward simulation (``BackwardSimulation``, the loop's batch source): the generator's input at its
  step k is made by the CURRENT generator's own k-step sampling from fresh noise, without grad (LCM's
  multistep sampler, ``dcm.sampling.sample_lcm``: predict x0, re-noise to the next σ), so training sees
  exactly the inputs inference gives it.  k is uniform over the K steps, per sample (the loop draws
  n from K one-index phases, ``generator_phases``).
- Real score: the frozen teacher with its guidance (CFG, or HunyuanVideo's embedded scale).
- Fake score μ_fake: a copy of the teacher trained online by flow matching on the generator's samples
  (σ uniform over the teacher's 1000 shifted training sigmas), ``fake_steps`` updates per generator
  update with its own AdamW (the two time-scale update rule; official 5).
- Distribution matching (``losses.distribution_matching_gradient`` / ``_loss``): at
  x_t = (1−σ_t)·x0_gen + σ_t·ε, σ_t a training sigma (uniform on the unshifted scale) clamped to
  [t_min, t_max] after the shift (``DistributionMatching.dm_sigmas``),

      grad = (x0_fake − x0_real) / mean|x0_gen − x0_real|    L_DM = 0.5·mse(x0_gen, (x0_gen − grad).detach())

- Optional GAN classifier (``gan_weight`` > 0): a head on the fake score's middle-block features of
  noised samples (σ uniform over the training sigmas, DMD2's "diffusion GAN"), real = the world's
  videos; L_G = softplus(−D(fake)) for the generator, softplus(D(fake)) + softplus(−D(real)) in the
  fake score's update (weight ``cls_weight``), which trains head and fake score together as DMD2 does.

Over ranks (``training.parallel``): every draw (the loop's rows and steps, the simulation's noise, t, ε,
the fake score's extra samples and the classifier's real rows) is made for the global batch from one
stream that every rank advances alike, each data rank keeping its rows, so a run at N ranks computes what
one process computes with the same global batch.  Under fsdp/hsdp the fake score is sharded like the
student (``parallelize``) and the backward simulation runs the sharded student as often on every rank.

Simplified against the paper / official code (README, "DMD2"): the classifier is DetE's head
(``discriminator.DiscriminatorHead``: one logit per token) on ONE tap, not a conv tower to one logit
per image on a UNet bottleneck; clipping, weight decay and the constant lr are the loop's shared
``training`` settings (official: clip 10, weight decay 0.01, 500 warm-up steps); no separate prompt
stream for the fake score (its extra updates draw prompts from the same training rows).  DMD2 has no
consistency loss: ``NoConsistencyLoss`` makes the loop's consistency term exactly 0, and the loop's
no-grad target forward is one wasted student forward per micro-batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dcm import io, paths, schedule
from dcm.backbones.base import Backbone, PromptEmbeds, enable_activation_checkpointing
from dcm.config import ConfigError, Params
from dcm.distill import losses
from dcm.distill.data import OnlineSource, SourceBatch
from dcm.distill.discriminator import Discriminator
from dcm.distill.loop import ADAM_BETAS, ConsistencyBatch, ConsistencySpace, Objective, Wrap, autocast_for
from dcm.distill.mcm import student_x0
from dcm.distill.optim import adamw
from dcm.distill.teacher_pretraining import flow_matching_loss
from dcm.parallel import fsdp
from dcm.parallel.checkpoint import load_optimizer_state
from dcm.parallel.context import gather_taps
from dcm.sampling import sample_lcm, teacher_velocity
from dcm.schedule import SIGMA_MIN_INDEX, Phase, SamplingStep, TeacherGrid, noised

RNG_SALT = 0x444D4432  # "DMD2": the objective's own stream, apart from the loop's and the sampler's

#: (data_rank, data_size): this rank's rows [data_rank·B, (data_rank + 1)·B) of a global batch of data_size·B
Part = tuple[int, int]
ONE_PROCESS: Part = (0, 1)


def own_rows(part: Part, batch: int) -> slice:
    """This rank's ``batch`` rows of a global batch of ``batch × data_size``."""
    return slice(part[0] * batch, (part[0] + 1) * batch)


def draw_global(draw, batch: int, part: Part) -> torch.Tensor:
    """``draw(n)`` (a tensor of n rows) for the global batch of ``batch × data_size`` rows, this rank's
    ``batch`` rows kept: the same values at any number of ranks (one process: exactly ``draw(batch)``)."""
    drawn = draw(batch * part[1])
    return drawn if part[1] == 1 else drawn[own_rows(part, batch)]


# ------------------------------------------------------------------------------ the generator's steps


def generator_grid(num_train_timesteps: int, shift: float) -> TeacherGrid:
    """The grid DMD2's generator lives on: the teacher scheduler's ``num_train_timesteps`` training sigmas
    (position i ↔ σ = shift((i + 1)/T), the DDPM-style timestep index i of the official code), with σ = 0
    below them as the end point, so the student's endpoint there is its x0 itself.  Not the teacher grid:
    DMD2 spaces its steps evenly over the training timesteps, which the 50-point grid cannot hold (4 steps:
    positions 749 and 249 are not on it)."""
    return TeacherGrid(sigmas=schedule.training_sigmas(num_train_timesteps, shift), sigma_min=0.0)


def generator_schedule(num_train_timesteps: int, shift: float, steps: int,
                       expert: str = "student") -> list[SamplingStep]:
    """DMD2's K generator timesteps, chosen on the unshifted scale and then shifted: positions
    t_k = T − 1 − k·⌊T/K⌋ (the official ``range(T − 1, 0, −T//K)``: 4 steps → 999, 749, 499, 249), each
    at its training sigma σ_k = shift((t_k + 1)/T), i.e. the shifted images of u = 1, 0.75, 0.5, 0.25
    (FastVideo's ``warp_denoising_step``: ``scheduler.timesteps[1000 − t]`` for t = 1000, 750, 500, 250).
    On a shift-17 grid the 4 steps are σ = 1, 0.981, 0.944, 0.850 (the last step then goes to 0, as in
    DMD2 and FastVideo)."""
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"DMD2 needs 1 to {T} generator steps, got {steps}")
    sigmas = schedule.training_sigmas(T, shift)
    return [SamplingStep(float(sigmas[T - 1 - k * (T // steps)]), expert) for k in range(steps)]


def generator_indices(grid: TeacherGrid, steps: Sequence[SamplingStep], key: str = "schedule") -> list[int]:
    """The generator-grid index of each generator timestep (the sampling schedule, highest σ first).

    The loop draws grid indices, so every step must lie on ``grid`` (``generator_grid``: the training
    sigmas; a derived schedule always does, an explicit ``methods.<m>.schedule`` must name training
    timesteps, t = 1000·σ to 1e-3)."""
    indices = []
    for step in steps:
        hits = np.flatnonzero(np.isclose(grid.sigmas, step.sigma, rtol=0, atol=1e-6))
        if not len(hits):
            near = grid.sigmas[np.argsort(np.abs(grid.sigmas - step.sigma))[:2]]
            raise ConfigError(key, [round(s.sigma, 6) for s in steps],
                              f"sigmas of the teacher scheduler's training timesteps (grid.shift, "
                              f"grid.num_train_timesteps): {step.sigma:.6g} is not one (nearest: "
                              f"{', '.join(f'{v:.6g}' for v in sorted(near))})")
        indices.append(int(hits[0]))
    return indices


def generator_phases(indices: Sequence[int]) -> list[Phase]:
    """One single-index phase per generator step: the loop draws n uniformly over the K steps, and the
    student's endpoint is taken to σ_min, from which its x0 is recovered exactly (``mcm.student_x0``)."""
    return [Phase(first=n, last=n, end=SIGMA_MIN_INDEX) for n in sorted(indices)]


class NoConsistencyLoss(ConsistencySpace):
    """DMD2 has no consistency loss: both endpoints map to one point, so the loop's term is exactly 0
    (no grad)."""

    name = "none"

    def student(self, x_end_pred: torch.Tensor) -> torch.Tensor:
        return x_end_pred.new_zeros((x_end_pred.shape[0], 1)).detach()

    def target(self, x_end_target: torch.Tensor) -> torch.Tensor:
        return x_end_target.new_zeros((x_end_target.shape[0], 1))


def prompt_embeddings(backbone: Backbone, prompts: Sequence[str]) -> PromptEmbeds:
    """Each row's prompt embedding, every distinct prompt encoded once."""
    unique = sorted(set(prompts))
    slot = {p: i for i, p in enumerate(unique)}
    with torch.no_grad():
        return backbone.encode_prompts(unique).index(torch.tensor([slot[p] for p in prompts]))


# ---------------------------------------------------------------------------- backward simulation


class BackwardSimulation:
    """The generator's inputs: for a row at generator step k (index n_k of ``grid``, the generator's own:
    ``generator_grid``), fresh noise ε at t_0 run
    through the current generator's first k steps of LCM sampling (no grad), ending re-noised to σ_{n_k}
    with fresh noise; k = 0 is the noise itself.  All draws come from the generator the caller passes
    (the loop's sampler), so a resumed run replays them.  ``x_prev`` = ``x_n``: no teacher step exists.
    Every batch reports how many samples sat at each step (``counts``: step0 … step{K−1}).

    ``batch(..., part=(data_rank, data_size))`` takes the global batch's rows and steps, draws for all of
    them and simulates this rank's; it runs the generator for every step count any rank needs (on a
    throw-away row where this rank has none), so a sharded (FSDP2) generator sees the same passes on
    every rank."""

    kind = "backward_simulation"
    draws_global_batch = True  # the loop hands ``batch`` the global batch and this rank's part
    own_grid = True  # its indices are ``grid``'s (``generator_grid``), not the teacher grid's

    def __init__(self, backbone: Backbone, student: nn.Module, embeds: PromptEmbeds, grid: TeacherGrid,
                 steps: Sequence[SamplingStep], latent_shape: Sequence[int],
                 device: torch.device | str = "cpu"):
        self.backbone, self.student, self.steps = backbone, student, list(steps)
        self.device = torch.device(device)
        self.embeds = embeds.to(self.device)
        self.grid_sigmas = grid.extended
        self.indices = generator_indices(grid, self.steps)
        self.step_of = {n: k for k, n in enumerate(self.indices)}
        self.latent_shape = tuple(latent_shape)
        self.autocast = autocast_for(self.device)

    def __len__(self) -> int:
        return len(self.embeds)

    def sigma(self, n: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.grid_sigmas[(n + 1).numpy()], dtype=torch.float32, device=self.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        with self.autocast():
            return self.backbone.predict(self.student, x, sigma, cond).float()

    @torch.no_grad()
    def batch(self, rows: torch.Tensor, n: torch.Tensor, generator: torch.Generator,
              part: Part = ONE_PROCESS) -> SourceBatch:
        size = len(rows) // part[1]
        mine = own_rows(part, size)
        cond = self.embeds.index(rows[mine].to(self.device))
        noise = draw_global(lambda b: torch.randn((b, *self.latent_shape), generator=generator), size, part)
        noise = noise.to(self.device)
        seeds = draw_global(lambda b: torch.randint(2**62, (b,), generator=generator), size, part)
        renoise = [torch.Generator().manual_seed(int(s)) for s in seeds]
        k_all = [self.step_of[int(i)] for i in n]
        k_of = k_all[mine]
        x = noise.clone()
        for k in sorted(set(k_all if part[1] > 1 else k_of) - {0}):
            idx = [i for i, k_i in enumerate(k_of) if k_i == k]
            if not idx:  # another rank's step count: the same generator passes here, on a row thrown away
                sample_lcm({"student": self.velocity}, self.steps[:k], noise[:1], cond.index([0]),
                           generators=[torch.Generator()], final_sigma=self.steps[k].sigma)
                continue
            x[idx] = sample_lcm({"student": self.velocity}, self.steps[:k], noise[idx], cond.index(idx),
                                generators=[renoise[i] for i in idx], final_sigma=self.steps[k].sigma)
        return SourceBatch(x, x, cond, counts={f"step{k}": k_of.count(k) for k in range(len(self.steps))})

    @torch.no_grad()
    def samples(self, batch_size: int, generator: torch.Generator,
                part: Part = ONE_PROCESS) -> tuple[torch.Tensor, PromptEmbeds]:
        """Fresh generator samples x0 = G(x_{t_k}) for random rows and steps (the fake score's extra
        updates): ``batch_size`` of them, this rank's part of a global draw."""
        total = batch_size * part[1]
        rows = torch.randint(len(self), (total,), generator=generator)
        n = torch.as_tensor(self.indices)[torch.randint(len(self.indices), (total,), generator=generator)]
        data = self.batch(rows, n, generator, part)
        sigma = self.sigma(n[own_rows(part, batch_size)])
        return losses.x0_from_velocity(data.x_n, self.velocity(data.x_n, sigma, data.cond), sigma), data.cond


# --------------------------------------------------------------------------- the objective


@dataclass
class _Pending:
    x0_gen: torch.Tensor  # detached: the fake score's first update trains on the generator step's own samples
    cond: PromptEmbeds


class DistributionMatching(Objective):
    """DMD2's generator terms (``dm``, ``gan_g``) and, after each generator step, ``fake_steps`` updates of
    the fake score (flow matching, + ``cls_weight`` · classifier loss) with its own AdamW.

    Its own CPU generator (``seed``) draws t, ε, rows and steps, for the global batch (every rank advances
    it alike and keeps its rows); it is part of the resume state with the fake score, the classifier head
    and their optimizer (a multi-rank checkpoint writes the fake score and the optimizer as DCP parts,
    ``sharded_parts``).  With ``grad_accum`` > 1 each fake-score update accumulates over as many
    micro-batches as the generator's did.
    """

    name = "dmd2"
    supports_context_parallel = True  # its draws are the global batch's; the classifier's tap is gathered

    def __init__(self, backbone: Backbone, source: BackwardSimulation, train_sigmas: torch.Tensor, *,
                 fake_steps: int, fake_lr: float, dm_weight: float, dm_sigma_range: tuple[float, float],
                 guidance: float | None = None, gan_weight: float = 0.0, cls_weight: float = 0.0,
                 real_videos: OnlineSource | None = None, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0, seed: int = 0):
        if fake_steps < 1:
            raise ValueError(f"DMD2 needs at least one fake-score update per generator update, got "
                             f"{fake_steps}")
        if gan_weight > 0 and real_videos is None:
            raise ValueError("DMD2's GAN classifier (gan_weight > 0) needs real videos")
        self.backbone, self.source = backbone, source
        self.fake_steps, self.dm_weight, self.gan_weight, self.cls_weight = (fake_steps, dm_weight,
                                                                             gan_weight, cls_weight)
        self.max_grad_norm, self.real_videos = max_grad_norm, real_videos
        self.train_sigmas = train_sigmas.float()
        self.dm_sigma_range = dm_sigma_range  # σ_t's clamp, after the shift (``scores``)
        self.real_velocity = teacher_velocity(backbone, None, guidance)
        # a copy of the teacher: a two-expert teacher's fake score has both experts, each trained on the
        # draws its boundary routes to it: one fake score per expert
        self.fake = copy.deepcopy(backbone.transformer).requires_grad_(True).train()
        self.classifier = None
        if gan_weight > 0:
            device = next(self.fake.parameters()).device
            self.classifier = Discriminator(backbone.feature_dim(self.fake), 1,
                                            backbone.token_patch(self.fake)).to(device)
        self.fake_lr, self.weight_decay = fake_lr, weight_decay
        self.optimizer = self.make_optimizer()
        # one stream, the same on every rank; the trailing 0 keeps the seed one-process runs always had
        self.rng = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, RNG_SALT, 0]).generate_state(1)[0]))
        self._pending: dict[int, list[_Pending]] = {}
        self._thaw_flags: list[tuple[nn.Parameter, bool]] | None = None  # set while the generator's step runs

    def make_optimizer(self) -> torch.optim.AdamW:
        return adamw(self.fake_parameters(), lr=self.fake_lr, betas=ADAM_BETAS,
                     weight_decay=self.weight_decay)

    def fake_parameters(self) -> list[nn.Parameter]:
        head = list(self.classifier.parameters()) if self.classifier is not None else []
        return [*self.fake.parameters(), *head]

    def parallelize(self, wrap: Wrap) -> None:
        """The fake score sharded like the student (trained, the student's size), the classifier head
        replicated; the optimizer then made anew over the wrapped parameters (FSDP2 replaces them by
        shards)."""
        wrap(self.fake, shard=True)
        if self.classifier is not None:
            wrap(self.classifier, shard=False)
        self.optimizer = self.make_optimizer()

    def _trained(self) -> nn.Module:
        """One module whose named parameters are the optimizer's (its state is saved keyed by these names)."""
        return nn.ModuleDict({"fake": self.fake,
                              **({"classifier": self.classifier} if self.classifier else {})})

    def sharded_parts(self) -> dict:
        from dcm.parallel.checkpoint import OptimizerState, TensorsState

        fsdp.reshard(self.fake)  # its parameters are then the shards the optimizer steps
        return {"fake": TensorsState(dict(self.fake.named_parameters())),
                "optimizer": OptimizerState(self._trained(), self.optimizer)}

    def grad_networks(self) -> list[nn.Module]:
        return [self.fake] if self.classifier is not None else []  # the generator's GAN term runs through it

    # --- draws (all from the objective's own generator, for the global batch: this rank's ``part`` kept)
    def draw_sigmas(self, batch: int, first: int = 0, last: int | None = None,
                    part: Part = ONE_PROCESS) -> torch.Tensor:
        last = len(self.train_sigmas) - 1 if last is None else last
        return self.train_sigmas[draw_global(
            lambda b: torch.randint(first, last + 1, (b,), generator=self.rng), batch, part)]

    def noise_like(self, x: torch.Tensor, part: Part = ONE_PROCESS) -> torch.Tensor:
        return draw_global(lambda b: torch.randn((b, *x.shape[1:]), generator=self.rng), x.shape[0],
                           part).to(x.device)

    # --- the networks
    def classify(self, x0: torch.Tensor, cond: PromptEmbeds, autocast,
                 part: Part = ONE_PROCESS) -> list[torch.Tensor]:
        """Classifier logits on the fake score's middle tap at x0 noised to a σ uniform over the training
        sigmas."""
        sigma = self.draw_sigmas(x0.shape[0], part=part).to(x0.device)
        x = noised(x0, self.noise_like(x0, part), sigma.view(-1, *([1] * (x0.ndim - 1))))
        with autocast():
            _, feats = self.backbone.predict(self.fake, x, sigma, cond, features=True)
        tap = gather_taps(self.fake, [feats.taps[len(feats.taps) // 2]])  # context parallel: the whole grid
        return self.classifier(tap, feats.latent_thw)

    def dm_sigmas(self, batch: int, part: Part = ONE_PROCESS) -> torch.Tensor:
        """The DM loss's σ_t: a training timestep uniform on the unshifted scale, shifted (one of the 1000
        training sigmas), then clamped to [t_min, t_max] (FastVideo's DMD: ``shift_timestep`` of
        ``randint(0, 1000)``, then ``clamp(min_timestep, max_timestep)``; DMD2 itself, unshifted: t uniform
        over [0.02, 0.98]·1000).  At shift 17 it covers σ ∈ [0.02, 0.98], 26% of it at 0.98."""
        return self.draw_sigmas(batch, part=part).clamp(*self.dm_sigma_range)

    def scores(self, x0_gen: torch.Tensor, cond: PromptEmbeds, autocast, part: Part = ONE_PROCESS
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_real, x0_fake): both scores' clean estimates at x_t, σ_t from ``dm_sigmas``, one ε."""
        sigma_t = self.dm_sigmas(x0_gen.shape[0], part).to(x0_gen.device)
        x_t = noised(x0_gen, self.noise_like(x0_gen, part), sigma_t.view(-1, *([1] * (x0_gen.ndim - 1))))
        with torch.no_grad(), autocast():
            v_real = self.real_velocity(x_t, sigma_t, cond)
            v_fake = self.backbone.predict(self.fake, x_t, sigma_t, cond)
        return (losses.x0_from_velocity(x_t, v_real.float(), sigma_t),
                losses.x0_from_velocity(x_t, v_fake.float(), sigma_t))

    # --- generator
    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        x0_gen = student_x0(batch)
        part = (batch.data_rank, batch.data_size)
        terms = {}
        if self.dm_weight > 0:
            x0_real, x0_fake = self.scores(x0_gen.detach(), batch.cond, batch.autocast, part)
            grad = losses.distribution_matching_gradient(x0_gen.detach(), x0_real, x0_fake)
            terms["dm"] = self.dm_weight * losses.distribution_matching_loss(x0_gen, grad)
        if self.classifier is not None:
            self._freeze_fake()  # the generator's term trains neither the fake score nor the head
            terms["gan_g"] = self.gan_weight * losses.dmd2_generator_gan(
                self.classify(x0_gen, batch.cond, batch.autocast, part))
        self._pending.setdefault(batch.step, []).append(_Pending(x0_gen.detach(), batch.cond))
        return terms

    def _freeze_fake(self) -> None:
        """The fake score and the head frozen from the generator's GAN term until ``after_generator_step``,
        not just around its forward: an activation-checkpointed block recomputes its forward inside the
        generator's backward, and must see the flags its first forward saw (trainable again there, it saves
        more tensors and torch's checkpoint raises)."""
        if self._thaw_flags is None:
            self._thaw_flags = [(p, p.requires_grad) for p in self.fake_parameters()]
            for p, _ in self._thaw_flags:
                p.requires_grad_(False)

    def _thaw_fake(self) -> None:
        for p, flag in self._thaw_flags or ():
            p.requires_grad_(flag)
        self._thaw_flags = None

    # --- fake score
    def fake_score_loss(self, x0: torch.Tensor, cond: PromptEmbeds, autocast, part: Part = ONE_PROCESS
                        ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Flow matching of μ_fake on generator samples x0 (σ uniform over the training sigmas), and the
        classifier's loss against as many real videos (with their prompts) when the GAN is on: (terms, the
        classifier's mean logits on real and fake)."""
        x0 = x0.detach()
        sigma = self.draw_sigmas(x0.shape[0], part=part).to(x0.device)
        with autocast():
            terms = {"fm": flow_matching_loss(self.backbone, self.fake, x0, self.noise_like(x0, part), sigma,
                                              cond)}
        logits = {}
        if self.classifier is not None:
            rows = draw_global(lambda b: torch.randint(len(self.real_videos), (b,), generator=self.rng),
                               x0.shape[0], part).to(x0.device)
            D_real = self.classify(self.real_videos.x0[rows], self.real_videos.embeds.index(rows), autocast,
                                   part)
            D_fake = self.classify(x0, cond, autocast, part)
            terms["cls"] = self.cls_weight * losses.dmd2_classifier(D_real, D_fake)
            logits = {"d_real": float(torch.stack([d.detach().mean() for d in D_real]).mean()),
                      "d_fake": float(torch.stack([d.detach().mean() for d in D_fake]).mean())}
        return terms, logits

    def fake_score_step(self, samples: Sequence[tuple[torch.Tensor, PromptEmbeds]], autocast,
                        part: Part = ONE_PROCESS) -> dict[str, float]:
        """One AdamW step of the fake score (and head), gradients accumulated over ``samples``
        (micro-batches)."""
        self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for x0, cond in samples:
            terms, logits = self.fake_score_loss(x0, cond, autocast, part)
            (sum(terms.values()) / len(samples)).backward()
            values = {**{k: float(v.detach()) for k, v in terms.items()}, **logits}
            for key, value in values.items():
                logged[key] = logged.get(key, 0.0) + value / len(samples)
        # multi-rank: gradients averaged over the ranks in backward by the engines (``parallelize``);
        # the norm is over every shard
        logged["grad_norm"] = float(fsdp.clip_grad_norm_(self.fake_parameters(), self.max_grad_norm))
        self.optimizer.step()
        return logged

    def after_generator_step(self, batch: ConsistencyBatch) -> dict[str, float]:
        """``fake_steps`` fake-score updates once per generator step (at its first micro-batch): the first on
        the generator step's own samples (as the official code), the rest on fresh backward-simulated ones."""
        self._thaw_fake()  # the generator's backward is done
        pending = self._pending.pop(batch.step, None)
        if pending is None:
            return {}
        part = (batch.data_rank, batch.data_size)
        steps = []
        for i in range(self.fake_steps):
            samples = ([(p.x0_gen, p.cond) for p in pending] if i == 0 else
                       [self.source.samples(len(p.cond), self.rng, part) for p in pending])
            steps.append(self.fake_score_step(samples, batch.autocast, part))
        logged = {f"fake_{key}": sum(s[key] for s in steps) / len(steps) for key in steps[0]}
        logged["fake_fm_last"] = steps[-1]["fm"]
        return logged

    def state_dict(self) -> dict:
        return {"fake": self.fake.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.get_state(),
                **({"classifier": self.classifier.state_dict()} if self.classifier is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """A one-process state (everything; spread over the ranks of a sharded job), or a multi-rank
        checkpoint's replicated rest (the fake score and the optimizer were loaded as ``sharded_parts``)."""
        if not state:
            return
        if "fake" in state:
            fsdp.load_full_state_dict_(self.fake, state["fake"])
        if self.classifier is not None:
            self.classifier.load_state_dict(state["classifier"])
        if "optimizer" in state:
            load_optimizer_state(self._trained(), self.optimizer, state["optimizer"])
        self.rng.set_state(state["rng"])


# ------------------------------------------------------------------------------------------ wiring


def build(params: Params, method: str, backbone: Backbone, student: nn.Module, steps: Sequence[SamplingStep],
          device: torch.device | str
          ) -> tuple[BackwardSimulation, NoConsistencyLoss, list[Objective], list[Phase]]:
    """The DMD2 parts for ``methods.<method>``: backward simulation over the training prompts at the row's
    sampling ``steps``, the no-consistency space, the DMD2 objective and the K generator phases."""
    m = params.method(method)
    cfg = m.dmd2
    key = f"methods.{method}"
    T = params.grid.num_train_timesteps
    grid = generator_grid(T, params.grid.shift)  # the generator's steps: training timesteps, not the grid
    prompts = [row["prompt"] for row in io.read_json(paths.PROMPTS)["train"]]
    latent_shape = backbone.video_latent_shape(params)
    source = BackwardSimulation(backbone, student, prompt_embeddings(backbone, prompts), grid, steps,
                                latent_shape, device)
    videos = None
    if cfg.gan_weight > 0 and backbone.two_experts:
        # the classifier taps one network's middle blocks; a two-expert fake score runs one expert or the
        # other by t, so the tap would come from different networks at different draws
        raise ConfigError(f"{key}.dmd2.gan_weight", cfg.gan_weight,
                          "0 with a two-expert teacher (Wan 2.2 A14B): the GAN classifier reads one fake "
                          "score's features, and this fake score has one expert per noise range")
    if cfg.gan_weight > 0:
        from dcm.distill import make_source

        videos = make_source(params, backbone, source="online")  # the world's videos: DMD2's real data
        if tuple(videos.x0.shape[1:]) != tuple(latent_shape):
            raise ConfigError(f"{key}.dmd2.gan_weight", cfg.gan_weight,
                              f"0 here: the world's videos have latent shape {tuple(videos.x0.shape[1:])}, "
                              f"the generator's samples {tuple(latent_shape)}")
    train_sigmas = torch.from_numpy(schedule.training_sigmas(T, params.grid.shift))
    objective = DistributionMatching(
        backbone, source, train_sigmas, fake_steps=cfg.fake_steps, fake_lr=cfg.fake_lr or m.lr,
        dm_weight=cfg.dm_weight, dm_sigma_range=(cfg.t_min, cfg.t_max),
        guidance=cfg.guidance, gan_weight=cfg.gan_weight, cls_weight=cfg.cls_weight, real_videos=videos,
        weight_decay=params.training.weight_decay, max_grad_norm=params.training.max_grad_norm,
        seed=params.seed)
    # the fake score trains at the student's size: the same memory rule
    if params.training.gradient_checkpointing:
        enable_activation_checkpointing(objective.fake)
    return source, NoConsistencyLoss(), [objective], generator_phases(source.indices)
