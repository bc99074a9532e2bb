"""DetE's adversarial path as the official code has it (METHODS.md, DetE), part by part against hand
computations: σ_adv set, re-noising, heads, the teacher's modulated output head, autocast, the
independent GAN / feature-matching switches, and per-term gradient norms in the loop's history."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcm import config, distill, paths, schedule
from dcm.backbones.base import PromptEmbeds, unpatchify
from dcm.distill.discriminator import (
    CMAP_DIM,
    Discriminator,
    DiscriminatorHead,
    GanFeatureMatching,
    adversarial_sigmas,
    check_variants,
    dete_objective,
    discriminator_summary,
    group_count,
    head_parameter_count,
)
from dcm.distill.loop import ConsistencyBatch, Objective, TemporalCoherence, term_grad_norm, train
from dcm.tracking import StageRun
from helpers import perturbed_dete, smoke_params

REPO = Path(__file__).resolve().parents[1]
CPU_BF16 = partial(torch.autocast, "cpu", dtype=torch.bfloat16)


def make_objective(backbone, params, **weights) -> GanFeatureMatching:
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    kw = {"gan_weight": 1.0, "fm_weight": 10.0, "disc_lr": 1e-2, **weights}
    return GanFeatureMatching(backbone, backbone.transformer,
                              adversarial_sigmas(grid, params.grid.kappa), **kw)


def make_batch(backbone, params, batch: int = 2, frames: int | None = None, size: int | None = None,
               autocast=None):
    shape = backbone.latent_shape(frames or params.world.frames, size or params.world.size)
    gen = torch.Generator().manual_seed(0)
    x_end_target = torch.randn((batch, *shape), generator=gen)
    x_end_pred = (x_end_target + 0.3 * torch.randn((batch, *shape), generator=gen)).requires_grad_(True)
    sigma = torch.full((batch,), 0.5)
    sigma_end = torch.full((batch,), 0.02)  # DetE's endpoints live at σ_min
    cond = backbone.encode_prompts(["a red circle moves left"] * batch)
    return ConsistencyBatch(0, torch.zeros(batch, dtype=torch.long), sigma, sigma, sigma_end, x_end_target,
                            x_end_target, cond, x_end_pred, x_end_target,
                            **({"autocast": autocast} if autocast else {}))


class TeacherSpy:
    """Records every teacher forward the objective makes: (x, σ, autocast on, grad on)."""

    def __init__(self, backbone, monkeypatch):
        self.calls = []
        predict = backbone.predict

        def spy(model, x, sigma, cond, features=False, guidance=None):
            self.calls.append((x.detach().clone(), sigma.clone(), torch.is_autocast_enabled("cpu"),
                               torch.is_grad_enabled()))
            return predict(model, x, sigma, cond, features=features, guidance=guidance)

        monkeypatch.setattr(backbone, "predict", spy)


# ------------------------------------------------------------------------------------------- σ_adv


def test_sigma_adv_is_drawn_from_sigma_min_and_the_grid_below_kappa():
    """Official sigmas_prev[U[0, κ+1)] = {σ_min, σ_0, …, σ_{κ−1}}: κ+1 levels, σ_κ and above never."""
    grid = schedule.teacher_grid(50, 17.0)
    sigmas = adversarial_sigmas(grid, 37)
    assert len(sigmas) == 38 and sigmas[0] == grid.sigma_min == pytest.approx(0.0167, abs=1e-4)
    assert sigmas[1] == pytest.approx(0.2576, abs=1e-4) and sigmas[-1] == grid.sigma(36)
    assert max(sigmas) < grid.sigma(37) == pytest.approx(0.98176, abs=1e-5)
    small = schedule.teacher_grid(10, 3.0)
    assert adversarial_sigmas(small, 2) == [small.sigma_min, small.sigma(0), small.sigma(1)]


def test_objective_renoises_real_and_fake_with_one_noise_from_sigma_end(backbone, params, monkeypatch):
    """x_adv = ((1 − σ_adv)·x + (σ_adv − σ_end)·ε′)/(1 − σ_end), the same σ_adv and ε′ for real and fake."""
    gan = make_objective(backbone, params)
    batch = make_batch(backbone, params)
    spy = TeacherSpy(backbone, monkeypatch)
    torch.manual_seed(3)
    gan.adversarial_features(batch)
    torch.manual_seed(3)  # the objective's draws, by hand: σ_adv index, then ε′
    pick = torch.randint(len(gan.adv_sigmas), (2,))
    eps = torch.randn(batch.x_end_pred.shape)
    s = gan.adv_sigmas[pick].view(-1, 1, 1, 1, 1)
    s_end = batch.sigma_end.view(-1, 1, 1, 1, 1)
    (x_real, sigma_real, _, grad_real), (x_fake, sigma_fake, _, grad_fake) = spy.calls
    torch.testing.assert_close(x_real, ((1 - s) * batch.x_end_target + (s - s_end) * eps) / (1 - s_end))
    torch.testing.assert_close(x_fake,
                               ((1 - s) * batch.x_end_pred.detach() + (s - s_end) * eps) / (1 - s_end))
    assert torch.equal(sigma_real, sigma_fake) and torch.equal(sigma_real, gan.adv_sigmas[pick])
    assert not grad_real and grad_fake  # the real pass has no graph, the fake one carries it to x̂


def test_sigma_adv_never_leaves_the_official_set(backbone, params, monkeypatch):
    gan = make_objective(backbone, params)
    batch = make_batch(backbone, params, batch=4)
    spy = TeacherSpy(backbone, monkeypatch)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(6):
            gan.adversarial_features(batch)
    drawn = {round(float(s), 6) for _, sigma, _, _ in spy.calls for s in sigma}
    allowed = {round(float(s), 6) for s in gan.adv_sigmas}
    assert drawn <= allowed and len(drawn) > 1
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    assert round(grid.sigma(params.grid.kappa), 6) not in allowed and round(grid.sigma_min, 6) in allowed


# ------------------------------------------------------------------------------------------- heads


def test_group_norm_uses_32_groups_or_the_largest_divisor_below():
    assert group_count(64) == 32 and group_count(48) == 24 and group_count(30) == 30 and group_count(7) == 7


@pytest.mark.parametrize("dim, expected", [
    (3072, 3072 * 1024 + 1024**2 + 7 * 1024 + 1),  # HunyuanVideo: 4 201 473
    (1536, 1536 * 1024 + 1024**2 + 7 * 1024 + 1),  # Wan 1.3B: 2 628 609
])
def test_head_width_is_min_c_1024_with_one_residual_conv(dim, expected):
    """C·h (stem conv) + h + h² + h (residual conv) + 4h (two GroupNorms) + h + 1 (logit conv), h = 1024."""
    head = DiscriminatorHead(dim)
    assert expected == head_parameter_count(dim) == sum(p.numel() for p in head.parameters())
    assert [m.out_channels for m in head.modules() if isinstance(m, torch.nn.Conv2d)] == [1024, 1024, 1]
    assert {m.negative_slope for m in head.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.01}
    assert DiscriminatorHead(48).stem[0].out_channels == 48  # narrower than 1024: C itself


def test_head_forward_by_hand():
    """Identity convs, two tokens: GN (one channel per group over the frame) → LeakyReLU(0.01), the
    residual block added back, then a logit conv reading channel 0."""
    head = DiscriminatorHead(2, hidden=2)
    with torch.no_grad():
        for conv in (head.stem[0], head.residual[0]):
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            conv.bias.zero_()
        head.to_logit.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        head.to_logit.bias.zero_()
    grid = torch.tensor([[1.0, 3.0], [2.0, -2.0]]).view(1, 2, 1, 2)  # channel 0: 1, 3; channel 1: 2, −2
    # stem: GN → channel 0 (−1, 1), channel 1 (1, −1); LeakyReLU → (−0.01, 1), (1, −0.01)
    # residual: GN of (−0.01, 1) → (−1, 1) → (−0.01, 1); added back → channel 0 (−0.02, 2)
    torch.testing.assert_close(head(grid).flatten(), torch.tensor([-0.02, 2.0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("latent_thw", [(8, 4, 4), (3, 6, 10)])
def test_heads_read_each_frames_token_grid_from_the_input_shape(latent_thw):
    dim, patch = 32, (1, 2, 2)
    disc = Discriminator(dim, num_taps=2, patch_size=patch)
    t, h, w = latent_thw[0], latent_thw[1] // 2, latent_thw[2] // 2
    feats = [torch.randn(3, t * h * w, dim) for _ in range(2)]
    logits = disc(feats, latent_thw)
    assert [lg.shape for lg in logits] == [torch.Size([3, t * h * w])] * 2
    # one logit per token: changing one token's features changes only logits of that token (1×1 convs,
    # per-frame norm)
    bumped = [f.clone() for f in feats]
    bumped[0][1, 5] += 10.0
    again = disc(bumped, latent_thw)
    changed = (again[0] != logits[0]).nonzero().tolist()
    frame_tokens = range((5 // (h * w)) * h * w, (5 // (h * w) + 1) * h * w)
    assert changed and all(b == 1 and tok in frame_tokens for b, tok in changed)
    with pytest.raises(ValueError, match="tokens"):
        disc([f[:, :-1] for f in feats], latent_thw)


def test_text_conditioned_head_is_a_projection_of_the_prompt():
    """logit = ⟨to_logit(h), W·c⟩/√64 per token: linear in the condition, different prompts different
    logits."""
    torch.manual_seed(0)
    disc = Discriminator(16, num_taps=1, patch_size=(1, 2, 2), cond_dim=8)
    feats = [torch.randn(2, 2 * 2 * 2, 16)]  # 2 frames of 2×2 tokens
    c1, c2 = torch.randn(2, 8), torch.randn(2, 8)
    l1, l2, l12 = (disc(feats, (2, 4, 4), c)[0] for c in (c1, c2, c1 + c2))
    assert not torch.allclose(l1, l2)
    bias = disc(feats, (2, 4, 4), torch.zeros(2, 8))[0]  # W·0 = the cond map's bias
    torch.testing.assert_close(l12 - bias, (l1 - bias) + (l2 - bias), atol=1e-5, rtol=1e-4)
    head = disc.heads[0]
    frames = feats[0].reshape(2, 2, 2, 2, 16).permute(0, 1, 4, 2, 3).reshape(4, 16, 2, 2)
    h = head.stem(frames)
    out = head.to_logit(h + head.residual(h))  # (frames, 64, 2, 2)
    cmap = head.cond_map(c1.repeat_interleave(2, dim=0))  # each frame its video's prompt
    by_hand = (out * cmap[:, :, None, None]).sum(1) / math.sqrt(CMAP_DIM)
    torch.testing.assert_close(l1, by_hand.reshape(2, 8))
    with pytest.raises(ValueError, match="pooled"):
        disc(feats, (2, 4, 4))


# ------------------------------------------------------------------- the teacher's output head (FM)


def _tiny_real_backbones():
    """Wan, HunyuanVideo and CogVideoX adapters around tiny random transformers (no pipeline folders)."""
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
        HunyuanVideoTransformer3DModel,
        WanTransformer3DModel,
    )

    from dcm.backbones import cogvideox, hunyuan, wan

    settings = types.SimpleNamespace()
    torch.manual_seed(0)
    m = WanTransformer3DModel(**wan.TRANSFORMER_CONFIGS["tiny"]).eval()
    yield (wan.WanBackbone(types.SimpleNamespace(transformer=m), settings, 5.0), 16,
           PromptEmbeds(torch.randn(2, 6, 32)))
    m = HunyuanVideoTransformer3DModel(**hunyuan.TRANSFORMER_CONFIGS["tiny"]).eval()
    cond = PromptEmbeds(torch.randn(2, 6, 32), {"attention_mask": torch.ones(2, 6, dtype=torch.long),
                                                "pooled": torch.randn(2, 32)})
    yield hunyuan.HunyuanBackbone(types.SimpleNamespace(transformer=m), settings, 6.0), 4, cond
    m = CogVideoXTransformer3DModel(**cogvideox.TRANSFORMER_CONFIGS["tiny"]).eval()
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", snr_shift_scale=3.0,
                                       set_alpha_to_one=True)
    yield (cogvideox.CogVideoXBackbone(types.SimpleNamespace(transformer=m, scheduler=scheduler),
                                       settings, 6.0),
           4, PromptEmbeds(torch.randn(2, 8, 32)))


def _last_block_projection_and_output(bb, x, cond, monkeypatch):
    """Project a tap on the LAST block: through the output head it must be the network's own output."""
    model = bb.transformer
    last = len(bb.blocks(model)) - 1
    monkeypatch.setattr(bb, "feature_block_indices", lambda _model: [0, last])
    raw = {}

    def keep(_module, _inputs, out):
        raw["out"] = out[0]

    handle = model.register_forward_hook(keep)
    with torch.no_grad():
        _, feats = bb.predict(model, x, torch.tensor([0.3, 0.8]), cond, features=True)
        projected = bb.project_features(model, feats)
    handle.remove()
    return feats, projected, raw["out"]


def test_toy_features_through_the_modulated_head_reproduce_the_teachers_output(backbone, params, monkeypatch):
    x = torch.randn(2, *backbone.latent_shape(params.world.frames, params.world.size))
    cond = backbone.encode_prompts(["a red circle moves left", "a blue square moves up quickly"])
    feats, projected, output = _last_block_projection_and_output(backbone, x, cond, monkeypatch)
    assert feats.latent_thw == tuple(x.shape[2:]) and projected[0].shape == x.shape
    torch.testing.assert_close(projected[1], output)
    # the modulation is part of it: the same taps under the other sample's time embedding differ
    swapped = copy.copy(feats)
    swapped.head_condition = feats.head_condition.flip(0)
    assert not torch.allclose(backbone.project_features(backbone.transformer, swapped)[1], output)


def test_wan_head_modulation_by_hand(backbone):
    """Wan: shift, scale = table + temb; out = proj_out(LayerNorm(h)·(1 + scale) + shift)."""
    model = backbone.transformer
    dim = model.proj_out.in_features
    torch.manual_seed(1)
    hidden, temb = torch.randn(1, 3, dim), torch.randn(1, dim)
    table = model.scale_shift_table[0]  # (2, dim): shift row, scale row
    shift, scale = table[0] + temb[0], table[1] + temb[0]
    expected = model.proj_out(F.layer_norm(hidden, (dim,), eps=1e-6) * (1 + scale) + shift)
    with torch.no_grad():
        torch.testing.assert_close(backbone.output_head(model, hidden, temb), expected, atol=1e-5, rtol=1e-5)


def test_unpatchify_by_hand():
    """Two tokens of a 1×1×2 grid, patch (1, 1, 2), 2 channels: token values (p, C) or (C, p)."""
    tokens = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])  # (B=1, 2 tokens, 4 values)
    last = unpatchify(tokens, (1, 1, 4), (1, 1, 2), channels_last=True)  # values (w0c0, w0c1, w1c0, w1c1)
    torch.testing.assert_close(last.flatten(2), torch.tensor([[[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0]]]))
    first = unpatchify(tokens, (1, 1, 4), (1, 1, 2), channels_last=False)  # values (c0w0, c0w1, c1w0, c1w1)
    torch.testing.assert_close(first.flatten(2), torch.tensor([[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0]]]))


def test_real_families_map_features_through_their_own_output_head(monkeypatch):
    """Wan, HunyuanVideo, CogVideoX: the last block's tap through ``project_features`` is the transformer's
    own output (CogVideoX's is (B, T, C, H, W): the engine's layout is (B, C, T, H, W))."""
    for bb, channels, cond in _tiny_real_backbones():
        x = torch.randn(2, channels, 3, 4, 4)
        _, projected, output = _last_block_projection_and_output(bb, x, cond, monkeypatch)
        if bb.family == "cogvideox":
            output = output.transpose(1, 2)
        assert projected[0].shape == x.shape, bb.family
        torch.testing.assert_close(projected[1], output, msg=bb.family)


def test_backbones_no_longer_import_the_distillation_layer():
    for path in (REPO / "src" / "dcm" / "backbones").glob("*.py"):
        assert "dcm.distill" not in path.read_text(), path.name
    assert "_unwrap" not in (REPO / "src" / "dcm" / "distill" / "discriminator.py").read_text()


# ---------------------------------------------------------------------------------------- objective


def test_generator_loss_weights_and_gradients_by_hand(backbone, params):
    gan = make_objective(backbone, params, gan_weight=2.0, fm_weight=10.0)
    batch = make_batch(backbone, params)
    torch.manual_seed(3)
    terms = gan.generator_loss(batch)
    assert set(terms) == {"gan_g", "fm"}
    torch.manual_seed(3)  # the same σ_adv and ε′: recompute by hand
    feat_real, feat_fake = gan.adversarial_features(batch)
    logits = gan.discriminator(feat_fake, batch.x_end_pred.shape[2:])
    hinge = sum(F.relu(1 - lg).mean() for lg in logits) / len(logits)
    proj_fake = backbone.project_features(backbone.transformer, feat_fake)
    proj_real = backbone.project_features(backbone.transformer, feat_real)
    fm = sum(F.mse_loss(f, r) for f, r in zip(proj_fake, proj_real)) / len(proj_fake)
    torch.testing.assert_close(terms["gan_g"], 0.1 * 5 * 2.0 * hinge)
    torch.testing.assert_close(terms["fm"], 0.1 * 10.0 * fm)
    assert proj_fake[0].shape == batch.x_end_pred.shape and terms["fm"] > 0  # compared in latent space
    sum(terms.values()).backward()
    # the fake carries grad
    assert batch.x_end_pred.grad is not None and batch.x_end_pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in gan.discriminator.parameters())  # the generator pass leaves D alone
    assert all(p.grad is None for p in backbone.transformer.parameters())  # the teacher is frozen


def test_real_and_fake_share_the_noise_and_sigma(backbone, params):
    gan = make_objective(backbone, params)
    batch = make_batch(backbone, params)
    batch.x_end_pred = batch.x_end_target.clone().requires_grad_(True)  # fake == real → identical features
    feat_real, feat_fake = gan.adversarial_features(batch)
    for r, f in zip(feat_real, feat_fake):
        torch.testing.assert_close(r, f.detach())
    torch.testing.assert_close(feat_real.head_condition, feat_fake.head_condition.detach())


def test_teacher_feature_passes_and_the_head_run_inside_the_training_autocast(backbone, params):
    """The batch's autocast (the loop's ``autocast_for``; CPU bf16 here) wraps both teacher passes and
    the output head of feature matching: checked inside hooked forwards."""
    gan = make_objective(backbone, params)
    seen = []
    model = backbone.transformer
    hooks = [model.blocks[0].register_forward_hook(
                 lambda *_: seen.append(("block", torch.is_autocast_enabled("cpu")))),
             model.proj_out.register_forward_hook(
                 lambda *_: seen.append(("head", torch.is_autocast_enabled("cpu"))))]
    try:
        gan.generator_loss(make_batch(backbone, params, autocast=CPU_BF16))
        on = list(seen)
        seen.clear()
        gan.generator_loss(make_batch(backbone, params))  # default: no autocast (the CPU path)
    finally:
        for h in hooks:
            h.remove()
    # real pass, fake pass (each: block 0, its own head), then the FM head on fake and real taps
    assert [k for k, _ in on] == ["block", "head", "block", "head", "head", "head"]
    assert all(flag for _, flag in on) and not any(flag for _, flag in seen)


@pytest.mark.parametrize("gan_weight, fm_weight, terms", [(1.0, 0.0, {"gan_g"}), (0.0, 1.0, {"fm"}),
                                                          (0.1, 1.0, {"gan_g", "fm"})])
def test_gan_and_feature_matching_switch_on_independently(backbone, params, gan_weight, fm_weight, terms):
    gan = make_objective(backbone, params, gan_weight=gan_weight, fm_weight=fm_weight)
    batch = make_batch(backbone, params)
    assert set(gan.generator_loss(batch)) == terms
    logged = gan.after_generator_step(batch)
    if gan_weight > 0:
        assert {"d_loss", "d_real", "d_fake"} <= logged.keys() and gan.state_dict()
    else:  # feature matching alone: no heads, no D step, nothing to resume
        assert gan.discriminator is None and logged == {} and gan.state_dict() == {}


def test_params_rows_get_their_adversarial_terms_and_the_ablation_rows_none(backbone):
    """params.yaml: dcm has hinge + FM; od, od_pe, od_pe_tc (Table 3's rows before GAN) have neither."""
    from dcm import config

    full = config.load(REPO / "params.yaml")
    grid = full.teacher_grid()
    built = {m: dete_objective(backbone, c.dete, grid, full.grid.kappa, full.training)
             for m, c in full.methods.items()
             if c.kind == "dcm" and c.dete is not None and not c.replicate_of}
    assert {m for m, o in built.items() if o is None} == {"od", "od_pe", "od_pe_tc"}
    dcm = built["dcm"]
    assert dcm.discriminator is not None \
        and (dcm.gan_weight, dcm.fm_weight) == (full.methods["dcm"].dete.gan_weight,
                                                full.methods["dcm"].dete.fm_weight)
    assert dcm.adv_sigmas.tolist() == pytest.approx(adversarial_sigmas(grid, full.grid.kappa))


def test_both_switches_off_is_refused(backbone, params):
    with pytest.raises(ValueError, match="gan_weight 0.0 and fm_weight 0.0"):
        make_objective(backbone, params, gan_weight=0.0, fm_weight=0.0)


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
    assert all(torch.equal(p, q)
               for p, q in zip(fresh.discriminator.parameters(), gan.discriminator.parameters()))


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


# -------------------------------------------------------------------- the loop: autocast, grad norms


def test_term_grad_norm_by_hand_leaves_grad_alone():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    term = 3 * p[0] + 4 * p[1] + 0 * q.sum()  # ∂/∂p = (3, 4), ∂/∂q = 0 → 5
    assert term_grad_norm(term, [p, q]) == pytest.approx(5.0)
    assert p.grad is None and q.grad is None
    assert term_grad_norm(torch.tensor(1.0), [p]) == 0.0  # a constant term: no gradient
    term.backward()  # the graph was kept for the step's own backward
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0]))


class AutocastSpy(Objective):
    name = "spy"

    def __init__(self):
        self.seen = []

    def generator_loss(self, batch):
        with batch.autocast():
            self.seen.append(torch.is_autocast_enabled("cpu"))
        return {}


def test_the_loop_hands_its_autocast_to_the_objectives(smoke, monkeypatch):
    from dcm.distill import loop

    monkeypatch.setattr(loop, "autocast_for", lambda device: CPU_BF16)
    params = smoke_params(source="online")
    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    student = distill.full_parameter_student(backbone)
    spy = AutocastSpy()
    phase = schedule.expert_phases(params.grid.steps, params.grid.kappa)["dete"]
    spec = distill.DistillSpec(name="spy", student=student, trainable=list(student.parameters()),
                               phases=[phase], target="online", lr=1e-4, train_steps=1, objectives=[spy])
    train(spec, backbone, source, params, smoke / "spy", StageRun(None))
    assert spy.seen == [True]


def _dete_run(out: Path, log_every: int, checkpointing: bool, **training):
    """3 DetE steps (LoRA) with GAN + FM and temporal coherence through the loop, from a fresh teacher
    load; ``training``: more training keys."""

    params = smoke_params(source="online", log_every=log_every, gradient_checkpointing=checkpointing,
                          **training)
    torch.manual_seed(0)
    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    kappa = params.grid.kappa
    # lora_B off zero: the adapter's gradients flow through A too
    dual, grid = perturbed_dete(backbone, params)
    gan = GanFeatureMatching(backbone, backbone.transformer, adversarial_sigmas(grid, kappa), gan_weight=1.0,
                             fm_weight=1.0, disc_lr=1e-3)
    phase = schedule.expert_phases(params.grid.steps, kappa)["dete"]
    spec = distill.DistillSpec(name="dete", student=dual, trainable=dual.trainable_parameters(),
                               phases=[phase], target="online", lr=1e-3, train_steps=3,
                               objectives=[TemporalCoherence(1.0, 1), gan])
    train(spec, backbone, source, params, out, StageRun(None))
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [p.detach().clone() for p in spec.trainable], gan, rows


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_term_grad_norms_are_logged_on_logging_steps_and_change_nothing(smoke, checkpointing):
    """log_every 1: every step holds grad_norm/<term> for each term; log_every 1000: only step 0.  The
    trained DetE, the discriminator and the logged losses are bit-identical either way (also with block
    recompute, which the extra ``autograd.grad`` passes run through)."""
    logged, gan_logged, rows_logged = _dete_run(smoke / "every", 1, checkpointing)
    plain, gan_plain, rows_plain = _dete_run(smoke / "first", 1000, checkpointing)
    keys = {"grad_norm/consistency", "grad_norm/tc", "grad_norm/gan/gan_g", "grad_norm/gan/fm"}
    assert all(keys <= r.keys() and all(r[k] > 0 for k in keys) for r in rows_logged)
    assert keys <= rows_plain[0].keys() \
        and not any(k.startswith("grad_norm/") for r in rows_plain[1:] for k in r)
    assert all(torch.equal(a, b) for a, b in zip(logged, plain, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(gan_logged.discriminator.parameters(),
                                                 gan_plain.discriminator.parameters(), strict=True))
    for a, b in zip(rows_logged, rows_plain, strict=True):
        assert {k: v for k, v in a.items()
                if k in ("loss", "grad_norm", "consistency", "tc", "gan/fm", "gan/d_loss")} \
            == {k: v for k, v in b.items()
                if k in ("loss", "grad_norm", "consistency", "tc", "gan/fm", "gan/d_loss")}
    # the pre-clip total is at most the sum of its terms' norms (triangle inequality)
    assert all(r["grad_norm"] <= sum(r[k] for k in keys) * (1 + 1e-5) for r in rows_logged)


def test_term_grad_norms_off_takes_no_extra_gradient_pass_and_trains_the_same(smoke, monkeypatch):
    """training.term_grad_norms false (the real presets): no step logs grad_norm/<term> nor runs a gradient
    pass for one (neither the one-process autograd.grad nor the multi-rank extra backward), the total norm is
    still logged, and DetE, D and the losses are bit-identical to a run that logs them every step."""
    from dcm.distill import loop

    on, gan_on, rows_on = _dete_run(smoke / "on", 1, False)

    def refuse(*args, **kwargs):
        raise AssertionError("a per-term gradient pass with training.term_grad_norms off")

    monkeypatch.setattr(loop, "term_grad_norm", refuse)
    monkeypatch.setattr(loop, "term_grad_norms_by_backward", refuse)
    off, gan_off, rows_off = _dete_run(smoke / "off", 1, False, term_grad_norms=False)
    assert all("grad_norm" in r and not any(k.startswith("grad_norm/") for k in r) for r in rows_off)
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(gan_on.discriminator.parameters(),
                                                 gan_off.discriminator.parameters(), strict=True))
    for a, b in zip(rows_on, rows_off, strict=True):
        assert {k: a[k] for k in ("loss", "grad_norm", "consistency", "tc", "gan/fm", "gan/d_loss")} \
            == {k: b[k] for k in ("loss", "grad_norm", "consistency", "tc", "gan/fm", "gan/d_loss")}


# ------------------------------------------------------------------ adversarial variants (issue 15)


def at_step(batch: ConsistencyBatch, step: int) -> ConsistencyBatch:
    return dataclasses.replace(batch, step=step)


def disc_state(gan) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in gan.discriminator.named_parameters()}


def adam_steps(gan) -> int:
    return int(next(iter(gan.optimizer.state.values()))["step"])


def test_disc_warmup_trains_only_d_and_keeps_fm(backbone, params):
    """disc_warmup 2: steps 0 and 1 have no hinge term (G's gradient is FM's alone) while D steps; step 2 has
    it."""
    gan = make_objective(backbone, params, disc_warmup=2)
    fm_only = make_objective(backbone, params, gan_weight=0.0)
    batch = make_batch(backbone, params)
    for step in range(3):
        b = at_step(batch, step)
        before = disc_state(gan)
        torch.manual_seed(step)
        terms = gan.generator_loss(b)
        assert set(terms) == ({"fm"} if step < 2 else {"gan_g", "fm"}), step
        if step < 2:  # the generator's gradient is the FM term's only: identical to an FM-only objective's
            (grad,) = torch.autograd.grad(sum(terms.values()), b.x_end_pred)
            torch.manual_seed(step)
            (fm_grad,) = torch.autograd.grad(sum(fm_only.generator_loss(b).values()), b.x_end_pred)
            torch.testing.assert_close(grad, fm_grad, rtol=0, atol=0)
        logged = gan.after_generator_step(b)
        assert logged["g_hinge_on"] == float(step >= 2)
        assert any(not torch.equal(p, before[n])
                   for n, p in gan.discriminator.named_parameters())  # D trained
    assert adam_steps(gan) == 3


def test_disc_warmup_without_fm_runs_the_fake_pass_without_grad(backbone, params, monkeypatch):
    gan = make_objective(backbone, params, fm_weight=0.0, disc_warmup=1)
    batch = make_batch(backbone, params)
    spy = TeacherSpy(backbone, monkeypatch)
    assert gan.generator_loss(batch) == {}
    assert [grad for *_, grad in spy.calls] == [False, False]
    assert gan.after_generator_step(batch)["d_loss"] >= 0 and adam_steps(gan) == 1


def test_disc_steps_3_takes_three_d_steps_per_g_step_on_fresh_noise(backbone, params, monkeypatch):
    """disc_steps 3: three AdamW steps per generator step; the first on the generator pass's features, the two
    further ones re-noise the same real and (detached) fake endpoints with fresh σ_adv, ε′ (teacher, no
    grad)."""
    gan = make_objective(backbone, params, disc_steps=3)
    batch = make_batch(backbone, params, batch=4)
    torch.manual_seed(0)
    gan.generator_loss(batch)
    spy = TeacherSpy(backbone, monkeypatch)
    seen = []
    step = gan._discriminator_step

    def counted(*args):
        seen.append(disc_state(gan))
        return step(*args)

    monkeypatch.setattr(gan, "_discriminator_step", counted)
    torch.manual_seed(1)
    logged = gan.after_generator_step(batch)
    assert adam_steps(gan) == 3 and len(seen) == 3
    assert all(any(not torch.equal(a[n], b[n]) for n in a)
               for a, b in zip(seen, seen[1:]))  # each step moved D
    assert len(spy.calls) == 4 and not any(grad for *_, grad in spy.calls)  # 2 further (real, fake) passes
    torch.manual_seed(1)  # the further steps' draws, by hand
    s_end = batch.sigma_end.view(-1, 1, 1, 1, 1)
    for k in range(2):
        pick = torch.randint(len(gan.adv_sigmas), (4,))
        eps = torch.randn(batch.x_end_pred.shape)
        s = gan.adv_sigmas[pick].view(-1, 1, 1, 1, 1)
        (x_real, sig_real, *_), (x_fake, sig_fake, *_) = spy.calls[2 * k: 2 * k + 2]
        torch.testing.assert_close(x_real, ((1 - s) * batch.x_end_target + (s - s_end) * eps) / (1 - s_end))
        torch.testing.assert_close(x_fake,
                                   ((1 - s) * batch.x_end_pred.detach() + (s - s_end) * eps) / (1 - s_end))
        assert torch.equal(sig_real, sig_fake) and torch.equal(sig_real, gan.adv_sigmas[pick])
    assert set(logged) == {"d_loss", "d_real", "d_fake"}  # the mean over the three steps
    one = make_objective(backbone, params)
    one.generator_loss(batch)
    one.after_generator_step(batch)
    assert adam_steps(one) == 1


def test_hinge_margin_running_mean_and_latched_gate(backbone, params):
    """m₁ = Δ₁, m_j = 0.9·m_{j−1} + 0.1·Δ_j with Δ = d_real − d_fake of each D step; the hinge is off
    until m > τ, then stays on; margin and gate are resume state."""
    gan = make_objective(backbone, params, hinge_margin=0.2)
    batch = make_batch(backbone, params)
    assert not gan.hinge_on(0) and set(gan.generator_loss(batch)) == {"fm"}
    m = None
    for delta in (0.1, 0.5, 0.5):
        gan._update_margin(delta)
        m = delta if m is None else 0.9 * m + 0.1 * delta
        assert gan.margin == pytest.approx(m)
    assert m == pytest.approx(0.1 * 0.81 + 0.05 * 0.9 + 0.05) and m < 0.2 and not gan.hinge_on(5)
    for _ in range(30):  # climbs past 0.2
        gan._update_margin(0.5)
    assert gan.margin > 0.2 and gan.hinge_on(0) and set(gan.generator_loss(batch)) == {"gan_g", "fm"}
    for _ in range(30):
        gan._update_margin(-1.0)
    assert gan.margin < 0.2 and gan.hinge_on(0)  # latched
    state = gan.state_dict()
    assert state["margin"] == {"value": gan.margin, "open": True}
    fresh = make_objective(backbone, params, hinge_margin=0.2)
    fresh.load_state_dict(state)
    assert fresh.margin == gan.margin and fresh.hinge_open


def test_hinge_margin_is_measured_on_the_d_steps(backbone, params):
    """Real D steps on a separable batch (fake = target + 3·noise): the logged margin follows the running mean
    of the logged d_real − d_fake, and the hinge switches on at the first step after it passes τ."""
    gan = make_objective(backbone, params, hinge_margin=0.2, disc_lr=1e-2)
    batch = make_batch(backbone, params, batch=4)
    noise = torch.randn(batch.x_end_target.shape, generator=torch.Generator().manual_seed(7))
    batch.x_end_pred = (batch.x_end_target + 3.0 * noise).requires_grad_(True)
    m, opened = None, None
    torch.manual_seed(0)
    for step in range(40):
        b = at_step(batch, step)
        terms = gan.generator_loss(b)
        assert ("gan_g" in terms) == (opened is not None and step > opened)
        logged = gan.after_generator_step(b)
        delta = logged["d_real"] - logged["d_fake"]
        m = delta if m is None else 0.9 * m + 0.1 * delta
        assert logged["margin"] == pytest.approx(m, abs=1e-9) \
            and logged["g_hinge_on"] == float("gan_g" in terms)
        if opened is None and m > 0.2:
            opened = step
    assert opened is not None, "D should separate fake = target + 3·noise within 40 steps at lr 1e-2"


def _student_batch(backbone, params, student, grid, n=(2, 0)):
    """A DetE micro-batch as the loop builds it: x_n at grid index n, x̂ = x_n + (σ_min − σ_n)·v_θ(x_n)."""
    from dcm.distill import losses

    n = torch.tensor(n)
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    x_n = torch.randn((len(n), *shape), generator=torch.Generator().manual_seed(2))
    sigma_n = torch.tensor([grid.sigma(int(i)) for i in n], dtype=torch.float32)
    sigma_end = torch.full_like(sigma_n, grid.sigma_min)
    cond = backbone.encode_prompts(["a red circle moves left"] * len(n))
    x_end_pred = losses.euler_endpoint(x_n, backbone.predict(student, x_n, sigma_n, cond).float(),
                                       sigma_n, sigma_end)
    return ConsistencyBatch(0, n, sigma_n, sigma_n, sigma_end, x_n, x_n, cond, x_end_pred,
                            x_end_pred.detach() + 1.0)


def test_real_ema_is_the_ema_students_endpoint(backbone, params, monkeypatch):
    """real="ema": θ_EMA starts at DetE's θ (real = fake at step 0), follows θ_EMA ← 0.9·θ_EMA + 0.1·θ once
    per step, and the real is x_n + (σ_end − σ_n)·v_θEMA(x_n) (a copy of the student holding θ_EMA, by
    hand)."""
    from dcm.distill import losses

    dual, grid = perturbed_dete(backbone, params)
    trainable = dual.trainable_parameters()
    gan = make_objective(backbone, params, real="ema", student=dual, trainable=trainable, ema_decay=0.9)
    batch = _student_batch(backbone, params, dual, grid)
    torch.testing.assert_close(gan.real_endpoint(batch), batch.x_end_pred.detach(), rtol=0, atol=0)
    theta0 = [p.detach().clone() for p in trainable]
    with torch.no_grad():
        for i, p in enumerate(trainable):  # an optimiser step, by hand
            p.add_(0.01 * (i % 3 + 1))
    gan.after_generator_step(at_step(batch, 0))
    gan.after_generator_step(at_step(batch, 0))  # a second micro-batch of the same step: no second update
    names = {id(p): n for n, p in dual.named_parameters()}
    for p, p0 in zip(trainable, theta0):
        torch.testing.assert_close(gan.ema[names[id(p)]], 0.9 * p0 + 0.1 * p.detach())
    by_hand = copy.deepcopy(dual)
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            if name in gan.ema:
                p.copy_(gan.ema[name])
        v = backbone.predict(by_hand, batch.x_n, batch.sigma_n, batch.cond).float()
    expected = losses.euler_endpoint(batch.x_n, v, batch.sigma_n, batch.sigma_end)
    real = gan.real_endpoint(batch)
    torch.testing.assert_close(real, expected)
    assert not torch.allclose(real, batch.x_end_pred.detach())
    assert all(torch.equal(p, q)
               for p, q in zip(dual.trainable_parameters(), trainable))  # the live θ is back
    spy = TeacherSpy(backbone, monkeypatch)  # the real side D and FM see: x̂_EMA re-noised with the fake's ε′
    torch.manual_seed(4)
    gan.adversarial_features(batch)
    torch.manual_seed(4)
    pick, eps = torch.randint(len(gan.adv_sigmas), (2,)), torch.randn(batch.x_n.shape)
    s, s_end = gan.adv_sigmas[pick].view(-1, 1, 1, 1, 1), batch.sigma_end.view(-1, 1, 1, 1, 1)
    (x_ema, sigma_ema, _, grad_ema), (x_real, *_), (x_fake, *_) = spy.calls  # EMA student, teacher real, fake
    assert torch.equal(x_ema, batch.x_n) and torch.equal(sigma_ema, batch.sigma_n) and not grad_ema
    torch.testing.assert_close(x_real, ((1 - s) * expected + (s - s_end) * eps) / (1 - s_end))
    torch.testing.assert_close(x_fake,
                               ((1 - s) * batch.x_end_pred.detach() + (s - s_end) * eps) / (1 - s_end))
    state = gan.state_dict()
    assert set(state) == {"heads", "optimizer", "ema"} and set(state["ema"]) == set(gan.ema)
    fresh = make_objective(backbone, params, real="ema", student=copy.deepcopy(dual), ema_decay=0.9)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.ema[n], gan.ema[n]) for n in gan.ema)


def test_real_ema_without_a_student_is_named(backbone, params):
    gan = make_objective(backbone, params, real="ema")
    with pytest.raises(RuntimeError, match="bind_student"):
        gan.generator_loss(make_batch(backbone, params))


def test_real_trajectory_is_the_cached_trajectorys_sigma_min_point(smoke, monkeypatch):
    """real="trajectory": the batch's own stored trajectories at σ_end (σ_min for DetE), re-noised with the
    same σ_adv and ε′ as the fake; at the phase boundary (n = 0) that point is x_{n−1} itself."""
    from dcm.backbones import load_teacher
    from dcm.data.trajectories import TrajectoryStore
    from dcm.distill.discriminator import TrajectoryEndpoints
    from dcm.pipeline.stages import trajectories

    params = smoke_params()
    trajectories.run(params)
    backbone = load_teacher(params, paths.TEACHER)
    store = TrajectoryStore(paths.TRAJECTORIES)
    gan = make_objective(backbone, params, real="trajectory")
    with pytest.raises(RuntimeError, match="watch_source"):
        gan.real_endpoint(make_batch(backbone, params))
    source = gan.watch_source(distill.CachedSource(store, backbone))
    assert isinstance(source, TrajectoryEndpoints) and len(source) == len(store) and source.kind == "cached"
    rows, n = torch.tensor([3, 1, 6]), torch.tensor([4, 0, 2])
    data = source.batch(rows, n, torch.Generator())
    grid = params.teacher_grid()
    sigma = torch.tensor([grid.sigma(int(i)) for i in n])
    sigma_prev = torch.tensor([grid.sigma(int(i) - 1) for i in n])
    sigma_end = torch.full((3,), grid.sigma_min)
    x_end_pred = (data.x_n + 0.1).requires_grad_(True)
    batch = ConsistencyBatch(0, n, sigma, sigma_prev, sigma_end, data.x_n, data.x_prev, data.cond, x_end_pred,
                             data.x_prev)
    end_points = torch.as_tensor(store.latents([3, 1, 6], -1)).float()
    real = gan.real_endpoint(batch)
    torch.testing.assert_close(real, end_points, rtol=0, atol=0)
    torch.testing.assert_close(real[1], data.x_prev[1], rtol=0, atol=0)  # n = 0: x_{n−1} is the σ_min point
    assert not torch.allclose(real[0], data.x_prev[0])
    spy = TeacherSpy(backbone, monkeypatch)
    torch.manual_seed(5)
    gan.generator_loss(batch)
    torch.manual_seed(5)
    pick, eps = torch.randint(len(gan.adv_sigmas), (3,)), torch.randn(data.x_n.shape)
    s, s_end = gan.adv_sigmas[pick].view(-1, 1, 1, 1, 1), sigma_end.view(-1, 1, 1, 1, 1)
    (x_real, *_), (x_fake, *_) = spy.calls[:2]
    torch.testing.assert_close(x_real, ((1 - s) * end_points + (s - s_end) * eps) / (1 - s_end))
    torch.testing.assert_close(x_fake, ((1 - s) * x_end_pred.detach() + (s - s_end) * eps) / (1 - s_end))
    stranger = dataclasses.replace(batch, x_n=data.x_n.clone())
    with pytest.raises(RuntimeError, match="did not come from the watched source"):
        gan.real_endpoint(stranger)
    with pytest.raises(config.ConfigError, match=r"training\.source = 'online'.*cached"):
        TrajectoryEndpoints(distill.make_source(smoke_params(source="online"), backbone))


def test_real_trajectory_with_the_online_source_fails_before_training(smoke):
    """training.source: online has no cached trajectory: the stage stops with a ConfigError naming the key,
    before it loads anything or writes a checkpoint."""
    from dcm import methods

    params = smoke_params(source="online")
    with pytest.raises(config.ConfigError, match=r"methods\.dcm_real_traj\.dete\.real = 'trajectory'.*"
                                                 r"training\.source: online"):
        methods.train(params, "dcm_real_traj", "train_dete")
    assert not paths.checkpoint("dcm_real_traj").exists()
    for bad, key in (({"gan_weight": 0.0, "disc_steps": 3}, "disc_steps"),
                     ({"gan_weight": 0.0, "disc_warmup": 2}, "disc_warmup"),
                     ({"gan_weight": 0.0, "hinge_margin": 0.1}, "hinge_margin"),
                     ({"gan_weight": 0.0, "fm_weight": 0.0, "real": "ema"}, "real")):
        dete = dataclasses.replace(params.methods["dcm"].dete, **bad)
        with pytest.raises(config.ConfigError, match=rf"methods\.dcm\.dete\.{key} = "):
            check_variants(dete, params.training, "methods.dcm.dete")


def test_variant_keys_validate_with_the_key_path():
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    for key, value, allowed in (("disc_steps", 0, "1"), ("disc_warmup", -1, "0"), ("real", "fake", "target"),
                                ("hinge_margin", float("nan"), "finite")):
        bad = copy.deepcopy(raw)
        bad["methods"]["dcm"]["dete"][key] = value
        with pytest.raises(config.ConfigError, match=rf"methods\.dcm\.dete\.{key} = .*{allowed}"):
            config.parse(bad)
    bad = copy.deepcopy(raw)
    bad["methods"]["dcm"]["seme"]["real"] = "ema"  # a DetE key on SemE
    with pytest.raises(config.ConfigError, match=r"methods\.dcm\.seme"):
        config.parse(bad)


def test_variant_rows_are_dcm_with_one_change_each():
    """params.yaml: dcm_dwarm, dcm_d3, dcm_margin, dcm_real_ema, dcm_real_traj are ablation rows with dcm's
    budget, differing from dcm only in their variant; dcm keeps the paper's defaults."""
    full = config.load(REPO / "params.yaml")
    variants = {"dcm_dwarm": {"disc_warmup": 50}, "dcm_d3": {"disc_steps": 3},
                "dcm_margin": {"hinge_margin": 0.2}, "dcm_real_ema": {"real": "ema"},
                "dcm_real_traj": {"real": "trajectory"}}
    base = dataclasses.asdict(full.methods["dcm"])
    assert {k: base["dete"][k] for k in ("disc_warmup", "disc_steps", "hinge_margin", "real")} == \
        {"disc_warmup": 0, "disc_steps": 1, "hinge_margin": None, "real": "target"}
    for name, change in variants.items():
        row = dataclasses.asdict(full.methods[name])
        assert row["ablation"] and not base["ablation"]
        expected = {**base, "ablation": True, "dete": {**base["dete"], **change}}
        assert row == expected, name
    smoke = config.load(REPO / "params.yaml", preset="smoke")
    for name in variants:
        assert smoke.methods[name].seme.train_steps == smoke.methods[name].dete.train_steps == 4


def test_default_variants_leave_the_objective_and_its_identity_as_before(backbone, params):
    """dcm's row builds the objective of the official path: no gate, 1:1, real = x̂_tgt, and nothing extra in
    its resume state, its log or the run's resume identity."""
    from dcm.methods.dual_expert import variant_settings

    gan = dete_objective(backbone, params.methods["dcm"].dete, params.teacher_grid(), params.grid.kappa,
                         params.training)
    assert (gan.disc_warmup, gan.disc_steps, gan.hinge_margin, gan.real) == (0, 1, None, "target")
    batch = make_batch(backbone, params)
    assert gan.hinge_on(0) and torch.equal(gan.real_endpoint(batch), batch.x_end_target)
    gan.generator_loss(batch)
    assert set(gan.after_generator_step(batch)) == {"d_loss", "d_real", "d_fake"}
    assert set(gan.state_dict()) == {"heads", "optimizer"}
    assert variant_settings(params.methods["dcm"].dete) == {}
    assert variant_settings(params.methods["dcm_d3"].dete) == {"disc_steps": 3}


def _variant_run(out: Path, params, steps: int, real: str, tau: float, fail_at: int | None = None):
    """A DetE run through the loop with the stateful variants at once (margin gate, warm-up, 2 D steps, a
    real)."""
    backbone = distill.load_backbone(params)
    torch.manual_seed(0)
    dual, grid = perturbed_dete(backbone, params)
    gan = GanFeatureMatching(backbone, backbone.transformer, adversarial_sigmas(grid, params.grid.kappa),
                             gan_weight=1.0, fm_weight=1.0, disc_lr=1e-2, disc_steps=2, hinge_margin=tau,
                             disc_warmup=1, real=real, student=dual, trainable=dual.trainable_parameters(),
                             ema_decay=0.5)
    source = gan.watch_source(distill.make_source(params, backbone))
    objectives = [gan] + ([_Interrupt(fail_at)] if fail_at is not None else [])
    phase = schedule.expert_phases(params.grid.steps, params.grid.kappa)["dete"]
    spec = distill.DistillSpec(name="dete", student=dual, trainable=dual.trainable_parameters(),
                               phases=[phase], target="online", lr=1e-3, train_steps=steps,
                               objectives=objectives, settings={"real": real})
    result = train(spec, backbone, source, params, out, StageRun(None))
    return result, gan


class _Interrupt(Objective):
    name = "interrupt"

    def __init__(self, step):
        self.step = step

    def generator_loss(self, batch):
        if batch.step == self.step:
            raise KeyboardInterrupt("simulated preemption")
        return {}


# τ tiny: on this CPU the gate opens before the checkpoint at step 3 (the margins of these 6 steps are ~1e-5)
@pytest.mark.parametrize("real, tau", [("ema", 5e-6), ("trajectory", 2e-4)])
def test_variant_state_resumes_exactly(smoke, real, tau):
    """6 steps straight vs 3 steps, a kill in step 4 and a resume: the same losses, D, margin and gate, θ_EMA
    (CPU); real="trajectory" reads the cached store through the loop (its batches recognised by their x_n)."""
    params = smoke_params(source="online" if real == "ema" else "cached", checkpoint_every=3)
    if real == "trajectory":
        from dcm.pipeline.stages import trajectories

        trajectories.run(params)
    torch.manual_seed(0)
    straight, gan_a = _variant_run(smoke / "straight", params, 6, real, tau, fail_at=-1)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _variant_run(smoke / "resumed", params, 6, real, tau, fail_at=4)
    resumed, gan_b = _variant_run(smoke / "resumed", params, 6, real, tau, fail_at=-1)
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses[3:]
    assert all(torch.equal(p, q)
               for p, q in zip(gan_a.discriminator.parameters(), gan_b.discriminator.parameters()))
    assert gan_a.margin == gan_b.margin and gan_a.hinge_open == gan_b.hinge_open
    assert all(torch.equal(gan_a.ema[n], gan_b.ema[n]) for n in gan_a.ema) \
        and bool(gan_a.ema) == (real == "ema")
    rows = [json.loads(line) for line in (smoke / "resumed" / "history.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) | {"step_s": r["step_s"]} for line, r in
                    zip((smoke / "straight" / "history.jsonl").read_text().splitlines(), rows)]
    assert [r["step"] for r in rows] == list(range(6)) and rows[0]["gan/g_hinge_on"] == 0.0
    assert all("gan/margin" in r for r in rows)
    assert all(("gan/gan_g" in r) == (r["gan/g_hinge_on"] == 1.0) for r in rows)
