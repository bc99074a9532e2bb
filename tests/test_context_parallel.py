"""Context parallelism (Ulysses all-to-all on the video token axis) equals the single-rank computation.

Two real gloo processes under torchrun run each tiny diffusers transformer (DESIGN.md's tiny configs,
random weights from a fixed seed on every rank) once plainly (the single-rank reference) and once
with ``enable_context_parallel`` over both ranks, on the same inputs; the loss is the consistency-style
MSE plus the SemE temporal-coherence loss on the model's (gathered) output, so its backward runs
through every collective.  This file is also the worker: ``torchrun … tests/test_context_parallel.py OUT``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TC_OFFSET = 3  # METHODS.md: SemE's frame offset l = 3 latent frames
OUT_ATOL = 1e-5
GRAD_ATOL = 1e-5
CASES = ["wan", "wan-checkpointing", "wan-fsdp", "wan-dete", "wan-a14b", "wan-ti2v", "wan-ti2v-dete",
         "hunyuan", "hunyuan15", "cogvideox", "cogvideox-rope"]


# ============================================================================ the cases (worker side)

def tiny_transformer(family: str, **overrides):
    """DESIGN.md's tiny configurations, built directly from diffusers' classes."""
    from diffusers import (
        CogVideoXTransformer3DModel,
        HunyuanVideo15Transformer3DModel,
        HunyuanVideoTransformer3DModel,
        WanTransformer3DModel,
    )

    if family == "wan":
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                   out_channels=16, text_dim=384, freq_dim=64, ffn_dim=256, num_layers=4,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
        return WanTransformer3DModel(**{**cfg, **overrides})
    if family == "hunyuan":
        cfg = dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32,
                   num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                   guidance_embeds=True,
                   text_embed_dim=384, pooled_projection_dim=384, rope_axes_dim=(8, 12, 12))
        return HunyuanVideoTransformer3DModel(**{**cfg, **overrides})
    if family == "hunyuan15":  # T2V: 2·16 + 1 input channels (latents, zero condition latents, zero mask)
        cfg = dict(in_channels=33, out_channels=16, num_attention_heads=4, attention_head_dim=16,
                   num_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                   text_embed_2_dim=32, image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v")
        return HunyuanVideo15Transformer3DModel(**{**cfg, **overrides})
    cfg = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
               text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
               patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16)
    return CogVideoXTransformer3DModel(**{**cfg, **overrides})


def make_case(name: str):
    """(family, model, inputs(), output → (B, C, T, H, W)) with weights and inputs from fixed seeds."""
    family = name.split("-")[0]
    overrides = {"use_rotary_positional_embeddings": True} if name == "cogvideox-rope" else {}
    ti2v = name.startswith("wan-ti2v")  # Wan 2.2 TI2V: 48 latent channels, one timestep per video token
    if ti2v:
        overrides = {"in_channels": 48, "out_channels": 48}
    torch.manual_seed(0)
    model = tiny_transformer(family, **overrides)
    if name == "wan-checkpointing":
        model.enable_gradient_checkpointing()
    # DetE: LoRA (B ≠ 0, so both factors get gradients) + copied layers over frozen SemE
    if name.endswith("dete"):
        from types import SimpleNamespace

        from dcm.distill.experts import make_dete

        backbone = SimpleNamespace(timestep_layer_names=("condition_embedder", "norm_out", "proj_out"),
                                   lora_target_modules=("to_q", "to_k", "to_v", "to_out.0"),
                                   model_timestep=lambda s: 1000.0 * s)
        model = make_dete(model, backbone, 4, 8.0, kappa=1, sigma_kappa=0.95)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
    # Wan 2.2 A14B's two experts, switched per sample at t = 875: the batch's t = 900 and 300 take one each
    if name == "wan-a14b":
        from dcm.backbones.routing import BoundaryExperts

        model = BoundaryExperts(model, tiny_transformer(family), 875.0)
    g = torch.Generator().manual_seed(1)
    batch, frames, size = 2, 8, 8  # 8 latent frames of 8×8: 8·4·4 = 128 video tokens
    if family == "wan":
        channels, timestep = (48, torch.tensor([[900.0], [300.0]]).expand(-1, 128)) if ti2v \
            else (16, torch.tensor([900.0, 300.0]))
        inputs = dict(hidden_states=torch.randn(batch, channels, frames, size, size, generator=g),
                      timestep=timestep, encoder_hidden_states=torch.randn(batch, 7, 384, generator=g))
        to_bcthw = None
    elif family == "hunyuan":
        mask = torch.ones(batch, 6, dtype=torch.long)
        mask[1, 4:] = 0  # padded prompt: the joint attention mask must hold across the all-to-all
        inputs = dict(hidden_states=torch.randn(batch, 16, frames, size, size, generator=g),
                      timestep=torch.tensor([900.0, 300.0]),
                      encoder_hidden_states=torch.randn(batch, 6, 384, generator=g),
                      encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 384, generator=g),
                      guidance=torch.tensor([6000.0, 6000.0]))
        to_bcthw = None
    elif family == "hunyuan15":
        mask, glyph_mask = torch.ones(batch, 6, dtype=torch.long), torch.zeros(batch, 5, dtype=torch.long)
        mask[1, 4:] = 0  # padded prompt
        glyph_mask[0, :2] = 1  # one prompt quotes glyph text, the other none (all-zero ByT5 mask)
        latents = torch.randn(batch, 16, frames, size, size, generator=g)
        inputs = dict(hidden_states=torch.cat([latents, torch.zeros(batch, 17, frames, size, size)], 1),
                      timestep=torch.tensor([900.0, 300.0]),
                      encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                      encoder_attention_mask=mask,
                      encoder_hidden_states_2=torch.randn(batch, 5, 32, generator=g),
                      encoder_attention_mask_2=glyph_mask, image_embeds=torch.zeros(batch, 3, 16))
        to_bcthw = None
    else:
        inputs = dict(hidden_states=torch.randn(batch, frames, 4, size, size, generator=g),
                      encoder_hidden_states=torch.randn(batch, 16, 32, generator=g),
                      timestep=torch.tensor([900, 300]))
        if overrides:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            grid = size // 2
            inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=16, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid),
                temporal_size=frames)
        to_bcthw = 1  # CogVideoX works on (B, T, C, H, W)
    return family, model, inputs, to_bcthw


def run_and_backward(model, inputs, to_bcthw, target):
    """Forward, the loss the SemE loop computes (MSE + temporal coherence on the whole clip), backward."""
    import torch.nn.functional as F

    from dcm.distill.losses import temporal_coherence

    out = model(**inputs, return_dict=False)[0]
    video = out.transpose(1, 2) if to_bcthw else out
    tc = temporal_coherence(video, target, TC_OFFSET)
    loss = F.mse_loss(video, target) + tc
    loss.backward()
    return out.detach(), video.detach(), float(tc.detach())


def worker(out_path: str) -> None:
    import torch.distributed as dist

    from dcm.distill.losses import temporal_coherence
    from dcm.parallel.context import enable_context_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in CASES:
        family, model, inputs, to_bcthw = make_case(name)
        reference = copy.deepcopy(model)
        shape = inputs["hidden_states"].shape
        # the output's channels (HunyuanVideo 1.5 takes 2C + 1 in: its condition latents and mask)
        target = torch.randn(shape[0], model.config.out_channels, 8, 8, 8,
                             generator=torch.Generator().manual_seed(2))
        ref_out, _, ref_tc = run_and_backward(reference, inputs, to_bcthw, target)

        if name == "wan-fsdp":  # FSDP2 over the same two ranks averages the gradients itself
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        cp = enable_context_parallel(model, "toy" if family == "wan" else family)
        seen = []  # tokens a middle block receives: the rank's slice
        probe = cp.transformers[0]
        middle = (probe.blocks if family == "wan" else probe.transformer_blocks)[1]
        handle = middle.register_forward_pre_hook(lambda _m, args, kwargs, seen=seen: seen.append(
            (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
        out, video, tc = run_and_backward(model, inputs, to_bcthw, target)
        handle.remove()
        if name != "wan-fsdp":
            cp.average_gradients(model.parameters())

        # the same TC computed per shard (each rank on its own frames, then averaged): what the official
        # code does, and not the whole-clip loss
        frames = video.shape[2]
        shard = video[:, :, rank * frames // world:(rank + 1) * frames // world]
        shard_target = target[:, :, rank * frames // world:(rank + 1) * frames // world]
        per_shard = torch.tensor(float(temporal_coherence(shard, shard_target, 1)))
        whole_offset1 = float(temporal_coherence(video, target, 1))
        dist.all_reduce(per_shard)

        grad_diff, grad_max, missing, local_numel = 0.0, 0.0, [], 0
        ref_params = dict(reference.named_parameters())
        for pname, p in model.named_parameters():
            r = ref_params[pname]
            if (p.grad is None) != (r.grad is None):
                missing.append(pname)
                continue
            if p.grad is not None:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                local_numel += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                grad_diff = max(grad_diff, float((grad - r.grad).abs().max()))
                grad_max = max(grad_max, float(r.grad.abs().max()))
        results[name] = {
            "out_max_abs_diff": float((out - ref_out).abs().max()), "out_max_abs": float(ref_out.abs().max()),
            "out_shape": list(out.shape), "ref_shape": list(ref_out.shape),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_max, "grad_mismatch": missing,
            "tc": tc, "tc_reference": ref_tc, "tc_per_shard_offset1": float(per_shard) / world,
            "tc_whole_offset1": whole_offset1,
            "video_tokens": int(cp.local_tokens * world), "local_tokens_seen": seen,
            "rank_out_checksum": float(out.double().sum()),
            "local_param_fraction": local_numel / sum(r.numel() for r in ref_params.values()),
        }
        cp.remove()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": gathered}, indent=1))
    dist.destroy_process_group()


# ============================================================================ the tests (pytest side)

@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--standalone", __file__, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = json.loads(out.read_text())["ranks"]
    for name, r in ranks[0].items():
        print(f"{name}: out max|Δ| {r['out_max_abs_diff']:.2e} (max|out| {r['out_max_abs']:.2f}), "
              f"grad max|Δ| {r['grad_max_abs_diff']:.2e} (max|grad| {r['grad_max_abs']:.2e}), "
              f"TC {r['tc']:.6f} vs {r['tc_reference']:.6f}")
    return ranks




@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_context_parallel_2_equals_1_rank_outputs_and_gradients(cp_results, case):
    for r in (ranks[case] for ranks in cp_results):
        assert r["out_shape"] == r["ref_shape"]  # the caller sees the whole clip
        assert r["out_max_abs_diff"] < OUT_ATOL, r
        assert not r["grad_mismatch"], r["grad_mismatch"]
        assert r["grad_max_abs_diff"] < GRAD_ATOL, r
        # each rank ran the blocks on its half of the video tokens
        assert r["local_tokens_seen"] and set(r["local_tokens_seen"]) == {r["video_tokens"] // 2}
        if case == "wan-fsdp":  # and held about half of the parameters (FSDP2 shards)
            assert 0.4 < r["local_param_fraction"] < 0.6, r["local_param_fraction"]
    # both ranks hold the same (whole) output
    assert cp_results[0][case]["rank_out_checksum"] == pytest.approx(cp_results[1][case]["rank_out_checksum"],
                                                                     rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_temporal_coherence_is_computed_over_the_whole_clip(cp_results, case):
    """The model's output is gathered before the loss: TC over all 8 frames equals the single-rank value,
    while TC computed per shard (each rank's 4 frames) is a different number."""
    for r in (ranks[case] for ranks in cp_results):
        assert r["tc"] == pytest.approx(r["tc_reference"], rel=1e-5, abs=1e-7)
        assert abs(r["tc_per_shard_offset1"] - r["tc_whole_offset1"]) > 1e-4 * abs(r["tc_whole_offset1"])


# ============================================================================ checks before any work

def test_degree_must_divide_tokens_and_heads():
    from dcm.config import ConfigError
    from dcm.parallel.context import allowed_degrees, check_context_parallel

    assert check_context_parallel(4, tokens=32 * 45 * 80, heads=24) == 4
    with pytest.raises(ConfigError) as err:
        check_context_parallel(5, tokens=32 * 45 * 80, heads=24)
    msg = str(err.value)
    assert "training.parallel.context_parallel" in msg and "5" in msg \
        and "allowed [1, 2, 3, 4, 6, 8, 12, 24]" in msg
    with pytest.raises(ConfigError, match="head count 12"):
        check_context_parallel(8, tokens=21 * 30 * 52, heads=12)
    with pytest.raises(ConfigError, match="world size 6"):
        check_context_parallel(4, tokens=128, heads=4, world_size=6)
    with pytest.raises(ConfigError, match="positive integer"):
        check_context_parallel(0, tokens=128, heads=4)
    assert allowed_degrees(13 * 30 * 45, 30) == [1, 2, 3, 5, 6, 10, 15, 30]


def test_video_tokens_at_the_presets_sizes():
    from dcm.parallel.context import video_tokens

    # latent (T, H, W) of the presets: HunyuanVideo 720p×125 frames, Wan 480×832×81, CogVideoX 480×720×49
    assert video_tokens({"patch_size": 2, "patch_size_t": 1, "num_single_layers": 40},
                        (32, 90, 160)) == 115200
    assert video_tokens({"patch_size": (1, 2, 2)}, (21, 60, 104)) == 32760
    assert video_tokens({"patch_size": 2, "patch_size_t": None, "max_text_seq_length": 226},
                        (13, 60, 90)) == 17550


def test_token_count_not_divisible_fails_at_the_first_forward_with_the_key():
    """One process, a one-rank gloo group whose size (1) divides everything: the hook's check is the same
    function, so exercise it through validate_context_parallel on a tiny model."""
    from dcm.config import ConfigError
    from dcm.parallel.context import validate_context_parallel

    model = tiny_transformer("wan")
    assert validate_context_parallel(model, 2, (8, 8, 8)) == 2
    with pytest.raises(ConfigError, match=r"training.parallel.context_parallel = 3 .*token count 80"):
        validate_context_parallel(model, 3, (5, 8, 8))


if __name__ == "__main__":
    worker(sys.argv[1])
