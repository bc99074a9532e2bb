"""``sample --method M``: the shared evaluation (prompt, seed) rows, sampled with the method's schedule.

Writes ``samples/<M>/``: one mp4 per row, ``latents.safetensors``, ``videos.safetensors`` (decoded,
float16) and ``samples.json`` (schedule, NFE, seconds per video) — the same rows and noise for every
method, so every comparison downstream is paired.

Data parallel and resumable: the rows are sampled in batches of ``dcm.methods.BATCH``, batch b on rank
b mod N (a row's values do not depend on the rank count); each finished batch is a part file in
``samples/.<M>.parts/`` with the fingerprint of what it depends on (method, schedule, rows, the weights'
files), so a killed or requeued run samples only the missing batches.  Rank 0 then writes
``samples/<M>/`` at once from the parts and removes them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dcm import distributed, io, paths, tracking
from dcm.backbones import load_teacher
from dcm.config import Params
from dcm.methods import BATCH, Sampler
from dcm.video import write_mp4


def parts_dir(method: str) -> Path:
    return paths.SAMPLES / f".{method}.parts"


def fingerprint(params: Params, method: str, rows: list[dict], steps, lcm_end: float = 0.0) -> str:
    """What a part's values depend on: the method's row, its schedule (and where LCM's sampler ends), the
    evaluation rows, the batch size and the weights it samples (their files' names, sizes and modification
    times)."""
    roots = paths.weights_paths(params, method)
    weights = [f for root in roots for f in Path(root).rglob("*") if f.is_file()]
    files = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weights)
    settings = params.to_dict()
    identity = {"method": settings["methods"][method], "grid": settings["grid"], "rows": rows, "batch": BATCH,
                "steps": [[s.sigma, s.expert] for s in steps], "lcm_end": lcm_end, "weights": files}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(part: Path, key: str) -> bool:
    record = part.with_suffix(".json")
    return part.is_file() and record.is_file() and io.read_json(record).get("fingerprint") == key


def run(params: Params, method: str) -> None:
    rows = io.read_json(paths.PROMPTS)["eval"]
    world = distributed.world()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher(params, paths.TEACHER).to(device)
    sampler = Sampler(params, method, backbone)
    key, work = fingerprint(params, method, rows, sampler.steps, sampler.lcm_end), parts_dir(method)
    batches = [rows[b:b + BATCH] for b in range(0, len(rows), BATCH)]
    if world.is_main:
        work.mkdir(parents=True, exist_ok=True)
        for stale in (p for p in work.glob("part-*.json") if io.read_json(p).get("fingerprint") != key):
            stale.unlink()
    distributed.barrier()
    done = [b for b in range(len(batches)) if _done(work / f"part-{b:05d}.safetensors", key)]
    mine = [b for b in range(len(batches)) if b % world.size == world.rank and b not in done]
    if done and world.is_main:
        print(f"sample[{method}]: resuming, {len(done)}/{len(batches)} batches already sampled", flush=True)
    with tracking.stage_run(params, "sample", method) as run_:
        desc = f"sample[{method}]" + (f" [rank {world.rank}/{world.size}]" if world.size > 1 else "")
        for b in tqdm(mine, desc=desc, unit="batch", position=world.rank):
            latents, videos, seconds = sampler.rows(batches[b])
            part = work / f"part-{b:05d}.safetensors"
            save_file({"latents": latents.contiguous(), "videos": videos.contiguous()},
                      str(part.with_name(f".{part.name}.tmp")))
            part.with_name(f".{part.name}.tmp").replace(part)
            io.write_json_atomic(part.with_suffix(".json"), {"fingerprint": key, "rows": len(batches[b]),
                                                             "seconds": seconds})
        distributed.barrier()
        if world.is_main:
            record = _assemble(method, params.method(method).kind, rows, batches, key, sampler)
            run_.metrics({"seconds_per_video": record["seconds_per_video"], "nfe": record["nfe"]})
    distributed.barrier()
    if world.is_main:
        print(f"sample[{method}]: {len(rows)} videos on {world.size} rank(s), "
              f"{record['seconds_per_video']:.3f} s/video, NFE {record['nfe']} → {paths.samples(method)}")


def _assemble(method: str, kind: str, rows: list[dict], batches: list[list[dict]], key: str,
              sampler: Sampler) -> dict:
    """``samples/<M>/`` from every batch's part, in row order, written at once; the parts are removed."""
    work = parts_dir(method)
    missing = [b for b in range(len(batches)) if not _done(work / f"part-{b:05d}.safetensors", key)]
    if missing:
        raise RuntimeError(f"sample[{method}]: batches {missing} have no part in {work}")
    parts = [load_file(str(work / f"part-{b:05d}.safetensors")) for b in range(len(batches))]
    seconds = sum(io.read_json(work / f"part-{b:05d}.json")["seconds"] for b in range(len(batches)))
    latents = torch.cat([p["latents"] for p in parts])
    videos = torch.cat([p["videos"] for p in parts])
    with io.atomic_dir(paths.samples(method)) as out:
        for i, (row, video) in enumerate(zip(rows, videos, strict=True)):
            write_mp4(out / f"{i:03d}_{row['prompt_id']}_{row['seed']}.mp4", video)
        save_file({"latents": latents.contiguous()}, str(out / "latents.safetensors"))
        save_file({"videos": videos.to(torch.float16).contiguous()}, str(out / "videos.safetensors"))
        record = {"method": method, "kind": kind, "steps": [[s.sigma, s.expert] for s in sampler.steps],
                  "num_steps": len(sampler.steps), "nfe": sampler.nfe,
                  "seconds_per_video": seconds / len(rows), "rows": rows}
        io.write_json_atomic(out / "samples.json", record)
    shutil.rmtree(work, ignore_errors=True)
    return record
