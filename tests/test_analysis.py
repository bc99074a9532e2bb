"""Analyses: the per-timestep training dynamics and κ proposal (``analyze`` stage), and the relative
weight change per module group between two checkpoints (``dcm analyze params``)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm import cli, config, paths
from dcm.analysis import dynamics as dyn
from dcm.analysis import param_change as ap

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ κ rule


def test_change_point_finds_the_step_of_a_two_level_curve():
    curve = np.r_[np.full(7, 0.1), np.full(13, 2.0)] + np.random.default_rng(0).normal(0, 0.02, 20)
    assert dyn.change_point(curve) == 7


def test_proposed_kappa_is_the_last_low_noise_index_where_loss_and_grad_norm_jump():
    n = np.arange(50)
    loss = np.where(n <= 30, 1e-3, 2e-2) * (1 + 0.05 * np.sin(n))
    grad_norm = np.where(n <= 30, 0.05, 0.9) * (1 + 0.05 * np.cos(n))
    assert dyn.propose_kappa(loss, grad_norm) == 30


def test_pooled_curves_are_the_geometric_mean_and_settle_a_noisy_split():
    """Three students on a loss that steps up 0.3 decades above n = 29, two of them with a bump of their own
    (0.6 decades over 8 indices, where a single student's wobble would sit): alone, those two propose their
    bump's edge; pooled (the geometric mean, as analyze does), the rule finds the common step."""
    n = np.arange(50)
    step, norm = np.where(n <= 29, -2.0, -1.7), np.full(50, 0.5)
    curves = []
    for bump in (2, 36, None):
        log_loss = step.copy()
        if bump is not None:
            log_loss[bump:bump + 8] += 0.6
        curves.append(10 ** log_loss)
    assert [dyn.propose_kappa(c, norm) for c in curves] == [9, 35, 29]
    pooled = dyn.geometric_mean(np.stack(curves))
    assert np.allclose(pooled, np.exp(np.log(np.stack(curves)).mean(0)))
    assert dyn.propose_kappa(pooled, norm) == 29


# the pooled probe curves (geometric mean of 3 students) of `make demo` on this CPU, 2026-12-03
DEMO_LOSS = [0.02981, 0.0221, 0.02066, 0.02513, 0.02248, 0.02175, 0.02118, 0.01886, 0.0175, 0.01442, 0.01474,
             0.01356, 0.01391, 0.01317, 0.0118, 0.01955, 0.01466, 0.01217, 0.01326, 0.01093, 0.01248, 0.01286,
             0.01196, 0.01401, 0.01192, 0.01546, 0.0108, 0.01141, 0.01468, 0.0117, 0.02201, 0.01343, 0.01675,
             0.01317, 0.01489, 0.01735, 0.01878, 0.01894, 0.0195, 0.02869, 0.0222, 0.0267, 0.02449, 0.03097,
             0.0402, 0.03904, 0.03783, 0.05862, 0.04838, 0.04607]
DEMO_NORM = [0.06011, 0.1625, 0.374, 0.5275, 0.475, 0.509, 0.572, 0.5934, 0.6012, 0.5979, 0.5392,
             0.543, 0.5594, 0.6459, 0.5862, 0.7273, 0.5773, 0.5439, 0.4626, 0.4453, 0.5559, 0.5247, 0.5067,
             0.5846, 0.4636, 0.6634, 0.3905, 0.4159, 0.717, 0.3996, 0.8967, 0.564, 0.6933, 0.349, 0.4745,
             0.5113, 0.6754, 0.5999, 0.6007, 0.9342, 0.5529, 0.7581, 0.4705, 0.5491, 0.6386, 0.6008, 0.5791,
             1.013, 0.7053, 0.6211]


def test_a_dip_of_the_gradient_norm_at_the_first_indices_does_not_make_an_expert_of_two_points():
    """The gradient norm falls towards σ_min by construction: in the demo's curves its first two indices sit
    a decade below the rest, while the loss rises above n ≈ 38.  Unconstrained, the joint fit split at the
    dip (κ = 1: DetE on two grid points); with each segment at least 10% of the grid it finds the rise."""
    loss, norm = np.array(DEMO_LOSS), np.array(DEMO_NORM)
    z = np.stack([dyn._zscore_log(loss), dyn._zscore_log(norm)])
    assert dyn.change_point(z) - 1 == 1  # what the rule proposed before the minimum segment
    assert dyn.propose_kappa(loss, norm) == 38
    with pytest.raises(ValueError, match="at least 10 grid indices"):
        dyn.change_point(np.zeros((1, 9)), min_size=5)


def test_proposed_kappa_follows_the_gradient_norm_when_the_loss_is_flat():
    n = np.arange(10)
    assert dyn.propose_kappa(np.full(10, 0.03), np.where(n <= 2, 0.1, 1.0)) == 2


def test_training_loss_per_index_averages_the_loops_per_sample_records(tmp_path):
    history = tmp_path / "history.jsonl"
    records = [{"step": 0, "n": [0, 1], "loss_per_sample": [9.0, 9.0]},
               {"step": 1, "n": [0, 0, 2], "loss_per_sample": [1.0, 3.0, 5.0]},
               {"step": 2, "n": [2], "loss_per_sample": [7.0]}]
    history.write_text("".join(json.dumps(r) + "\n" for r in records))
    mean, count = dyn.training_loss_per_index(history, steps=4, from_step=1)
    assert count.tolist() == [2, 0, 2, 0]
    assert mean[0] == 2.0 and mean[2] == 6.0 and np.isnan(mean[1]) and np.isnan(mean[3])


# ------------------------------------------------------------------------------ the stage


@pytest.mark.slow
def test_analyze_stage_distils_one_model_and_writes_the_dynamics_figure(tmp_path, monkeypatch, capsys):
    from dcm.backbones import create_teacher
    from dcm.pipeline.stages import analyze, prepare, trajectories

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCM_TRACKING", "off")
    params = config.load("params.yaml", preset="smoke")
    prepare.run(params)
    create_teacher(params).save(paths.TEACHER)
    trajectories.run(params)
    analyze.run(params)

    out = json.loads((paths.ANALYSIS / "dynamics.json").read_text())
    steps = params.grid.steps
    assert out["configured_kappa"] == params.grid.kappa and 0 <= out["proposed_kappa"] <= steps - 2
    assert len(out["probe_loss"]) == len(out["grad_norm"]) == steps
    assert all(v > 0 and np.isfinite(v) for v in out["probe_loss"] + out["grad_norm"])
    assert (paths.ANALYSIS / "dynamics.png").stat().st_size > 0
    history = [json.loads(line)
               for line in (paths.ANALYSIS / "train" / "history.jsonl").read_text().splitlines()]
    assert len(history) == params.analysis.train_steps
    assert {n for r in history for n in r["n"]} <= set(range(steps))  # one phase over the whole grid
    # analysis.seeds students, each with its own training seed, pooled by the geometric mean
    k = params.analysis.seeds
    assert k == 3 and out["seeds"] == k and len(out["per_seed_proposed_kappa"]) == k
    assert [json.loads((paths.ANALYSIS / folder / "train.json").read_text())["seed"]
            for folder in ("train", "train_s1", "train_s2")] \
        == [params.seed, params.seed + 1, params.seed + 2]
    seed_loss = np.array(out["seed_probe_loss"])
    assert seed_loss.shape == (k, steps) and not np.allclose(seed_loss[0], seed_loss[1])
    assert np.allclose(out["probe_loss"], 10 ** np.log10(seed_loss).mean(0), rtol=1e-6)
    assert out["proposed_kappa"] == dyn.propose_kappa(out["probe_loss"], out["grad_norm"])
    assert out["per_seed_proposed_kappa"] == [dyn.propose_kappa(a, b) for a, b in
                                              zip(out["seed_probe_loss"], out["seed_grad_norm"])]
    printed = capsys.readouterr().out
    assert f"configured grid.kappa = {params.grid.kappa}" in printed \
        and "each of the 3 students alone" in printed


def test_probe_measures_each_index_alone_and_leaves_no_gradients(params, backbone):
    from dcm.distill.data import SourceBatch
    from dcm.schedule import teacher_grid

    grid = teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)

    class Source:  # x_n on the straight path of fixed x0/ε: the probe needs only ``batch`` and ``len``
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            shape = (2, *backbone.latent_shape(params.world.frames, params.world.size))
            self.x0, self.eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            self.cond = backbone.encode_prompts(["a red square moves left", "a blue disc moves up"])

        def __len__(self):
            return 2

        def batch(self, rows, n, generator):
            s = torch.as_tensor(grid.extended, dtype=torch.float32)
            hi, lo = s[n + 1].view(-1, 1, 1, 1, 1), s[n].view(-1, 1, 1, 1, 1)  # σ_n, σ_{n−1}
            return SourceBatch((1 - hi) * self.x0 + hi * self.eps, (1 - lo) * self.x0 + lo * self.eps,
                               self.cond.index(rows))

    student = copy.deepcopy(backbone.transformer).requires_grad_(True)
    loss, norm = dyn.probe(student, backbone, Source(), params, batch=2)
    assert loss.shape == norm.shape == (params.grid.steps,)
    assert np.all(norm > 0) and np.all(np.isfinite(loss))
    assert all(p.grad is None for p in student.parameters())
    again_loss, again_norm = dyn.probe(student, backbone, Source(), params, batch=2)
    np.testing.assert_allclose(again_norm, norm, rtol=1e-5)  # nothing accumulates between indices


# ------------------------------------------------------------------------------ parameter change


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_relative_change_per_group_matches_a_hand_computation(tmp_path, backbone):
    a = copy.deepcopy(backbone.transformer)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if ".ffn." in name:
                p.mul_(1.1)  # ΔW = 0.1·W on every FFN tensor: relative change exactly 0.1
    changes = ap.relative_change(ap.load_weights(_save(a, tmp_path / "a")),
                                 ap.load_weights(_save(b, tmp_path / "b")))
    assert changes["FFN"]["relative_change"] == pytest.approx(0.1, rel=1e-5)
    assert all(c["relative_change"] == 0 for g, c in changes.items() if g != "FFN")
    assert set(changes) == {"timestep embedding", "attention linears", "FFN", "norms", "output", "other"}
    assert sum(c["params"] for c in changes.values()) == sum(p.numel() for p in a.parameters())


def test_lora_dete_is_merged_before_comparing_with_its_seme(tmp_path, backbone, capsys):
    from dcm.distill.experts import make_dete, save_dete

    method = tmp_path / "checkpoints" / "dcm"
    seme = copy.deepcopy(backbone.transformer)
    _save(seme, method / "seme" / "transformer")
    dual = make_dete(copy.deepcopy(seme), backbone, rank=2, alpha=4.0, kappa=5, sigma_kappa=0.8)
    with torch.no_grad():
        for name, p in dual.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        dual.dete_modules["condition_embedder"].time_proj.weight.mul_(1.5)
    save_dete(dual, method / "dete")

    assert cli.main(["analyze", "params", str(method / "seme"), str(method / "dete"),
                     "--plot", str(tmp_path / "change.png"), "--json", str(tmp_path / "change.json")]) == 0
    groups = json.loads((tmp_path / "change.json").read_text())["groups"]
    assert groups["attention linears"]["relative_change"] > 0  # the merged LoRA
    assert groups["timestep embedding"]["relative_change"] > 0  # DetE's copied layers
    assert groups["FFN"]["relative_change"] == 0 and groups["norms"]["relative_change"] == 0
    assert groups["other"]["relative_change"] == 0
    merged = dual.materialize("dete").state_dict()
    assert torch.equal(ap.load_weights(method / "dete")["blocks.0.attn1.to_q.weight"],
                       merged["blocks.0.attn1.to_q.weight"])
    out = capsys.readouterr().out
    assert "| attention linears |" in out and "‖ΔW‖/‖W‖" in out
    assert (tmp_path / "change.png").stat().st_size > 0


def test_a_folder_that_is_no_checkpoint_is_refused_with_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint; expected a diffusers transformer folder"):
        ap.load_weights(tmp_path)


def test_the_dynamics_figure_keeps_its_legend_off_the_curves(tmp_path, monkeypatch):
    """The report shows analysis/dynamics.png: its legend (each student, the pooled curve, both κ) sits
    beside the axes, not over the curves it labels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    overlaps, save = [], Figure.savefig

    def checked(fig, path, *args, **kwargs):
        fig.canvas.draw()
        overlaps.extend(ax for ax in fig.axes if ax.get_legend() is not None
                        and ax.get_legend().get_window_extent().overlaps(ax.get_window_extent()))
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked)
    n = np.arange(50)
    curves = np.stack([np.where(n <= 29, 1e-2, 4e-2) * (1 + 0.1 * k) for k in range(3)])
    d = dyn.Dynamics(sigmas=np.linspace(0.01, 1, 50), probe_loss=dyn.geometric_mean(curves),
                     grad_norm=np.ones(50),
                     train_loss=np.full(50, np.nan), train_count=np.zeros(50, dtype=int), proposed_kappa=29,
                     configured_kappa=37, seed_probe_loss=curves, seed_grad_norm=np.ones((3, 50)),
                     seed_kappa=(29, 29, 30))
    assert dyn.plot(d, tmp_path / "dynamics.png").stat().st_size > 0 and overlaps == []
