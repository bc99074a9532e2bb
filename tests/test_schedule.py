"""The teacher grid, the κ split, PCM phases and sampling schedules against METHODS.md's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from dcm.schedule import (
    SIGMA_MIN_INDEX,
    Phase,
    expert_phases,
    expert_schedule,
    pcm_phases,
    phase_of,
    phase_schedule,
    phases_from_ends,
    split_points,
    teacher_grid,
    training_sigmas,
    uniform_schedule,
)

HUNYUAN_SIGMAS = {49: 1.0, 38: 0.98368, 37: 0.98176, 34: 0.97541, 18: 0.91243, 0: 0.2576}


@pytest.fixture(scope="module")
def grid():
    return teacher_grid(50, 17.0)


def test_shift_17_grid_matches_the_paper_sigmas(grid):
    assert grid.steps == 50
    for n, sigma in HUNYUAN_SIGMAS.items():
        assert grid.sigma(n) == pytest.approx(sigma, abs=1e-4), n
    assert grid.sigma(SIGMA_MIN_INDEX) == pytest.approx(0.0167, abs=1e-4)
    assert np.all(np.diff(grid.sigmas) > 0) and grid.sigma_min < grid.sigmas[0]


def test_grid_equals_diffusers_flow_match_scheduler_at_every_20th_position(grid):
    descending = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=17.0).sigmas.double().numpy()
    ascending = descending[::-1]
    np.testing.assert_allclose(training_sigmas(1000, 17.0), ascending, rtol=1e-6)
    positions = [20 * (i + 1) - 1 for i in range(50)]  # grid index i ↔ ascending position 20(i+1)−1
    np.testing.assert_allclose(grid.sigmas, ascending[positions], rtol=1e-6)
    assert grid.sigma_min == pytest.approx(ascending[0], rel=1e-6)


def test_extended_grid_puts_sigma_min_at_position_zero(grid):
    ext = grid.extended
    assert len(ext) == 51 and ext[0] == grid.sigma_min and ext[-1] == 1.0
    for n in (-1, 0, 37, 49):
        assert ext[n + 1] == grid.sigma(n)


def test_grid_index_outside_the_grid_raises(grid):
    with pytest.raises(IndexError, match="grid index 50"):
        grid.sigma(50)
    with pytest.raises(IndexError, match="grid index -2"):
        grid.sigma(-2)


def test_grid_steps_must_divide_the_training_timesteps():
    with pytest.raises(ValueError, match="must divide"):
        teacher_grid(30, 17.0)


def test_kappa_37_splits_seme_38_to_49_ending_at_37_and_dete_0_to_37_ending_at_sigma_min():
    phases = expert_phases(50, 37)
    assert phases["seme"] == Phase(first=38, last=49, end=37)
    assert phases["dete"] == Phase(first=0, last=37, end=SIGMA_MIN_INDEX)
    assert phases["seme"].size + phases["dete"].size == 50


def test_wan_kappa_34_gives_seme_35_to_49_ending_at_34():
    phases = expert_phases(50, 34)
    assert phases["seme"] == Phase(first=35, last=49, end=34)
    assert phases["dete"] == Phase(first=0, last=34, end=SIGMA_MIN_INDEX)


@pytest.mark.parametrize("kappa", [-1, 49, 50])
def test_kappa_outside_the_grid_raises(kappa):
    with pytest.raises(ValueError, match="kappa"):
        expert_phases(50, kappa)


def test_pcm_four_phases_start_at_0_12_25_37():
    phases = pcm_phases(50, 4)
    assert [p.first for p in phases] == [0, 12, 25, 37]
    assert [(p.last, p.end) for p in phases] == [(11, -1), (24, 11), (36, 24), (49, 36)]
    assert phase_of(phases, 30) == phases[2] and phase_of(phases, 0) == phases[0]
    with pytest.raises(ValueError, match="num_phases"):
        pcm_phases(50, 0)


def test_one_phase_is_the_whole_grid_to_sigma_min():
    assert pcm_phases(50, 1) == [Phase(0, 49, SIGMA_MIN_INDEX)]
    assert phases_from_ends([SIGMA_MIN_INDEX], 10) == [Phase(0, 9, SIGMA_MIN_INDEX)]


def test_invalid_phase_raises():
    with pytest.raises(ValueError, match="invalid phase"):
        Phase(first=5, last=4, end=1)


def test_dcm_four_step_schedule_is_the_official_hunyuan_sigmas(grid):
    steps = expert_schedule(grid, 37, 4)
    np.testing.assert_allclose([s.sigma for s in steps], [1.0, 0.992, 0.9818, 0.9124], atol=1e-3)
    assert [s.expert for s in steps] == ["seme", "seme", "dete", "dete"]
    assert split_points(49, 37, 2) == [49, 43] and split_points(37, -1, 2) == [37, 18]


def test_dcm_eight_step_schedule_switches_experts_at_kappa(grid):
    steps = expert_schedule(grid, 37, 8)
    assert [s.expert for s in steps] == ["seme"] * 4 + ["dete"] * 4
    assert steps[4].sigma == grid.sigma(37)
    assert all(a.sigma > b.sigma for a, b in zip(steps[:-1], steps[1:], strict=True))
    with pytest.raises(ValueError, match="at least 2 steps"):
        expert_schedule(grid, 37, 1)


def test_full_uniform_schedule_walks_the_whole_grid_downwards(grid):
    steps = uniform_schedule(grid, 50)
    assert [s.sigma for s in steps] == list(grid.sigmas[::-1])
    assert {s.expert for s in steps} == {"teacher"}
    four = uniform_schedule(grid, 4)
    assert four[0].sigma == 1.0 and len(four) == 4


def test_phase_schedule_steps_from_each_phase_top(grid):
    steps = phase_schedule(grid, pcm_phases(50, 4))
    assert [s.sigma for s in steps] == [grid.sigma(n) for n in (49, 36, 24, 11)]
