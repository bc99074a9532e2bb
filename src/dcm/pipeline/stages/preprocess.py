"""``preprocess``: a real family's text embeddings (and, with ``data.videos``, VAE latents), computed once
with the recorded folder's own encoders into ``data/preprocessed/`` (``dcm.data.preprocess``).

Order: the video set is parsed and every video opened (frame counts) before any model loads, and every bad
row (missing or unreadable video, too few frames, empty caption, duplicate id) is reported at once; then
the prompt store and the video store are written shard by shard (shard i on rank i mod N, resumable after
a kill or a requeue), and rank 0 writes ``preprocess.json`` last.  Later stages read these stores and never
load the text encoders (``dcm.backbones.load_teacher``).

The toy family does nothing here: its prompt encoder is part of the trained teacher (models/teacher), so
the stage only writes ``preprocess.json`` saying so, and ``make demo`` is what it was.
"""

from __future__ import annotations

import shutil
import time

import torch
from tqdm import tqdm

from dcm import distributed, io, paths, shards, tracking
from dcm.backbones import load_encoders
from dcm.backbones.real import read_record
from dcm.config import Params
from dcm.data import dataset, preprocess


def run(params: Params) -> None:
    world = distributed.world()
    if params.backbone.family == "toy":
        if world.is_main:
            with io.atomic_dir(paths.PREPROCESSED) as tmp:
                io.write_json_atomic(tmp / paths.PREPROCESS_RECORD.name, {
                    "family": "toy", "prompts": 0, "videos": 0,
                    "note": "nothing to preprocess: the toy's prompt encoder is part of its trained teacher"})
        print("preprocess: toy family, nothing to do (its prompt encoder is part of the teacher)")
        return
    videos, frames = check_videos(params, world)  # every bad row, before any model loads
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_encoders(params, paths.TEACHER, vae=bool(videos)).to(device)
    config_sha256 = read_record(paths.TEACHER)["config_sha256"]
    prompts = preprocess.prompt_list(io.read_json(paths.PROMPTS), [v.caption for v in videos],
                                     params.backbone.real.negative_prompt)
    shard_size, tag = params.data.shard_size, f" [rank {world.rank}/{world.size}]" if world.size > 1 else ""
    with tracking.stage_run(params, "preprocess") as run_log:
        header = preprocess.prompt_header(backbone, config_sha256, prompts, shard_size)
        writer = shards.ShardWriter(paths.PROMPT_STORE, header,
                                    shards.split_rows(preprocess.prompt_rows(prompts), shard_size), world)
        summary = {"prompts": len(prompts), "prompt_shards": writer.num_shards,
                   "prompt_shards_reused": writer.num_shards - len(writer.pending())}
        for i in tqdm(writer.mine(), desc=f"preprocess prompts{tag}", unit="shard", position=world.rank):
            writer.write(i, backbone.prompt_tensors([r["prompt"] for r in writer.shard_rows[i]]))
        writer.finish()
        if videos:
            summary.update(write_videos(params, backbone, config_sha256, videos, frames, world, tag))
        elif world.is_main:
            shutil.rmtree(paths.VIDEO_STORE, ignore_errors=True)  # a video set no longer in the params
        summary["wall_s"] = time.perf_counter() - started
        if world.is_main:
            io.write_json_atomic(paths.PREPROCESS_RECORD, {"family": params.backbone.family, **summary,
                                                           "ranks": world.size})
            run_log.metrics(summary)
            run_log.artifact(paths.PREPROCESS_RECORD)
    distributed.barrier()
    if world.is_main:
        print(f"preprocess: {len(prompts)} prompts, {len(videos)} videos in {summary['wall_s']:.1f} s on "
              f"{world.size} rank(s) -> {paths.PREPROCESSED}")


def check_videos(params: Params, world: distributed.World) -> tuple[list[dataset.VideoRow], list[list[int]]]:
    """The video set's rows and each clip's frames; every bad row reported together (each rank opens its
    share of the videos, every rank raises the same report)."""
    if not params.data.videos:
        return [], []
    rows = dataset.read_videos("data.videos", params.data.videos)
    policy = dataset.ClipPolicy.from_params(params)
    mine = range(world.rank, len(rows), world.size)
    found, problems = {}, []
    for part_frames, part_problems in distributed.gather_objects(dataset.clip_frames(rows, policy, mine)):
        found.update(part_frames)
        problems += part_problems
    if problems:
        raise dataset.DatasetError("data.videos", params.data.videos, [p for _, p in sorted(problems)],
                                   dataset.CLIPS_ALLOWED)
    return rows, [found[k] for k in range(len(rows))]


def write_videos(params: Params, backbone, config_sha256: str, videos: list[dataset.VideoRow],
                 frames: list[list[int]], world: distributed.World, tag: str) -> dict:
    """The video store, shard by shard; its summary."""
    data, policy = params.data, dataset.ClipPolicy.from_params(params)
    stored = preprocess.video_rows(videos, frames)
    header = preprocess.video_header(backbone, config_sha256, videos, stored, policy, data.shard_size,
                                     data.batch_size, backbone.video_latent_shape(params))
    writer = shards.ShardWriter(paths.VIDEO_STORE, header, shards.split_rows(stored, data.shard_size), world)
    reused = writer.num_shards - len(writer.pending())
    bar = tqdm(total=sum(len(writer.shard_rows[i]) for i in writer.mine()), desc=f"preprocess videos{tag}",
               unit="video", position=world.rank)
    for i in writer.mine():
        first = i * data.shard_size
        rows, clip = videos[first:first + len(writer.shard_rows[i])], frames[first:first + data.shard_size]
        writer.write(i, preprocess.video_tensors(backbone, rows, clip, policy, data.batch_size))
        bar.update(len(rows))
    bar.close()
    index = writer.finish()
    return {"videos": len(videos), "video_shards": writer.num_shards, "video_shards_reused": reused,
            "video_store_mb": sum(s["bytes"] for s in index["shards"]) / 2**20}
