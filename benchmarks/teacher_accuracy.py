"""How well the trained teacher follows its prompts on the held-out eval rows (unseen seeds).

Samples every eval row of ``data/prompts.json`` with the guided teacher at the full grid (50 steps)
and with plain 4-step Euler, runs ``shapes.detect`` on each video and prints the per-attribute
accuracy, the match rate on (colour, shape, direction) and seconds per video.

    python benchmarks/teacher_accuracy.py [--params params.yaml] [--preset P] [--teacher models/teacher]
                                          [--steps 50 4] [--limit N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dcm import config, io, paths, schedule
from dcm.backbones import load_teacher
from dcm.sampling import sample, teacher_velocity
from dcm.worlds import shapes

MATCH_KEYS = ("colour", "shape", "direction")


def initial_noise(rows: list[dict], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The contract's noise of each (prompt, seed) row."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(r["seed"]))
                        for r in rows])


def score(videos: torch.Tensor, rows: list[dict], size: int) -> dict[str, float]:
    hits = {k: [] for k in shapes.ATTRIBUTES}
    matched = []
    for video, row in zip(videos, rows):
        det = shapes.detect(video, size_hint=size)
        wanted = shapes.parse_caption(row["prompt"])
        for key in shapes.ATTRIBUTES:
            hits[key].append(getattr(det, key) == wanted[key])
        matched.append(shapes.matches(det, row["prompt"], keys=MATCH_KEYS))
    out = {key: float(np.mean(v)) for key, v in hits.items()}
    out["match"] = float(np.mean(matched))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--teacher", default=str(paths.TEACHER))
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="default: grid.steps and 4")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N eval rows")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=None, help="override backbone.guidance_scale")
    args = ap.parse_args()

    params = config.load(args.params, args.preset)
    backbone = load_teacher(params, args.teacher)
    rows = io.read_json(paths.PROMPTS)["eval"][: args.limit]
    grid = params.teacher_grid()
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    noise = initial_noise(rows, shape)
    scale = params.backbone.guidance_scale if args.guidance is None else args.guidance
    print(f"teacher {args.teacher}: {len(rows)} eval rows, guidance {scale}, torch threads "
          f"{torch.get_num_threads()}")

    for steps in args.steps or [params.grid.steps, 4]:
        plan = schedule.uniform_schedule(grid, steps)
        videos = []
        start = time.perf_counter()
        for lo in range(0, len(rows), args.batch):
            batch = rows[lo:lo + args.batch]
            cond = backbone.encode_prompts([r["prompt"] for r in batch])
            velocity = teacher_velocity(backbone, backbone.null_prompts(len(batch)), scale)
            latents = sample({"teacher": velocity}, plan, noise[lo:lo + len(batch)], cond)
            videos.append(backbone.decode_latents(latents))
        seconds = (time.perf_counter() - start) / len(rows)
        result = score(torch.cat(videos), rows, params.world.size)
        attrs = "  ".join(f"{k} {result[k]:.3f}" for k in shapes.ATTRIBUTES)
        print(f"{steps:>3} steps: match({'+'.join(MATCH_KEYS)}) {result['match']:.3f} | {attrs} | "
              f"{seconds:.3f} s/video")


if __name__ == "__main__":
    main()
