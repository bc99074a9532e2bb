"""What the ``preprocess`` stage computes for a real family, once, with the family's own encoders: the text
conditioning of every prompt a later stage asks for and, with a video set, the VAE latents of every clip.
Both are sharded stores under ``data/preprocessed/`` (``dcm.shards``: shard i on rank i mod N, each shard
atomic, resumable shard by shard, index.json written last by rank 0)::

    prompts/          rows {"prompt"}: tensors {j}.hidden and {j}.<extra> of the j-th prompt of the shard
                      (``PipelineBackbone.prompt_tensors``), read back by ``load_prompt_store``
    videos/           rows {"id", "video", "caption", "bytes", "frames"}: tensor "latents" (S, C, T, H, W)
                      float32, the VAE posterior's mode in the transformer's latent space
                      (``backbone.encode_video``), read by the online source (``VideoLatents``)
    preprocess.json   what the stage made, written last (the toy family: nothing, see the stage)

A store's fingerprint covers the recorded teacher folder, the text (or VAE and clip) settings, the shard
size and every row (a video by its path, size and modification time), so a run with other inputs starts
that store over and a killed run recomputes only its unfinished shards.  Batches never span shards, so the
bytes of a shard do not depend on the number of ranks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from dcm import shards
from dcm.backbones.base import Backbone
from dcm.backbones.real import TEXT_BATCH
from dcm.data.dataset import ClipPolicy, VideoRow, read_frames

FORMAT_VERSION = 1


def prompt_list(prompt_sets: dict, captions: Sequence[str], negative_prompt: str) -> list[str]:
    """Every prompt a later stage asks the backbone for, once, in a fixed order: the train rows', the eval
    rows', the videos' captions, the negative prompt (CFG's unconditional input, prompt dropout's empty
    prompt) and the empty prompt."""
    rows = [r["prompt"] for key in ("train", "eval") for r in prompt_sets.get(key, [])]
    return list(dict.fromkeys([*rows, *captions, negative_prompt, ""]))


def teacher_identity(backbone, config_sha256: str) -> dict:
    """The recorded folder and the text settings a prompt's embedding depends on (what
    ``load_prompt_store`` checks)."""
    return {"family": backbone.family, "config_sha256": config_sha256, "text": backbone.text_settings()}


def prompt_header(backbone, config_sha256: str, prompts: Sequence[str], shard_size: int) -> dict:
    teacher = teacher_identity(backbone, config_sha256)
    identity = {"kind": "prompts", "version": FORMAT_VERSION, "teacher": teacher, "prompts": list(prompts),
                "shard_size": shard_size, "text_batch": TEXT_BATCH}
    return {"kind": "prompts", "format_version": FORMAT_VERSION, "teacher": teacher, "count": len(prompts),
            "shard_size": shard_size, "fingerprint": shards.fingerprint(identity)}


def prompt_rows(prompts: Sequence[str]) -> list[dict]:
    return [{"prompt": p} for p in prompts]


def video_rows(rows: Sequence[VideoRow], frames: Sequence[Sequence[int]]) -> list[dict]:
    """The stored rows of a video set: id, path as written, caption, file size and the frames taken."""
    return [{"id": r.id, "video": r.video, "caption": r.caption, "bytes": r.path.stat().st_size,
             "frames": list(f)} for r, f in zip(rows, frames, strict=True)]


def video_header(backbone, config_sha256: str, rows: Sequence[VideoRow], stored: Sequence[dict],
                 policy: ClipPolicy, shard_size: int, batch_size: int, latent_shape: Sequence[int]) -> dict:
    settings = backbone.settings
    teacher = {"family": backbone.family, "config_sha256": config_sha256,
               "vae": {"dtype": settings.vae_dtype, "tiling": settings.vae_tiling,
                       "slicing": settings.vae_slicing}}
    mtimes = [os.stat(r.path).st_mtime_ns for r in rows]
    identity = {"kind": "videos", "version": FORMAT_VERSION, "teacher": teacher,
                "policy": dataclasses.asdict(policy), "rows": list(stored), "mtimes": mtimes,
                "shard_size": shard_size, "batch_size": batch_size}
    return {"kind": "videos", "format_version": FORMAT_VERSION, "teacher": teacher,
            "policy": dataclasses.asdict(policy), "count": len(stored), "shard_size": shard_size,
            "batch_size": batch_size, "latent_shape": [int(d) for d in latent_shape],
            "fingerprint": shards.fingerprint(identity)}


@torch.no_grad()
def video_tensors(backbone: Backbone, rows: Sequence[VideoRow], frames: Sequence[Sequence[int]],
                  policy: ClipPolicy, batch_size: int) -> dict[str, torch.Tensor]:
    """One shard of the video store: every row's clip read, resized and encoded, ``batch_size`` at a time."""
    parts = []
    for start in range(0, len(rows), batch_size):
        clips = torch.stack([policy.resize_frames(read_frames(r.path, f))
                             for r, f in zip(rows[start:start + batch_size], frames[start:start + batch_size],
                                             strict=True)])
        parts.append(backbone.encode_video(clips).float().cpu())
    return {"latents": torch.cat(parts)}


class VideoLatents:
    """The video store, read lazily: ``len``, the captions in row order and ``latents(rows)`` (float32, on
    the CPU), reading only the rows asked for."""

    def __init__(self, root: str | os.PathLike):
        self.store = shards.ShardStore(root, producer="`dcm run preprocess`")
        self.captions = [row["caption"] for row in self.store.rows]
        self.latent_shape = tuple(self.store.index["latent_shape"])
        self._where = [(i, j) for i, shard in enumerate(self.store.shards) for j in range(len(shard["rows"]))]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.store)

    def latents(self, rows: Sequence[int]) -> torch.Tensor:
        out = []
        for row in rows:
            shard, local = self._where[int(row)]
            if shard not in self._handles:
                self._handles[shard] = self.store.open(shard)
            out.append(self._handles[shard].get_slice("latents")[local:local + 1])
        return torch.cat(out).float()

    def __getstate__(self):  # open safetensors handles do not pickle
        return {**self.__dict__, "_handles": {}}

