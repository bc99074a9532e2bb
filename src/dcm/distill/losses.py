"""Every loss equation of the papers, one short function each, named as the papers name them
(METHODS.md).

Flow matching throughout: x_σ = (1−σ)·x0 + σ·ε, the network predicts v ≈ ε − x0.  The
parametrisation (x0 from v, the Euler endpoint, the consistency target with its phase boundary),
the consistency and temporal-coherence losses, DetE's GAN + feature-matching losses and MCM's
WGAN + R1 losses, DMD2's distribution-matching gradient and GAN classifier live here and nowhere else;
the training loop and the objectives call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """σ of shape (B,) (or a scalar) broadcast against latents (B, C, T, H, W)."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Clean-sample estimate x0 = x_σ − σ·v (from x_σ = (1−σ)·x0 + σ·ε and v = ε − x0)."""
    return x_t - _per_sample(sigma, x_t) * v


def euler_endpoint(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float,
                   sigma_end: torch.Tensor | float) -> torch.Tensor:
    """PCM Euler form of the student's phase endpoint: x̂_end = x_n + (σ_end − σ_n)·v_θ(x_n, t_n)."""
    return x_t + (_per_sample(sigma_end, x_t) - _per_sample(sigma, x_t)) * v


def consistency_target(x_prev: torch.Tensor, v_prev: torch.Tensor, sigma_prev: torch.Tensor,
                       sigma_end: torch.Tensor, at_boundary: torch.Tensor) -> torch.Tensor:
    """x̂_tgt = x_{n−1} + (σ_end − σ_{n−1})·v_θ⁻(x_{n−1}, t_{n−1}); at the phase boundary (n−1 = end)
    the target is x_{n−1} itself, exactly (``at_boundary`` (B,) bool selects those samples)."""
    target = euler_endpoint(x_prev, v_prev, sigma_prev, sigma_end)
    return torch.where(_per_sample(at_boundary, x_prev).bool(), x_prev, target)


def flow_matching(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Teacher pretraining (rectified flow): mse(v_θ(x_σ, σ, c), ε − x0), x_σ = (1 − σ)·x0 + σ·ε."""
    return (v_pred.float() - (eps - x0)).pow(2).mean()


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance mean(√((x − y)² + c²) − c), computed in fp32 (c = 0.001 in DCM/PCM)."""
    d = x.float() - y.float()
    return (torch.sqrt(d * d + c * c) - c).mean()


def pseudo_huber_per_sample(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """The same distance averaged per sample, (B,): the per-timestep loss the analysis reads."""
    d = x.float() - y.float()
    return (torch.sqrt(d * d + c * c) - c).flatten(1).mean(1)


def temporal_coherence(x_pred: torch.Tensor, x_target: torch.Tensor, offset: int) -> torch.Tensor:
    """SemE temporal coherence (DCM):

        L_TC = mse(x̂[:, :, l:] − x̂[:, :, :−l], x̂_tgt[:, :, l:] − x̂_tgt[:, :, :−l]).

    Frames are dim 2 of (B, C, T, H, W); with T ≤ l there is no frame pair and the loss is 0.
    """
    if offset < 1:
        raise ValueError(f"temporal coherence offset must be >= 1 frame, got {offset}")
    frames = x_pred.shape[2]
    if frames <= offset:
        return x_pred.float().sum() * 0.0  # keeps the graph (and the device) of a real loss
    motion_pred = x_pred[:, :, offset:] - x_pred[:, :, :-offset]
    motion_target = x_target[:, :, offset:] - x_target[:, :, :-offset]
    return F.mse_loss(motion_pred.float(), motion_target.float())


# ------------------------------------------------------------- DetE: GAN + feature matching (DCM)
# H discriminator heads, one per teacher feature tap; every head's term is a mean over its tokens.

GENERATOR_SCALE = 0.1  # the outer 0.1 of L_G
HINGE_WEIGHT = 5.0  # the 5 in front of the generator hinge


def adversarial_noising(x: torch.Tensor, eps: torch.Tensor, sigma_adv: torch.Tensor,
                        sigma_end: torch.Tensor | float) -> torch.Tensor:
    """An endpoint at σ_end forward-diffused to σ_adv (DCM, DetE; official code):
    x_adv = ((1 − σ_adv)·x + (σ_adv − σ_end)·ε′)/(1 − σ_end); σ_adv = σ_end gives x back."""
    s_adv, s_end = _per_sample(sigma_adv, x), _per_sample(sigma_end, x)
    return ((1 - s_adv) * x + (s_adv - s_end) * eps) / (1 - s_end)


def discriminator_hinge(D_real: Sequence[torch.Tensor], D_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_D = Σ_h [relu(1 + D_h(fake)) + relu(1 − D_h(real))] / H (DCM, DetE)."""
    terms = [F.relu(1.0 + fake).mean() + F.relu(1.0 - real).mean()
             for real, fake in zip(D_real, D_fake, strict=True)]
    return torch.stack(terms).sum() / len(terms)


def generator_hinge(D_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_hinge = Σ_h relu(1 − D_h(fake)) / H: the generator's hinge term of L_G (DCM, DetE)."""
    return torch.stack([F.relu(1.0 - fake).mean() for fake in D_fake]).sum() / len(D_fake)


def feature_matching(feat_fake: Sequence[torch.Tensor], feat_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_FM = mse(feat_fake, feat_real) in fp32, averaged over taps; the features are the teacher's
    output head applied to each tap (``Backbone.project_features``), in latent space (DCM, DetE)."""
    terms = [F.mse_loss(fake.float(), real.float()) for fake, real in zip(feat_fake, feat_real, strict=True)]
    return torch.stack(terms).mean()


def dete_generator_loss(L_hinge: torch.Tensor | None, L_FM: torch.Tensor | None, lambda_gan: float = 1.0,
                        lambda_fm: float = 1.0) -> dict[str, torch.Tensor]:
    """L_G = 0.1·(5·λ_gan·L_hinge + λ_fm·L_FM) (DCM, DetE: λ_gan = 1, λ_fm = 1 Hunyuan / 10 Wan), returned
    as its two summands {"gan_g", "fm"} (their sum is L_G) so each is logged; a term passed as None is off."""
    terms = {}
    if L_hinge is not None:
        terms["gan_g"] = GENERATOR_SCALE * HINGE_WEIGHT * lambda_gan * L_hinge
    if L_FM is not None:
        terms["fm"] = GENERATOR_SCALE * lambda_fm * L_FM
    return terms


# ------------------------------------------------------------------- MCM: image discriminator (WGAN)


def wgan_generator(D_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_G = −D(fake) (MCM), each head a mean over its logits, averaged over heads."""
    return torch.stack([-fake.mean() for fake in D_fake]).mean()


def wgan_discriminator(D_real: Sequence[torch.Tensor], D_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_D = max(−1, −D(real)) + max(−1, D(fake)) (MCM's clipped WGAN), means over logits and heads."""
    terms = [torch.clamp(-real, min=-1.0).mean() + torch.clamp(fake, min=-1.0).mean()
             for real, fake in zip(D_real, D_fake, strict=True)]
    return torch.stack(terms).mean()


def r1_penalty(D_real: Sequence[torch.Tensor], feat_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """R1 = E‖∂ΣD(real)/∂feat_real‖² (MCM, weight γ_R1): the squared gradient norm per real sample,
    summed over taps, averaged over samples (with graph, so it trains D)."""
    grads = torch.autograd.grad(sum(d.sum() for d in D_real), list(feat_real), create_graph=True)
    return torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).mean()


# ------------------------------------------------ DMD2: distribution matching + GAN classifier (Yin et al.)


def distribution_matching_gradient(x0_gen: torch.Tensor, x0_real: torch.Tensor,
                                   x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient of KL(p_fake ‖ p_real) at the generator's sample, normalised per sample as DMD does
    (DMD2, Yin et al., arXiv 2405.14867, Sec. 3; DMD, arXiv 2311.18828):

        p_real = x0_gen − x0_real,  p_fake = x0_gen − x0_fake
        grad   = (p_real − p_fake) / mean|p_real| = (x0_fake − x0_real) / mean|x0_gen − x0_real|  (per sample)

    x0_real / x0_fake: the real (teacher, guided) and fake score's clean estimates at the noised sample x_t.
    Descending it moves x0_gen toward the real score's estimate and away from the fake one's; a sample
    where both estimates coincide with it gets 0 (nan_to_num).
    """
    p_real, p_fake = x0_gen.float() - x0_real.float(), x0_gen.float() - x0_fake.float()
    weight = p_real.abs().mean(dim=tuple(range(1, p_real.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / weight)


def distribution_matching_loss(x0_gen: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """L_DM = 0.5·mse(x0_gen, (x0_gen − grad).detach()) (DMD/DMD2): ∂L_DM/∂x0_gen = grad / numel, so the
    generator receives the distribution-matching gradient through its own backward pass."""
    return 0.5 * F.mse_loss(x0_gen.float(), (x0_gen.float() - grad).detach())


def dmd2_generator_gan(D_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_G = softplus(−D(fake)) (DMD2's non-saturating GAN term), means over logits, averaged over heads."""
    return torch.stack([F.softplus(-fake).mean() for fake in D_fake]).mean()


def dmd2_classifier(D_real: Sequence[torch.Tensor], D_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_D = softplus(D(fake)) + softplus(−D(real)) (DMD2's classifier on the fake score's features)."""
    terms = [F.softplus(fake).mean() + F.softplus(-real).mean()
             for real, fake in zip(D_real, D_fake, strict=True)]
    return torch.stack(terms).mean()
