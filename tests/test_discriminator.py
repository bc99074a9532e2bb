"""Discriminator heads on teacher features, and the GAN / feature-matching losses of METHODS.md (DetE)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dcm import schedule
from dcm.distill.discriminator import (
    Discriminator,
    GanFeatureMatching,
    discriminator_hinge,
    discriminator_summary,
    feature_matching,
    generator_adversarial,
    generator_hinge,
    group_count,
    output_projection,
)
from dcm.distill.loop import ConsistencyBatch

REPO = Path(__file__).resolve().parents[1]


def make_objective(backbone, params, **weights) -> GanFeatureMatching:
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    kw = {"gan_weight": 1.0, "fm_weight": 10.0, "disc_lr": 1e-2, **weights}
    return GanFeatureMatching(backbone, backbone.transformer, [grid.sigma(n) for n in range(params.grid.kappa + 1)],
                              **kw)


def make_batch(backbone, params, batch: int = 2, frames: int | None = None, size: int | None = None):
    shape = backbone.latent_shape(frames or params.world.frames, size or params.world.size)
    gen = torch.Generator().manual_seed(0)
    x_end_target = torch.randn((batch, *shape), generator=gen)
    x_end_pred = (x_end_target + 0.3 * torch.randn((batch, *shape), generator=gen)).requires_grad_(True)
    sigma = torch.full((batch,), 0.5)
    cond = backbone.encode_prompts(["a red circle moves left"] * batch)
    return ConsistencyBatch(0, torch.zeros(batch, dtype=torch.long), sigma, sigma, sigma * 0, x_end_target,
                            x_end_target, cond, x_end_pred, x_end_target)


def test_group_norm_uses_32_groups_or_the_largest_divisor_below():
    assert group_count(64) == 32 and group_count(48) == 24 and group_count(30) == 30 and group_count(7) == 7


@pytest.mark.parametrize("latent_thw", [(8, 4, 4), (3, 6, 10)])
def test_heads_read_each_frames_token_grid_from_the_input_shape(latent_thw):
    dim, patch = 32, (1, 2, 2)
    disc = Discriminator(dim, num_taps=2, patch_size=patch)
    t, h, w = latent_thw[0], latent_thw[1] // 2, latent_thw[2] // 2
    feats = [torch.randn(3, t * h * w, dim) for _ in range(2)]
    logits = disc(feats, latent_thw)
    assert [lg.shape for lg in logits] == [torch.Size([3, t * h * w])] * 2
    # one logit per token: changing one token's features changes only logits of that token (1×1 convs, per-frame norm)
    bumped = [f.clone() for f in feats]
    bumped[0][1, 5] += 10.0
    again = disc(bumped, latent_thw)
    changed = (again[0] != logits[0]).nonzero().tolist()
    frame_tokens = range((5 // (h * w)) * h * w, (5 // (h * w) + 1) * h * w)
    assert changed and all(b == 1 and tok in frame_tokens for b, tok in changed)
    with pytest.raises(ValueError, match="tokens"):
        disc([f[:, :-1] for f in feats], latent_thw)


def test_hinge_losses_have_the_paper_signs_and_weights():
    real = [torch.tensor([0.5, 2.0]), torch.tensor([-1.0, 1.0])]
    fake = [torch.tensor([-2.0, 0.5]), torch.tensor([0.0, 3.0])]
    # head 1: mean(relu(1+fake)) = (0 + 1.5)/2, mean(relu(1−real)) = (0.5 + 0)/2 → 1.0
    # head 2: (1 + 4)/2 + (2 + 0)/2 = 3.5;  L_D = (1.0 + 3.5)/2
    assert discriminator_hinge(real, fake).item() == pytest.approx(2.25)
    # generator: head 1 mean(relu(1−fake)) = (3 + 0.5)/2 = 1.75; head 2 (1 + 0)/2 = 0.5 → (1.75 + 0.5)/2
    assert generator_hinge(fake).item() == pytest.approx(1.125)
    # L_G = 0.1·(5·1.125 + λ_fm·FM), λ_fm = 10, FM = 0.2
    assert generator_adversarial(fake, torch.tensor(0.2), 10.0).item() == pytest.approx(0.1 * (5 * 1.125 + 10 * 0.2))
    # a more convincing fake lowers the generator loss and raises the discriminator's
    better = [f + 1.0 for f in fake]
    assert generator_hinge(better) < generator_hinge(fake)
    assert discriminator_hinge(real, better) > discriminator_hinge(real, fake)


def test_feature_matching_is_mse_after_the_projection():
    fake = [torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]])]
    real = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3.0, 0.0]]])]
    # identity projection: tap 1 mse = (0 + 4)/2 = 2, tap 2 = (9 + 0)/2 = 4.5 → mean 3.25
    assert feature_matching(fake, real, lambda f: f).item() == pytest.approx(3.25)
    assert feature_matching(fake, real, lambda f: 2 * f).item() == pytest.approx(13.0)


def test_feature_projection_is_the_teachers_output_head_without_modulation(backbone):
    model = backbone.transformer
    feat = torch.randn(2, 5, model.proj_out.in_features)
    expected = model.proj_out(torch.nn.functional.layer_norm(feat, feat.shape[-1:], eps=1e-6))
    torch.testing.assert_close(output_projection(model)(feat), expected, atol=1e-5, rtol=1e-5)


def test_generator_loss_weights_and_gradients(backbone, params):
    gan = make_objective(backbone, params, gan_weight=2.0, fm_weight=10.0)
    batch = make_batch(backbone, params)
    torch.manual_seed(3)
    terms = gan.generator_loss(batch)
    assert set(terms) == {"gan_g", "fm"}
    torch.manual_seed(3)  # the same σ_adv and ε′: recompute by hand
    feat_real, feat_fake = gan.adversarial_features(batch)
    logits = gan.discriminator(feat_fake, batch.x_end_pred.shape[2:])
    torch.testing.assert_close(terms["gan_g"], 0.1 * 5 * 2.0 * generator_hinge(logits))
    torch.testing.assert_close(terms["fm"], 0.1 * 10.0 * feature_matching(feat_fake, feat_real, gan.project))
    assert terms["fm"] > 0
    sum(terms.values()).backward()
    assert batch.x_end_pred.grad is not None and batch.x_end_pred.grad.abs().sum() > 0  # the fake carries grad
    assert all(p.grad is None for p in gan.discriminator.parameters())  # the generator pass leaves D alone
    assert all(p.grad is None for p in backbone.transformer.parameters())  # the teacher is frozen


def test_real_and_fake_share_the_noise_and_sigma(backbone, params):
    gan = make_objective(backbone, params)
    batch = make_batch(backbone, params)
    batch.x_end_pred = batch.x_end_target.clone().requires_grad_(True)  # fake == real → identical features
    feat_real, feat_fake = gan.adversarial_features(batch)
    for r, f in zip(feat_real, feat_fake):
        torch.testing.assert_close(r, f.detach())


def test_discriminator_step_changes_only_the_discriminator(backbone, params):
    gan = make_objective(backbone, params)
    batch = make_batch(backbone, params)
    teacher_before = copy.deepcopy(backbone.transformer.state_dict())
    heads_before = {n: p.detach().clone() for n, p in gan.discriminator.named_parameters()}
    gan.generator_loss(batch)
    logged = gan.after_generator_step(batch)
    assert {"d_loss", "d_real", "d_fake"} <= logged.keys() and logged["d_loss"] >= 0
    assert any(not torch.equal(p, heads_before[n]) for n, p in gan.discriminator.named_parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in backbone.transformer.state_dict().items())
    assert batch.x_end_pred.grad is None  # D trains on detached fakes
    state = gan.state_dict()
    assert {"heads", "optimizer"} == set(state) and state["optimizer"]["state"]
    fresh = make_objective(backbone, params)
    fresh.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(fresh.discriminator.parameters(), gan.discriminator.parameters()))


def test_objective_works_on_a_second_latent_shape(backbone, params):
    gan = make_objective(backbone, params)
    batch = make_batch(backbone, params, batch=1, frames=2 * params.backbone.toy.patch_size[0], size=24)
    terms = gan.generator_loss(batch)
    assert all(torch.isfinite(v) for v in terms.values())
    assert gan.after_generator_step(batch)["d_loss"] >= 0


def test_discriminator_summary_flags_heads_at_chance_over_the_second_half():
    """Hinge L_D = 2 with D(real) = D(fake): at chance; a separating D is not flagged; no GAN: None."""
    def rows(d_loss, real, fake, n=10):
        return [{"step": i, "gan/d_loss": d_loss, "gan/d_real": real, "gan/d_fake": fake} for i in range(n)]

    chance = discriminator_summary(rows(2.004, -0.09, -0.093))
    assert chance["at_chance"] and chance["steps"] == [5, 9]
    assert chance["d_loss"] == pytest.approx(2.004) and chance["real_minus_fake"] == pytest.approx(0.003)
    # separating only late: the first half does not count
    early_chance = rows(2.0, 0.0, 0.0, 5) + [{**r, "step": r["step"] + 5} for r in rows(1.2, 0.6, -0.5, 5)]
    late = discriminator_summary(early_chance)
    assert not late["at_chance"] and late["real_minus_fake"] == pytest.approx(1.1)
    assert discriminator_summary([{"step": 0, "loss": 1.0}]) is None
