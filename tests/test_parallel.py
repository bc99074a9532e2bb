"""Sharded training on PyTorch's engines (training.parallel, dcm.parallel): FSDP2 at 2 ranks computes what
one process computes with the same global batch, holds half of each weight per rank, and its DCP
checkpoints resume exactly, at 2 ranks and at 1.  Ranks are real processes (torchrun, gloo); the runs go
through ``dcm run <stage>`` and the stage table, as a SLURM job would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dcm import config
from dcm.parallel import fsdp

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOSS_RTOL = 1e-5


def smoke_raw(**training) -> dict:
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["training"].update(training)
    return raw


# ----------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(("parallel", "key", "allowed"), [
    ({"cpu_offload": True}, "cpu_offload", "with strategy 'ddp'"),
    ({"mixed_precision": "bf16"}, "mixed_precision", "only fsdp or hsdp"),
    ({"strategy": "fsdp", "shard_group_size": 2}, "shard_group_size", "hsdp only"),
    ({"strategy": "zero3"}, "strategy", "'ddp', 'fsdp', 'hsdp'"),
    ({"context_parallel": 0}, "context_parallel", ">= 1"),
])
def test_bad_parallel_combinations_fail_at_parse_time_naming_the_key(parallel, key, allowed):
    with pytest.raises(config.ConfigError, match=allowed) as err:
        config.parse(smoke_raw(parallel=parallel))
    assert err.value.key == f"training.parallel.{key}"


def test_defaults_are_ddp_with_nothing_sharded():
    p = config.parse(smoke_raw()).training.parallel
    assert (p.strategy, p.context_parallel, p.mixed_precision, p.cpu_offload, p.shard_teacher) == \
        ("ddp", 1, "none", False, False)


@pytest.mark.parametrize(("parallel", "world", "key", "allowed"), [
    ({"strategy": "hsdp", "shard_group_size": 3}, 4, "shard_group_size", "divisor of the data-parallel ranks"),
    ({"context_parallel": 3}, 4, "context_parallel", "divisor of the world size"),
    ({"context_parallel": 3}, 3, "context_parallel", r"divisor of the video token count \(16 tokens"),
])
def test_layouts_that_do_not_fit_the_world_fail_with_key_value_and_what_fits(parallel, world, key, allowed):
    params = config.parse(smoke_raw(parallel=parallel))
    with pytest.raises(config.ConfigError, match=allowed) as err:
        fsdp.check_world(params, world)
    assert err.value.key == f"training.parallel.{key}" and err.value.value == parallel[key]


def test_a_training_stage_checks_the_layout_before_loading_any_model(tmp_path, monkeypatch):
    from dcm import distill

    monkeypatch.chdir(tmp_path)  # no trajectories, no teacher: the layout is checked first
    monkeypatch.setenv("WORLD_SIZE", "4")
    params = config.parse(smoke_raw(parallel={"strategy": "hsdp", "shard_group_size": 3}))
    with pytest.raises(config.ConfigError, match="shard_group_size"):
        distill.check_inputs(params)


@pytest.mark.parametrize(("parallel", "world", "shape", "names"), [
    ({"strategy": "ddp"}, 8, (8,), ("dp_replicate",)),
    ({"strategy": "fsdp"}, 8, (8,), ("dp_shard",)),
    ({"strategy": "hsdp", "shard_group_size": 4}, 8, (2, 4), ("dp_replicate", "dp_shard")),
    ({"strategy": "fsdp", "context_parallel": 2}, 8, (4, 2), ("dp_shard", "cp")),
])
def test_mesh_degrees_multiply_to_the_world_size(parallel, world, shape, names):
    dims = fsdp.check_world(config.parse(smoke_raw(parallel=parallel)), world)
    assert dims.mesh_shape() == (shape, names)
    assert dims.dp_replicate * dims.dp_shard * dims.cp == world
    assert dims.dp_size == world // dims.cp


def test_blocks_found_in_every_family_and_under_expert_wrappers():
    from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=3)
    assert [type(b).__name__ for b in fsdp.transformer_blocks(wan)] == ["WanTransformerBlock"] * 3
    hunyuan = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                             num_layers=2, num_single_layers=3, num_refiner_layers=1, patch_size=2,
                                             patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
                                             rope_axes_dim=(4, 6, 6))
    names = [type(b).__name__ for b in fsdp.transformer_blocks(hunyuan)]
    assert names.count("HunyuanVideoTransformerBlock") == 2 and names.count("HunyuanVideoSingleTransformerBlock") == 3
    cog = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      time_embed_dim=4, text_embed_dim=32, num_layers=2, sample_width=16,
                                      sample_height=16, sample_frames=9, patch_size=2, max_text_seq_length=16)
    assert [type(b).__name__ for b in fsdp.transformer_blocks(cog)].count("CogVideoXBlock") == 2
    # a LoRA DualExpert with a second full expert: both transformers' blocks, once each
    from dcm.backbones.toy import ToyBackbone
    from dcm.distill.experts import make_dete

    params = config.parse(smoke_raw())
    backbone = ToyBackbone.create(params.backbone.toy, 1.0, seed=0)
    full = make_dete(backbone.transformer, backbone, 0, 1.0, kappa=5, sigma_kappa=0.5)
    assert len(fsdp.transformer_blocks(full)) == 2 * params.backbone.toy.num_layers


def test_one_process_builds_no_mesh_and_wraps_nothing():
    dims = fsdp.check_world(config.parse(smoke_raw(parallel={"strategy": "fsdp"})), 1)
    assert dims.build_mesh() is None
    model = torch.nn.Linear(2, 2)
    assert fsdp.parallelize(model, config.parse(smoke_raw()).training.parallel, None) is model
    assert type(model) is torch.nn.Linear


# --------------------------------------------------------------------------- 2 ranks vs 1 rank


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """prepare → a random toy teacher → cached trajectories, once (the inputs of every run below)."""
    from dcm import paths
    from dcm.backbones import create_teacher
    from dcm.pipeline.stages import prepare, trajectories

    root = tmp_path_factory.mktemp("parallel-base")
    here = Path.cwd()
    os.chdir(root)
    try:
        raw = smoke_raw()
        Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        params = config.parse(raw)
        prepare.run(params)
        create_teacher(params).save(paths.TEACHER)
        trajectories.run(params)
    finally:
        os.chdir(here)
    return root


def make_project(base: Path, folder: Path, batch_size: int, parallel: dict | None = None, seme_steps: int = 4,
                 dete: dict | None = None) -> Path:
    """A copy of ``base`` (its outputs included) with these settings."""
    shutil.copytree(base, folder, dirs_exist_ok=True)
    return set_params(folder, batch_size, parallel, seme_steps, dete)


def set_params(folder: Path, batch_size: int, parallel: dict | None = None, seme_steps: int = 4,
               dete: dict | None = None) -> Path:
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["training"].update(batch_size=batch_size, checkpoint_every=100, log_every=2)
    raw["training"]["parallel"] = parallel or {"strategy": "ddp"}
    raw["methods"]["dcm"]["seme"]["train_steps"] = seme_steps
    raw["methods"]["dcm"]["dete"].update(dete or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def dcm_run(folder: Path, stage: str, ranks: int, method: str = "dcm") -> None:
    """``dcm run <stage> --method <method>`` in ``folder``: in one process, or as ``ranks`` torchrun processes."""
    command = [str(BIN / "dcm"), "run", stage, "--method", method]
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks), *command]
    env = {**os.environ, "DCM_TRACKING": "off", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in run.joinpath("history.jsonl").read_text().splitlines()]


def safetensors_in(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no weights in {folder}"
    return out


def assert_same_run(one: Path, two: Path) -> None:
    """Per-step losses (and every logged loss term and gradient norm) within LOSS_RTOL."""
    rows_one, rows_two = history(one), history(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["n"] == b["n"]  # the same global batch, in the same order
        for key in a:
            if key == "loss" or key in ("consistency", "tc", "grad_norm") or key.startswith("grad_norm/"):
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key)


def assert_half_per_rank(run: Path) -> dict:
    """FSDP2 shards dim 0: each rank holds its chunk of every trainable parameter, together all of it."""
    record = json.loads(run.joinpath("distributed.json").read_text())
    assert record["world_size"] == 2 and record["parallel"]["dp_shard"] == 2
    assert record["parameter_digests"][0] == record["parameter_digests"][1]
    first, second = record["local_numel"]
    for name, shape in record["shapes"].items():
        numel = int(torch.tensor(shape).prod()) if shape else 1
        rows = shape[0] if shape else 1
        per_row = numel // max(rows, 1)
        assert first[name] == -(-rows // 2) * per_row and first[name] + second[name] == numel, name
    total = sum(first.values()) + sum(second.values())
    assert 0.45 < sum(first.values()) / total < 0.55
    return record


@pytest.fixture(scope="module")
def seme_runs(base_project, tmp_path_factory):
    """SemE 4 steps: 1 process with global batch 4, and 2 FSDP2 ranks with batch 2 each."""
    root = tmp_path_factory.mktemp("parallel-seme")
    one = make_project(base_project, root / "one", batch_size=4)
    two = make_project(base_project, root / "two", batch_size=2, parallel={"strategy": "fsdp"})
    dcm_run(one, "train_seme", 1)
    dcm_run(two, "train_seme", 2)
    return one, two


@pytest.mark.slow
def test_fsdp_seme_at_two_ranks_equals_one_process_with_the_same_global_batch(seme_runs):
    one, two = (p / "checkpoints/dcm/seme" for p in seme_runs)
    assert_same_run(one, two)
    record = assert_half_per_rank(two)
    assert len(record["shapes"]) == len(safetensors_in(one / "transformer"))  # a full fine-tune: every weight
    a, b = safetensors_in(one / "transformer"), safetensors_in(two / "transformer")  # consolidated by rank 0
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    summary = json.loads(two.joinpath("train.json").read_text())
    assert summary["global_batch_size"] == 4 and summary["parallel"]["strategy"] == "fsdp"
    assert (two / "resume/dcp/.metadata").is_file() and not (two / "resume/state.pt").exists()


@pytest.mark.slow
def test_hsdp_lcm_with_an_ema_target_equals_one_process(base_project, tmp_path):
    """LCM's EMA target is sharded like the student, a frozen FSDP2 model with no backward to reshard it:
    each EMA update must reach the next target forward (HSDP's 2-D mesh: 1 replica group × 2 shards)."""
    one = make_project(base_project, tmp_path / "one", batch_size=4)
    two = make_project(base_project, tmp_path / "two", batch_size=2,
                       parallel={"strategy": "hsdp", "shard_group_size": 2})
    dcm_run(one, "train_baseline", 1, method="lcm")
    dcm_run(two, "train_baseline", 2, method="lcm")
    one, two = one / "checkpoints/lcm", two / "checkpoints/lcm"
    assert_same_run(one, two)
    assert json.loads(two.joinpath("distributed.json").read_text())["parallel"]["strategy"] == "hsdp"
    assert_half_per_rank(two)
    a, b = safetensors_in(one / "transformer"), safetensors_in(two / "transformer")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_lora_dete_at_two_ranks_equals_one_process(seme_runs, tmp_path):
    """LoRA DetE (adapters + copied timestep layers trainable, the rest frozen) sharded; GAN/FM off here:
    their σ_adv and ε′ come from each rank's global RNG, so only the consistency loss is rank-invariant."""
    one_seme, _ = seme_runs
    dete = {"gan_weight": 0.0, "fm_weight": 0.0}
    one = make_project(one_seme, tmp_path / "one", batch_size=4, dete=dete)
    two = make_project(one_seme, tmp_path / "two", batch_size=2, parallel={"strategy": "fsdp"}, dete=dete)
    dcm_run(one, "train_dete", 1)
    dcm_run(two, "train_dete", 2)
    one, two = one / "checkpoints/dcm/dete", two / "checkpoints/dcm/dete"
    assert_same_run(one, two)
    record = assert_half_per_rank(two)
    assert all("lora_" in name or name.startswith("dete_") for name in record["shapes"])
    for folder in ("adapter", "."):
        a, b = safetensors_in(one / folder), safetensors_in(two / folder)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_exactly_at_two_ranks_and_at_one(base_project, seme_runs, tmp_path):
    """Stop a 2-rank SemE run at step 2 (a DCP checkpoint), continue to 4: the uninterrupted run's losses.
    The same checkpoint continued by one process (global batch 4): its losses equal the 2-rank continuation's."""
    _, uninterrupted = seme_runs
    two = make_project(base_project, tmp_path / "two", batch_size=2, parallel={"strategy": "fsdp"}, seme_steps=2)
    dcm_run(two, "train_seme", 2)
    assert (two / "checkpoints/dcm/seme/resume/dcp/.metadata").is_file()
    one = make_project(two, tmp_path / "one", batch_size=4, seme_steps=4)  # the step-2 checkpoint, one process
    dcm_run(set_params(two, batch_size=2, parallel={"strategy": "fsdp"}, seme_steps=4), "train_seme", 2)
    dcm_run(one, "train_seme", 1)

    reference = [r["loss"] for r in history(uninterrupted / "checkpoints/dcm/seme")]
    resumed = [r["loss"] for r in history(two / "checkpoints/dcm/seme")]
    assert resumed == reference  # bit for bit: the same ranks and shards
    at_one = [r["loss"] for r in history(one / "checkpoints/dcm/seme")]
    assert at_one[:2] == reference[:2]  # the history the checkpoint covers, kept
    assert at_one[2:] == pytest.approx(resumed[2:], rel=LOSS_RTOL)
    for run in (two, one):
        assert json.loads((run / "checkpoints/dcm/seme/train.json").read_text())["resumed_from"] == 2
    assert (one / "checkpoints/dcm/seme/resume/state.pt").is_file()  # one process writes the one-file form
    assert not (one / "checkpoints/dcm/seme/resume/dcp").exists()
