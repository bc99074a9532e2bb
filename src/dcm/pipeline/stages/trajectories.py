"""``trajectories``: guided teacher ODE solves of the ``train`` rows, stored as checksummed shards.

Reads ``data/prompts.json`` and ``models/teacher``; writes ``trajectories/`` (see
``dcm.data.trajectories``).  Resumable: a run killed at any moment recomputes only the shards that are
missing, batches never span shards, and a store made with other params is started over.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dcm import io, paths, tracking
from dcm.backbones import load_teacher
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
    backbone = load_teacher(params, paths.TEACHER)
    backbone.to(_device())
    latent_shape = backbone.video_latent_shape(params)
    header = store_header(grid, params.grid.num_train_timesteps, params.grid.shift, backbone.guidance_mode,
                          backbone.guidance_scale, cfg.dtype, latent_shape, cfg.shard_size, cfg.batch_size,
                          rows, folder_digest(paths.TEACHER))
    writer = TrajectoryWriter(paths.TRAJECTORIES, header, rows)
    pending = writer.pending()
    reused = writer.num_shards - len(pending)
    if writer.started_over:
        print(f"trajectories: {paths.TRAJECTORIES} was made with other params or another teacher: "
              "starting over")
    if reused:
        print(f"trajectories: resuming, {reused}/{writer.num_shards} shards already written")

    with tracking.stage_run(params, "trajectories") as run_log:
        todo = sum(len(writer.shard_rows[i]) for i in pending)
        start = time.perf_counter()
        bar = tqdm(total=len(rows), initial=len(rows) - todo, unit="traj", desc="trajectories")
        for step, i in enumerate(pending):
            shard_start = time.perf_counter()
            shard_rows = writer.shard_rows[i]
            parts = []
            for b in range(0, len(shard_rows), cfg.batch_size):  # batches never span shards
                batch = shard_rows[b:b + cfg.batch_size]
                noise = torch.stack([initial_noise(r["seed"], latent_shape) for r in batch])
                parts.append(solve(backbone, grid, [r["prompt"] for r in batch], noise))
                bar.update(len(batch))
            writer.write(i, torch.cat(parts))
            run_log.metrics({"shard_trajectories_per_s": len(shard_rows)
                             / (time.perf_counter() - shard_start)}, step=step)
        bar.close()
        index = writer.finish()
        wall = time.perf_counter() - start
        store_bytes = sum((paths.TRAJECTORIES / s["file"]).stat().st_size for s in index["shards"])
        summary = {"trajectories": len(rows), "computed": todo, "shards": writer.num_shards,
                   "shards_reused": reused, "wall_s": wall,
                   "trajectories_per_s": todo / wall if todo else 0.0,
                   "store_mb": store_bytes / 2**20, "bytes_per_trajectory": store_bytes / len(rows)}
        run_log.metrics(summary)
        run_log.artifact(paths.TRAJECTORIES / "index.json")
    print(f"trajectories: {todo} solved in {wall:.1f} s ({summary['trajectories_per_s']:.2f} traj/s), "
          f"{reused} shards reused, {store_bytes / 2**20:.1f} MB -> {paths.TRAJECTORIES}")
