"""LCM's multistep sampler against diffusers' FlowMatchLCMScheduler, and the boundary condition of the
Euler-form student endpoint that every consistency method here trains (METHODS.md; loop.endpoints)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchLCMScheduler

from dcm.data.trajectories import initial_noise
from dcm.distill import losses
from dcm.distill.loop import endpoints
from dcm.sampling import renoise_generators, sample, sample_lcm
from dcm.schedule import SamplingStep, explicit_schedule, pcm_phases, phase_schedule, teacher_grid

SHAPE = (4, 3, 6, 6)  # (C, T, H, W)
MU = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
SEEDS = [11, 22, 33]
GRID = teacher_grid(50, 17.0)


def field(x, sigma, cond):
    """A deterministic stand-in student velocity (elementwise, so rows are independent)."""
    return (x - MU) / sigma.view(-1, 1, 1, 1, 1) + 0.3 * torch.cos(2.0 * x)


def noise_for(seeds):
    return torch.stack([initial_noise(s, SHAPE) for s in seeds])


SCHEDULES = {
    "pcm4_shift17": phase_schedule(GRID, pcm_phases(50, 4)),  # LCM/PCM multistep at phase edges
    "hunyuan_official": explicit_schedule([[1000, "student"], [992, "student"], [981.8, "student"],
                                           [912.4, "student"]]),
    "uniform8": [SamplingStep(float(s), "student") for s in np.linspace(1.0, 0.125, 8)],
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_lcm_sampler_matches_diffusers_flow_match_lcm_scheduler_step_by_step(name):
    steps = SCHEDULES[name]
    noise = noise_for(SEEDS)
    ours = sample_lcm({"student": field}, steps, noise, None, seeds=SEEDS, keep_trajectory=True)

    scheduler = FlowMatchLCMScheduler(num_train_timesteps=1000, shift=1.0)  # shift 1: σ as given
    scheduler.set_timesteps(sigmas=[s.sigma for s in steps])
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([s.sigma for s in steps] + [0.0],
                                                              dtype=torch.float32), rtol=0, atol=0)
    generators = renoise_generators(SEEDS)  # the same per-row streams, handed to diffusers
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        v = field(x, scheduler.sigmas[i].expand(len(SEEDS)), None)
        x = scheduler.step(v, t, x, generator=generators).prev_sample
        torch.testing.assert_close(ours[i + 1], x, rtol=0, atol=0, msg=f"step {i} (σ = {steps[i].sigma})")
    assert len(ours) == len(steps) + 1


def test_lcm_rows_are_deterministic_per_seed_whatever_the_batch():
    steps = SCHEDULES["pcm4_shift17"]
    together = sample_lcm({"student": field}, steps, noise_for(SEEDS), None, seeds=SEEDS)
    alone = sample_lcm({"student": field}, steps, noise_for(SEEDS[2:]), None, seeds=SEEDS[2:])
    torch.testing.assert_close(together[2:], alone, rtol=0, atol=0)
    again = sample_lcm({"student": field}, steps, noise_for(SEEDS), None,
                       generators=renoise_generators(SEEDS))
    torch.testing.assert_close(together, again, rtol=0, atol=0)
    other = sample_lcm({"student": field}, steps, noise_for(SEEDS), None, seeds=[1, 2, 3])
    assert not torch.allclose(together, other)  # the fresh noise matters


def test_renoise_stream_is_not_the_initial_noise_of_the_same_seed():
    first = torch.randn((1, *SHAPE), generator=renoise_generators([7])[0])[0]
    assert not torch.allclose(first, initial_noise(7, SHAPE))


def test_lcm_reinjects_fresh_noise_unlike_euler_but_one_step_is_the_same_x0():
    steps = SCHEDULES["pcm4_shift17"]
    noise = noise_for(SEEDS)
    lcm = sample_lcm({"student": field}, steps, noise, None, seeds=SEEDS, keep_trajectory=True)
    euler = sample({"student": field}, steps, noise, None, keep_trajectory=True)
    assert not torch.allclose(lcm[1], euler[1], atol=1e-3)
    # after re-noising, x sits at σ_next as (1 − σ_next)·x0̂ + σ_next·ε: its x0̂ part is exactly the
    # prediction
    x0_hat = noise - steps[0].sigma * field(noise, torch.full((3,), steps[0].sigma), None)
    eps = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in renoise_generators(SEEDS)])
    s1 = torch.tensor(steps[1].sigma, dtype=torch.float32)
    torch.testing.assert_close(lcm[1], (1 - s1) * x0_hat + s1 * eps)
    one = [SamplingStep(0.9, "student")]
    torch.testing.assert_close(sample_lcm({"student": field}, one, noise, None, seeds=SEEDS),
                               sample({"student": field}, one, noise, None), rtol=0, atol=1e-6)


def test_lcm_sampler_switches_experts_like_the_euler_sampler():
    seen = []

    def expert(name):
        def velocity(x, sigma, cond):
            seen.append((name, round(float(sigma[0]), 4)))
            return field(x, sigma, cond)
        return velocity

    steps = explicit_schedule([[1000, "seme"], [992, "seme"], [981.8, "dete"], [912.4, "dete"]])
    sample_lcm({"seme": expert("seme"), "dete": expert("dete")}, steps, noise_for(SEEDS), None, seeds=SEEDS)
    assert seen == [("seme", 1.0), ("seme", 0.992), ("dete", 0.9818), ("dete", 0.9124)]


def test_lcm_sampler_rejects_missing_or_mismatched_noise_sources():
    steps = SCHEDULES["pcm4_shift17"]
    with pytest.raises(ValueError, match="exactly one of seeds or generators"):
        sample_lcm({"student": field}, steps, noise_for(SEEDS), None)
    with pytest.raises(ValueError, match="exactly one of seeds or generators"):
        sample_lcm({"student": field}, steps, noise_for(SEEDS), None, seeds=SEEDS,
                   generators=renoise_generators(SEEDS))
    with pytest.raises(ValueError, match="3 rows but 2"):
        sample_lcm({"student": field}, steps, noise_for(SEEDS), None, seeds=SEEDS[:2])
    with pytest.raises(KeyError, match="only \\['student'\\]"):
        sample_lcm({"student": field}, [SamplingStep(1.0, "seme")], noise_for(SEEDS), None, seeds=SEEDS)


# --------------------------------------------------------------------------- boundary condition
#
# LCM writes f(x, t) = c_skip(t)·x + c_out(t)·x0̂ with c_skip = σ_d²/((s·t)² + σ_d²) and
# c_out = s·t/√((s·t)² + σ_d²) (σ_d = 0.5, s = 10), so that f(x, 0) = x.  This codebase's student
# endpoint is the Euler form x̂_end = x_n + (σ_end − σ_n)·v, i.e. c_skip = 1 and c_out = σ_end − σ_n
# on the velocity: the boundary condition f(x, σ_end) = x holds by construction, for every phase end.


def _stub(velocity):
    """What loop.endpoints needs of a backbone: predict(model, x, σ, cond) -> v."""
    return SimpleNamespace(predict=lambda model, x, sigma, cond: velocity(x, sigma, cond))


def test_euler_endpoint_satisfies_the_boundary_condition_exactly_at_the_phase_end():
    x = noise_for(SEEDS)
    v = field(x, torch.full((3,), 0.5), None) * 1e3  # any finite velocity, however large
    for sigma_end in (GRID.sigma(37), GRID.sigma_min, 0.0):  # SemE's end σ_κ, DetE's end σ_min, LCM's t = 0
        s = torch.full((3,), sigma_end)
        assert torch.equal(losses.euler_endpoint(x, v, s, s), x)  # f(x, σ_end) = x, bit for bit
        # and continuously: |x̂_end − x_n| = (σ_n − σ_end)·|v| → 0 linearly as σ_n → σ_end
        gaps = [(losses.euler_endpoint(x, v, s + d, s) - x).abs().max().item() for d in (1e-1, 1e-2, 1e-3)]
        np.testing.assert_allclose(gaps, np.array([1e-1, 1e-2, 1e-3]) * v.abs().max().item(), rtol=1e-3)


def test_loop_endpoints_at_the_phase_end_return_x_n_and_the_boundary_branch_is_the_euler_value():
    """loop.endpoints, the training code path, on a stand-in network: x_n at σ_n = σ_end comes back
    unchanged, and at n − 1 = end the Euler value x_{n−1} + 0·v equals the ``at_boundary`` branch."""
    x_n, x_prev = noise_for(SEEDS), noise_for([1, 2, 3])
    data = SimpleNamespace(x_n=x_n, x_prev=x_prev, cond=None)
    sigma_end = torch.full((3,), GRID.sigma(37))
    pred, target = endpoints(_stub(field), None, None, data, sigma_end, sigma_end, sigma_end,
                             at_boundary=torch.zeros(3, dtype=torch.bool))
    assert torch.equal(pred, x_n) and torch.equal(target, x_prev)
    _, flagged = endpoints(_stub(field), None, None, data, sigma_end, sigma_end, sigma_end,
                           at_boundary=torch.ones(3, dtype=torch.bool))
    assert torch.equal(flagged, target)


def test_lcm_skip_scalings_hold_the_boundary_only_at_t_zero_not_at_a_phase_end():
    """LCM's scalings reach c_skip = 1 only at t = 0: at the grid's σ_min (t ≈ 16.7) c_skip ≈ 9e-6, so
    f ≈ x0̂, not x, and a multi-phase end like σ_κ has no boundary at all.  The Euler form needs no
    scalings: its boundary is wherever the phase ends."""
    def c_skip(t, s=10.0, sigma_data=0.5):
        return sigma_data**2 / ((s * t) ** 2 + sigma_data**2)

    def c_out(t, s=10.0, sigma_data=0.5):
        return s * t / np.sqrt((s * t) ** 2 + sigma_data**2)

    assert c_skip(0.0) == 1.0 and c_out(0.0) == 0.0
    t_min = 1000 * GRID.sigma_min
    assert t_min == pytest.approx(16.7, abs=0.1)
    assert c_skip(t_min) < 1e-5 and c_out(t_min) > 0.99999
    assert c_skip(1000 * GRID.sigma(37)) < 1e-7
