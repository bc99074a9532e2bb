"""Fidelity to the official code (issue 31, item 6): DMD2's generator steps and distribution-matching window
on shifted grids (DMD2, FastVideo), Wan DetE's copied layers (Vchitect/DCM), the discriminator head width,
the LCM sampler's last step against where LCM trains to, and the default table's DMD2 row without its GAN."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dcm import config, schedule
from dcm.backbones.wan import TRANSFORMER_CONFIGS
from dcm.distill import dmd2, losses
from dcm.distill.loop import _check_grid, phase_tables
from dcm.sampling import sample_lcm
from dcm.schedule import SamplingStep
from helpers import REPO

T = 1000


def shifted(u, shift: float):
    """The flow-matching shift of an unshifted σ (FastVideo's ``shift_timestep``, diffusers' scheduler)."""
    u = np.asarray(u, dtype=np.float64)
    return shift * u / (1 + (shift - 1) * u)


# ------------------------------------------------------------------------------------ DMD2's timesteps


@pytest.mark.parametrize("shift", [17.0, 3.0])
def test_dmd2_generator_sigmas_are_the_shifted_images_of_evenly_spaced_unshifted_steps(shift):
    """DMD2: range(999, 0, −250) = 999, 749, 499, 249 on the training timesteps; FastVideo
    (warp_denoising_step): scheduler.timesteps[1000 − t] for t = 1000, 750, 500, 250.  Both: σ = shift(1,
    0.75, 0.5, 0.25)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = dmd2.generator_schedule(T, shift, 4)
    sigmas = [s.sigma for s in steps]
    np.testing.assert_allclose(sigmas, shifted([1.0, 0.75, 0.5, 0.25], shift), rtol=0, atol=1e-12)
    timesteps = torch.cat([FlowMatchEulerDiscreteScheduler(shift=shift).timesteps, torch.zeros(1)])
    warped = timesteps[T - torch.tensor([1000, 750, 500, 250])] / T  # FastVideo's warp, as it indexes
    np.testing.assert_allclose(sigmas, warped.double().numpy(), rtol=0, atol=1e-6)
    grid = dmd2.generator_grid(T, shift)
    assert dmd2.generator_indices(grid, steps) == list(range(T - 1, 0, -(T // 4)))  # DMD2's list
    if shift == 17.0:  # the real presets: the last generator step at σ 0.85 (→ 0), as in DMD2/FastVideo
        assert sigmas[-1] == pytest.approx(0.85) and sigmas[1] == pytest.approx(0.98077, abs=1e-5)
    else:  # the shapes world (grid.shift 3): 1, 0.9, 0.75, 0.5 (the 50-point grid gave 1, 0.905, 0.75, 0.513)
        np.testing.assert_allclose(sigmas, [1.0, 0.9, 0.75, 0.5], atol=1e-12)
    # 1 and 2 steps as DMD2 places them: u = 1 and u = 1, 0.5
    assert [s.sigma for s in dmd2.generator_schedule(T, shift, 1)] == [1.0]
    np.testing.assert_allclose([s.sigma for s in dmd2.generator_schedule(T, shift, 2)],
                               shifted([1.0, 0.5], shift), atol=1e-12)


def test_the_dmd2_rows_sample_and_train_at_the_generator_steps():
    """The row's sampling schedule is the generator's, the loop takes the generator's own grid (not the
    teacher grid, which cannot hold u = 0.75, 0.25) and its phases end at σ = 0 (the generator's x0)."""
    from dcm.methods import dmd2 as method

    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["grid"]["shift"] = config.load_raw(REPO / "params.yaml", preset="wan")["grid"]["shift"]
    params = config.parse(raw)
    assert params.grid.shift == 17.0
    steps = method.schedule(params, "dmd2")
    assert [s.sigma for s in steps] == [s.sigma for s in dmd2.generator_schedule(T, 17.0, 4)]
    grid = dmd2.generator_grid(T, 17.0)
    source = SimpleNamespace(own_grid=True, grid_sigmas=grid.extended)
    sigmas_ext = _check_grid(source, params)
    assert len(sigmas_ext) == T + 1 and sigmas_ext[0] == 0.0
    indices = dmd2.generator_indices(grid, steps)
    allowed, end_of = phase_tables(dmd2.generator_phases(indices), len(sigmas_ext) - 1)
    assert sorted(allowed.tolist()) == sorted(indices)
    np.testing.assert_allclose(sigmas_ext[allowed.numpy() + 1], sorted(s.sigma for s in steps), atol=1e-12)
    assert set(sigmas_ext[end_of[allowed].numpy() + 1]) == {0.0}
    assert method.lcm_end_sigma(params, "dmd2") == 0.0  # sampled to its x0, as DMD2 trains it


def official_dm_sigmas(shift: float, t_min: float = 0.02, t_max: float = 0.98) -> np.ndarray:
    """FastVideo's DMD score timestep over every draw: randint(0, 1000) → shift_timestep →
    clamp(int(0.02·1000), int(0.98·1000)), as σ."""
    u = np.arange(T, dtype=np.float64)
    t = T * shifted(u / T, shift)
    return np.clip(t, int(t_min * T), int(t_max * T)) / T


def test_the_dm_window_is_shifted_then_clamped_as_the_official_rule(params, backbone):
    """At shift 17 the window covers σ ∈ [0.02, 0.98] (the official rule), not [0.27, 1] (the window taken
    on the unshifted scale); the share clamped at 0.98 and the share below 0.27 are the official ones."""
    shift = 17.0
    source = SimpleNamespace()  # the objective reads nothing of it for σ_t
    sigmas = torch.from_numpy(schedule.training_sigmas(T, shift))
    objective = dmd2.DistributionMatching(backbone, source, sigmas, fake_steps=1, fake_lr=1e-4, dm_weight=1.0,
                                          dm_sigma_range=(0.02, 0.98), seed=0)
    drawn = objective.dm_sigmas(20000).double().numpy()
    official = official_dm_sigmas(shift)
    assert drawn.min() == pytest.approx(0.02) and drawn.max() == pytest.approx(0.98)
    assert official.min() == pytest.approx(0.02) and official.max() == pytest.approx(0.98)
    # every value drawn is one the official rule draws, up to its one-position offset (u = k vs k + 1)
    ours = sigmas.float().clamp(0.02, 0.98).double().numpy()
    assert np.isin(drawn, ours).all()
    for share in (lambda s: np.mean(np.isclose(s, 0.98)), lambda s: np.mean(s < 0.27),
                  lambda s: np.mean(s < 0.5), lambda s: np.mean(s < 0.9)):
        assert share(ours) == pytest.approx(share(official), abs=2e-3)
        assert share(drawn) == pytest.approx(share(official), abs=0.015)
    assert np.mean(np.isclose(drawn, 0.98)) == pytest.approx(0.258, abs=0.015)  # 1 − u*, shift(u*) = 0.98
    assert 0.0 < np.mean(drawn < 0.27) < 0.04  # the unshifted window [0.02, 0.98]·1000 never went below 0.27


def test_the_dmd2_config_bounds_reach_the_objective_as_the_sigma_clamp():
    """methods.<m>.dmd2.t_min / t_max are the clamp's bounds in σ (= t/1000 after the shift)."""
    import inspect

    source = inspect.getsource(dmd2.build)
    assert re.search(r"dm_sigma_range=\(cfg\.t_min, cfg\.t_max\)", source)
    params = config.load(REPO / "params.yaml")
    assert (params.methods["dmd2"].dmd2.t_min, params.methods["dmd2"].dmd2.t_max) == (0.02, 0.98)


# ------------------------------------------------------------------------------------ Wan DetE


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**TRANSFORMER_CONFIGS["tiny"]).eval()


def test_wan_dete_copies_the_official_layers_and_keeps_scale_shift_table_shared_and_frozen():
    """Official (Vchitect/DCM, modeling_wan.py add_layer/init_layer): condition_embedder, norm_out and
    proj_out are copied; scale_shift_table_lora is commented out and DetE modulates with the shared table."""
    from dcm.backbones.toy import ToyBackbone
    from dcm.backbones.wan import WanBackbone
    from dcm.distill.experts import make_dete

    official = ("condition_embedder", "norm_out", "proj_out")
    assert WanBackbone.timestep_layer_names == official and ToyBackbone.timestep_layer_names == official
    model = tiny_wan()
    table = model.scale_shift_table
    wan = SimpleNamespace(timestep_layer_names=WanBackbone.timestep_layer_names,
                          lora_target_modules=WanBackbone.lora_target_modules,
                          model_timestep=lambda s: 1000.0 * s)
    dual = make_dete(model, wan, 4, 8.0, kappa=1, sigma_kappa=0.95)
    trainable = {n for n, p in dual.named_parameters() if p.requires_grad}
    copied = {n.split(".")[1] for n in trainable if n.startswith(("dete_modules.", "dete_parameters."))}
    assert copied == {"condition_embedder", "proj_out"}  # norm_out: an affine-free LayerNorm, no weights
    assert not any("scale_shift_table" in n for n in trainable) and len(dual.dete_parameters) == 0
    assert dual.seme_transformer.scale_shift_table is table and not table.requires_grad
    before = table.detach().clone()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    text = torch.randn(2, 6, TRANSFORMER_CONFIGS["tiny"]["text_dim"], generator=g)
    t = torch.tensor([300.0, 100.0])  # both DetE's (t ≤ 950)
    with torch.no_grad():
        for name, p in dual.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=g)
    optimizer = torch.optim.AdamW([p for p in dual.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        out = dual(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out.pow(2).mean().backward()
        optimizer.step()
    assert table.grad is None and torch.equal(table, before)
    # DetE's forward reads the shared table: moving it moves DetE's output (and SemE's)
    with torch.no_grad():
        out = dual(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        table.add_(0.5)
        moved = dual(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert not torch.allclose(out, moved)
    # the merged DetE carries the copied layers and SemE's table
    merged = dual.materialize("dete")
    assert torch.equal(merged.scale_shift_table, table)
    assert torch.equal(merged.proj_out.weight, dual.dete_timestep_layer("proj_out").weight)


# ------------------------------------------------------------------------------------ discriminator heads


@pytest.mark.parametrize("family, variant", [("wan", "1.3B"), ("wan", "14B"), ("hunyuan", "13B"),
                                             ("cogvideox", "2B"), ("cogvideox", "5B")])
def test_heads_are_the_official_1024_wide_on_every_real_backbone(family, variant):
    """Official: inner_channel = 1024 for any C; here min(C, 1024), which is 1024 on every real model."""
    from dcm.distill.discriminator import HEAD_WIDTH, head_parameter_count
    from dcm.plan.memory import CONFIGS

    cfg = CONFIGS[(family, variant)]
    channels = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert HEAD_WIDTH == 1024 and channels >= HEAD_WIDTH
    h = HEAD_WIDTH
    assert head_parameter_count(channels) == channels * h + h * h + 7 * h + 1


# ------------------------------------------------------------------------------------ the LCM sampler


def linear_field(x, sigma, cond):
    return 0.3 * x + 0.1 * sigma.view(-1, *([1] * (x.ndim - 1)))


def test_the_lcm_sampler_returns_the_endpoint_lcm_trained_to(params):
    """LCM trains its single phase to σ_min (the loop's phase end −1; LCM's boundary is its smallest
    training timestep, diffusers' train_lcm_distill: timesteps clamped at 0, c_skip(0) = 1), and its
    scheduler returns the consistency function's output at the last step (LCMScheduler: prev = denoised).
    The sampler of an LCM/MCM row takes each step's output at σ_min, so its sample is the trained endpoint."""
    from dcm.methods import lcm_end_sigma

    grid = params.teacher_grid()
    phases = schedule.pcm_phases(params.grid.steps, params.methods["lcm"].phases)
    assert [p.end for p in phases] == [schedule.SIGMA_MIN_INDEX]
    for row in ("lcm", "lcm1", "mcm"):
        assert params.methods[row].sampler == "lcm"
        assert lcm_end_sigma(params, row) == grid.sigma(phases[0].end) == grid.sigma_min > 0
    assert lcm_end_sigma(params, "dmd2") == 0.0

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 2, 2, 2, generator=g)
    one = [SamplingStep(1.0, "student")]
    out = sample_lcm({"student": linear_field}, one, noise, None, seeds=[1, 2], end_sigma=grid.sigma_min)
    v = linear_field(noise, torch.ones(2), None)
    # exactly what the loop's student endpoint is for that phase (losses.euler_endpoint to σ_min)
    endpoint = losses.euler_endpoint(noise, v, torch.ones(2), torch.full((2,), grid.sigma_min))
    torch.testing.assert_close(out, endpoint)
    x0 = sample_lcm({"student": linear_field}, one, noise, None, seeds=[1, 2])  # end 0: x − σ·v
    torch.testing.assert_close(x0, noise - v)
    torch.testing.assert_close(out - x0, grid.sigma_min * v)

    # two steps by hand: x̂ = x + (σ_end − σ)·v, re-noised as if clean, x̂ again at the last step
    two = [SamplingStep(1.0, "student"), SamplingStep(0.5, "student")]
    end = grid.sigma_min
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    got = sample_lcm({"student": linear_field}, two, noise, None, generators=gens, end_sigma=end)
    replay = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    eps = torch.cat([torch.randn((1, *noise.shape[1:]), generator=r) for r in replay])
    x1 = 0.5 * (noise + (end - 1.0) * v) + 0.5 * eps
    v1 = linear_field(x1, torch.full((2,), 0.5), None)
    torch.testing.assert_close(got, x1 + (end - 0.5) * v1)
    with pytest.raises(ValueError, match="end_sigma"):
        sample_lcm({"student": linear_field}, two, noise, None, seeds=[1, 2], end_sigma=0.5)


# ------------------------------------------------------------------------------------ DMD2 without its GAN


def test_the_default_dmd2_row_runs_without_the_gan_and_the_docs_say_so():
    """The default table's dmd2 row has gan_weight 0 (dmd2_gan has DMD2's weights): its faithfulness row
    and the row's comment name it "DMD2 (no GAN)"."""
    params = config.load(REPO / "params.yaml")
    assert params.methods["dmd2"].dmd2.gan_weight == 0 and not params.methods["dmd2"].ablation
    assert params.methods["dmd2_gan"].dmd2.gan_weight == pytest.approx(5e-3)
    assert "DMD2 (no GAN)" in (REPO / "params.yaml").read_text()
    docs = (REPO / "docs" / "methods.md").read_text()
    table = docs[docs.index("## Faithful to the papers"):]
    assert re.search(r"^\| DMD2 .*DMD2 \(no GAN\)", table, re.M)


def test_the_sampler_of_an_lcm_row_passes_its_end_sigma(params, backbone, monkeypatch):
    """``methods.Sampler`` hands ``sample_lcm`` the row's end σ: σ_min for LCM/MCM rows, 0 for DMD2 rows."""
    import dcm.methods as methods

    seen = []
    monkeypatch.setattr(methods, "load_experts", lambda *a, **k: ({"student": linear_field}, {}))
    monkeypatch.setattr(methods, "sample_lcm",
                        lambda experts, steps, noise, cond, seeds, end_sigma: seen.append(end_sigma) or noise)
    rows = [{"prompt": "a red striped square moves left slowly", "seed": 0}]
    for row, end in (("lcm", params.teacher_grid().sigma_min), ("mcm", params.teacher_grid().sigma_min),
                     ("dmd2", 0.0)):
        methods.Sampler(params, row, backbone).rows(rows)
        assert seen[-1] == end


def test_the_headline_dmd2_row_is_shown_as_dmd2_without_its_gan_wherever_it_is_shown(tmp_path):
    from dcm.evaluation import reporting, results_block
    from dcm.evaluation.metrics import label
    from dcm.pipeline.stages.report_paper import COMPARISONS, labelled, labelled_curves

    params = config.load(REPO / "params.yaml")
    assert params.method("dmd2").dmd2.gan_weight == 0 and label(params, "dmd2") == {"label": "DMD2 (no GAN)"}
    assert label(params, "dmd2_gan") == {} and label(params, "dcm") == {}
    row = {"total": 0.9, "quality": 0.9, "semantic": 0.9, "steps": 4, "nfe": 4, "label": "DMD2 (no GAN)"}
    metrics = {"dcm": {**row, "label": None}, "dmd2": row}
    assert "| dmd2 — DMD2 (no GAN) |" in reporting.markdown_table(reporting.method_table(metrics, ["dmd2"]))
    assert "| dmd2 — DMD2 (no GAN) |" in results_block.method_table(metrics, ["dmd2"])
    assert labelled(COMPARISONS[0], metrics).text.startswith("DCM vs DMD2 (no GAN) at 4 steps")
    assert "DMD2 (no GAN)" in labelled_curves(metrics) and "DMD2" not in labelled_curves(metrics)
    summary = tmp_path / "reports" / "summary.md"
    summary.parent.mkdir()
    summary.write_text("| method | steps |\n|---|---|\n| dmd2 — DMD2 (no GAN) | 4 |\n")
    assert results_block._report_order(tmp_path, metrics) == ["dmd2"]
