"""``trajectories``: guided teacher ODE solves of the ``train`` rows, stored as checksummed shards.

Reads ``data/prompts.json`` and ``models/teacher``; writes ``trajectories/`` (see
``dcm.data.trajectories``).  Data parallel: on N ranks shard i is solved by rank i mod N (batches never
span shards, so the store is the same at any rank count).  The teacher runs in the inference precision
(``dcm.backbones.base.inference_precision``: bf16 autocast on GPUs, the Euler steps in fp32).
Resumable: a run killed at any moment recomputes only the shards that are missing, and a store made
with other params is started over.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dcm import distributed, io, paths, tracking
from dcm.backbones import load_teacher
from dcm.backbones.base import inference_precision
from dcm.config import ConfigError, Params
from dcm.data.trajectories import TrajectoryWriter, folder_digest, initial_noise, solve, store_header


def _train_rows(params: Params) -> list[dict]:
    """The ``train`` rows, checked against the params before any teacher forward."""
    rows = io.read_json(paths.PROMPTS).get("train")
    wanted = params.trajectories.num_trajectories
    if not isinstance(rows, list) or len(rows) != wanted:
        got = len(rows) if isinstance(rows, list) else rows
        raise ConfigError("trajectories.num_trajectories", wanted,
                          f"equal to the number of train rows in {paths.PROMPTS} ({got}): "
                          "re-run `dcm run prepare`")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or {"prompt_id", "prompt", "seed"} - set(row):
            raise ConfigError(f"data/prompts.json train[{i}]", row, "a row with prompt_id, prompt and seed")
    return rows


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(params: Params) -> None:
    rows = _train_rows(params)
    cfg = params.trajectories
    grid = params.teacher_grid()
    device = _device()
    backbone = load_teacher(params, paths.TEACHER)
    backbone.to(device)
    latent_shape = backbone.video_latent_shape(params)
    header = store_header(grid, params.grid.num_train_timesteps, params.grid.shift, backbone.guidance_mode,
                          backbone.guidance_scale, cfg.dtype, latent_shape, cfg.shard_size, cfg.batch_size,
                          rows, folder_digest(paths.TEACHER))
    writer = TrajectoryWriter(paths.TRAJECTORIES, header, rows)
    world = distributed.world()
    mine = writer.mine()
    reused = writer.num_shards - len(writer.pending())
    if writer.started_over and world.is_main:
        print(f"trajectories: {paths.TRAJECTORIES} was made with other params or another teacher: "
              "starting over")
    if reused and world.is_main:
        print(f"trajectories: resuming, {reused}/{writer.num_shards} shards already written")

    with tracking.stage_run(params, "trajectories") as run_log:
        todo = sum(len(writer.shard_rows[i]) for i in mine)
        start = time.perf_counter()
        desc = "trajectories" + (f" [rank {world.rank}/{world.size}]" if world.size > 1 else "")
        bar = tqdm(total=todo, unit="traj", desc=desc, position=world.rank)
        for step, i in enumerate(mine):
            shard_start = time.perf_counter()
            shard_rows = writer.shard_rows[i]
            parts = []
            for b in range(0, len(shard_rows), cfg.batch_size):  # batches never span shards
                batch = shard_rows[b:b + cfg.batch_size]
                noise = torch.stack([initial_noise(r["seed"], latent_shape) for r in batch])
                with inference_precision(device):
                    parts.append(solve(backbone, grid, [r["prompt"] for r in batch], noise))
                bar.update(len(batch))
            writer.write(i, torch.cat(parts))
            run_log.metrics({"shard_trajectories_per_s": len(shard_rows)
                             / (time.perf_counter() - shard_start)}, step=step)
        bar.close()
        index = writer.finish()  # every rank's shards: rank 0 writes the index
        wall = time.perf_counter() - start
        computed = sum(distributed.gather_objects(todo))
        store_bytes = sum((paths.TRAJECTORIES / s["file"]).stat().st_size for s in index["shards"])
        summary = {"trajectories": len(rows), "computed": computed, "shards": writer.num_shards,
                   "shards_reused": reused, "ranks": world.size, "wall_s": wall,
                   "trajectories_per_s": computed / wall if computed else 0.0,
                   "store_mb": store_bytes / 2**20, "bytes_per_trajectory": store_bytes / len(rows)}
        run_log.metrics(summary)
        run_log.artifact(paths.TRAJECTORIES / "index.json")
    if world.is_main:
        print(f"trajectories: {computed} solved in {wall:.1f} s ({summary['trajectories_per_s']:.2f} traj/s) "
              f"on {world.size} rank(s), {reused} shards reused, {store_bytes / 2**20:.1f} MB "
              f"-> {paths.TRAJECTORIES}")
