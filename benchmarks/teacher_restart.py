"""Where along the σ axis does the teacher lose the prompt?  Restart sampling from noised real videos.

For every held-out eval row a clean video of its caption is rendered (scene drawn from the row's
seed), noised to x_σ = (1 − σ)·x0 + σ·ε at each start σ of the grid, and integrated to σ = 0 with
the guided teacher on the remaining grid steps.  The detector then reads the attributes back.

Start σ = 1 is ordinary sampling.  A teacher that is a good denoiser at every noise level keeps the
prompt's attributes from every start; the highest start σ at which an attribute still survives tells
where training has to improve (layout and motion are decided at high σ, texture at low σ).

    python benchmarks/teacher_restart.py [--params params.yaml] [--preset P] [--teacher models/teacher]
                                         [--starts 0.6 0.8 0.9 0.95 1.0] [--limit N] [--guidance G]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from teacher_accuracy import MATCH_KEYS, score

from dcm import config, io, paths
from dcm.backbones import load_teacher
from dcm.sampling import sample, teacher_velocity
from dcm.schedule import SamplingStep
from dcm.worlds import shapes


def clean_latents(backbone, rows: list[dict], size: int, frames: int, jitter: float | None) -> torch.Tensor:
    """Latents of the rendered ground-truth video of each (prompt, seed) row."""
    scenes = [shapes.sample_scene(np.random.default_rng(r["seed"]), size, frames, caption=r["prompt"],
                                  jitter=jitter)
              for r in rows]
    return backbone.encode_video(shapes.render_batch(scenes, size, frames))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--teacher", default=str(paths.TEACHER))
    ap.add_argument("--starts", type=float, nargs="+", default=[0.6, 0.8, 0.9, 0.95, 0.98, 1.0])
    ap.add_argument("--limit", type=int, default=32, help="score only the first N eval rows")
    ap.add_argument("--guidance", type=float, default=None, help="override backbone.guidance_scale")
    args = ap.parse_args()

    params = config.load(args.params, args.preset)
    backbone = load_teacher(params, args.teacher)
    rows = io.read_json(paths.PROMPTS)["eval"][: args.limit]
    size, frames = params.world.size, params.world.frames
    grid = params.teacher_grid()
    descending = [float(s) for s in grid.sigmas[::-1]]
    scale = params.backbone.guidance_scale if args.guidance is None else args.guidance
    bad = [s for s in args.starts if not descending[-1] <= s <= 1.0]
    if bad:
        ap.error(f"--starts {bad}: each start σ must lie in [{descending[-1]:.4f}, 1] "
                 "(the grid's lowest σ to 1)")

    x0 = clean_latents(backbone, rows, size, frames, params.world.position_jitter)
    eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(r["seed"]))
                       for r in rows])
    cond = backbone.encode_prompts([r["prompt"] for r in rows])
    velocity = teacher_velocity(backbone, backbone.null_prompts(len(rows)), scale)
    print(f"teacher {args.teacher}: {len(rows)} eval rows, guidance {scale}, grid {params.grid.steps} steps "
          f"shift {params.grid.shift}")
    for start in sorted(args.starts):
        first = next(i for i, s in enumerate(descending) if s <= start + 1e-9)
        sigma0 = descending[first]
        plan = [SamplingStep(s, "teacher") for s in descending[first:]]
        latents = sample({"teacher": velocity}, plan, (1 - sigma0) * x0 + sigma0 * eps, cond)
        result = score(backbone.decode_latents(latents), rows, size)
        attrs = "  ".join(f"{k} {result[k]:.3f}" for k in shapes.ATTRIBUTES)
        print(f"start σ {sigma0:.3f} ({len(plan):>2} steps): match({'+'.join(MATCH_KEYS)}) "
              f"{result['match']:.3f} | {attrs}")


if __name__ == "__main__":
    main()
