"""SemE and DetE training-step time, peak memory and model FLOP utilisation on a real-size random transformer.

One step is what ``dcm.distill.loop.train`` does per micro-batch, with the engine's own pieces:
student forward with grad (bf16 autocast over fp32 master weights), target forward without grad,
pseudo-Huber endpoint loss, backward, clip 1.0, AdamW (wd 1e-3); SemE adds the temporal coherence
loss and trains every parameter; DetE is ``make_dete`` (LoRA r = 128, α = 256 + copied timestep
layers, backbone frozen) with ``GanFeatureMatching`` (frozen-teacher features of real and fake,
discriminator heads, their own AdamW step).  Activation checkpointing is on (diffusers'
``enable_gradient_checkpointing`` on the student and the frozen teacher, as ``training.gradient_checkpointing``)
unless ``--no-checkpointing``.

One GPU, no FSDP: a 13B full-parameter SemE (fp32 weights + AdamW states ≈ 16 bytes/parameter) does
not fit, so ``--depth-scale`` (default: automatic for HunyuanVideo, halving until a step fits) builds
fewer blocks; the printed block counts say which depth was measured.

Model FLOPs: F = one forward (``gpu_common.forward_flops``); SemE step = student fwd + bwd (3F) +
target fwd (F) = 4F; DetE step adds the teacher's feature forwards for real (F) and fake (fwd + bwd,
3F) = 8F (the LoRA and discriminator heads are ignored).  MFU = model FLOPs / step time / peak bf16.

    python benchmarks/gpu_train_step.py --family wan                 # Wan 2.1 1.3B, 480×832, 81 frames
    python benchmarks/gpu_train_step.py --family hunyuan             # HunyuanVideo, largest fitting depth
    python benchmarks/gpu_train_step.py --family wan --tiny          # CPU smoke run
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

from dcm.backbones.base import enable_activation_checkpointing  # noqa: E402
from dcm.distill import losses  # noqa: E402
from dcm.distill.discriminator import GanFeatureMatching, adversarial_sigmas  # noqa: E402
from dcm.distill.experts import make_dete  # noqa: E402
from dcm.distill.loop import ConsistencyBatch  # noqa: E402

FM_WEIGHT = {"wan": 10.0, "hunyuan": 1.0, "cogvideox": 1.0}


def make_step(expert: str, backbone, student, teacher, trainable, x_n, x_prev, cond, grid, kappa, device, fm):
    """A closure running one SemE or DetE optimisation step."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, weight_decay=1e-3)
    if expert == "seme":
        n, end = torch.tensor([kappa + 1]), kappa
    else:
        n, end = torch.tensor([kappa]), -1
    sigma_n = torch.tensor([grid.sigma(int(n))], device=device)
    sigma_prev = torch.tensor([grid.sigma(int(n) - 1)], device=device)
    sigma_end = torch.tensor([grid.sigma(end) if end >= 0 else grid.sigma_min], device=device)
    gan = None
    if expert == "dete":
        gan = GanFeatureMatching(backbone, teacher, adversarial_sigmas(grid, kappa), gan_weight=1.0,
                                 fm_weight=fm, disc_lr=1e-5, weight_decay=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            v = backbone.predict(student, x_n, sigma_n, cond)
        x_end = losses.euler_endpoint(x_n, v.float(), sigma_n, sigma_end)
        with torch.no_grad(), autocast:
            v_prev = backbone.predict(student, x_prev, sigma_prev, cond)
        target = losses.consistency_target(x_prev, v_prev.float(), sigma_prev, sigma_end,
                                           torch.zeros(1, dtype=torch.bool, device=device))
        loss = losses.pseudo_huber(x_end, target, 1e-3)
        batch = ConsistencyBatch(0, n, sigma_n, sigma_prev, sigma_end, x_n, x_prev, cond, x_end, target)
        if expert == "seme":
            loss = loss + losses.temporal_coherence(x_end, target, 3)
        else:
            with autocast:
                loss = loss + sum(gan.generator_loss(batch).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if gan is not None:
            with autocast:
                gan.after_generator_step(batch)

    return step


def measure(args, depth_scale: float) -> dict:
    device, _ = common.device_and_dtype(args.tiny)
    frames, height, width = common.video_size(args)
    backbone, cfg = common.build_backbone(args.family, args.tiny, frames, height, width, depth_scale)
    backbone.transformer.to(device).eval().requires_grad_(False)  # fp32 master weights, frozen teacher
    backbone.to(device)
    latent = backbone.latent_shape_hw(frames, height, width)
    grid, kappa = common.preset_grid(args.family)
    x_n = torch.randn(1, *latent, device=device)
    x_prev = x_n + 0.01 * torch.randn_like(x_n)
    cond = common.random_cond(backbone, 1, device, torch.float32)
    tokens = common.video_tokens(backbone, latent)
    flops = common.forward_flops(backbone.transformer, tokens, common.text_tokens(backbone),
                                 common.count_blocks(backbone))
    out = {"cfg": cfg, "latent": latent, "tokens": tokens, "frames": frames, "height": height, "width": width,
           "params": sum(p.numel() for p in backbone.transformer.parameters()), "forward_flops": flops}

    for expert in ("seme", "dete"):
        seme = copy.deepcopy(backbone.transformer).requires_grad_(True)
        if expert == "seme":
            student, trainable = seme, list(seme.parameters())
        else:
            student = make_dete(seme, backbone, 4 if args.tiny else 128, 8 if args.tiny else 256, kappa=kappa,
                                sigma_kappa=grid.sigma(kappa)).to(device)
            trainable = student.trainable_parameters()
        if args.checkpointing:  # as training.gradient_checkpointing: the student and the GAN teacher pass
            enable_activation_checkpointing(student, backbone.transformer)
        student.train()
        step = make_step(expert, backbone, student, backbone.transformer, trainable, x_n, x_prev, cond, grid, kappa,
                         device, FM_WEIGHT[args.family])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = common.median_seconds(step, args.repeats, args.warmup, device)
        out[expert] = {"times": times, "trainable": sum(p.numel() for p in trainable),
                       "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                       "model_flops": (4 if expert == "seme" else 8) * flops}
        del student, trainable, step, seme
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = common.base_parser(__doc__, repeats=5, warmup=2)
    ap.add_argument("--depth-scale", type=float, default=None,
                    help="fraction of the blocks (default 1; HunyuanVideo on one GPU: halve until it fits)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: from the GPU name)")
    args = ap.parse_args()
    torch.manual_seed(0)
    device, _ = common.device_and_dtype(args.tiny)

    scale = args.depth_scale or 1.0
    auto = args.depth_scale is None and args.family == "hunyuan" and not args.tiny
    while True:
        try:
            result = measure(args, scale)
            break
        except torch.OutOfMemoryError:
            if not auto or scale < 0.05:
                raise
            print(f"out of memory at depth scale {scale}; halving")
            torch.cuda.empty_cache()
            scale /= 2

    depth = ", ".join(f"{k}={result['cfg'][k]}" for k in common.DEPTH_KEYS[args.family])
    peak = common.peak_tflops(device, args.peak_tflops)
    print(f"device: {common.describe_device(device)}; fp32 master weights, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, activation checkpointing {args.checkpointing}")
    print(f"model: {args.family} {'tiny' if args.tiny else common.SIZES[args.family]} random init at depth {depth}"
          f" (scale {scale:g}{', the largest that fit' if auto and scale < 1 else ''}), "
          f"{result['params'] / 1e6:.1f} M parameters")
    print(f"video: {result['frames']} frames {result['height']}×{result['width']} → latent {tuple(result['latent'])}, "
          f"{result['tokens']} video tokens, batch 1; forward = {result['forward_flops'] / 1e9:.4g} GFLOP")
    for expert in ("seme", "dete"):
        r = result[expert]
        t = common.median(r["times"])
        mfu = f", MFU {100 * r['model_flops'] / t / (peak * 1e12):.1f}% of {peak:g} TFLOP/s" if peak else ""
        mem = f", peak memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
        print(f"{expert}: median step {t:.3f} s (runs {', '.join(f'{x:.3f}' for x in r['times'])}), "
              f"{r['trainable'] / 1e6:.2f} M trainable{mem}, {r['model_flops'] / t / 1e12:.2f} TFLOP/s{mfu}")


if __name__ == "__main__":
    main()
