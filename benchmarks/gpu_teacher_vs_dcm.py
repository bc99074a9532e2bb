"""Latency of the 50-step teacher vs the 4-step DCM on a real-size random transformer (bf16 on GPU).

The teacher is the family's adapter with its guidance (Wan/CogVideoX: batched CFG, two forwards per
step; HunyuanVideo: embedded guidance, one forward), run by ``dcm.sampling.sample`` over the 50-point
teacher grid.  DCM is the same transformer with the DetE LoRA adapter (r = 128) and copied timestep
layers injected (``make_dete``), routed per sample over the expert schedule of ``dcm.schedule`` (one
forward per step).  Both exclude text encoding and VAE decoding (identical for both, and the paper's
latency compares the denoising loops).  Prints the median of ``--repeats`` runs after a warm-up, and
the speedup.  ``--depth-scale`` shrinks the block count when a model does not fit (printed).

    python benchmarks/gpu_teacher_vs_dcm.py --family wan            # Wan 2.1 1.3B, 480×832, 81 frames
    python benchmarks/gpu_teacher_vs_dcm.py --family hunyuan        # HunyuanVideo 13B, 544×960, 61 frames
    python benchmarks/gpu_teacher_vs_dcm.py --family wan --tiny     # CPU, tiny config (a smoke run)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

from dcm.distill.experts import make_dete  # noqa: E402
from dcm.sampling import sample, student_velocity, teacher_velocity  # noqa: E402
from dcm.schedule import expert_schedule, uniform_schedule  # noqa: E402


def main() -> None:
    ap = common.base_parser(__doc__, repeats=3, warmup=1)
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--dcm-steps", type=int, default=4)
    ap.add_argument("--depth-scale", type=float, default=1.0, help="fraction of the blocks to build")
    args = ap.parse_args()

    torch.manual_seed(0)
    device, dtype = common.device_and_dtype(args.tiny)
    frames, height, width = common.video_size(args)
    backbone, cfg = common.build_backbone(args.family, args.tiny, frames, height, width, args.depth_scale)
    backbone.transformer.to(device, dtype).eval().requires_grad_(False)
    backbone.to(device)
    latent = backbone.latent_shape_hw(frames, height, width)
    tokens = common.video_tokens(backbone, latent)
    params = sum(p.numel() for p in backbone.transformer.parameters())
    print(f"device: {common.describe_device(device)}; dtype {dtype}")
    print(f"model: {args.family} {'tiny' if args.tiny else common.SIZES[args.family]} random init, "
          f"{params / 1e6:.1f} M parameters, {common.count_blocks(backbone)} blocks"
          + (f" (depth scaled ×{args.depth_scale}: "
             f"{', '.join(f'{k}={cfg[k]}' for k in common.DEPTH_KEYS[args.family])})"
             if args.depth_scale != 1.0 else ""))
    print(f"video: {frames} frames {height}×{width} → latent {tuple(latent)}, {tokens} video tokens, batch 1")

    grid, kappa = common.preset_grid(args.family)
    noise = torch.randn(1, *latent, device=device, dtype=dtype)
    cond = common.random_cond(backbone, 1, device, dtype)
    uncond = common.random_cond(backbone, 1, device, dtype) if backbone.guidance_mode == "cfg" else None
    teacher_steps = uniform_schedule(grid, args.teacher_steps, "teacher")
    dcm_steps = expert_schedule(grid, kappa, args.dcm_steps)

    with torch.no_grad():
        teacher = {"teacher": teacher_velocity(backbone, uncond)}
        t_teacher = common.median_seconds(lambda: sample(teacher, teacher_steps, noise, cond), args.repeats,
                                          args.warmup, device)
        sigma_kappa = grid.sigma(kappa)
        dual = make_dete(backbone.transformer, backbone, 4 if args.tiny else 128, 8 if args.tiny else 256,
                         kappa=kappa, sigma_kappa=sigma_kappa).to(device, dtype).eval()
        velocity = student_velocity(backbone, dual)
        experts = {"seme": velocity, "dete": velocity}
        t_dcm = common.median_seconds(lambda: sample(experts, dcm_steps, noise, cond), args.repeats,
                                      args.warmup, device)
    forwards = (2 if backbone.guidance_mode == "cfg" else 1) * len(teacher_steps)
    print(f"teacher: {len(teacher_steps)} steps, {forwards} forwards ({backbone.guidance_mode}): "
          f"median {common.median(t_teacher):.3f} s (runs {', '.join(f'{t:.3f}' for t in t_teacher)})")
    print(f"dcm:     {len(dcm_steps)} steps, {len(dcm_steps)} forwards (σ = "
          f"{', '.join(f'{s.sigma:.4f}:{s.expert}' for s in dcm_steps)}): "
          f"median {common.median(t_dcm):.3f} s (runs {', '.join(f'{t:.3f}' for t in t_dcm)})")
    print(f"speedup: {common.median(t_teacher) / common.median(t_dcm):.2f}x")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
