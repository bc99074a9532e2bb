"""``sample --method M``: the shared evaluation (prompt, seed) rows, sampled with the method's schedule.

Writes ``samples/<M>/``: one mp4 per row, ``latents.safetensors``, ``videos.safetensors`` (decoded,
float16) and ``samples.json`` (schedule, NFE, seconds per video) — the same rows and noise for every
method, so every comparison downstream is paired.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from dcm import io, paths, tracking
from dcm.backbones import load_teacher
from dcm.config import Params
from dcm.methods import generate
from dcm.video import write_mp4


def run(params: Params, method: str) -> None:
    rows = io.read_json(paths.PROMPTS)["eval"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher(params, paths.TEACHER).to(device)
    with tracking.stage_run(params, "sample", method) as run_, io.atomic_dir(paths.samples(method)) as out:
        latents_t, videos_t, seconds_per_video, steps, cost = generate(params, method, backbone, rows)
        for i, (row, video) in enumerate(zip(rows, videos_t)):
            write_mp4(out / f"{i:03d}_{row['prompt_id']}_{row['seed']}.mp4", video)
        save_file({"latents": latents_t.contiguous()}, str(out / "latents.safetensors"))
        save_file({"videos": videos_t.to(torch.float16).contiguous()}, str(out / "videos.safetensors"))
        record = {"method": method, "kind": params.method(method).kind,
                  "steps": [[s.sigma, s.expert] for s in steps], "num_steps": len(steps),
                  "nfe": cost, "seconds_per_video": seconds_per_video, "rows": rows}
        io.write_json_atomic(out / "samples.json", record)
        run_.metrics({"seconds_per_video": record["seconds_per_video"], "nfe": record["nfe"]})
    print(f"sample[{method}]: {len(rows)} videos, {record['seconds_per_video']:.3f} s/video, "
          f"NFE {record['nfe']} → {paths.samples(method)}")
