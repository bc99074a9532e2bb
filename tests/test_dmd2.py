"""DMD2 on the one engine: the distribution-matching gradient, backward simulation, the fake score, what the
generator's loss may touch, exact resume, the config rows and the stages."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm import config, distill, distributed, paths, schedule
from dcm.backbones.base import enable_activation_checkpointing
from dcm.distill import dmd2, losses
from dcm.distill.loop import ConsistencyBatch, autocast_for, train
from dcm.distill.teacher_pretraining import flow_matching_loss
from dcm.methods import schedule_for
from dcm.sampling import sample_lcm
from dcm.tracking import StageRun
from dcm.worlds import shapes
from helpers import FailAt, smoke_params

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the equation


def test_distribution_matching_gradient_by_hand_sign_and_normalisation():
    # two samples of two values, as latents (B, C, T, H, W)
    x0_gen = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 1, 1, 1, 2)
    x0_real = torch.tensor([[0.0, 0.0], [1.0, 3.0]]).view(2, 1, 1, 1, 2)
    x0_fake = torch.tensor([[2.0, 1.0], [1.0, 1.0]]).view(2, 1, 1, 1, 2)
    # sample 0: (x0_fake − x0_real) = [2, 1], mean|x0_gen − x0_real| = (1 + 2)/2 → [4/3, 2/3]
    # sample 1: (x0_fake − x0_real) = [0, −2], mean|x0_gen − x0_real| = (1 + 3)/2 → [0, −1]
    grad = losses.distribution_matching_gradient(x0_gen, x0_real, x0_fake)
    assert torch.allclose(grad.view(2, 2), torch.tensor([[4 / 3, 2 / 3], [0.0, -1.0]]))

    x = x0_gen.clone().requires_grad_(True)
    loss = losses.distribution_matching_loss(x, grad)
    assert loss.item() == pytest.approx(0.5 * (16 / 9 + 4 / 9 + 0 + 1) / 4)
    loss.backward()
    assert torch.allclose(x.grad, grad / 4)  # ∂L/∂x0_gen = grad / numel
    # descending moves each sample toward the real score's estimate, away from the fake one's
    step = -x.grad.view(2, 2)
    assert (step * (x0_real - x0_fake).view(2, 2) >= 0).all() and (step != 0).any()


def test_distribution_matching_gradient_is_zero_where_the_scores_agree_with_the_sample():
    x = torch.randn(3, 2, 1, 2, 2)
    assert torch.equal(losses.distribution_matching_gradient(x, x, x), torch.zeros_like(x))  # 0/0 → 0
    assert torch.allclose(losses.distribution_matching_gradient(x, x + 1, x + 1), torch.zeros_like(x))


def test_dmd2_gan_terms_are_the_non_saturating_softplus_losses():
    real, fake = [torch.tensor([[2.0, -1.0]])], [torch.tensor([[0.5, 0.0]])]
    sp = torch.nn.functional.softplus
    assert losses.dmd2_generator_gan(fake).item() == pytest.approx(sp(-fake[0]).mean().item())
    assert losses.dmd2_classifier(real, fake).item() \
        == pytest.approx((sp(fake[0]).mean() + sp(-real[0]).mean()).item())


# ------------------------------------------------------------------------------------- the parts


def make_objective(params, backbone, steps=2, gan_weight=0.0, fake_lr=1e-3, fake_steps=1, videos=None):
    """A DMD2 objective on a few captions, the generator a frozen copy of the teacher
    (``.source.student``)."""
    g = params.grid
    grid = dmd2.generator_grid(g.num_train_timesteps, g.shift)
    captions = shapes.all_captions()[:6]
    student = copy.deepcopy(backbone.transformer).requires_grad_(True)
    latent_shape = backbone.latent_shape(params.world.frames, params.world.size)
    steps = dmd2.generator_schedule(g.num_train_timesteps, g.shift, steps)
    source = dmd2.BackwardSimulation(backbone, student, dmd2.prompt_embeddings(backbone, captions), grid,
                                     steps, latent_shape)
    sigmas = torch.from_numpy(schedule.training_sigmas(params.grid.num_train_timesteps, params.grid.shift))
    torch.manual_seed(3)
    return dmd2.DistributionMatching(backbone, source, sigmas, fake_steps=fake_steps, fake_lr=fake_lr,
                                     dm_weight=1.0, dm_sigma_range=(0.02, 0.98), gan_weight=gan_weight,
                                     cls_weight=1e-2 if gan_weight else 0.0, real_videos=videos, seed=0)


def consistency_batch(objective: dmd2.DistributionMatching, rows: list[int],
                      n: list[int]) -> ConsistencyBatch:
    """A loop micro-batch at generator steps ``n``: backward-simulated x_n, the student's endpoint to σ_min
    with grad."""
    source = objective.source
    n = torch.tensor(n)
    data = source.batch(torch.tensor(rows), n, torch.Generator().manual_seed(5))
    sigma_n = source.sigma(n)
    sigma_end = torch.full_like(sigma_n, float(source.grid_sigmas[0]))
    v = objective.backbone.predict(source.student, data.x_n, sigma_n, data.cond)
    x_end = losses.euler_endpoint(data.x_n, v, sigma_n, sigma_end)
    return ConsistencyBatch(0, n, sigma_n, sigma_n, sigma_end, data.x_n, data.x_prev, data.cond, x_end,
                            x_end.detach())


def test_generator_steps_are_the_sampling_schedule_on_the_grid(params):
    grid = dmd2.generator_grid(params.grid.num_train_timesteps, params.grid.shift)
    steps = dmd2.generator_schedule(params.grid.num_train_timesteps, params.grid.shift, 4)
    indices = dmd2.generator_indices(grid, steps)
    assert [grid.sigma(n) for n in indices] == [s.sigma for s in steps] and indices[0] == grid.steps - 1
    assert dmd2.generator_phases(indices) == [schedule.Phase(n, n, -1) for n in sorted(indices)]
    off_grid = [schedule.SamplingStep(0.5 * (grid.sigma(3) + grid.sigma(4)), "student")]
    with pytest.raises(config.ConfigError, match="not one"):
        dmd2.generator_indices(grid, off_grid)


def test_backward_simulation_is_the_generators_own_lcm_sampling(params, backbone):
    """Step 0 is the noise; step k is the generator's first k LCM steps from it, re-noised to σ_{t_k}."""
    objective = make_objective(params, backbone, steps=3)
    source = objective.source
    n = torch.tensor(source.indices)  # one row at each step
    rows = torch.tensor([0, 1, 2])
    batch = source.batch(rows, n, torch.Generator().manual_seed(7))
    assert batch.counts == {"step0": 1, "step1": 1, "step2": 1} and batch.x_prev is batch.x_n

    replay = torch.Generator().manual_seed(7)  # the source's draws, in its order
    noise = torch.randn((3, *source.latent_shape), generator=replay)
    seeds = torch.randint(2**62, (3,), generator=replay)
    assert torch.equal(batch.x_n[0], noise[0])
    for k in (1, 2):
        expected = sample_lcm({"student": source.velocity}, source.steps[:k], noise[k:k + 1],
                              source.embeds.index([k]),
                              generators=[torch.Generator().manual_seed(int(seeds[k]))],
                              final_sigma=source.steps[k].sigma)
        assert torch.equal(batch.x_n[k:k + 1], expected)
    # k = 1 by hand: x0̂ = ε − σ_0·v(ε), then (1 − σ_1)·x0̂ + σ_1·ε′
    sigma0, sigma1 = source.steps[0].sigma, source.steps[1].sigma
    v = source.velocity(noise[1:2], torch.full((1,), sigma0), source.embeds.index([1]))
    eps_prime = torch.randn((1, *source.latent_shape), generator=torch.Generator().manual_seed(int(seeds[1])))
    assert torch.allclose(batch.x_n[1:2],
                          (1 - sigma1) * (noise[1:2] - sigma0 * v) + sigma1 * eps_prime, atol=1e-6)


def test_fake_score_flow_matching_loss_decreases_on_a_fixed_generator(params, backbone):
    objective = make_objective(params, backbone, fake_lr=2e-3)
    generator = copy.deepcopy(objective.source.student.state_dict())
    # a held-out set of generator samples
    x0, cond = objective.source.samples(16, torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    sigma = objective.train_sigmas[torch.linspace(0, 999, 16).long()]

    def held_out() -> float:
        with torch.no_grad():
            return flow_matching_loss(backbone, objective.fake, x0, eps, sigma, cond).item()

    # flow matching has a floor (E‖ε − x0 − E[ε − x0 | x_σ]‖²) far above 0: the loss falls a few percent,
    # steadily
    curve = [held_out()]
    for _ in range(4):
        for _ in range(10):
            objective.fake_score_step([objective.source.samples(8, objective.rng)], autocast_for(x0.device))
        curve.append(held_out())
    assert all(b < a for a, b in zip(curve, curve[1:])) and curve[-1] < 0.97 * curve[0], curve
    for key, value in objective.source.student.state_dict().items():  # the generator stayed as it was
        assert torch.equal(value, generator[key]), key


@pytest.mark.parametrize("gan", [False, True])
def test_the_generator_loss_updates_only_the_generator(params, backbone, gan):
    """Teacher frozen, fake score and classifier untouched by the generator's terms (also the GAN term, which
    runs through the fake score); the fake score changes only in its own step."""
    videos = None
    if gan:
        from helpers import video_source

        videos = video_source(params, backbone, quality="clean")
    objective = make_objective(params, backbone, gan_weight=1.0 if gan else 0.0, videos=videos)
    teacher = copy.deepcopy(backbone.transformer.state_dict())
    fake = copy.deepcopy(objective.fake.state_dict())
    batch = consistency_batch(objective, [0, 1, 2, 3], objective.source.indices * 2)
    terms = objective.generator_loss(batch)
    assert set(terms) == ({"dm", "gan_g"} if gan else {"dm"})
    sum(terms.values()).backward()
    student = objective.source.student
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.dim() > 1)
    assert all(not p.requires_grad and p.grad is None for p in backbone.transformer.parameters())
    assert all(p.grad is None for p in objective.fake_parameters())
    # with the GAN term: frozen from that term until the generator's step is done (checkpointed blocks
    # recompute in its backward); without it the generator's terms never touch the fake score's flags
    assert all(p.requires_grad != gan for p in objective.fake_parameters())

    logged = objective.after_generator_step(batch)
    assert all(p.requires_grad for p in objective.fake_parameters())
    assert logged["fake_fm"] > 0 and ("fake_cls" in logged) == gan
    assert objective.after_generator_step(batch) == {}  # once per step, not once per micro-batch
    for key, value in backbone.transformer.state_dict().items():
        assert torch.equal(value, teacher[key]), key
    assert any(not torch.equal(value, fake[key]) for key, value in objective.fake.state_dict().items())


def test_dm_term_pulls_the_generator_toward_the_real_score(params, backbone):
    """The sign end to end, through the objective's own score passes: a step down the DM loss moves the
    generator's x0 along x0_real − x0_fake; each call of ``scores`` is one draw of (t, ε) from the objective's
    RNG."""
    objective = make_objective(params, backbone)
    batch = consistency_batch(objective, [0, 1], objective.source.indices)
    x0_gen = dmd2.student_x0(batch)
    state = objective.rng.get_state()
    x0_real, x0_fake = objective.scores(x0_gen.detach(), batch.cond, batch.autocast)
    grad = losses.distribution_matching_gradient(x0_gen.detach(), x0_real, x0_fake)
    loss = losses.distribution_matching_loss(x0_gen, grad)
    (g,) = torch.autograd.grad(loss, x0_gen)
    moved = x0_gen.detach() - 1e-1 * g / g.abs().max()
    shift = x0_real - x0_fake
    assert ((moved - x0_gen.detach()) * shift).sum() > 0
    objective.rng.set_state(state)
    assert torch.equal(objective.scores(x0_gen.detach(), batch.cond, batch.autocast)[0],
                       x0_real)  # one draw each


class RealVideos:
    """Stand-in for the world's encoded videos (``OnlineSource``): latents and their prompts' embeddings."""

    def __init__(self, x0: torch.Tensor, embeds):
        self.x0, self.embeds = x0, embeds

    def __len__(self) -> int:
        return len(self.x0)


@pytest.mark.parametrize("family", ["wan", "wan22_ti2v", "hunyuan", "hunyuan15", "cogvideox"])
def test_a_dmd2_step_with_the_classifier_runs_on_every_real_family(family, tmp_path):
    """Tiny Wan (2.1; 2.2 TI2V: per-token timesteps) / HunyuanVideo (embedded guidance) / CogVideoX (VP)
    pipelines under activation checkpointing:
    generator terms, only the generator's gradients, then the fake score's updates (trainable again), through
    each adapter's velocity and features."""
    import helpers as real
    from dcm.backbones import adapter_class

    torch.manual_seed(0)
    real.BUILDERS[family](tmp_path)
    params = real.family_params(family, tmp_path)
    bb = params.backbone
    backbone = adapter_class(bb.family).from_folder(bb.path, bb.real, bb.guidance_scale)
    g = params.grid
    grid = dmd2.generator_grid(g.num_train_timesteps, g.shift)
    student = copy.deepcopy(backbone.transformer).requires_grad_(True)
    shape = backbone.video_latent_shape(params)
    source = dmd2.BackwardSimulation(backbone, student, dmd2.prompt_embeddings(backbone, real.PROMPTS), grid,
                                     dmd2.generator_schedule(g.num_train_timesteps, g.shift, 2), shape)
    videos = RealVideos(torch.randn(2, *shape), backbone.encode_prompts(real.PROMPTS))
    sigmas = torch.from_numpy(schedule.training_sigmas(params.grid.num_train_timesteps, params.grid.shift))
    objective = dmd2.DistributionMatching(backbone, source, sigmas, fake_steps=2, fake_lr=1e-4, dm_weight=1.0,
                                          dm_sigma_range=(0.02, 0.98), gan_weight=5e-3, cls_weight=1e-2,
                                          real_videos=videos)
    # as the real presets train (training.gradient_checkpointing): the generator's backward recomputes the
    # checkpointed fake score's blocks, which must still be frozen then
    enable_activation_checkpointing(student, objective.fake)
    batch = consistency_batch(objective, [0, 1], source.indices)
    terms = objective.generator_loss(batch)
    assert set(terms) == {"dm", "gan_g"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in objective.fake_parameters())
    assert all(p.grad is None for p in backbone.transformer.parameters())
    assert not any(p.requires_grad for p in objective.fake_parameters())  # until the generator's step is done
    logged = objective.after_generator_step(batch)
    assert all(p.requires_grad for p in objective.fake_parameters())
    assert {"fake_fm", "fake_cls", "fake_d_real", "fake_d_fake"} <= logged.keys()
    assert all(np.isfinite(v) for v in logged.values())


# ------------------------------------------------------------------------------------------ resume


def dmd2_spec(params, backbone, method="dmd2", steps=6, extra=()):
    """The spec ``train_baseline`` builds for a dmd2 row."""
    torch.manual_seed(11)  # the classifier head's initialisation, equal in every run
    student = distill.full_parameter_student(backbone)
    source, space, objectives, phases = dmd2.build(params, method, backbone, student,
                                                   schedule_for(params, method), distill.device())
    spec = distill.DistillSpec(name=method, student=student, trainable=list(student.parameters()),
                               phases=phases, target="online", lr=1e-3, train_steps=steps,
                               objectives=[*objectives, *extra],
                               consistency_space=space)
    return spec, source


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_resume_of_a_dmd2_run_gives_identical_next_losses(smoke):
    """6 steps straight vs 3 steps, a kill during step 4 and a resume: same losses, fake score, head and
    draws."""
    params = smoke_params(checkpoint_every=3)
    method = "dmd2_gan"  # the classifier's state is part of what must resume
    assert params.methods[method].dmd2.gan_weight > 0
    backbone = distill.load_backbone(params)
    kill = FailAt(4)
    spec, source = dmd2_spec(params, backbone, method, extra=[kill])
    straight = train(spec, backbone, source, params, smoke / "straight", StageRun(None))
    straight_state = copy.deepcopy(spec.objectives[0].state_dict())
    kill.armed = True
    spec, source = dmd2_spec(params, backbone, method, extra=[kill])
    with pytest.raises(KeyboardInterrupt):
        train(spec, backbone, source, params, smoke / "resumed", StageRun(None))
    state = torch.load(smoke / "resumed" / "resume" / "state.pt", weights_only=False)
    assert {"fake", "optimizer", "rng", "classifier"} == set(state["objectives"]["dmd2"])
    spec, source = dmd2_spec(params, backbone, method, extra=[kill])
    resumed = train(spec, backbone, source, params, smoke / "resumed", StageRun(None))
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses[3:]
    rows_straight, rows_resumed = history(smoke / "straight"), history(smoke / "resumed")
    for key in ("loss", "dmd2/dm", "dmd2/gan_g", "dmd2/fake_fm", "dmd2/fake_cls", "source/step0"):
        assert [r[key] for r in rows_resumed] == [r[key] for r in rows_straight], key
    now = spec.objectives[0].state_dict()
    for part in ("fake", "classifier"):
        for key, value in now[part].items():
            assert torch.equal(value, straight_state[part][key]), (part, key)
    assert torch.equal(now["rng"], straight_state["rng"])


def test_activation_checkpointing_covers_the_fake_score(smoke):
    """The fake score trains at the student's size: training.gradient_checkpointing applies to it too."""
    for flag in (False, True):
        params = smoke_params(gradient_checkpointing=flag)
        backbone = distill.load_backbone(params)
        student = distill.full_parameter_student(backbone)
        _, _, (objective,), _ = dmd2.build(params, "dmd2", backbone, student,
                                           schedule_for(params, "dmd2"), "cpu")
        assert objective.fake.is_gradient_checkpointing == flag


def test_memory_plan_counts_the_generator_the_sharded_fake_score_and_the_classifier():
    """dcm.plan.memory's DMD2 column: the generator as SemE (no EMA), a fake score's fp32 weights,
    gradients and AdamW moments sharded as the generator's are, and with the classifier its head and the
    generator's pass through the fake score."""
    import dataclasses

    from dcm.distill.discriminator import head_parameter_count
    from dcm.plan import memory as mp
    from helpers import plan_workloads

    work, _ = plan_workloads()["toy"]
    for gan in (False, True):
        w = dataclasses.replace(work, dmd2_gan=gan)
        st = mp.structure(w, torch.float32)
        rows = mp.plan(w, mp.Setting(2, compute="fp32", ema=True), st)
        seme, dmd2_row = rows["SemE"], rows["DMD2"]
        generator = sum(seme[k]
                        for k in ("parameters (fp32)", "gradients (fp32)", "optimizer (AdamW, 2 × fp32)"))
        # rank 0's shard of 2
        assert dmd2_row["fake score (weights+grads+AdamW)"] == generator < 16 * st.total
        assert dmd2_row["EMA (fp32)"] == 0
        for key in ("parameters (fp32)", "gradients (fp32)", "optimizer (AdamW, 2 × fp32)",
                    "FSDP working set"):
            assert dmd2_row[key] == seme[key], key
        assert dmd2_row["discriminator (weights+grads+AdamW)"] == (16 * head_parameter_count(384)
                                                                   if gan else 0)
        assert (dmd2_row["activations, no checkpointing"] > seme["activations, no checkpointing"]) == gan
        # checkpointed: the fake score's blocks recompute while the generator's block inputs are held, the
        # generator's after the fake score's saves are freed; the larger of the two, never less than SemE's
        expected = (mp.checkpointed_passes(st.profiles[(1, "seme")], st.profiles[(1, "teacher")]) if gan
                    else seme["activations, checkpointing"])
        assert dmd2_row["activations, checkpointing"] == expected >= seme["activations, checkpointing"]


def train_at_ranks(out: str) -> None:
    """Worker (``torchrun … tests/test_dmd2.py OUT`` in a smoke project): 4 steps of dmd2_gan, then every
    rank's digest of its fake score and classifier head to OUT/fake_digests.json."""
    from dcm.distributed import seed_everything

    method = "dmd2_gan"
    params = config.load("params.yaml", preset="smoke")
    with distributed.process_group() as world:
        seed_everything(params.seed)
        backbone = distill.load_backbone(params)
        spec, source = dmd2_spec(params, backbone, method, steps=4)
        train(spec, backbone, source, params, out, StageRun(None))
        objective = spec.objectives[0]
        digests = {part: distributed.gather_objects(
                       distributed.parameter_digest([p.detach() for p in net.parameters()]))
                   for part, net in (("fake", objective.fake), ("head", objective.classifier))}
        if world.is_main:
            (Path(out) / "fake_digests.json").write_text(json.dumps(digests))


@pytest.mark.slow
def test_two_ddp_ranks_keep_one_fake_score_and_one_classifier(smoke):
    """training.parallel ddp at 2 gloo ranks: the loop replicates the objective's networks, so their gradients
    are averaged and every rank holds the same fake score and head after the run (as it holds the same
    generator)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__,
                          str(smoke / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    digests = json.loads((smoke / "out" / "fake_digests.json").read_text())
    assert all(len(ranks) == 2 and len(set(ranks)) == 1 for ranks in digests.values()), digests
    assert len(set(json.loads((smoke / "out" / "distributed.json").read_text())["parameter_digests"])) == 1


# ------------------------------------------------------------------------------------------ params


def test_dmd2_rows_load_with_defaults_and_ablations_opt_in():
    params = config.load(REPO / "params.yaml")
    # paper.seeds' extra training seeds (dmd2_s1, …) aside
    rows = {m: c for m, c in params.methods.items() if c.kind == "dmd2" and not c.replicate_of}
    assert {m: (c.sample_steps, c.ablation, c.nfe_curve) for m, c in rows.items()} == {
        "dmd2": (4, False, False), "dmd2_1": (1, False, True), "dmd2_2": (2, False, True),
        "dmd2_gan": (4, True, False), "dmd2_steps": (4, True, False)}
    # dmd2's budget (about LCM's wall time) for every row but dmd2_steps, which has LCM's generator steps
    lcm_steps, dmd2_steps = params.methods["lcm"].train_steps, params.methods["dmd2"].train_steps
    assert all(c.sampler == "lcm" and c.train_steps == (lcm_steps if m == "dmd2_steps" else dmd2_steps)
               for m, c in rows.items())
    # DMD2's defaults, but for the classifier: off on the shapes world except in dmd2_gan (README, "DMD2")
    assert {m: c.dmd2.gan_weight for m, c in rows.items()} == {
        "dmd2": 0.0, "dmd2_1": 0.0, "dmd2_2": 0.0, "dmd2_gan": 5e-3, "dmd2_steps": 0.0}
    assert rows["dmd2_gan"].dmd2 == config.Dmd2Config()
    assert (config.Dmd2Config().fake_steps, config.Dmd2Config().t_min, config.Dmd2Config().t_max,
            config.Dmd2Config().gan_weight, config.Dmd2Config().cls_weight) == (5, 0.02, 0.98, 5e-3, 1e-2)
    steps = schedule_for(params, "dmd2")
    assert [s.expert for s in steps] == ["student"] * 4 and steps[0].sigma == 1.0


@pytest.mark.parametrize("change, message", [
    ({"sampler": "euler"}, r"methods\.dmd2\.sampler = 'euler' is invalid: 'lcm' for kind 'dmd2'"),
    ({"dmd2": {"t_min": 0.5, "t_max": 0.4}},
     r"methods\.dmd2\.dmd2\.t_min = 0\.5 is invalid: < methods\.dmd2\.dmd2\.t_max"),
    ({"dmd2": {"fake_steps": 0}}, r"methods\.dmd2\.dmd2\.fake_steps = 0 is invalid: must be >= 1"),
    ({"dmd2": {"fake_lr": 0.0}}, r"methods\.dmd2\.dmd2\.fake_lr = 0\.0 is invalid: must be > 0"),
    ({"kind": "consistency", "sampler": "euler"},
     r"methods\.dmd2\.dmd2 = .* is invalid: only for kind 'dmd2'"),
])
def test_bad_dmd2_params_fail_with_key_value_and_what_is_allowed(change, message):
    raw = config.load_raw(REPO / "params.yaml")
    raw["methods"]["dmd2"] = config.deep_merge(raw["methods"]["dmd2"], change)
    with pytest.raises(config.ConfigError, match=message):
        config.parse(raw)


# ---------------------------------------------------------------------------------- the stages


@pytest.mark.slow
def test_dmd2_trains_samples_and_evaluates_through_the_stage_table(smoke, monkeypatch):
    from dcm.pipeline.table import STAGES

    monkeypatch.setenv("DCM_TRACKING", "on")
    params = smoke_params(source="online")  # DMD2 reads no trajectories: online needs none either
    STAGES["train_baseline"].run(params, "dmd2")
    out = paths.checkpoint("dmd2")
    assert (out / "transformer").is_dir()
    summary = json.loads((out / "train.json").read_text())
    m = params.methods["dmd2"]
    assert summary["steps"] == m.train_steps and summary["target"] == "online"
    grid = dmd2.generator_grid(params.grid.num_train_timesteps, params.grid.shift)
    trained_at = sorted(grid.sigma(first) for first, last, end in summary["phases"])
    assert trained_at == sorted(s.sigma for s in schedule_for(params, "dmd2"))  # the steps it samples with
    assert sum(summary["source_counts"].values()) == m.train_steps * params.training.batch_size
    rows = history(out)
    assert all({"dmd2/dm", "dmd2/fake_fm", "dmd2/fake_fm_last"} <= r.keys() and r["consistency"] == 0
               and "dmd2/gan_g" not in r for r in rows)  # the shapes dmd2 row: no GAN classifier
    for method in ("teacher", "dmd2"):
        STAGES["sample"].run(params, method)
    STAGES["evaluate"].run(params, "dmd2")
    metrics = json.loads(paths.metrics("dmd2").read_text())
    assert metrics["method"] == "dmd2" and metrics["steps"] == 4 and metrics["nfe"] == 4
    assert np.isfinite(metrics["total"])
    print(json.dumps({k: metrics[k] for k in ("total", "steps", "nfe")}))


if __name__ == "__main__":
    train_at_ranks(sys.argv[1])


def test_dmd2_rows_share_dmd2s_budget_except_dmd2_steps():
    """params.yaml: dmd2_1, dmd2_2 and dmd2_gan get dmd2's generator-step budget (about LCM's wall time) and
    differ from dmd2 only in their step count or the GAN classifier; dmd2_steps gets LCM's generator steps."""
    import dataclasses

    full = config.load(REPO / "params.yaml")
    base = dataclasses.asdict(full.methods["dmd2"])
    curve, ablation = {"nfe_curve": True}, {"ablation": True}  # the opt-in group each row is in
    changes = {"dmd2_1": {"sample_steps": 1, **curve}, "dmd2_2": {"sample_steps": 2, **curve},
               "dmd2_gan": {"dmd2": {**base["dmd2"], "gan_weight": 5.0e-3, "cls_weight": 1.0e-2},
                            "label": None, **ablation},
               "dmd2_steps": {"train_steps": full.methods["lcm"].train_steps, **ablation}}
    for name, change in changes.items():
        row = dataclasses.asdict(full.methods[name])
        assert row == {**base, **change}, name
