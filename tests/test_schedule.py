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
    explicit_schedule,
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


# ------------------------------------------------------------------ official schedules as data

# The spec (METHODS.md, Inference): the released lists, written here independently of any preset.
HUNYUAN_4_STEP_SIGMAS = [1.0, 0.992, 0.9818, 0.9124]
HUNYUAN_4_STEP = [[1000 * s, e]
                  for s, e in zip(HUNYUAN_4_STEP_SIGMAS, ["seme", "seme", "dete", "dete"], strict=True)]
WAN_6_STEP = [[1000, "seme"], [992, "seme"], [982, "seme"], [949, "dete"], [905, "dete"], [810, "dete"]]
WAN_SHIFT, WAN_KAPPA = 17.0, 34  # src/dcm/presets/wan.yaml grid; κ = 34 (METHODS.md)


def test_explicit_schedule_gives_the_official_hunyuan_four_steps(grid):
    steps = explicit_schedule(HUNYUAN_4_STEP)
    np.testing.assert_allclose([s.sigma for s in steps], HUNYUAN_4_STEP_SIGMAS, rtol=0, atol=1e-12)
    assert [s.expert for s in steps] == ["seme", "seme", "dete", "dete"]
    # the derived schedule agrees with the official one to the 1e-3 the paper prints
    derived = expert_schedule(grid, 37, 4)
    np.testing.assert_allclose([s.sigma for s in derived], [s.sigma for s in steps], atol=1e-3)
    assert [s.expert for s in derived] == [s.expert for s in steps]


def test_explicit_schedule_gives_the_official_wan_six_steps():
    steps = explicit_schedule(WAN_6_STEP, num_train_timesteps=1000, experts={"seme", "dete"})
    np.testing.assert_allclose([s.sigma for s in steps], [1.0, 0.992, 0.982, 0.949, 0.905, 0.81],
                               rtol=0, atol=1e-12)
    assert [s.expert for s in steps] == ["seme"] * 3 + ["dete"] * 3
    # Every SemE step lies above σ_κ and every DetE step below it, so κ = 34 routes them the same way ...
    wan_grid = teacher_grid(50, WAN_SHIFT)
    sigma_kappa = wan_grid.sigma(WAN_KAPPA)
    assert all(s.sigma > sigma_kappa for s in steps[:3]) and all(s.sigma < sigma_kappa for s in steps[3:])


def test_derived_wan_schedule_departs_from_the_official_list():
    """... but the derived split (SemE from σ_49 to σ_κ, DetE from σ_κ to σ_min, evenly in grid index)
    is not Wan's released list: derived t ≈ [1000, 993.5, 985.5, 975.4, 935.4, 843.0] (indices 49, 44, 39 |
    34, 22, 11) against the official [1000, 992, 982, 949, 905, 810] (within 0.6 of grid indices 49, 43, 37 |
    25, 17, 9). The official list is data, not a rule of (steps, shift, κ): it must come from
    ``explicit_schedule``."""
    wan_grid = teacher_grid(50, WAN_SHIFT)
    derived = expert_schedule(wan_grid, WAN_KAPPA, 6)
    official = explicit_schedule(WAN_6_STEP)
    assert [s.expert for s in derived] == [s.expert for s in official]  # same expert split ...
    derived_t = np.array([1000 * s.sigma for s in derived])
    official_t = np.array([1000 * s.sigma for s in official])
    np.testing.assert_allclose(derived_t, [1000.0, 993.51, 985.51, 975.41, 935.41, 842.98], atol=0.01)
    assert np.abs(derived_t - official_t).max() > 25  # ... at other timesteps (DetE's first step: 975 vs 949)
    assert derived_t[3] == pytest.approx(1000 * wan_grid.sigma(WAN_KAPPA))  # derived DetE starts at σ_κ
    # the official timesteps sit within 0.6 of grid timesteps (992.04, 981.76, 948.50, 905.33, 809.52)
    nearest = [int(np.argmin(np.abs(1000 * wan_grid.sigmas - t))) for t in official_t]
    assert nearest == [49, 43, 37, 25, 17, 9]
    np.testing.assert_allclose(official_t, 1000 * wan_grid.sigmas[nearest], atol=0.6)


@pytest.mark.parametrize(("pairs", "message"), [
    ([], "non-empty list"),
    ("1000 seme", "non-empty list"),
    ([[1000, "seme"], [1000, "dete"]], r"schedule\[1\].*decrease strictly"),
    ([[900, "seme"], [950, "seme"]], r"schedule\[1\].*decrease strictly"),
    ([[1001, "seme"]], r"schedule\[0\].*\(0, 1000\]"),
    ([[0, "dete"]], r"\(0, 1000\]"),
    ([[-5, "dete"]], r"\(0, 1000\]"),
    ([[True, "seme"]], "t must be a number"),
    ([["1000", "seme"]], "t must be a number"),
    ([[1000, ""]], "non-empty name"),
    ([[1000, 3]], "non-empty name"),
    ([[1000, "seme", 1]], r"\[t, expert\] pair"),
    (["seme"], r"\[t, expert\] pair"),
    ([[1000, "seme"], [900, "dete"], [800, "seme"]], r"schedule\[2\].*'seme' already handed over"),
])
def test_explicit_schedule_rejects_bad_lists(pairs, message):
    with pytest.raises(ValueError, match=message):
        explicit_schedule(pairs)


def test_explicit_schedule_checks_expert_names_and_scales_by_the_training_timesteps():
    with pytest.raises(ValueError, match=r"expert 'student' is not one of \['dete', 'seme'\]"):
        explicit_schedule([[1000, "student"]], experts=("seme", "dete"))
    steps = explicit_schedule([(500, "student"), (250.5, "student")], num_train_timesteps=500)
    assert [s.sigma for s in steps] == [1.0, 0.501] and {s.expert for s in steps} == {"student"}


@pytest.mark.parametrize(("preset", "spec"), [("hunyuan", HUNYUAN_4_STEP), ("wan", WAN_6_STEP)])
def test_real_presets_give_the_official_steps_through_dcm_config(preset, spec, tmp_path):
    from pathlib import Path

    from dcm import config

    raw = config.load_raw(Path(__file__).resolve().parents[1] / "params.yaml", preset)
    raw["backbone"]["path"] = str(tmp_path)  # parsing wants an existing weights folder
    params = config.parse(raw)
    dcm = params.method("dcm")
    steps = explicit_schedule(dcm.schedule, params.grid.num_train_timesteps, experts=("seme", "dete"))
    assert steps == explicit_schedule(spec) and len(steps) == dcm.sample_steps
    from dcm.methods import schedule_for

    assert schedule_for(params, "dcm") == steps  # what the sample stage and the benchmarks use
