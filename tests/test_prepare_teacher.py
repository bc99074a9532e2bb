"""The ``prepare`` and ``teacher`` stages: the (prompt, seed) sets and the flow-matching teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm import config, paths
from dcm.backbones import create_teacher, load_teacher
from dcm.config import ConfigError
from dcm.data.prompts import TRAIN_SEED_LIMIT, build_prompt_sets
from dcm.distill.teacher_pretraining import (
    flow_matching_loss,
    sample_sigmas,
    scene_batch,
    train_teacher,
    warmup_cosine,
)
from dcm.pipeline.table import STAGES
from dcm.worlds import shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shapes_params():
    """The shapes world of params.yaml with full captions only (the open rows' contract:
    tests/test_open_world.py)."""
    params = config.load(REPO / "params.yaml")
    params.world.open_share, params.world.eval_open_prompts = 0.0, 0
    return params


@pytest.fixture
def smoke_params():
    return config.load(REPO / "params.yaml", preset="smoke")


# ------------------------------------------------------------------------------------ prepare


def test_prepare_is_deterministic_from_the_seed(shapes_params):
    assert build_prompt_sets(shapes_params) == build_prompt_sets(shapes_params)
    shapes_params.seed += 1
    other = build_prompt_sets(shapes_params)
    shapes_params.seed -= 1
    assert other != build_prompt_sets(shapes_params)


def test_prepare_rows_follow_the_prompts_contract(shapes_params):
    sets = build_prompt_sets(shapes_params)
    captions = shapes.all_captions()
    assert len(sets["train"]) == shapes_params.trajectories.num_trajectories
    assert len(sets["eval"]) == shapes_params.world.eval_prompts * shapes_params.world.eval_seeds
    for row in sets["train"] + sets["eval"]:
        assert set(row) == {"prompt_id", "prompt", "seed"}
        assert captions[row["prompt_id"]] == row["prompt"]


def test_eval_seeds_are_unseen_and_disjoint_from_train_seeds(shapes_params):
    sets = build_prompt_sets(shapes_params)
    train_seeds = [r["seed"] for r in sets["train"]]
    eval_seeds = [r["seed"] for r in sets["eval"]]
    assert all(0 <= s < TRAIN_SEED_LIMIT for s in train_seeds)
    assert all(s >= TRAIN_SEED_LIMIT for s in eval_seeds)
    assert len(set(train_seeds)) == len(train_seeds) and len(set(eval_seeds)) == len(eval_seeds)


def test_train_rows_cycle_over_every_caption_before_repeating(shapes_params):
    shapes_params.trajectories.num_trajectories = 300
    prompts = [r["prompt_id"] for r in build_prompt_sets(shapes_params)["train"]]
    n = len(shapes.all_captions())
    assert sorted(prompts[:n]) == list(range(n))
    assert prompts[n:] == prompts[: 300 - n]


def test_eval_prompts_spread_over_every_attribute_value(shapes_params):
    rows = build_prompt_sets(shapes_params)["eval"]
    prompts = sorted({r["prompt"] for r in rows})
    assert len(prompts) == shapes_params.world.eval_prompts
    for key, values in shapes.VOCABULARY.items():
        counts = {v: 0 for v in values}
        for p in prompts:
            counts[shapes.parse_caption(p)[key]] += 1
        assert max(counts.values()) - min(counts.values()) <= 1, (key, counts)


def test_prepare_stage_writes_prompts_json(project):
    params = config.load("params.yaml", preset="smoke")
    STAGES["prepare"].run(params)
    written = json.loads(paths.PROMPTS.read_text())
    assert written == build_prompt_sets(params)


def test_too_many_eval_prompts_fail_with_the_key(shapes_params):
    shapes_params.world.eval_prompts = 10_000
    with pytest.raises(ConfigError, match="world.eval_prompts"):
        build_prompt_sets(shapes_params)


# ------------------------------------------------------------------------------------ teacher


def test_training_scenes_come_from_training_seeds_and_match_their_captions(smoke_params):
    videos, captions = scene_batch(np.random.default_rng(0), 3, 16, 8, "clean")
    assert videos.shape == (3, 3, 8, 16, 16)
    for video, caption in zip(videos, captions):
        assert shapes.detect(video).caption == caption


def test_low_quality_world_trains_on_degraded_videos():
    clean, _ = scene_batch(np.random.default_rng(0), 2, 16, 8, "clean")
    low, _ = scene_batch(np.random.default_rng(0), 2, 16, 8, "low")
    assert not torch.equal(clean, low)
    assert low.abs().max() <= 1.0


def test_training_sigmas_stay_inside_the_training_range():
    train = torch.linspace(0.01, 1.0, 1000)
    sigma = sample_sigmas(4096, train, torch.Generator().manual_seed(0))
    assert sigma.min() >= 0.01 and sigma.max() <= 1.0
    assert sigma.std() > 0.1


def test_lr_warms_up_then_decays_to_zero():
    f = warmup_cosine(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_flow_matching_loss_is_zero_for_the_exact_velocity(smoke_params):
    backbone = create_teacher(smoke_params)
    x0 = torch.randn(2, *backbone.latent_shape(8, 16))
    eps = torch.randn_like(x0)

    class ExactVelocity(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            return (eps - x0,)

    loss = flow_matching_loss(backbone, ExactVelocity(), x0, eps, torch.tensor([0.3, 0.9]),
                              backbone.null_prompts(2))
    assert loss.item() == 0.0


def test_teacher_training_is_deterministic_from_the_seed(smoke_params):
    smoke_params.teacher.train_steps = 2
    weights = []
    for _ in range(2):
        backbone = create_teacher(smoke_params)
        train_teacher(backbone, smoke_params)
        weights.append(torch.cat([p.flatten() for p in backbone.transformer.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_teacher_stage_needs_prepare_first(project):
    params = config.load("params.yaml", preset="smoke")
    with pytest.raises(ConfigError, match="prepare"):
        STAGES["teacher"].run(params)
    assert not paths.TEACHER.exists()


@pytest.mark.slow
def test_smoke_teacher_stage_produces_a_loadable_teacher_whose_loss_decreases(project):
    params = config.load("params.yaml", preset="smoke")
    STAGES["prepare"].run(params)
    STAGES["teacher"].run(params)

    summary = json.loads((paths.TEACHER / "training.json").read_text())
    assert summary["steps"] == params.teacher.train_steps
    curve = summary["loss_curve"]
    assert curve[-1] < curve[0]
    assert not any(p.name.startswith(".") for p in paths.TEACHER.parent.iterdir())  # no temp dirs left

    teacher = load_teacher(params, paths.TEACHER)
    x = torch.randn(1, *teacher.latent_shape(params.world.frames, params.world.size))
    with torch.no_grad():
        v = teacher.guided_velocity(teacher.transformer, x, torch.ones(1),
                                    teacher.encode_prompts(["a red square moves left slowly"]),
                                    teacher.null_prompts(1))
    assert v.shape == x.shape and torch.isfinite(v).all()
