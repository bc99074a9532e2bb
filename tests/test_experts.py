"""DetE built from SemE: what trains, how each sample is routed, and what survives a save/load."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from dcm import config, paths, schedule
from dcm.distill.discriminator import GanFeatureMatching, adversarial_sigmas
from dcm.distill.experts import DualExpert, load_dual_expert, make_dete, save_dete
from dcm.distill.loop import ConsistencyBatch
from dcm.methods.dual_expert import dcm_experts
from dcm.sampling import sample

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moves left"


@pytest.fixture(scope="module")
def grid(params):
    return schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)


def build(backbone, grid, params, rank=4, alpha=8.0) -> DualExpert:
    seme = copy.deepcopy(backbone.transformer)
    return make_dete(seme, backbone, rank, alpha, kappa=params.grid.kappa,
                     sigma_kappa=grid.sigma(params.grid.kappa))


def perturb_dete(dual: DualExpert, scale: float = 0.05) -> None:
    """Move DetE away from SemE (LoRA B starts at zero) so the two experts give different outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dual.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def latents(backbone, params, batch: int, seed: int = 0) -> torch.Tensor:
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def test_dete_trains_only_lora_and_time_embedding(backbone, grid, params):
    dual = build(backbone, grid, params)
    seme_before = {k: v.clone() for k, v in backbone.transformer.state_dict().items()}
    before = {n: p.detach().clone() for n, p in dual.named_parameters()}
    kappa = params.grid.kappa
    gan = GanFeatureMatching(backbone, backbone.transformer, adversarial_sigmas(grid, kappa),
                             gan_weight=1.0, fm_weight=1.0, disc_lr=1e-2)
    heads_before = {n: p.detach().clone() for n, p in gan.discriminator.named_parameters()}
    optimizer = torch.optim.AdamW(dual.trainable_parameters(), lr=1e-2)
    cond = backbone.encode_prompts([PROMPT] * 2)
    torch.manual_seed(0)
    for step in range(3):
        x_n = latents(backbone, params, 2, seed=step)
        sigma = torch.tensor([grid.sigma(kappa), grid.sigma(1)])
        v = backbone.predict(dual, x_n, sigma, cond)
        x_end_pred = x_n - sigma.view(-1, 1, 1, 1, 1) * v
        x_end_target = x_n - sigma.view(-1, 1, 1, 1, 1) * backbone.predict(backbone.transformer,
                                                                           x_n, sigma, cond)
        batch = ConsistencyBatch(step, torch.tensor([kappa, 1]), sigma, sigma, sigma * 0, x_n, x_n, cond,
                                 x_end_pred, x_end_target.detach())
        optimizer.zero_grad()
        loss = (x_end_pred - batch.x_end_target).pow(2).mean() + sum(gan.generator_loss(batch).values())
        loss.backward()
        optimizer.step()
        gan.after_generator_step(batch)

    changed = {n for n, p in dual.named_parameters() if not torch.equal(p, before[n])}
    own = {n for n, p in dual.named_parameters() if any(p is q for q in dual.trainable_parameters())}
    assert changed and changed <= own
    assert any("lora_B" in n for n in changed) \
        and any(n.startswith("dete_modules.condition_embedder") for n in changed)
    # the output modulation table is SemE's, shared and frozen (the official Wan DetE copies no table)
    assert not any("scale_shift_table" in n for n in own)
    # every SemE tensor (the shared backbone under the adapter) is bit-identical to the SemE it started from
    seme_now = dual.materialize("seme").state_dict()
    assert seme_now.keys() == seme_before.keys()
    assert all(torch.equal(seme_now[k], seme_before[k]) for k in seme_before)
    assert any(not torch.equal(p, heads_before[n]) for n, p in gan.discriminator.named_parameters())
    counts = dual.parameter_counts()
    assert counts["dete_trainable_params"] == sum(before[n].numel() for n in own)
    assert 0 < counts["dete_trainable_fraction_of_backbone"] < 1


def test_lora_targets_every_attention_linear_and_nothing_else(backbone, grid, params):
    dual = build(backbone, grid, params)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in dual.model.named_parameters() if ".lora_A." in n}
    expected = {f"base_model.model.blocks.{b}.{attn}.{lin}" for b in range(params.backbone.toy.num_layers)
                for attn in ("attn1", "attn2") for lin in ("to_q", "to_k", "to_v", "to_out.0")}
    assert wrapped == expected


def test_routing_sends_each_sample_of_a_mixed_sigma_batch_to_its_expert(backbone, grid, params):
    dual = build(backbone, grid, params)
    perturb_dete(dual)
    seme, dete = dual.materialize("seme"), dual.materialize("dete")
    kappa = params.grid.kappa
    # above, exactly at, and below σ_κ (σ_κ itself is DetE's first point), in mixed order
    sigma = torch.tensor([grid.sigma(kappa + 1), grid.sigma(kappa), grid.sigma(0),
                          grid.sigma(grid.steps - 1)])
    x = latents(backbone, params, 4)
    cond = backbone.encode_prompts([PROMPT, "a blue square moves up", PROMPT, "a green triangle moves right"])
    with torch.no_grad():
        mixed = backbone.predict(dual, x, sigma, cond)
        alone_seme = backbone.predict(seme, x, sigma, cond)
        alone_dete = backbone.predict(dete, x, sigma, cond)
    assert not torch.allclose(alone_seme, alone_dete, atol=1e-3)  # the experts really differ
    goes_to_seme = [True, False, False, True]
    for i, to_seme in enumerate(goes_to_seme):
        torch.testing.assert_close(mixed[i], (alone_seme if to_seme else alone_dete)[i], atol=1e-5, rtol=1e-5)
    assert dual.route(sigma * 1000).tolist() == goes_to_seme
    # a sub-batch through the dual expert equals the same samples in the mixed batch (no cross-talk)
    with torch.no_grad():
        single = backbone.predict(dual, x[1:2], sigma[1:2], cond.index(slice(1, 2)))
    torch.testing.assert_close(single[0], mixed[1], atol=1e-5, rtol=1e-5)


def test_dete_timestep_layers_are_copies_not_shared(backbone, grid, params):
    dual = build(backbone, grid, params)
    base = dual.seme_transformer
    for name in backbone.timestep_layer_names:
        ours, theirs = dual.dete_timestep_layer(name), getattr(base, name)
        assert ours is not theirs
        with dual._dete_layers_swapped():
            assert getattr(base, name) is ours
        assert getattr(base, name) is theirs  # restored on the instance; the class is untouched


@pytest.mark.parametrize("rank", [4, 0])
def test_save_load_round_trip_gives_the_same_dual_expert(backbone, grid, params, tmp_path, rank):
    dual = build(backbone, grid, params, rank=rank)
    perturb_dete(dual)
    dual.materialize("seme").save_pretrained(tmp_path / "seme" / "transformer")
    save_dete(dual, tmp_path / "dete")
    meta = json.loads((tmp_path / "dete" / "expert.json").read_text())
    assert meta["kappa"] == params.grid.kappa \
        and meta["sigma_kappa"] == pytest.approx(grid.sigma(params.grid.kappa))
    assert meta["rank"] == rank and meta["form"] == ("lora" if rank else "full")
    if rank:
        assert {"adapter_config.json", "adapter_model.safetensors"} \
            <= {p.name for p in (tmp_path / "dete" / "adapter").iterdir()}
        assert (tmp_path / "dete" / "timestep_layers.safetensors").is_file()
    else:
        assert meta["dete_trainable_fraction_of_backbone"] == 1.0
    loaded = load_dual_expert(tmp_path / "seme", tmp_path / "dete", backbone)
    sigma = torch.tensor([grid.sigma(grid.steps - 1), grid.sigma(0), grid.sigma(params.grid.kappa)])
    x = latents(backbone, params, 3)
    cond = backbone.encode_prompts([PROMPT] * 3)
    with torch.no_grad():
        torch.testing.assert_close(backbone.predict(loaded, x, sigma, cond),
                                   backbone.predict(dual, x, sigma, cond))
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == []


def test_missing_dete_folder_is_named(backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="expert.json"):
        load_dual_expert(tmp_path / "seme", tmp_path / "dete", backbone)


@pytest.mark.slow
def test_train_dete_smoke_run_writes_adapter_layers_and_samples(tmp_path, monkeypatch):
    """SemE then DetE on the smoke preset (online source), then 4-step sampling through both experts."""
    from dcm.backbones import create_teacher, load_teacher
    from dcm.pipeline.stages import prepare, train
    from dcm.pipeline.table import STAGES

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCM_TRACKING", "off")
    raw = config.load_raw("params.yaml", preset="smoke")
    raw["training"]["source"] = "online"
    params = config.parse(raw)
    prepare.run(params)
    create_teacher(params).save(paths.TEACHER)
    with pytest.raises(config.ConfigError, match=r"checkpoints/dcm/seme.*`dcm run train_seme --method dcm`"):
        STAGES["train_dete"].run(params, "dcm")
    train.run(params, "dcm", "train_seme")
    train.run(params, "dcm", "train_dete")

    out = paths.checkpoint("dcm", "dete")
    assert {"adapter", "timestep_layers.safetensors", "expert.json", "train.json"} \
        <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == params.methods["dcm"].dete.train_steps
    assert 0 < summary["dete_trainable_fraction_of_backbone"] < 1 and summary["wall_s"] > 0 \
        and summary["peak_rss_mb"] > 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all(0 <= n <= params.grid.kappa for r in rows for n in r["n"])
    assert all({"gan/gan_g", "gan/fm", "gan/d_loss"} <= r.keys() for r in rows)
    assert summary["discriminator"]["steps"][1] == len(rows) - 1 and "at_chance" in summary["discriminator"]

    backbone = load_teacher(params, paths.TEACHER)
    experts = dcm_experts(params, "dcm", backbone)
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    steps = schedule.expert_schedule(grid, params.grid.kappa, params.methods["dcm"].sample_steps)
    x = sample(experts, steps, latents(backbone, params, 1), backbone.encode_prompts([PROMPT]))
    assert torch.isfinite(x).all()


def test_export_loads_with_stock_diffusers_and_peft_and_samples_like_dcm(backbone, params, grid, tmp_path):
    """The exported folder, read with diffusers + peft only (no dcm model code), gives dcm's 4-step
    samples."""
    import json as json_

    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from peft import PeftModel
    from safetensors.torch import load_file

    from dcm.methods.export import export_dual_expert
    from dcm.sampling import student_velocity

    dual = build(backbone, grid, params)
    perturb_dete(dual)
    dual = dual.requires_grad_(False).eval()
    steps = schedule.expert_schedule(grid, params.grid.kappa, 4)
    out = export_dual_expert(dual, steps, tmp_path / "export", "dcm")

    seme = WanTransformer3DModel.from_pretrained(out / "transformer").eval()
    dete = WanTransformer3DModel.from_pretrained(out / "transformer")
    missing, unexpected = dete.load_state_dict(load_file(out / "dete_timestep_layers.safetensors"),
                                               strict=False)
    assert not unexpected
    dete = PeftModel.from_pretrained(dete, out / "dete_lora").eval()
    plan = json_.loads((out / "student_schedule.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(sigmas=[s["sigma"] for s in plan["steps"]])
    assert [s["expert"] for s in plan["steps"]] == ["seme", "seme", "dete", "dete"]

    noise = latents(backbone, params, 2)
    cond = backbone.encode_prompts([PROMPT, "a blue striped square moves up slowly"])
    x = noise.clone()
    with torch.no_grad():
        for step, t in zip(plan["steps"], scheduler.timesteps):
            model = seme if step["expert"] == "seme" else dete
            v = model(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=cond.hidden,
                      return_dict=False)[0]
            x = scheduler.step(v, t, x).prev_sample
    ours = sample({"seme": student_velocity(backbone, dual), "dete": student_velocity(backbone, dual)},
                  steps, noise, cond)
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)
    seme_only = sample({"seme": student_velocity(backbone, dual.materialize("seme"))},
                       [schedule.SamplingStep(s.sigma, "seme") for s in steps], noise, cond)
    assert not torch.allclose(ours, seme_only, atol=1e-3)  # DetE really took the last two steps


def test_merged_experts_sample_like_the_routed_dual_expert(backbone, params, grid):
    from dcm.sampling import student_velocity

    dual = build(backbone, grid, params)
    perturb_dete(dual)
    dual = dual.requires_grad_(False).eval()
    steps = schedule.expert_schedule(grid, params.grid.kappa, 4)
    noise, cond = latents(backbone, params, 2), backbone.encode_prompts([PROMPT, PROMPT])
    routed = sample({e: student_velocity(backbone, dual) for e in ("seme", "dete")}, steps, noise, cond)
    merged = sample({e: student_velocity(backbone, dual.materialize(e).eval()) for e in ("seme", "dete")},
                    steps, noise, cond)
    torch.testing.assert_close(merged, routed, rtol=1e-4, atol=1e-4)


def test_an_fsdp2_bf16_dual_expert_routes_on_the_callers_timestep(backbone, grid, params):
    """FSDP2's bf16 policy casts forward inputs; the dual expert's route must see the timestep the caller
    gave (at t ≈ 960 bf16's spacing is 4: a DetE sample at σ_κ would go to SemE)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dcm.config import ParallelConfig
    from dcm.parallel.fsdp import parallelize

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        dual = build(backbone, grid, params)
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
        parallelize(dual, ParallelConfig(strategy="fsdp", mixed_precision="bf16"), mesh)
        seen = []
        route = dual.route
        dual.route = lambda t: seen.append(t.clone()) or route(t)
        t = torch.tensor([dual.t_kappa], dtype=torch.float32)
        assert t.to(torch.bfloat16).float() != t  # the cast would change it
        x = latents(backbone, params, 1)
        cond = backbone.encode_prompts([PROMPT])
        with torch.no_grad():
            dual(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden, return_dict=False)
        assert seen and seen[0].dtype == torch.float32 and torch.equal(seen[0], t)
        assert not dual.route(seen[0]).any()  # σ_κ itself: DetE's
    finally:
        dist.destroy_process_group()
