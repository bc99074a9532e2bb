"""The consistency-distillation losses of the papers, one short function each (METHODS.md).

Flow matching throughout: x_σ = (1−σ)·x0 + σ·ε, the network predicts v ≈ ε − x0.  The
parametrisation (x0 from v, the Euler endpoint, the consistency target with its phase boundary)
lives here and nowhere else; the training loop and the objectives call these functions.
"""

from __future__ import annotations

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


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance mean(√((x − y)² + c²) − c), computed in fp32 (c = 0.001 in DCM/PCM)."""
    d = x.float() - y.float()
    return (torch.sqrt(d * d + c * c) - c).mean()


def pseudo_huber_per_sample(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """The same distance averaged per sample, (B,): the per-timestep loss the analysis reads."""
    d = x.float() - y.float()
    return (torch.sqrt(d * d + c * c) - c).flatten(1).mean(1)


def temporal_coherence(x_pred: torch.Tensor, x_target: torch.Tensor, offset: int) -> torch.Tensor:
    """SemE temporal coherence (DCM): L_TC = mse(x̂[:, :, l:] − x̂[:, :, :−l], x̂_tgt[:, :, l:] − x̂_tgt[:, :, :−l]).

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
