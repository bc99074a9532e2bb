"""The pre-flight check: everything the DAG of these params will need, checked at once before any work
(``dcm check``, and the first thing the DAG's first stage, ``prepare``, does).

- weights: a real family's folder holds the pipeline's components, ``model_index.json`` names the
  family's diffusers classes, every component's config parses and names the class the index does;
- data: a real family's prompt file, video set and evaluation prompts parse, with their counts (every bad
  row listed); the online source and DMD2's GAN classifier have the videos they read; no row of the DAG
  needs the shapes world on a real family (MCM's image discriminator);
- evaluation: with ``evaluation.backend: vbench``, its venv and every weight file of the chosen dimensions;
- disk: free space at the project against the bytes the DAG's caches, checkpoints and samples will take
  (the estimate below, with the plan's per-stage checkpoint bytes, ``dcm.plan.memory.disk``), less what
  the outputs already hold (a resumed run rewrites those).

A problem names the key, the value and what is allowed; ``problems`` returns all of them, ``require``
raises one ``PreflightError`` listing every one.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcm.config import METHOD_KINDS, ConfigError, Params, vae_spatial_compression

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# the diffusers classes each family's folder holds (the adapters' own: dcm.backbones.<family>)
EXPECTED_CLASSES = {
    "wan": {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan"},
    "hunyuan": {"transformer": "HunyuanVideoTransformer3DModel", "vae": "AutoencoderKLHunyuanVideo"},
    "hunyuan15": {"transformer": "HunyuanVideo15Transformer3DModel", "vae": "AutoencoderKLHunyuanVideo15",
                  "guider": "ClassifierFreeGuidance"},
    "cogvideox": {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX"},
}
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2", "scheduler", "guider")  # no weights, not models


@dataclass(frozen=True)
class Problem:
    key: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.allowed}"


class PreflightError(ConfigError):
    """Every problem of the pre-flight check, one a line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  {i + 1}. {p}" for i, p in enumerate(problems))
        super().__init__("pre-flight", f"{len(problems)} problem(s)",
                         f"nothing ran; every problem the DAG of these params would meet:\n{lines}")


def _caught(check) -> list[Problem]:
    """``check()``'s ConfigError as a problem (none: [])."""
    try:
        check()
    except ConfigError as e:
        return [Problem(e.key, e.value, e.allowed)]
    return []


# ----------------------------------------------------------------------------------- the weights


def weights(params: Params) -> list[Problem]:
    """A real family's folder: components, model_index.json's classes, each component's config."""
    bb = params.backbone
    if bb.family == "toy":
        return []
    from dcm.backbones import adapter_class

    cls = adapter_class(bb.family)
    found = _caught(lambda: cls.check_folder(bb.path))
    if found:
        return found
    folder = Path(os.path.expanduser(bb.path)).resolve()
    key, out = "backbone.path", []
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except ValueError as e:
        return [Problem(key, str(folder), f"a folder whose model_index.json parses ({e})")]
    for name in cls.components:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            out.append(Problem(f"{key} model_index.json {name}", entry, "a [library, class] pair"))
            continue
        library, class_name = entry
        wanted = EXPECTED_CLASSES[bb.family].get(name)
        if wanted and class_name != wanted:
            out.append(Problem(f"{key} model_index.json {name}", entry,
                               f"class {wanted} for family {bb.family!r}"))
        try:
            getattr(importlib.import_module(library), class_name)
        except (ImportError, AttributeError):
            out.append(Problem(f"{key} model_index.json {name}", entry,
                               f"a class this environment has ({library}.{class_name} is not importable)"))
        if name in TOKENIZER_PARTS:
            continue
        config = folder / name / "config.json"
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            out.append(Problem(f"{key} {name}/config.json", str(config), f"a config that parses ({e})"))
            continue
        declared = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        if declared is not None and declared != class_name:
            out.append(Problem(f"{key} {name}/config.json", declared,
                               f"the class model_index.json names ({class_name})"))
    return out


# ----------------------------------------------------------------------------------- the data


@dataclass
class Counts:
    prompts: int = 0
    videos: int = 0
    eval_prompts: int = 0


def data(params: Params, counts: Counts) -> list[Problem]:
    """A real family's files parse (every bad row listed), and what the DAG's rows read is there."""
    if params.backbone.family == "toy":
        return []
    from dcm.data import dataset

    d, out = params.data, []

    def read(key: str, value: str | None, reader, attr: str) -> None:
        try:
            setattr(counts, attr, len(reader(key, value)))
        except ConfigError as e:
            out.append(Problem(e.key, e.value, e.allowed))

    if not d.prompts and not d.videos:
        out.append(Problem("data.prompts", None, f"a local prompt file (or data.videos, whose captions are "
                           f"then the prompts) for family {params.backbone.family!r}: the shapes world's "
                           "captions belong to the toy teacher"))
    if d.prompts:
        read("data.prompts", d.prompts, dataset.read_prompts, "prompts")
    if d.videos:
        read("data.videos", d.videos, dataset.read_videos, "videos")
        counts.prompts = counts.prompts or counts.videos
    if params.evaluation.prompts is None:
        out.append(Problem("evaluation.prompts", None, "a local prompt file of the evaluation prompts for "
                           f"family {params.backbone.family!r} (each sampled evaluation.videos_per_prompt "
                           "times)"))
    else:
        read("evaluation.prompts", params.evaluation.prompts, dataset.read_prompts, "eval_prompts")
    online = []
    for method, stage in _dag_runs(params):
        m, kind = params.methods[method], METHOD_KINDS[params.methods[method].kind]
        if kind.needs_shapes_world:
            out.append(Problem(f"methods.{method}.kind", m.kind, f"not on family {params.backbone.family!r}: "
                               f"it trains on the shapes world's {kind.needs_shapes_world} (no real set is "
                               "wired); drop the row or make it an ablation row"))
        elif (kind.source or params.training.source) == "online" and not d.videos:
            online.append(f"{stage} --method {method}")
        if m.dmd2 is not None and m.dmd2.gan_weight > 0 and not d.videos:
            out.append(Problem(f"methods.{method}.dmd2.gan_weight", m.dmd2.gan_weight,
                               "0 without data.videos: DMD2's classifier scores real video latents"))
    if online:
        out.append(Problem("data.videos", None, f"a captioned video set: {', '.join(online)} train on "
                           "training.source online, which noises real video latents (or set training.source: "
                           "cached)"))
    return out


def _dag_runs(params: Params) -> Iterator[tuple[str, str]]:
    """(method, training stage) of every training run in the DAG of these params."""
    from dcm.pipeline.table import STAGES

    for stage in STAGES.values():
        if stage.trains and stage.in_dag(params):
            for method in stage.dag_methods(params):
                yield method, stage.name


# ----------------------------------------------------------------------------------- evaluation


def evaluation(params: Params) -> list[Problem]:
    """The VBench backend's venv and weights, when it scores the DAG's samples; in standard mode, its prompt
    suite (read from the venv's vbench package) and the subset asked of it."""
    cfg = params.evaluation
    if cfg.backend != "vbench":
        return []
    from dcm.evaluation import vbench, vbench_suite

    out = _caught(lambda: vbench.check_env(os.path.expanduser(cfg.vbench.venv)))
    if not out:
        out += _caught(lambda: vbench_suite.standard_rows(params))
    dims: list[str] = []
    out += _caught(lambda: dims.extend(vbench.dimensions_for(cfg.vbench.mode, cfg.vbench.dimensions)))
    if dims or not out:
        out += _caught(lambda: vbench.check_weights(cfg.vbench.weights_dir, dims))
    return out


# ----------------------------------------------------------------------------------- disk


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _latent_shape(params: Params) -> tuple[int, int, int, int]:
    """(C, T, H, W) of one video's latents: the toy's codec, or the folder's VAE config."""
    bb = params.backbone
    if bb.family == "toy":
        f, w = bb.toy.codec_factor, params.world
        return 3 * f * f, w.frames, w.size // f, w.size // f
    cfg = _read_json(Path(os.path.expanduser(bb.path)) / "vae" / "config.json")
    channels = cfg.get("z_dim") or cfg.get("latent_channels") or 16
    temporal = cfg.get("scale_factor_temporal") or cfg.get("temporal_compression_ratio") or 4
    spatial = vae_spatial_compression(bb.family, bb.path)
    real = bb.real
    frames = (real.frames - 1) // int(temporal) + 1
    return int(channels), frames, real.height // int(spatial), real.width // int(spatial)


def _transformer_parameters(params: Params) -> int:
    """Parameters of the teacher transformer: from a real folder's safetensors headers (nothing else is
    read); 0 for the toy, whose checkpoints are a few MB."""
    if params.backbone.family == "toy":
        return 0
    from safetensors import safe_open

    total, folder = 0, Path(os.path.expanduser(params.backbone.path)) / "transformer"
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _text_bytes(params: Params) -> int:
    """Bytes of one prompt's stored embedding (hidden states; pooled and masks are small beside them)."""
    bb = params.backbone
    folder = Path(os.path.expanduser(bb.path))
    cfg = _read_json(folder / "text_encoder" / "config.json")
    width = cfg.get("d_model") or cfg.get("hidden_size") or 4096
    from dcm.backbones import adapter_class

    length = bb.real.max_sequence_length or adapter_class(bb.family).default_max_sequence_length
    return int(width) * int(length) * DTYPE_BYTES[bb.real.text_dtype]


def planned_bytes(params: Params, counts: Counts) -> dict[str, int]:
    """Bytes the DAG of these params writes, by output: the preprocessed stores, the trajectory cache (when
    a run reads it), each training run's checkpoint (the plan's per-stage bytes) and each method's samples."""
    from dcm.data.trajectories import bytes_per_trajectory
    from dcm.pipeline.table import STAGES
    from dcm.plan.memory import Structure, Workload, disk

    c, t, h, w = latent = _latent_shape(params)
    latent_bytes = c * t * h * w * 4
    out: dict[str, int] = {}
    if params.backbone.family != "toy":
        prompts = counts.prompts + counts.eval_prompts + counts.videos + 2  # + negative and empty prompts
        out["data/preprocessed (text embeddings, video latents)"] = (prompts * _text_bytes(params)
                                                                     + counts.videos * latent_bytes)
    runs = list(_dag_runs(params))
    cached = [m for m, s in runs if METHOD_KINDS[params.methods[m].kind].source is None
              and params.training.source == "cached"]
    if cached:
        out["trajectories"] = params.trajectories.num_trajectories * bytes_per_trajectory(
            latent, params.grid.steps, params.trajectories.dtype)
    total = _transformer_parameters(params)
    work = Workload(params.backbone.family, {}, latent, gan=True)
    per_stage = disk(work, Structure(seme={}, dete={}, total=total, block=(0, 0), dete_block=(0, 0)))
    for method, stage in runs:
        fake_score = params.methods[method].dmd2 is not None  # a second transformer trains beside it
        name = {"train_seme": "train_seme (export + resume)", "train_dete": "train_dete (export + resume)",
                "train_baseline": "train_baseline dmd2 (export + resume)" if fake_score
                else "train_baseline (export + resume, with EMA)"}[stage]
        out[f"checkpoints/{method} ({stage})"] = per_stage[name]
    rows = (counts.eval_prompts * params.evaluation.videos_per_prompt if params.backbone.family != "toy"
            else (params.world.eval_prompts + params.world.eval_open_prompts) * params.world.eval_seeds)
    frames, height, width = ((params.backbone.real.frames, params.backbone.real.height,
                              params.backbone.real.width) if params.backbone.family != "toy"
                             else (params.world.frames, params.world.size, params.world.size))
    per_video = latent_bytes + 3 * frames * height * width * 2  # latents (fp32) + decoded video (fp16)
    for method in STAGES["sample"].dag_methods(params):
        out[f"samples/{method}"] = rows * per_video
    return out


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def disk_space(params: Params, counts: Counts) -> list[Problem]:
    planned = planned_bytes(params, counts)
    existing = sum(_folder_bytes(Path(out)) for out in {name.split(" ")[0] for name in planned})
    need = max(0, sum(planned.values()) - existing)
    free = shutil.disk_usage(Path.cwd()).free
    if need <= free:
        return []
    largest = sorted(planned.items(), key=lambda kv: -kv[1])[:4]
    detail = ", ".join(f"{k} {v / GiB:.1f}" for k, v in largest)
    return [Problem("disk", f"{free / GiB:.1f} GiB free at {Path.cwd()}",
                    f">= {need / GiB:.1f} GiB for what the DAG writes (largest, GiB: {detail}): free space, "
                    "or fewer trajectories, evaluation rows or methods")]


# ----------------------------------------------------------------------------------- entry points


def problems(params: Params) -> list[Problem]:
    """Every problem the DAG of these params would meet, in the order above (none: [])."""
    counts = Counts()
    out = weights(params) + data(params, counts) + evaluation(params)
    try:  # the estimate reads the folder's configs and the data counts: partial when those failed above
        out += disk_space(params, counts)
    except (OSError, ValueError, KeyError, TypeError):
        if not out:
            raise
    return out


def require(params: Params) -> None:
    """Raise one PreflightError listing every problem (what ``prepare`` runs first)."""
    found = problems(params)
    if found:
        raise PreflightError(found)


def main(params: Params) -> int:
    """``dcm check``: 0 and a summary when the DAG can run, 2 and every problem otherwise."""
    found = problems(params)
    if found:
        print(PreflightError(found))
        return 2
    counts = Counts()
    data(params, counts)
    planned = planned_bytes(params, counts)
    data_line = ("the shapes world's own splits" if params.backbone.family == "toy" else
                 f"{counts.prompts} training prompts, {counts.videos} videos, "
                 f"{counts.eval_prompts} evaluation prompts")
    print(f"pre-flight: ok ({params.backbone.family}; {data_line}; the DAG writes about "
          f"{sum(planned.values()) / GiB:.1f} GiB, {shutil.disk_usage(Path.cwd()).free / GiB:.1f} GiB free)")
    return 0

