"""dcm.plan.whole (`dcm plan --dag`, and the check `dcm launch` makes before it submits): FLOPs counted on
meta tensors equal FlopCounterMode's count of a real CPU forward and backward; the wan and hunyuan presets'
whole-DAG plans list every run of their default DAG with GPU-hours and the memory plan's numbers; a stage
whose plan does not fit its SLURM row is refused by `dcm launch` with the numbers, before anything reaches
sbatch."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dcm import cli, config
from dcm.pipeline import dag, launch
from dcm.plan import memory, whole
from helpers import plan_workloads

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ FLOPs on meta

def _real_passes(work: memory.Workload, role: str) -> tuple[int, int]:
    """(forward, backward) FLOPs of the same transformer built on the CPU with random weights and inputs."""
    from dcm.distill.experts import make_dete

    one = memory.Workload(**{**work.__dict__, "batch": 1})
    torch.manual_seed(0)
    model = memory.transformer_class(work.family)(**work.config)
    inputs = memory.model_inputs(one, torch.float32, device="cpu", generator=torch.Generator().manual_seed(0))
    run = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    if role == "dete":
        backbone = SimpleNamespace(timestep_layer_names=memory.TIMESTEP_LAYERS[work.family],
                                   lora_target_modules=memory.LORA_TARGETS,
                                   model_timestep=lambda s: 1000.0 * s)
        dual = make_dete(model, backbone, work.lora_rank, 2.0 * work.lora_rank, kappa=1, sigma_kappa=0.5)
        run = lambda: dual.run_expert("dete", **inputs)  # noqa: E731
    if role == "teacher":
        model.requires_grad_(False)
        inputs["hidden_states"].requires_grad_(True)
    return whole.counted(run)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox"])
@pytest.mark.parametrize("role", ["seme", "dete", "teacher"])
def test_meta_flops_equal_flop_counter_on_a_real_cpu_forward_and_backward(name, role):
    work, _ = plan_workloads()[name]
    meta = whole.pass_flops(work, role)
    real = _real_passes(work, role)
    assert meta == real and meta[0] > 0 and meta[1] > 0, (meta, real)


def test_backward_costs_follow_what_trains():
    """Every weight trained: about twice the forward; DetE (LoRA) and the frozen teacher: input gradients
    (about one forward) and the adapters' small weight gradients."""
    work, _ = plan_workloads()["wan"]
    forward, seme_b = whole.pass_flops(work, "seme")
    dete_f, dete_b = whole.pass_flops(work, "dete")
    _, teacher_b = whole.pass_flops(work, "teacher")
    assert 1.8 * forward < seme_b < 2.2 * forward
    assert teacher_b < dete_b < seme_b and dete_f > forward


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox"])
def test_inference_activations_on_meta_equal_the_live_bytes_of_a_real_cpu_forward(name):
    """The inference stages' activation peak: one forward without grad in bf16, counted on meta (attention as
    a fused kernel holds it) and measured by the same live-bytes tracker on the CPU (SDPA's own kernel)."""
    import dataclasses

    work, _ = plan_workloads()[name]
    batch = dataclasses.replace(work, batch=2)
    torch.manual_seed(0)
    model = memory.transformer_class(work.family)(**work.config).to(torch.bfloat16)
    inputs = memory.model_inputs(batch, torch.bfloat16, device="cpu",
                                 generator=torch.Generator().manual_seed(0))
    held = sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
    with torch.no_grad(), whole._LiveBytes() as live:
        model(**inputs, return_dict=False)
    assert whole.inference_activation_bytes(work, 2) == held + live.peak > held


def test_the_sample_batch_is_the_samplers():
    from dcm.methods import BATCH

    assert whole.SAMPLE_BATCH == BATCH


# ============================================================================ the presets' plans

def preset_params(preset: str, folder: Path, **overrides) -> config.Params:
    """The preset over params.yaml with ``backbone.path`` at ``folder`` (no weights: the released config)."""
    raw = config.deep_merge(config.load_raw(REPO / "params.yaml", preset),
                            {"backbone": {"path": str(folder)}, **overrides})
    return config.parse(raw)


@pytest.fixture(scope="module")
def preset_plans(tmp_path_factory) -> dict:
    """family → (params, runs, plans, planner) on slurm/resources-<family>.yaml: every run of the wan preset's
    DAG, the training runs of the hunyuan preset's (its 720p teacher-50 sample plan alone costs about a minute
    of meta VAE decoding on 2 cores, and the plan code is the family-agnostic one the wan DAG runs)."""
    out = {}
    for family in ("wan", "hunyuan"):
        params = preset_params(family, tmp_path_factory.mktemp(family))
        runs = launch.stage_runs(params, REPO / "slurm" / f"resources-{family}.yaml")
        if family == "hunyuan":
            runs = [r for r in runs if r.stage.startswith("train")]
        planner = whole.Planner(params)
        out[family] = (params, runs, [planner.plan(r) for r in runs], planner)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan"])
def test_the_plan_lists_every_run_of_the_default_dag_with_gpu_hours(preset_plans, family):
    params, runs, plans, _ = preset_plans[family]
    assert [p.label for p in plans] == [f"{s.name}[{m}]" if m else s.name for s, m in dag.runs(params)]
    assert {p.stage for p in plans} == {s.name for s, _ in dag.runs(params)} >= {
        "prepare", "teacher", "trajectories", "analyze", "train_baseline", "train_seme", "train_dete",
        "sample", "evaluate", "report"}
    if family == "wan":  # the arithmetic: 512 trajectories × 50 CFG steps ≈ 1.5e19 FLOP
        assert plans[[p.label for p in plans].index("trajectories")].flops == pytest.approx(1.5e19, rel=0.1)
    gpu_work = ("preprocess", "trajectories", "analyze", "train_baseline", "train_seme", "train_dete",
                "sample", "evaluate")
    for run, plan in zip(runs, plans, strict=True):
        print(plan.label, whole.summary(plan))
        assert plan.error is None, plan.label
        if run.stage in gpu_work:
            assert plan.gpu_hours > 0 and plan.wall_h > 0 and run.row.total_gpus > 0, plan.label
        else:  # prepare, teacher (recorded, not trained), report
            assert plan.flops == 0 and plan.gpu_hours == 0, plan.label
        if run.stage in ("trajectories", "sample", "analyze") or run.stage.startswith("train"):
            assert plan.peak_bytes > 0 and plan.disk_bytes > 0, plan.label


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_training_stages_carry_the_memory_plans_numbers(preset_plans, family):
    """The training rows' peaks are dcm.plan.memory's at the preset's training.parallel over the row's
    ranks."""
    params, runs, plans, planner = preset_plans[family]
    par = params.training.parallel
    for run, plan in zip(runs, plans, strict=True):
        if not run.stage.startswith("train"):
            continue
        m = params.method(run.method)
        setting = memory.Setting(run.row.ranks, par.context_parallel, None, par.shard_teacher,
                                 ema=run.stage == "train_baseline" and m.target == "ema", compute="bf16")
        # the micro-batches at the row's ranks (from training.global_batch_size): DetE holds each one's taps
        accum = params.training.accumulation(run.row.ranks // par.context_parallel, run.row.ranks,
                                             par.context_parallel)
        work = memory.Workload(**{**planner.work.__dict__, "grad_accum": accum})
        if m.kind == "dmd2":
            work = memory.Workload(**{**work.__dict__, "dmd2_gan": m.dmd2.gan_weight > 0})
        st = planner.measure.structure(work, par.context_parallel, "bf16")
        key = {"train_seme": "SemE", "train_dete": "DetE"}.get(run.stage,
                                                               "DMD2" if m.kind == "dmd2" else "Baseline")
        assert plan.peak_bytes == memory.plan(work, setting, st)[key]["total, checkpointing"], plan.label
    if family == "hunyuan":  # the documented memory plan: SemE fits at context parallel 8, DetE does not
        by_label = {p.label: p for p in plans}
        assert by_label["train_seme[dcm]"].peak_bytes / 2**30 == pytest.approx(22.7, abs=0.1)
        assert by_label["train_seme[dcm]"].fits_memory and not by_label["train_dete[dcm]"].fits_memory
        refused = whole.refusal(by_label["train_dete[dcm]"], runs[plans.index(by_label["train_dete[dcm]"])],
                                planner.options)
        assert "train_dete[dcm]" in str(refused) and "GiB per GPU" in str(refused)
        assert refused.key.endswith("train_dete.gpu_type")


@pytest.mark.slow
def test_dcm_plan_dag_prints_the_table_and_its_json(tmp_path, capsys, monkeypatch):
    """The command's plumbing, on the wan preset at a small video size (its own size: the tests above)."""
    params_file = tmp_path / "params.yaml"
    small = {"frames": 17, "height": 64, "width": 64}
    raw = config.deep_merge(config.load_raw(REPO / "params.yaml", "wan"),
                            {"backbone": {"path": str(tmp_path), "real": small}})
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv(dag.RESOURCES_ENV, str(REPO / "slurm" / "resources-wan.yaml"))
    out = tmp_path / "plan.json"
    argv = ["plan", "--dag", "--params", str(params_file), "--mfu", "0.4", "--json-out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    print(text)
    assert "whole-DAG plan: wan 1.3B at 17×64×64" in text and "MFU 0.4" in text and "train_dete[dcm]" in text
    document = json.loads(out.read_text())
    stages = {s["label"]: s for s in document["stages"]}
    assert list(stages) == [f"{s.name}[{m}]" if m else s.name for s, m in dag.runs(config.parse(raw))]
    assert stages["trajectories"]["flops"] > 0 and stages["train_seme[dcm]"]["fits_memory"] is True
    assert document["options"]["mfu"] == 0.4


# ============================================================================ errors

def test_the_toy_world_and_a_bad_mfu_are_refused_with_key_value_and_allowed(capsys):
    assert cli.main(["plan", "--dag", "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "backbone.family = 'toy'" in err and "needs no plan" in err
    assert cli.main(["plan", "--dag", "--params", str(REPO / "params.yaml"), "--mfu", "1.5"]) == 2
    assert "--mfu = 1.5" in capsys.readouterr().err


# ============================================================================ dcm launch refuses

@pytest.fixture
def slurm_stub(tmp_path, monkeypatch):
    """A wan-preset project in ``tmp_path`` with ``launcher: slurm``, and an ``sbatch`` on PATH that records
    being called and fails (submitit's own submission path, untouched, reaches it); returns the record."""
    project = tmp_path / "project"
    project.mkdir()
    raw = config.deep_merge(config.load_raw(REPO / "params.yaml", "wan"),
                            {"backbone": {"path": str(project)}, "launcher": "slurm"})
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rows = yaml.safe_load((REPO / "slurm" / "resources-wan.yaml").read_text())
    rows["trajectories"] = {"gpus": 1, "time_min": 10}  # 512 CFG solves of Wan 1.3B: tens of GPU-hours
    (project / "resources.yaml").write_text(yaml.safe_dump(rows))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch-called"
    # sbatch records its arguments and refuses; srun is never called, but submitit's SlurmExecutor refuses
    # to start where none is on PATH (a machine without SLURM installed)
    stubs = {"sbatch": f"echo \"$@\" > {record}\necho 'sbatch: stub refuses' >&2\nexit 1\n",
             "srun": "exit 1\n"}
    for name, body in stubs.items():
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n" + body)
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(dag.RESOURCES_ENV, str(project / "resources.yaml"))
    monkeypatch.delenv(launch.NO_PLAN_CHECK_ENV, raising=False)
    monkeypatch.chdir(project)
    return record


def test_launch_refuses_a_stage_past_its_time_limit_before_submitting(slurm_stub, capsys):
    assert cli.main(["launch", "trajectories", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "trajectories.time_min = 10" in err and "GPU-h at MFU 0.35" in err and "on 1 GPU(s)" in err
    assert ">= " in err and "4 jobs" in err and "--no-plan-check" in err
    assert not slurm_stub.exists() and not Path("slurm/logs").exists()  # nothing reached submitit


def test_no_plan_check_submits_what_the_plan_refuses(slurm_stub, monkeypatch):
    with pytest.raises(Exception, match="sbatch|stub|Command"):
        cli.main(["launch", "trajectories", "--params", "params.yaml", "--no-plan-check"])
    assert slurm_stub.exists()
    slurm_stub.unlink()
    monkeypatch.setenv(launch.NO_PLAN_CHECK_ENV, "1")
    with pytest.raises(Exception, match="sbatch|stub|Command"):
        cli.main(["launch", "trajectories", "--params", "params.yaml"])
    assert slurm_stub.exists()
