"""Cached-trajectory vs online-teacher distillation: median training-step time of the same student.

Both runs use the one training loop (``dcm.distill.train``) with the same full-parameter student,
batch size and phases (PCM, ``--phases``); only the batch source differs:

- cached: x_n, x_{n−1} read from teacher trajectories solved beforehand (no teacher forward per step);
- online: a data latent noised to x_n and one guided teacher Euler step (CFG: a doubled-batch forward).

The teacher is random (the step cost does not depend on its weights).  The cached trajectories are
solved up front with the guided teacher over the full grid and written to a real (temporary)
trajectory store, read back through ``TrajectoryStore`` as in training (the solve is not timed).  Prints both
medians (after ``--warmup`` steps) and a final line ``ratio: X`` = online / cached.

    python benchmarks/train_step.py [--params params.yaml] [--preset P] [--steps 12] [--warmup 3]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from dcm import config, distill, schedule
from dcm.backbones import create_teacher
from dcm.data.prompts import build_prompt_sets
from dcm.data.trajectories import TrajectoryStore, TrajectoryWriter, initial_noise, solve, store_header
from dcm.tracking import StageRun


def write_store(root: Path, backbone, rows: list[dict], grid: schedule.TeacherGrid,
                params) -> TrajectoryStore:
    """A real trajectory store (safetensors shards + index) of ``rows``, solved by the guided teacher."""
    latent_shape = backbone.latent_shape(params.world.frames, params.world.size)
    header = store_header(grid, params.grid.num_train_timesteps, params.grid.shift, backbone.guidance_mode,
                          backbone.guidance_scale, params.trajectories.dtype, latent_shape, len(rows),
                          len(rows), rows, "random-teacher")
    writer = TrajectoryWriter(root, header, rows)
    noise = torch.stack([initial_noise(r["seed"], latent_shape) for r in rows])
    writer.write(0, solve(backbone, grid, [r["prompt"] for r in rows], noise))
    writer.finish()
    return TrajectoryStore(root, verify=True)


def step_times(spec_factory, backbone, source, params, warmup: int) -> list[float]:
    """Seconds of each step after the warm-up, from the loop's own history (``step_s``)."""
    with tempfile.TemporaryDirectory() as out:
        distill.train(spec_factory(), backbone, source, params, Path(out), StageRun(None))
        rows = [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in rows[warmup:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--steps", type=int, default=12, help="timed steps after warm-up (>= 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--phases", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fair on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating cached/online runs (evens out load drift)")
    args = ap.parse_args()
    os.environ.setdefault("DCM_TRACKING", "off")
    torch.set_num_threads(args.threads)
    params = config.load(args.params, args.preset)
    backbone = create_teacher(params)
    backbone.transformer.requires_grad_(False).eval()
    backbone.prompt_encoder.requires_grad_(False)
    grid = params.teacher_grid()
    rows = build_prompt_sets(params)["train"][: params.training.batch_size]
    latent_shape = backbone.latent_shape(params.world.frames, params.world.size)
    steps = args.warmup + args.steps

    def spec():
        student = distill.full_parameter_student(backbone)
        return distill.DistillSpec(name="bench", student=student, trainable=list(student.parameters()),
                                   phases=schedule.pcm_phases(grid.steps, args.phases), target="online",
                                   lr=1e-5, train_steps=steps)

    print(f"preset {args.preset or 'shapes'}: batch {params.training.batch_size}, latents {latent_shape}, "
          f"{sum(p.numel() for p in backbone.transformer.parameters()) / 1e6:.2f} M params, "
          f"{torch.get_num_threads()} thread(s)")
    online = distill.OnlineSource(rows, backbone, grid, params.world.size, params.world.frames,
                                  params.world.quality, jitter=params.world.position_jitter)
    times: dict[str, list[float]] = {"cached": [], "online": []}
    with tempfile.TemporaryDirectory() as store_dir:
        cached = distill.CachedSource(write_store(Path(store_dir), backbone, rows, grid, params), backbone)
        for _ in range(args.rounds):
            times["cached"] += step_times(spec, backbone, cached, params, args.warmup)
            times["online"] += step_times(spec, backbone, online, params, args.warmup)
    t_cached, t_online = (statistics.median(times[k]) for k in ("cached", "online"))
    for name, t in (("cached", t_cached), ("online", t_online)):
        print(f"{name}: median {t * 1000:.1f} ms/step ({1 / t:.2f} steps/s) over {len(times[name])} steps")
    print(f"ratio: {t_online / t_cached:.3f}")


if __name__ == "__main__":
    main()
