"""shapes-bench: a clean ground-truth video scores near 1 on every dimension; each degradation lowers
the dimension that measures it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcm.evaluation.scoring import aggregate
from dcm.evaluation.shapes_bench import SHAPES_BENCH, psnr, score_video
from dcm.worlds import shapes

SIZE, FRAMES = 32, 8


def scene(caption="a red striped square moves right quickly", seed=3):
    return shapes.sample_scene(np.random.default_rng(seed), SIZE, FRAMES, caption=caption)


def clean(s):
    return shapes.render(s, SIZE, FRAMES)


def test_clean_render_scores_near_one_everywhere():
    s = scene()
    scores = score_video(clean(s), s, SIZE, FRAMES)
    assert set(scores) == set(SHAPES_BENCH)
    assert all(v > 0.97 for v in scores.values()), scores
    assert aggregate(scores, SHAPES_BENCH)["total"] > 0.98


def test_blur_lowers_imaging_quality():
    s = scene()
    blurred = shapes.degrade(clean(s), np.random.default_rng(0), blur=1.0, noise=0.0, colour_shift=0.0)
    assert score_video(blurred, s, SIZE, FRAMES)["imaging_quality"] < 0.75


def test_flicker_lowers_temporal_flickering_and_background_consistency():
    s = scene()
    video = clean(s).clone()
    video[:, 1::2] = (video[:, 1::2] + 0.3).clamp(-1, 1)  # every other frame brighter
    scores = score_video(video, s, SIZE, FRAMES)
    assert scores["temporal_flickering"] < 0.95
    assert scores["background_consistency"] < 0.95


def test_jitter_lowers_motion_smoothness():
    s = scene()
    video = clean(s).clone()
    for t in range(1, FRAMES, 2):
        video[:, t] = torch.roll(video[:, t], shifts=3, dims=1)  # the object jumps 3 px up and down
    assert score_video(video, s, SIZE, FRAMES)["motion_smoothness"] < 0.7


def test_wrong_colour_and_wrong_direction_score_zero_on_their_dimension():
    truth = scene("a red striped square moves right quickly")
    other_colour = scene("a blue striped square moves right quickly")
    other_direction = scene("a red striped square moves left quickly")
    assert score_video(clean(other_colour), truth, SIZE, FRAMES)["color"] == 0.0
    assert score_video(clean(other_direction), truth, SIZE, FRAMES)["motion_direction"] == 0.0


def test_frozen_video_has_no_dynamic_degree():
    s = scene()
    frozen = clean(s)[:, :1].repeat(1, FRAMES, 1, 1)
    scores = score_video(frozen, s, SIZE, FRAMES)
    assert scores["dynamic_degree"] == 0.0


def test_psnr_is_infinite_for_identical_and_finite_otherwise():
    v = clean(scene())
    assert psnr(v, v) == float("inf")
    assert 10 < psnr(v, (v + 0.05).clamp(-1, 1)) < 60


@pytest.mark.parametrize("seed", range(5))
def test_subject_consistency_drops_when_the_object_changes_colour_midway(seed):
    s = scene(seed=seed)
    video = clean(s).clone()
    video[:, FRAMES // 2:] = clean(scene("a green striped square moves right quickly", seed))[:, FRAMES // 2:]
    assert score_video(video, s, SIZE, FRAMES)["subject_consistency"] < 0.9
