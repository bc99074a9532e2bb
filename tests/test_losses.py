"""The losses of the papers, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from dcm.distill import losses


def test_pseudo_huber_on_known_values():
    x = torch.tensor([0.0, 3.0, -4.0])
    y = torch.zeros(3)
    c = 1.0
    expected = ((math.sqrt(0 + 1) - 1) + (math.sqrt(9 + 1) - 1) + (math.sqrt(16 + 1) - 1)) / 3
    assert losses.pseudo_huber(x, y, c).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_huber_is_zero_at_equality_and_near_l1_for_small_c():
    x = torch.randn(2, 3, 4)
    assert losses.pseudo_huber(x, x, 0.001).item() == 0.0
    y = x + 0.5
    assert losses.pseudo_huber(x, y, 0.001).item() == pytest.approx(0.5 - 0.001, abs=1e-5)


def test_pseudo_huber_is_fp32_for_half_inputs():
    x = torch.randn(8, dtype=torch.bfloat16)
    assert losses.pseudo_huber(x, torch.zeros_like(x), 0.001).dtype == torch.float32


def test_euler_endpoint_is_x_plus_sigma_gap_times_velocity_per_sample():
    x = torch.randn(2, 3, 4, 2, 2)
    v = torch.randn_like(x)
    sigma = torch.tensor([0.9, 0.5])
    sigma_end = torch.tensor([0.4, 0.1])
    out = losses.euler_endpoint(x, v, sigma, sigma_end)
    for b in range(2):
        torch.testing.assert_close(out[b], x[b] + (sigma_end[b] - sigma[b]) * v[b])


def test_x0_from_velocity_inverts_the_flow_matching_forward_process():
    x0, eps = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    sigma = torch.tensor([0.3, 0.8])
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    torch.testing.assert_close(losses.x0_from_velocity(x_t, eps - x0, sigma), x0)


def test_euler_endpoint_to_zero_is_x0_estimate():
    x = torch.randn(1, 2, 3, 2, 2)
    v = torch.randn_like(x)
    torch.testing.assert_close(losses.euler_endpoint(x, v, torch.tensor([0.7]), torch.tensor([0.0])),
                               losses.x0_from_velocity(x, v, torch.tensor([0.7])))


def test_temporal_coherence_equals_hand_computation():
    frames = 5
    x_pred = torch.arange(frames, dtype=torch.float32).pow(2).view(1, 1, frames, 1, 1)  # 0 1 4 9 16
    x_target = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1)  # 0 1 2 3 4
    # offset 2: pred differences [4, 8, 12], target differences [2, 2, 2] → errors 2, 6, 10
    expected = (2**2 + 6**2 + 10**2) / 3
    assert losses.temporal_coherence(x_pred, x_target, 2).item() == pytest.approx(expected)


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_temporal_coherence_is_zero_with_at_most_offset_frames(frames):
    x_pred = torch.randn(2, 3, frames, 2, 2, requires_grad=True)
    loss = losses.temporal_coherence(x_pred, torch.randn(2, 3, frames, 2, 2), 3)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert x_pred.grad is not None and x_pred.grad.abs().sum() == 0


def test_temporal_coherence_ignores_a_constant_offset_between_videos():
    x = torch.randn(2, 3, 6, 2, 2)
    assert losses.temporal_coherence(x + 7.0, x, 3).item() == pytest.approx(0.0, abs=1e-10)


def test_consistency_target_is_euler_endpoint_of_the_target_velocity():
    x_prev, v_prev = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    sigma_prev, sigma_end = torch.tensor([0.8, 0.6]), torch.tensor([0.2, 0.2])
    target = losses.consistency_target(x_prev, v_prev, sigma_prev, sigma_end, torch.tensor([False, False]))
    torch.testing.assert_close(target, losses.euler_endpoint(x_prev, v_prev, sigma_prev, sigma_end))


def test_target_at_phase_boundary_is_stored_x_end():
    """n = end + 1: x_{n−1} is the phase end itself, and the target is exactly x_{n−1} (even for a wild
    velocity)."""
    x_prev = torch.randn(2, 3, 4, 2, 2)
    v_prev = torch.full_like(x_prev, float("inf"))
    v_prev[1] = torch.randn_like(x_prev[1])
    sigma_prev = torch.tensor([0.2, 0.6])
    sigma_end = torch.tensor([0.2, 0.2])
    target = losses.consistency_target(x_prev, v_prev, sigma_prev, sigma_end, torch.tensor([True, False]))
    assert torch.equal(target[0], x_prev[0])
    torch.testing.assert_close(target[1], x_prev[1] + (0.2 - 0.6) * v_prev[1])


# ------------------------------------------------------------------------- DetE: GAN + feature matching


def test_adversarial_noising_from_sigma_end_to_sigma_adv_by_hand():
    """x_adv = ((1 − σ_adv)·x + (σ_adv − σ_end)·ε′)/(1 − σ_end), per sample."""
    x = torch.tensor([2.0, -1.0]).view(2, 1, 1, 1, 1)
    eps = torch.tensor([0.5, 4.0]).view(2, 1, 1, 1, 1)
    sigma_adv, sigma_end = torch.tensor([0.6, 0.2]), torch.tensor([0.2, 0.2])
    out = losses.adversarial_noising(x, eps, sigma_adv, sigma_end).flatten()
    # sample 0: (0.4·2 + 0.4·0.5)/0.8 = 1.25;  sample 1 at σ_adv = σ_end: (0.8·(−1) + 0)/0.8 = −1 (x itself)
    torch.testing.assert_close(out, torch.tensor([1.25, -1.0]))
    # σ_end = 0 is the plain forward process (1 − σ)·x + σ·ε
    plain = losses.adversarial_noising(x, eps, sigma_adv, 0.0).flatten()
    torch.testing.assert_close(plain, torch.tensor([0.4 * 2 + 0.6 * 0.5, 0.8 * -1 + 0.2 * 4.0]))


def test_hinge_losses_have_the_paper_signs_and_weights():
    real = [torch.tensor([0.5, 2.0]), torch.tensor([-1.0, 1.0])]
    fake = [torch.tensor([-2.0, 0.5]), torch.tensor([0.0, 3.0])]
    # head 1: mean(relu(1+fake)) = (0 + 1.5)/2, mean(relu(1−real)) = (0.5 + 0)/2 → 1.0
    # head 2: (1 + 4)/2 + (2 + 0)/2 = 3.5;  L_D = (1.0 + 3.5)/2
    assert losses.discriminator_hinge(real, fake).item() == pytest.approx(2.25)
    # generator: head 1 mean(relu(1−fake)) = (3 + 0.5)/2 = 1.75; head 2 (1 + 0)/2 = 0.5 → (1.75 + 0.5)/2
    assert losses.generator_hinge(fake).item() == pytest.approx(1.125)
    # a more convincing fake lowers the generator loss and raises the discriminator's
    better = [f + 1.0 for f in fake]
    assert losses.generator_hinge(better) < losses.generator_hinge(fake)
    assert losses.discriminator_hinge(real, better) > losses.discriminator_hinge(real, fake)


def test_feature_matching_is_the_mse_averaged_over_taps_in_fp32():
    fake = [torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]], dtype=torch.bfloat16)]
    real = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3.0, 0.0]]], dtype=torch.bfloat16)]
    # tap 1 mse = (0 + 4)/2 = 2, tap 2 = (9 + 0)/2 = 4.5 → mean 3.25
    fm = losses.feature_matching(fake, real)
    assert fm.item() == pytest.approx(3.25) and fm.dtype == torch.float32


@pytest.mark.parametrize("lambda_gan, lambda_fm", [(1.0, 1.0), (1.0, 10.0), (0.1, 1.0)])
def test_dete_generator_loss_is_the_papers_sum_split_into_its_two_terms(lambda_gan, lambda_fm):
    """L_G = 0.1·(5·λ_gan·L_hinge + λ_fm·L_FM); each term alone when the other is off (None)."""
    hinge, fm = torch.tensor(1.125), torch.tensor(0.2)
    terms = losses.dete_generator_loss(hinge, fm, lambda_gan, lambda_fm)
    assert set(terms) == {"gan_g", "fm"}
    assert sum(terms.values()).item() == pytest.approx(0.1 * (5 * lambda_gan * 1.125 + lambda_fm * 0.2))
    assert terms["gan_g"].item() == pytest.approx(0.5 * lambda_gan * 1.125)
    assert losses.dete_generator_loss(None, fm, lambda_gan, lambda_fm) == {"fm": terms["fm"]}
    assert losses.dete_generator_loss(hinge, None, lambda_gan, lambda_fm) == {"gan_g": terms["gan_g"]}


# ---------------------------------------------------------------------------------- MCM: WGAN + R1


def test_wgan_losses_and_r1_by_hand():
    real = [torch.tensor([0.5, 2.0]), torch.tensor([-3.0, 1.0])]
    fake = [torch.tensor([-2.0, 0.5]), torch.tensor([0.0, 3.0])]
    # G: −mean(fake) per head → 0.75, −1.5 → mean −0.375
    assert losses.wgan_generator(fake).item() == pytest.approx(-0.375)
    # D head 1: mean(max(−1, −real)) = (−0.5 − 1)/2 = −0.75; mean(max(−1, fake)) = (−1 + 0.5)/2 = −0.25 → −1
    # D head 2: (3 − 1)/2 = 1; (0 + 3)/2 = 1.5 → 2.5;  mean over heads 0.75
    assert losses.wgan_discriminator(real, fake).item() == pytest.approx(0.75)
    # R1 with D(f) = Σ w·f per sample: the gradient is w everywhere, ‖w‖² per token, 4 tokens per sample
    feats = [torch.randn(3, 4, 2, requires_grad=True)]
    w = torch.tensor([1.0, -2.0])
    logits = [(feats[0] * w).sum(-1)]
    assert losses.r1_penalty(logits, feats).item() == pytest.approx(4 * 5.0)
