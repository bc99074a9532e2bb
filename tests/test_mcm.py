"""MCM on the one engine: motion representations, single-frame image discriminator, mixed trajectories,
resume, stages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcm import config, distill, paths, schedule
from dcm.distill import mcm
from dcm.distill.loop import ConsistencyBatch, train
from dcm.tracking import StageRun
from dcm.worlds import shapes
from helpers import FailAt, smoke_params, video_source

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ params


def test_mcm_rows_load_with_defaults_and_ablations_opt_in():
    params = config.load(REPO / "params.yaml")
    assert "mcm" in params.default_methods and params.methods["mcm"].kind == "mcm"
    ablations = {m: c.mcm for m, c in params.methods.items() if c.kind == "mcm" and c.ablation}
    assert {m: (c.cd_target, c.mix_portion) for m, c in ablations.items()} == {
        "mcm_raw": ("raw", 0.5), "mcm_nomix": ("learn", 0.0), "mcm_diff": ("diff", 0.5)}
    assert config.load(REPO / "params.yaml", preset="mcm").world.quality == "low"


@pytest.mark.parametrize("change, message", [
    ({"mcm": {"cd_target": "hlearn"}},
     r"methods\.mcm\.mcm\.cd_target = 'hlearn' is invalid: one of 'raw', 'diff', 'learn'"),
    ({"mcm": {"mix_portion": 1.5}}, r"methods\.mcm\.mcm\.mix_portion = 1\.5 is invalid: must be <= 1"),
    ({"mcm": {"disc_frames": 9}}, r"methods\.mcm\.mcm\.disc_frames = 9 is invalid: <= world\.frames \(8\)"),
    ({"kind": "consistency"}, r"methods\.mcm\.mcm = .* is invalid: only for kind 'mcm'"),
])
def test_bad_mcm_params_fail_with_key_value_and_what_is_allowed(change, message):
    raw = config.load_raw(REPO / "params.yaml")
    raw["methods"]["mcm"] = config.deep_merge(raw["methods"]["mcm"], change)
    with pytest.raises(config.ConfigError, match=message):
        config.parse(raw)


# ------------------------------------------------------------------------ motion representations


def test_raw_and_diff_motion_representations_by_hand():
    # one sample, 2 channels, 3 frames, 1×1 pixels: channel 0 = 1, 4, 9; channel 1 = 2, 2, 5
    z = torch.tensor([[1.0, 4.0, 9.0], [2.0, 2.0, 5.0]]).reshape(1, 2, 3, 1, 1)
    expected_diff = torch.tensor([[3.0, 5.0], [0.0, 3.0]]).reshape(1, 2, 2, 1, 1)
    torch.testing.assert_close(mcm.temporal_difference(z), expected_diff)
    diff = mcm.MotionSpace("diff", channels=2)
    torch.testing.assert_close(diff.student(z), expected_diff)
    torch.testing.assert_close(diff.target(z), expected_diff)
    assert diff.parameters() == [] and diff.state_dict() == {}
    raw = mcm.MotionSpace("raw", channels=2)
    assert raw.student(z) is z and raw.target(z) is z
    with pytest.raises(ValueError, match="2 latent frames"):
        mcm.temporal_difference(z[:, :, :1])
    with pytest.raises(ValueError, match="cd_target 'hlearn'"):
        mcm.MotionSpace("hlearn", channels=2)


def test_learn_head_is_the_identity_at_init_and_a_per_frame_residual():
    torch.manual_seed(0)
    head = mcm.MotionHead(channels=4)
    conv_in, norm, conv_out = head.g[1], head.g[2], head.g[4]
    assert (conv_in.in_channels, conv_in.out_channels, conv_out.in_channels,
            conv_out.out_channels) == (4, 64, 64, 4)
    assert conv_in.kernel_size == conv_out.kernel_size == (1, 1) and norm.num_groups == 32
    assert torch.count_nonzero(conv_out.weight) == 0 and torch.count_nonzero(conv_out.bias) == 0
    z = torch.randn(2, 4, 3, 5, 5)
    torch.testing.assert_close(head(z), z)  # identity at start
    space = mcm.MotionSpace("learn", channels=4)
    torch.testing.assert_close(space.student(z), z)
    torch.testing.assert_close(space.target(z), z)

    torch.nn.init.normal_(conv_out.weight)
    torch.nn.init.normal_(conv_out.bias)
    # by hand for frame t = 1 of sample 0: z + W2·SiLU(GN(W1·SiLU(z) + b1)) + b2 on that frame alone
    frame = z[0:1, :, 1]
    h = F.conv2d(F.silu(frame), conv_in.weight, conv_in.bias)
    h = F.group_norm(h, 32, norm.weight, norm.bias, norm.eps)
    expected = frame + F.conv2d(F.silu(h), conv_out.weight, conv_out.bias)
    out = head(z)
    torch.testing.assert_close(out[0:1, :, 1], expected, rtol=1e-5, atol=1e-5)
    # per frame: changing frame 2 leaves frames 0 and 1 alone
    bumped = z.clone()
    bumped[:, :, 2] += 3.0
    again = head(bumped)
    torch.testing.assert_close(again[:, :, :2], out[:, :, :2])
    assert not torch.allclose(again[:, :, 2], out[:, :, 2])


def test_learn_target_side_is_an_ema_copy_of_the_head():
    space = mcm.MotionSpace("learn", channels=4, head_ema_decay=0.9)
    before = {k: v.clone() for k, v in space.head_ema.state_dict().items()}
    with torch.no_grad():
        for p in space.head.parameters():
            p.add_(1.0)
    space.after_optimizer_step()
    after = space.head_ema.state_dict()
    for key, p in space.head.state_dict().items():
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * p)
    assert all(not p.requires_grad for p in space.head_ema.parameters())
    assert {id(p) for p in space.parameters()} == {id(p) for p in space.head.parameters()}
    fresh = mcm.MotionSpace("learn", channels=4, head_ema_decay=0.9)
    fresh.load_state_dict(space.state_dict())
    for a, b in zip(fresh.head_ema.parameters(), space.head_ema.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ image discriminator


def make_batch(backbone, params, batch=2):
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    gen = torch.Generator().manual_seed(0)
    x_n = torch.randn((batch, *shape), generator=gen)
    x_end_pred = (0.5 * x_n + 0.1 * torch.randn((batch, *shape), generator=gen)).requires_grad_(True)
    sigma_n, sigma_end = torch.full((batch,), 0.8), torch.full((batch,), 0.02)
    cond = backbone.encode_prompts(["a red circle moves left"] * batch)
    return ConsistencyBatch(0, torch.ones(batch, dtype=torch.long), sigma_n, sigma_n, sigma_end, x_n, x_n,
                            cond, x_end_pred, x_end_pred.detach())


class SpyFeatures(mcm.TeacherFrameFeatures):
    """The real teacher backbone, recording the frames it is shown and the features it returns."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: list[tuple[torch.Size, list[torch.Size]]] = []

    def __call__(self, frames):
        feats = super().__call__(frames)
        self.seen.append((frames.shape, [f.shape for f in feats]))
        return feats


def hq_set(backbone, params, n=6):
    images, captions = mcm.hq_stills(n, seed=1, size=params.world.size)
    return images, backbone.encode_prompts(captions).pooled()


def test_hq_stills_are_the_worlds_hq_images_with_their_captions(params):
    images, captions = mcm.hq_stills(5, seed=3, size=params.world.size, jitter=1.5)
    assert torch.equal(images, shapes.hq_images(5, seed=3, size=params.world.size, jitter=1.5))
    assert len(captions) == 5 and all(shapes.parse_caption(c) for c in captions)


def test_pooled_prompt_is_the_mean_of_the_non_padding_tokens(backbone):
    cond = backbone.encode_prompts(["a red circle moves left", "a blue striped square moves up quickly"])
    words = [5, 7]  # tokens of each caption; the rest of the 8 positions are zero padding
    for row, n in enumerate(words):
        assert cond.hidden[row, n:].abs().sum() == 0 and (cond.hidden[row, :n].abs().sum(-1) > 0).all()
        torch.testing.assert_close(cond.pooled()[row], cond.hidden[row, :n].mean(0))


def test_image_discriminator_logits_depend_on_the_prompt(backbone, params):
    """MCM's heads are text-conditioned: the same frames scored under two prompts get different logits,
    and the generator term follows the batch's prompts."""
    torch.manual_seed(0)
    features = mcm.TeacherFrameFeatures(backbone, backbone.transformer, 0.1)
    disc = mcm.ImageDiscriminator(features, *hq_set(backbone, params), weight=1.0, disc_lr=1e-3,
                                  r1_weight=0.0, frames=2)
    frames = disc.real_bank[:2]
    torch.manual_seed(1)
    feats = features(frames)
    a, b = (backbone.encode_prompts([p] * 2).pooled() for p in ("a red circle moves left",
                                                                "a blue striped square moves up quickly"))
    logits_a, logits_b = (disc.discriminator(feats, frames.shape[2:], a),
                          disc.discriminator(feats, frames.shape[2:], b))
    assert all(not torch.allclose(x, y) for x, y in zip(logits_a, logits_b))
    batch = make_batch(backbone, params)
    other = make_batch(backbone, params)
    other.cond = backbone.encode_prompts(["a blue striped square moves up quickly"] * 2)
    torch.manual_seed(2)
    g_a = disc.generator_loss(batch)["img_g"]
    torch.manual_seed(2)  # the same frames and noise: only the prompt differs
    g_b = disc.generator_loss(other)["img_g"]
    assert not torch.allclose(g_a, g_b)


def test_unconditioned_image_discriminator_ignores_the_prompt(backbone, params):
    """mcm.disc_text false (the one-change row on MCM's imaging quality): heads without a condition map,
    whose generator term and D step are the same whatever the batch's prompts."""
    features = mcm.TeacherFrameFeatures(backbone, backbone.transformer, 0.1)
    torch.manual_seed(0)
    disc = mcm.ImageDiscriminator(features, *hq_set(backbone, params), weight=1.0, disc_lr=1e-3,
                                  r1_weight=1e-5, frames=2, conditioned=False)
    assert all(head.cond_map is None for head in disc.discriminator.heads)
    batch = make_batch(backbone, params)
    other = make_batch(backbone, params)
    other.cond = backbone.encode_prompts(["a blue striped square moves up quickly"] * 2)
    assert disc.fake_text(batch) is None
    torch.manual_seed(2)
    g_a = disc.generator_loss(batch)["img_g"]
    torch.manual_seed(2)
    g_b = disc.generator_loss(other)["img_g"]
    torch.testing.assert_close(g_a, g_b)
    logged = disc.after_generator_step(batch)
    assert {"d_loss", "r1", "d_real", "d_fake"} <= logged.keys()
    assert params.method("mcm").mcm.disc_text is True  # MCM's conditioned heads stay the default


def test_image_discriminator_scores_single_frames_of_the_students_x0(backbone, params):
    features = SpyFeatures(backbone, backbone.transformer, 0.1)
    images, text = hq_set(backbone, params)
    disc = mcm.ImageDiscriminator(features, images, text, weight=1.0, disc_lr=1e-3, r1_weight=1e-5, frames=2)
    batch = make_batch(backbone, params, batch=3)
    c, t, h, w = backbone.latent_shape(params.world.frames, params.world.size)
    assert disc.real_bank.shape == (6, c, 1, h, w)  # still images are one-frame latents
    terms = disc.generator_loss(batch)
    terms["img_g"].backward()  # the loop's order: the student's backward, then the D step
    logged = disc.after_generator_step(batch)
    tokens = (h // 2) * (w // 2)  # one frame's token grid (patch 1×2×2)
    fake_seen, real_seen = features.seen
    assert fake_seen[0] == real_seen[0] == (3 * 2, c, 1, h, w)  # 2 single frames per video, as many real ones
    assert all(s == (6, tokens, features.dim) for s in fake_seen[1] + real_seen[1])
    assert set(terms) == {"img_g"} and {"d_loss", "r1", "d_real", "d_fake"} <= logged.keys()
    assert batch.x_end_pred.grad.abs().sum() > 0  # the student's x0 frames carry the gradient
    assert all(p.grad is None for p in backbone.transformer.parameters())  # the backbone stays frozen


def test_fake_frames_are_frames_of_the_students_x0(backbone, params):
    features = mcm.TeacherFrameFeatures(backbone, backbone.transformer, 0.1)
    batch = make_batch(backbone, params, batch=2)
    x0 = mcm.student_x0(batch)
    v = (batch.x_end_pred - batch.x_n) / (0.02 - 0.8)
    torch.testing.assert_close(x0, batch.x_n - 0.8 * v)
    index = torch.tensor([[0, 5], [3, 7]])
    frames = features.video_frames(x0, index)
    for k, (b, t) in enumerate([(0, 0), (0, 5), (1, 3), (1, 7)]):
        torch.testing.assert_close(frames[k, :, 0], x0[b, :, t])
    torch.manual_seed(0)
    drawn = mcm.segment_frames(500, 8, 2)
    assert drawn[:, 0].min() == 0 and drawn[:, 0].max() == 3 and drawn[:, 1].min() == 4 \
        and drawn[:, 1].max() == 7


# ------------------------------------------------------------------------------- mixed trajectories


@pytest.mark.parametrize("portion", [0.0, 0.5, 1.0])
def test_mix_ratio_is_honoured(backbone, params, portion):
    videos = video_source(params, backbone)
    student = copy.deepcopy(backbone.transformer)
    source = mcm.MixedTrajectorySource(videos, backbone, student, portion)
    gen = torch.Generator().manual_seed(0)
    counts = {"video": 0, "student": 0}
    for _ in range(100):
        batch = source.batch(torch.randint(len(videos), (8,), generator=gen), torch.full((8,), 3), gen)
        assert sum(batch.counts.values()) == 8
        for key, value in batch.counts.items():
            counts[key] += value
    fraction = counts["student"] / 800
    if portion in (0.0, 1.0):
        assert fraction == portion
    else:
        assert abs(fraction - portion) < 0.06  # 800 draws: 3.4 standard deviations


def test_student_samples_start_from_the_students_one_step_x0(backbone, params):
    videos = video_source(params, backbone)
    student = copy.deepcopy(backbone.transformer)
    source = mcm.MixedTrajectorySource(videos, backbone, student, 1.0)
    rows, n = torch.tensor([0, 2]), torch.tensor([4, 4])
    gen = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    batch = source.batch(rows, n, gen)
    assert batch.counts == {"video": 0, "student": 2}
    # by hand: the same draws, x0 = ε − 1·v_θ(ε, σ = 1), then the video source's noising + teacher step
    assert (torch.rand(2, generator=replay) < 1.0).all()
    eps = torch.randn((2, *videos.x0.shape[1:]), generator=replay)
    with torch.no_grad():
        v = backbone.predict(student, eps, torch.ones(2), videos.embeds.index(rows))
    expected = videos.batch_from_x0(eps - v, rows, n, replay)
    torch.testing.assert_close(batch.x_n, expected.x_n)
    torch.testing.assert_close(batch.x_prev, expected.x_prev)
    video_batch = videos.batch(rows, n, torch.Generator().manual_seed(3))
    assert not torch.allclose(batch.x_n, video_batch.x_n)


def test_low_quality_videos_are_the_degraded_renders(backbone, params):
    clean, low = video_source(params, backbone, "clean"), video_source(params, backbone, "low")
    assert clean.x0.shape == low.x0.shape and not torch.allclose(clean.x0, low.x0)
    scene = shapes.sample_scene(np.random.default_rng(0), params.world.size, params.world.frames,
                                caption=shapes.all_captions()[0])
    expected = shapes.degrade(shapes.render(scene, params.world.size, params.world.frames)[None],
                              np.random.default_rng(0))
    torch.testing.assert_close(low.x0[0:1], backbone.encode_video(expected))


# ----------------------------------------------------------------------------------- the loop


def mcm_spec(params, backbone, method="mcm", steps=6, extra=()):
    torch.manual_seed(11)  # head and discriminator initialisation, equal in every run
    student = distill.full_parameter_student(backbone)
    videos = distill.make_source(params, backbone, source="online",
                                 quality=params.methods[method].mcm.video_quality)
    source, space, objectives = mcm.build(params, method, backbone, student, videos, distill.device())
    spec = distill.DistillSpec(name=method, student=student, trainable=list(student.parameters()),
                               phases=schedule.pcm_phases(params.grid.steps, 1), target="ema", lr=1e-3,
                               train_steps=steps, objectives=[*objectives, *extra], consistency_space=space)
    return spec, source


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_resume_of_an_mcm_run_gives_identical_next_losses(smoke):
    """6 steps straight vs 3 steps, a kill during step 4 and a resume: same losses, head, discriminator, mix
    counts."""
    params = smoke_params(checkpoint_every=3)
    backbone = distill.load_backbone(params)  # on distill.device(), as the stages load it
    kill = FailAt(4)
    spec, source = mcm_spec(params, backbone, extra=[kill])
    straight = train(spec, backbone, source, params, smoke / "straight", StageRun(None))
    straight_head = copy.deepcopy(spec.consistency_space.state_dict())
    kill.armed = True
    spec, source = mcm_spec(params, backbone, extra=[kill])
    with pytest.raises(KeyboardInterrupt):
        train(spec, backbone, source, params, smoke / "resumed", StageRun(None))
    state = torch.load(smoke / "resumed" / "resume" / "state.pt", weights_only=False)
    assert {"head", "head_ema"} == set(state["consistency_space"]) and "img_gan" in state["objectives"]
    spec, source = mcm_spec(params, backbone, extra=[kill])
    resumed = train(spec, backbone, source, params, smoke / "resumed", StageRun(None))
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses[3:]
    rows_straight, rows_resumed = history(smoke / "straight"), history(smoke / "resumed")
    for key in ("loss", "consistency", "img_gan/img_g", "img_gan/d_loss", "source/student"):
        assert [r[key] for r in rows_resumed] == [r[key] for r in rows_straight], key
    for key, value in spec.consistency_space.state_dict()["head"].items():
        assert torch.equal(value, straight_head["head"][key]), key
    summary = json.loads((smoke / "resumed" / "train.json").read_text())
    assert sum(summary["source_counts"].values()) == 6 * params.training.batch_size
    assert summary["source_counts"]["student"] == sum(r["source/student"] for r in rows_straight)


# ---------------------------------------------------------------------------------- the stages


@pytest.mark.slow
def test_mcm_trains_samples_and_evaluates_through_the_stage_table(smoke, monkeypatch):
    from dcm import cli

    monkeypatch.setenv("DCM_TRACKING", "on")
    def dcm_run(stage, method):
        return cli.main(["run", stage, "--method", method, "--preset", "smoke"])

    assert dcm_run("train_baseline", "mcm") in (0, None)
    out = paths.checkpoint("mcm")
    assert (out / "transformer").is_dir() and (out / mcm.MOTION_HEAD_FILE).is_file()
    summary = json.loads((out / "train.json").read_text())
    params = smoke_params()
    assert summary["steps"] == params.methods["mcm"].train_steps
    assert set(summary["source_counts"]) == {"video", "student"}
    rows = history(out)
    assert all({"consistency", "img_gan/img_g", "img_gan/d_loss", "source/student"} <= r.keys() for r in rows)
    for method in ("teacher", "mcm"):
        assert dcm_run("sample", method) in (0, None)
    assert dcm_run("evaluate", "mcm") in (0, None)
    metrics = json.loads(paths.metrics("mcm").read_text())
    assert metrics["method"] == "mcm" and metrics["steps"] == 4 and np.isfinite(metrics["total"])
    for dim, (lo, hi) in metrics["dimensions_ci95"].items():  # per-dimension intervals, paired differences
        assert lo <= metrics["dimensions"][dim] + 1e-12 and metrics["dimensions"][dim] <= hi + 1e-12, dim
        diff = metrics["diff_vs_teacher"][dim]
        assert diff["ci95"][0] <= diff["mean"] + 1e-12 <= diff["ci95"][1] + 2e-12, dim
