"""CPU speed of the toy teacher's training step, two variants side by side in one process.

``--compare adamw`` (default): PyTorch's default CPU AdamW (a loop over the tensors; what the
package's ``dcm.distill.optim.adamw`` makes on the CPU) against its multi-tensor kernel (``foreach=True``).
``--compare fused``: the package's against PyTorch's fused AdamW kernel (``fused=True``).
``--compare compile``: the eager transformer against ``torch.compile`` of it (inductor's C++ kernels;
both with the package's AdamW); the first, untimed block of the compiled variant includes its
compilation, printed as the warm-up time.

Both variants run the same teacher step (scene batch, flow-matching loss, backward, clip, optimizer
step) on their own copy of the model, in interleaved blocks so that a machine's drift hits both alike;
it prints each block's steps/s, the median per variant and the median of the per-block ratios, and
whether the two copies' weights are still bitwise equal (a speed-up that keeps them equal changes no
result), with the largest difference of the two runs' losses.

    python benchmarks/cpu_speed.py [--compare adamw|fused|compile] [--blocks 5] [--steps 20]
        [--params params.yaml]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from dcm import config, schedule
from dcm.backbones import create_teacher
from dcm.distill.optim import adamw
from dcm.distill.teacher_pretraining import MAX_GRAD_NORM, flow_matching_loss, sample_sigmas, scene_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=("adamw", "fused", "compile"), default="adamw")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="teacher steps per block and variant")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    args = ap.parse_args()
    params = config.load(args.params, preset=args.preset)
    if params.backbone.family != "toy":
        raise config.ConfigError("backbone.family", params.backbone.family,
                                 "toy: the benchmark trains the toy teacher")
    torch.manual_seed(params.seed)
    base = create_teacher(params)
    cfg, world = params.teacher, params.world
    sigmas = torch.from_numpy(schedule.training_sigmas(params.grid.num_train_timesteps,
                                                       params.grid.shift)).float()

    def foreach_adamw(p):
        return torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)

    def dcm_adamw(p):
        return adamw(p, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def fused_adamw(p):
        return torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    pairs = {"adamw": (("dcm adamw (PyTorch's CPU loop)", dcm_adamw, False),
                       ("foreach AdamW", foreach_adamw, False)),
             "fused": (("dcm adamw (PyTorch's CPU loop)", dcm_adamw, False),
                       ("fused AdamW", fused_adamw, False)),
             "compile": (("eager", dcm_adamw, False), ("torch.compile", dcm_adamw, True))}[args.compare]
    variants = {}
    for name, make, compiled in pairs:
        backbone = copy.deepcopy(base)
        trainable = [p for m in (backbone.transformer, backbone.prompt_encoder) for p in m.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        net = torch.compile(backbone.transformer) if compiled else backbone.transformer
        variants[name] = {"backbone": backbone, "net": net, "trainable": trainable,
                          "optimizer": make(trainable),
                          "rng": np.random.default_rng(0), "gen": torch.Generator().manual_seed(0),
                          "rates": [], "losses": []}

    def block(v: dict) -> float:
        bb = v["backbone"]
        start = time.perf_counter()
        for _ in range(args.steps):
            videos, captions = scene_batch(v["rng"], cfg.batch_size, world.size, world.frames, world.quality,
                                           world.position_jitter, world.open_share, world.open_attributes)
            x0 = bb.encode_video(videos)
            eps = torch.randn(x0.shape, generator=v["gen"])
            sigma = sample_sigmas(x0.shape[0], sigmas, v["gen"])
            loss = flow_matching_loss(bb, v["net"], x0, eps, sigma, bb.encode_prompts(captions))
            v["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(v["trainable"], MAX_GRAD_NORM)
            v["optimizer"].step()
            v["losses"].append(float(loss.detach()))
        return args.steps / (time.perf_counter() - start)

    for name, v in variants.items():  # warm-up, untimed (it compiles a compiled variant)
        start = time.perf_counter()
        block(v)
        print(f"warm-up block of {name}: {time.perf_counter() - start:.1f} s")
    print(f"teacher step, batch {cfg.batch_size}, {torch.get_num_threads()} threads; steps/s per block:")
    for b in range(args.blocks):
        for v in (list(variants.values()) if b % 2 == 0 else list(variants.values())[::-1]):
            v["rates"].append(block(v))
        print("  block", b, "  ".join(f"{name}: {v['rates'][-1]:.2f}" for name, v in variants.items()))
    (a, va), (b_, vb) = variants.items()
    ratios = [y / x for x, y in zip(va["rates"], vb["rates"])]
    for name, v in variants.items():
        print(f"{name}: median {statistics.median(v['rates']):.2f} steps/s (min {min(v['rates']):.2f}, "
              f"max {max(v['rates']):.2f})")
    print(f"speed-up ({b_} / {a}): median {statistics.median(ratios):.2f}× "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    same = all(torch.equal(x, y) for x, y in zip(va["trainable"], vb["trainable"]))
    print(f"weights bitwise equal after {(args.blocks + 1) * args.steps} steps each: {same}")
    gap = max(abs(x - y) for x, y in zip(va["losses"], vb["losses"]))
    print(f"largest difference of the two runs' losses: {gap:.3g}")


if __name__ == "__main__":
    main()
