"""The distillation engine: phases honoured, targets as configured, exact resume, guards, stage outputs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from dcm import config, distill, paths, schedule
from dcm.backbones import load_teacher
from dcm.distill import losses
from dcm.distill.loop import Objective, TrainingDiverged, autocast_for, draw_indices, phase_tables, train
from dcm.tracking import StageRun
from helpers import FailAt, perturbed_dete, smoke_params

REPO = Path(__file__).resolve().parents[1]


def online_setup(params):
    """The saved teacher and the batch source ``training.source`` names."""
    backbone = distill.load_backbone(params)  # on distill.device(), as the stages load it
    return backbone, distill.make_source(params, backbone)


def make_spec(params, backbone, phases, target="online", steps=6, objectives=(), name="test"):
    student = distill.full_parameter_student(backbone)
    return distill.DistillSpec(name=name, student=student, trainable=list(student.parameters()),
                               phases=phases, target=target, lr=1e-3, train_steps=steps,
                               objectives=list(objectives),
                               save=distill.save_transformer(student))


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


class Record(Objective):
    """Keeps every batch the loop shows the objectives (with the student as it was for that forward)."""

    name = "record"

    def __init__(self, student=None):
        self.batches, self.students, self.student = [], [], student

    def generator_loss(self, batch):
        self.batches.append(batch)
        if self.student is not None:
            self.students.append(copy.deepcopy(self.student))
        return {}


# ----------------------------------------------------------------------------- phases and draws


@pytest.mark.parametrize("phases", [schedule.pcm_phases(50, 1), schedule.pcm_phases(50, 4),
                                    [schedule.expert_phases(50, 37)["seme"]],
                                    [schedule.expert_phases(50, 37)["dete"]]])
def test_drawn_indices_cover_exactly_the_phases_union_uniformly(phases):
    allowed, end_of = phase_tables(phases, 50)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(400):
        _, n = draw_indices(8, allowed, 16, generator)
        counts += torch.bincount(n, minlength=50)
    expected = {n for p in phases for n in range(p.first, p.last + 1)}
    assert {int(i) for i in torch.nonzero(counts).flatten()} == expected
    drawn = counts[sorted(expected)]
    assert drawn.min() > 0.6 * drawn.mean()  # uniform over the union, not per phase
    for p in phases:
        assert all(int(end_of[n]) == p.end for n in range(p.first, p.last + 1))


def test_seme_phase_from_kappa_and_pcm_phase_ends():
    allowed, end_of = phase_tables([schedule.expert_phases(50, 37)["seme"]], 50)
    assert allowed.tolist() == list(range(38, 50)) and set(end_of[38:].tolist()) == {37}
    _, end_of = phase_tables(schedule.pcm_phases(50, 4), 50)
    assert [int(end_of[n]) for n in (0, 11, 12, 24, 25, 36, 37, 49)] == [-1, -1, 11, 11, 24, 24, 36, 36]


def test_training_draws_n_only_from_the_seme_phase_with_its_end(smoke):
    params = smoke_params(source="online")
    backbone, source = online_setup(params)
    phase = schedule.expert_phases(params.grid.steps, params.grid.kappa)["seme"]
    record = Record()
    spec = make_spec(params, backbone, [phase], steps=4, objectives=[record])
    train(spec, backbone, source, params, smoke / "run", StageRun(None))
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift)
    drawn = torch.cat([b.n for b in record.batches])
    assert drawn.min() >= phase.first and drawn.max() <= phase.last
    for b in record.batches:
        torch.testing.assert_close(b.sigma_end, torch.full_like(b.sigma_end, grid.sigma(phase.end)))
        torch.testing.assert_close(b.sigma_n.cpu(), torch.tensor([grid.sigma(int(n)) for n in b.n]))
        torch.testing.assert_close(b.sigma_prev.cpu(), torch.tensor([grid.sigma(int(n) - 1) for n in b.n]))
    logged = [n for row in history(smoke / "run") for n in row["n"]]
    assert logged == drawn.tolist()


def test_every_step_reaches_mlflow_in_batches_of_log_every(smoke, monkeypatch):
    """history.jsonl and the MLflow run hold the same per-step values, though the loop sends them every
    ``log_every`` steps (7 steps at 3: batches of 3, 3, 1)."""
    from mlflow.tracking import MlflowClient

    from dcm import tracking

    monkeypatch.setenv("DCM_TRACKING", "on")  # the session's sqlite store (conftest)
    params = smoke_params(source="online", log_every=3)
    backbone, source = online_setup(params)
    spec = make_spec(params, backbone, schedule.pcm_phases(params.grid.steps, 2), steps=7)
    with tracking.stage_run(params, "train_baseline", "batched") as run:
        train(spec, backbone, source, params, smoke / "run", run)
        run_id = run.run_id
    logged = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in logged) == [(row["step"], row["loss"])
                                                        for row in history(smoke / "run")]


# --------------------------------------------------------------------------------- the targets


def test_online_target_is_the_current_student_without_grad(smoke):
    params = smoke_params(source="online")
    backbone, source = online_setup(params)
    spec = make_spec(params, backbone, schedule.pcm_phases(params.grid.steps, 2), steps=3)
    record = Record(spec.student)
    spec.objectives = [record]
    train(spec, backbone, source, params, smoke / "run", StageRun(None))
    b, student_then = record.batches[-1], record.students[-1]
    assert not b.x_end_target.requires_grad and b.x_end_pred.requires_grad
    with torch.no_grad(), autocast_for(b.x_prev.device)():  # the loop's precision (bf16 autocast on CUDA)
        v = backbone.predict(student_then, b.x_prev, b.sigma_prev, b.cond).float()
    expected = losses.consistency_target(b.x_prev, v, b.sigma_prev, b.sigma_end, b.sigma_prev == b.sigma_end)
    torch.testing.assert_close(b.x_end_target, expected, rtol=1e-5, atol=1e-5)


def test_ema_target_with_decay_one_stays_the_initial_student(smoke):
    params = smoke_params(source="online", ema_decay=1.0)
    backbone, source = online_setup(params)
    spec = make_spec(params, backbone, schedule.pcm_phases(params.grid.steps, 1), target="ema", steps=3)
    initial = copy.deepcopy(spec.student)
    record = Record(spec.student)
    spec.objectives = [record]
    train(spec, backbone, source, params, smoke / "run", StageRun(None))
    b = record.batches[-1]
    with torch.no_grad(), autocast_for(b.x_prev.device)():
        v_initial = backbone.predict(initial, b.x_prev, b.sigma_prev, b.cond).float()
        v_current = backbone.predict(record.students[-1], b.x_prev, b.sigma_prev, b.cond).float()
    not_boundary = b.sigma_prev != b.sigma_end
    assert not_boundary.any()
    target_initial = losses.euler_endpoint(b.x_prev, v_initial, b.sigma_prev, b.sigma_end)
    target_current = losses.euler_endpoint(b.x_prev, v_current, b.sigma_prev, b.sigma_end)
    torch.testing.assert_close(b.x_end_target[not_boundary], target_initial[not_boundary],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b.x_end_target[not_boundary], target_current[not_boundary], atol=1e-5)


# ------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("source_kind", ["online", "cached"])
def test_resume_gives_identical_next_losses(smoke, source_kind):
    """6 steps straight vs 3 steps, a kill during step 4, and a resume: the same losses, bit for bit (CPU)."""
    params = smoke_params(source=source_kind, checkpoint_every=3)
    if source_kind == "cached":
        from dcm.pipeline.stages import trajectories

        trajectories.run(params)
    backbone, source = online_setup(params)
    phases = schedule.pcm_phases(params.grid.steps, 2)

    def spec(*objectives):
        return make_spec(params, backbone, phases, target="ema", steps=6,
                         objectives=[distill.TemporalCoherence(1.0, 2), *objectives])

    kill = FailAt(4, "interrupt")  # the same objectives in both runs: only the kill differs
    straight = train(spec(kill), backbone, source, params, smoke / "straight", StageRun(None))
    kill.armed = True
    with pytest.raises(KeyboardInterrupt):
        train(spec(kill), backbone, source, params, smoke / "resumed", StageRun(None))
    assert (smoke / "resumed" / "resume" / "state.pt").is_file()
    resumed = train(spec(kill), backbone, source, params, smoke / "resumed", StageRun(None))
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses[3:]
    assert [r["loss"] for r in history(smoke / "resumed")] == [r["loss"] for r in history(smoke / "straight")]
    assert [r["step"] for r in history(smoke / "resumed")] == list(range(6))


def test_resume_state_from_other_settings_is_discarded(smoke):
    params = smoke_params(source="online", checkpoint_every=2)
    backbone, source = online_setup(params)
    phases = schedule.pcm_phases(params.grid.steps, 2)
    train(make_spec(params, backbone, phases, steps=2), backbone, source, params, smoke / "run",
          StageRun(None))
    other = make_spec(params, backbone, schedule.pcm_phases(params.grid.steps, 1), steps=2)
    result = train(other, backbone, source, params, smoke / "run", StageRun(None))
    assert result.resumed_from == 0 and len(result.losses) == 2


# ------------------------------------------------------------------------------------- guards


def test_nan_loss_stops_with_the_step_and_last_checkpoint_named(smoke):
    params = smoke_params(source="online", checkpoint_every=3)
    backbone, source = online_setup(params)
    spec = make_spec(params, backbone, schedule.pcm_phases(params.grid.steps, 1), steps=6,
                     objectives=[FailAt(4, "nan")])
    with pytest.raises(TrainingDiverged) as err:
        train(spec, backbone, source, params, smoke / "run", StageRun(None))
    message = str(err.value)
    assert "step 4" in message and "'fail': nan" in message and "consistency" in message
    assert "resume/state.pt (step 3)" in message


def test_source_made_on_another_grid_is_refused_before_training(smoke):
    params = smoke_params(source="online")
    backbone, source = online_setup(params)
    raw = config.load_raw("params.yaml", preset="smoke")
    raw["grid"]["shift"] = 5.0
    other = config.parse(raw)
    spec = make_spec(other, backbone, schedule.pcm_phases(other.grid.steps, 1), steps=1)
    with pytest.raises(config.ConfigError, match="grid"):
        train(spec, backbone, source, other, smoke / "run", StageRun(None))
    assert not (smoke / "run" / "history.jsonl").exists()


def test_stage_without_teacher_fails_with_a_clear_message(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    from dcm.pipeline.table import STAGES

    with pytest.raises(config.ConfigError, match=r"models/teacher.*run `dcm run teacher`"):
        STAGES["train_baseline"].run(smoke_params(), "lcm")


# ------------------------------------------------------------------------------ stage smoke runs


def _stage_params(smoke):
    """Smoke params with cached trajectories written by the real stage."""
    params = smoke_params()
    from dcm.pipeline.stages import trajectories

    trajectories.run(params)
    return params


@pytest.mark.slow
def test_lcm_and_pcm_smoke_runs_write_loadable_transformers(smoke, monkeypatch, mlflow_sqlite):
    from diffusers import WanTransformer3DModel

    from dcm.pipeline.stages import train

    monkeypatch.setenv("DCM_TRACKING", "on")
    params = _stage_params(smoke)
    for method in ("lcm", "pcm"):
        train.run(params, method, "train_baseline")
        out = paths.checkpoint(method)
        model = WanTransformer3DModel.from_pretrained(out / "transformer")
        teacher = load_teacher(params, paths.TEACHER).transformer
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in teacher.parameters())
        summary = json.loads((out / "train.json").read_text())
        assert summary["steps"] == params.methods[method].train_steps == len(history(out))
        assert summary["trainable_fraction"] == 1.0 and summary["peak_rss_mb"] > 0
        assert summary["target"] == params.methods[method].target
        assert (out / "resume" / "state.pt").is_file()
    assert json.loads((paths.checkpoint("pcm") / "train.json").read_text())["phases"] \
        == [[0, 4, -1], [5, 9, 4]]


@pytest.mark.slow
def test_seme_smoke_run_trains_the_high_noise_phase_with_temporal_coherence(smoke):
    from diffusers import WanTransformer3DModel

    from dcm.pipeline.stages import train

    params = _stage_params(smoke)
    train.run(params, "dcm", "train_seme")
    out = paths.checkpoint("dcm", "seme")
    WanTransformer3DModel.from_pretrained(out / "transformer")
    rows = history(out)
    assert len(rows) == params.methods["dcm"].seme.train_steps
    assert all(params.grid.kappa < n <= params.grid.steps - 1 for r in rows for n in r["n"])
    assert all("tc" in r and r["tc"] >= 0 for r in rows)


@pytest.mark.slow
def test_cached_source_pairs_consecutive_stored_points(smoke):
    from dcm.data.trajectories import TrajectoryStore
    from dcm.pipeline.stages import trajectories

    params = smoke_params()
    trajectories.run(params)
    store = TrajectoryStore(paths.TRAJECTORIES, verify=True)
    backbone = load_teacher(params, paths.TEACHER)
    source = distill.CachedSource(store, backbone)
    rows, n = torch.tensor([0, 1]), torch.tensor([0, 5])
    batch = source.batch(rows, n, torch.Generator())
    torch.testing.assert_close(batch.x_n, torch.as_tensor(store.latents([0, 1], [0, 5])).float())
    torch.testing.assert_close(batch.x_prev, torch.as_tensor(store.latents([0, 1], [-1, 4])).float())
    prompts = [r["prompt"] if isinstance(r, dict) else r[1] for r in store.rows]
    torch.testing.assert_close(batch.cond.hidden, backbone.encode_prompts(prompts[:2]).hidden)


# ------------------------------------------------------------------------------ activation checkpointing


def _dete_run(params, out: Path):
    """A short DetE run with GAN + FM through the loop, from a fresh load of the saved teacher."""
    from dcm.distill.discriminator import GanFeatureMatching

    torch.manual_seed(0)
    backbone, source = online_setup(params)
    kappa = params.grid.kappa
    # lora_B off zero: the adapter's gradients flow through A too
    dual, grid = perturbed_dete(backbone, params)
    phase = schedule.expert_phases(params.grid.steps, kappa)["dete"]
    gan = GanFeatureMatching(backbone, backbone.transformer, [grid.sigma(n) for n in range(kappa + 1)],
                             gan_weight=1.0, fm_weight=1.0, disc_lr=1e-3)
    spec = distill.DistillSpec(name="dete", student=dual, trainable=dual.trainable_parameters(),
                               phases=[phase], target="online", lr=1e-3, train_steps=3, objectives=[gan])
    before = [p.detach().clone() for p in spec.trainable]
    result = train(spec, backbone, source, params, out, StageRun(None))
    assert any(not torch.equal(a, b) for a, b in zip(before, spec.trainable, strict=True)), "DetE trained"
    return result, dual, backbone


def test_activation_checkpointing_changes_memory_not_the_dete_run(smoke):
    """gradient_checkpointing on: the student and the GAN teacher recompute blocks; losses and weights
    match."""
    plain, dual_plain, _ = _dete_run(smoke_params(source="online"), smoke / "plain")
    params = smoke_params(source="online", gradient_checkpointing=True)
    ckpt, dual_ckpt, backbone = _dete_run(params, smoke / "ckpt")
    assert dual_ckpt.seme_transformer.gradient_checkpointing and backbone.transformer.gradient_checkpointing
    assert not dual_plain.seme_transformer.gradient_checkpointing
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-7)
    for (name, a), (_, b) in zip(dual_ckpt.named_parameters(), dual_plain.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # a resume state written without checkpointing is accepted with it (same maths, other memory)
    assert distill.loop.resume_settings(distill.DistillSpec("x", dual_ckpt, [], [], "online", 1.0, 1),
                                        params) == \
        distill.loop.resume_settings(distill.DistillSpec("x", dual_ckpt, [], [], "online", 1.0, 1),
                                     smoke_params(source="online"))


def test_lora_seme_with_grad_and_checkpointing_is_refused(smoke):
    """Backward would recompute SemE's blocks with the adapter re-enabled: refused, not silently wrong."""
    from dcm.backbones.base import enable_activation_checkpointing
    from dcm.distill.experts import make_dete

    params = smoke_params(source="online")
    backbone, _ = online_setup(params)
    dual = make_dete(copy.deepcopy(backbone.transformer), backbone, 4, 8.0, kappa=params.grid.kappa,
                     sigma_kappa=0.5)
    assert enable_activation_checkpointing(dual) == 1
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    x = torch.randn(1, *shape).to(distill.device())
    sigma = torch.tensor([0.9], device=x.device)
    cond = backbone.encode_prompts(["a red circle moves left"])
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        backbone.predict(dual, x, sigma, cond)
    with torch.no_grad():  # sampling is unaffected
        assert backbone.predict(dual, x, sigma, cond).shape == x.shape


def test_prompt_dropout_gives_dropped_rows_the_empty_prompt_in_every_tensor():
    from dcm.backbones.base import PromptEmbeds
    from dcm.distill.data import drop_prompts

    cond = PromptEmbeds(torch.ones(3, 2, 4),
                        {"pooled": torch.ones(3, 5), "mask": torch.ones(3, 2, dtype=torch.bool)})
    null = PromptEmbeds(torch.zeros(3, 2, 4),
                        {"pooled": torch.zeros(3, 5), "mask": torch.zeros(3, 2, dtype=torch.bool)})
    out = drop_prompts(cond, null, torch.tensor([False, True, False]))
    assert out.hidden[:, 0, 0].tolist() == [1, 0, 1]
    assert out.extra["pooled"][:, 0].tolist() == [1, 0, 1] \
        and out.extra["mask"][:, 0].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="does not match"):
        drop_prompts(cond, PromptEmbeds(torch.zeros(3, 7, 4)), torch.tensor([True, False, False]))


def test_prompt_dropout_changes_training_only_when_set(smoke):
    """p = 0 draws nothing (same run as before the option existed); p > 0 trains on some empty prompts."""
    import copy

    finals = {}
    for p in (0.0, 0.0, 0.5):
        params = smoke_params(source="online", prompt_dropout=p)
        backbone = distill.load_backbone(params)
        student = distill.full_parameter_student(backbone)
        spec = distill.DistillSpec(name=f"drop{p}", student=student, trainable=list(student.parameters()),
                                   phases=[schedule.Phase(0, params.grid.steps - 1, -1)], train_steps=2,
                                   lr=1e-3, target="online")
        train(spec, backbone, distill.make_source(params, backbone), params, smoke / f"drop{len(finals)}",
              StageRun(None))
        finals[len(finals)] = copy.deepcopy(torch.cat([q.detach().flatten() for q in student.parameters()]))
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], finals[2])
