"""Distribution metrics of the shapes world: real videos score at the real-vs-real floor; blur moves the
Fréchet distance beyond it; mode collapse shows on diversity; bad input fails naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dcm import config
from dcm.data.prompts import balanced_captions, build_prompt_sets
from dcm.evaluation import distribution, reporting
from dcm.evaluation.metrics import shapes_bench_metrics
from dcm.worlds import shapes

REPO = Path(__file__).resolve().parents[1]
SIZE, FRAMES, JITTER = 16, 8, 1.5  # the shapes preset's world
PROMPTS, SEEDS, DRAWS = 16, 2, 200
# outside every split and the real sets' range: a "method" that samples real videos
GENERATED_SEED_BASE = 5_000_000


@pytest.fixture(scope="module")
def world():
    captions = balanced_captions(shapes.all_captions(), PROMPTS, np.random.default_rng(1))
    prompts = [c for c in captions for _ in range(SEEDS)]
    real = distribution.real_sets(prompts, SIZE, FRAMES, JITTER, seed=0)
    generated = distribution.real_videos(prompts, GENERATED_SEED_BASE + np.arange(len(prompts)), SIZE,
                                         FRAMES, JITTER)
    return prompts, real, generated


def score(world, videos: torch.Tensor) -> dict:
    prompts, real, _ = world
    return distribution.compare(distribution.features(videos, SIZE), prompts, real, n=DRAWS, seed=0)


def covers(ci, value) -> bool:
    return ci[0] <= value <= ci[1]


def overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def test_real_videos_score_the_real_floor_within_their_interval(world):
    m = score(world, world[2])
    assert covers(m["fd_ci95"], m["fd_real_floor"]), m
    assert covers(m["fd_excess_ci95"], 0.0), m  # real vs real: FD beyond the floor ≈ 0
    assert overlap(m["diversity_ci95"], m["diversity_real_ci95"]), m
    assert set(m["distribution"]["mean_shift"]) == set(distribution.FEATURES)
    assert m["distribution"]["seeds_per_prompt"] == [SEEDS, SEEDS] and m["distribution"]["prompts"] == PROMPTS


def test_blur_moves_fd_beyond_the_real_floor_but_not_diversity(world):
    blurred = shapes.degrade(world[2], np.random.default_rng(0), blur=0.5, noise=0.0, colour_shift=0.0)
    m = score(world, blurred)
    assert m["fd_ci95"][0] > m["fd_real_floor_ci95"][1], m  # the interval excludes the floor, with room
    assert m["fd_excess_ci95"][0] > 0, m
    shift = m["distribution"]["mean_shift"]
    assert max(shift, key=lambda k: abs(shift[k])) in ("edge_sharpness", "high_frequency"), shift
    assert overlap(m["diversity_ci95"], m["diversity_real_ci95"]), m  # blur is not collapse


def test_mode_collapse_lowers_diversity(world):
    collapsed = world[2].clone()
    for first in range(0, len(collapsed), SEEDS):  # every seed of a prompt gives the prompt's first video
        collapsed[first + 1:first + SEEDS] = collapsed[first]
    m = score(world, collapsed)
    assert m["diversity"] == 0 and m["diversity_ci95"][1] < m["diversity_real_ci95"][0], m
    assert all(p["diversity"] == 0 for p in m["distribution"]["per_prompt"])


def test_one_seed_per_prompt_gives_fd_but_no_diversity_and_says_why(world):
    prompts, real, generated = world
    m = distribution.compare(distribution.features(generated[::SEEDS], SIZE), prompts[::SEEDS], real, n=20)
    assert m["fd"] >= 0 and m["diversity"] is None and m["diversity_ci95"] is None
    assert "world.eval_seeds" in m["distribution"]["note"]


def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_one():
    x = np.random.default_rng(0).standard_normal((50, 4))
    assert distribution.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert distribution.frechet_distance(x + np.array([1.0, 2.0, 0.0, 0.0]), x) == pytest.approx(5.0)


def test_bad_input_fails_naming_what_is_wrong(world):
    prompts, real, generated = world
    with pytest.raises(ValueError, match="no videos"):
        distribution.check_videos(torch.zeros(0, 3, FRAMES, SIZE, SIZE), SIZE, FRAMES, "samples")
    with pytest.raises(ValueError,
                       match=r"samples: expected videos of shape \(N, 3, 8, 16, 16\).*got \(2, 3, 8, 8, 8\)"):
        distribution.check_videos(torch.zeros(2, 3, FRAMES, 8, 8), SIZE, FRAMES, "samples")
    features = distribution.features(generated[:4], SIZE)
    with pytest.raises(ValueError, match="4 feature rows for 3 prompts"):
        distribution.compare(features, prompts[:3], real)
    with pytest.raises(ValueError, match="no real reference videos, e.g. 'a red square moves up slowly'"):
        distribution.compare(features, ["a red square moves up slowly"] * 4, real)
    with pytest.raises(ValueError, match="needs ≥ 2 generated videos, got 1"):
        distribution.compare(features[:1], prompts[:1], real)
    with pytest.raises(ValueError, match="feature sizes differ"):
        distribution.frechet_distance(features, features[:, :3])


def test_evaluate_metrics_carry_the_distribution_keys_and_the_report_shows_them():
    params = config.load(REPO / "params.yaml", preset="smoke")  # 4 prompts × 1 seed
    rows = build_prompt_sets(params)["eval"]
    scenes = [shapes.sample_scene(np.random.default_rng(r["seed"]), params.world.size, params.world.frames,
                                  caption=r["prompt"], jitter=params.world.position_jitter) for r in rows]
    videos = shapes.render_batch(scenes, params.world.size, params.world.frames)
    record = {"num_steps": 50, "nfe": 100, "seconds_per_video": 1.0, "rows": rows}
    m = shapes_bench_metrics(params, "teacher", record, videos, videos)
    for key in distribution.METRIC_KEYS:
        assert key in m, key
    assert m["fd"] >= 0 and len(m["fd_ci95"]) == 2 and m["diversity"] is None  # one seed per prompt
    with pytest.raises(ValueError, match="4 videos for 3 rows"):
        distribution.distribution_metrics(params, rows[:3], videos)
    table = reporting.markdown_table(reporting.method_table({"teacher": m}, ["teacher"]))
    assert "FD to real [95% CI] | FD real vs real | diversity [95% CI] |" in table
    assert (f"| {m['fd']:.2f} [{m['fd_ci95'][0]:.2f}, {m['fd_ci95'][1]:.2f}] "
            f"| {m['fd_real_floor']:.2f} |  |") in table
