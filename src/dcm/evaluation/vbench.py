"""The real VBench (pip ``vbench`` 0.1.5) as an evaluation backend, run in its own virtual environment.

vbench pins numpy<2 and transformers 4.33, so it cannot share dcm's environment: ``dcm vbench setup``
creates ``evaluation.vbench.venv`` from the pinned ``vbench-requirements.txt`` beside this module, and
``evaluate`` (``evaluation.backend: vbench``) runs it as a subprocess on ``samples/<method>/*.mp4``:

    <venv>/bin/python -m torch.distributed.run --standalone --nproc_per_node N -m vbench.launch.evaluate
        --videos_path <staged mp4s> --dimension d1 d2 … --mode custom_input --prompt_file prompts.json
        --output_path <out> --load_ckpt_from_local True

(the entry point ``vbench evaluate`` builds the same command) where CUDA is available.  Without it that
launcher cannot start (it opens an NCCL process group and hard-codes ``torch.device("cuda")``), so the
same flags go to ``vbench_cpu.py`` beside this module instead, run by the venv's interpreter
(``<venv>/bin/python -I vbench_cpu.py …``): the launcher's ``main`` in one process with device cpu, through
vbench's Python API, writing the same results file; everything else (staging, weights check, parsing)
is shared.  Of the 16 dimensions only temporal_flickering needs no weights (it is a mean absolute
frame difference); it is the one scored on the CPU in the tests.  ``--load_ckpt_from_local`` is an
argparse ``type=bool``: any string, "False" included, reads as True, so it is passed as "True" or not
at all.  Weights are read from ``evaluation.vbench.weights_dir`` (vbench's ``VBENCH_CACHE_DIR``) with
the hub offline; every file the chosen dimensions need is checked before any work, because vbench
itself would try to download a missing one.

Modes.  ``custom_input`` scores our own prompts (from a prompt file); vbench refuses the six
dimensions that need its prompt metadata there (object_class, multiple_objects, scene,
appearance_style, color, spatial_relationship), so Semantic is then the weighted mean of the semantic
dimensions that were scored (the metrics name the missing ones).  ``standard`` is the 946-prompt suite:
the sampled rows are staged as ``{prompt}-{k}.mp4`` and all 16 dimensions can be scored.
``run_vbench`` scores any dimensions; ``evaluate`` (Total) needs at least one of each group, and every
semantic dimension needs weights.

vbench writes ``{dimension: [mean, [{"video_path", "video_results", …}, …]]}``; Quality, Semantic and
Total are not in the package and are computed here with ``scoring.aggregate`` (METHODS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dcm.config import ConfigError
from dcm.evaluation.scoring import VBENCH, Dimension, aggregate, bootstrap
from dcm.evaluation.vbench_suite import VIDEOS_PER_PROMPT

REQUIREMENTS = Path(__file__).with_name("vbench-requirements.txt")
CPU_RUNNER = Path(__file__).with_name("vbench_cpu.py")  # runs in the venv, never imported by dcm
STAMP_FILE = "dcm-vbench.json"
RESULTS_GLOB = "*_eval_results.json"

_VICLIP = ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz")
_GRIT = ("grit_model/grit_b_densecap_objectdet.pth",)
# What each dimension reads under VBENCH_CACHE_DIR in local mode (vbench 0.1.5, utils.init_submodules
# and the dimension modules); a missing file would make vbench download it.
WEIGHTS: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main/hubconf.py",
                            "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": _GRIT,
    "multiple_objects": _GRIT,
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "color": _GRIT,
    "spatial_relationship": _GRIT,
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
    "temporal_style": _VICLIP,
    "overall_consistency": _VICLIP,
}
# vbench's check_dimension_requires_extra_info: these need the standard suite's prompt metadata.
CUSTOM_UNSUPPORTED = frozenset({"object_class", "multiple_objects", "scene", "appearance_style", "color",
                                "spatial_relationship"})
MODES = {"custom_input": "custom_input", "standard": "vbench_standard"}  # ours → vbench's --mode


# ----------------------------------------------------------------------------------- environment


def python_of(venv: str | os.PathLike) -> Path:
    return Path(venv) / "bin" / "python"


def setup_commands(venv: str | os.PathLike, requirements: str | os.PathLike = REQUIREMENTS,
                   python: str = sys.executable) -> list[list[str]]:
    """The commands ``dcm vbench setup`` runs: a fresh venv, then pip on the pinned requirements."""
    return [[python, "-m", "venv", str(venv)],
            [str(python_of(venv)), "-m", "pip", "install", "--upgrade", "pip"],
            [str(python_of(venv)), "-m", "pip", "install", "-r", str(Path(requirements).resolve())]]


def create_env(venv: str | os.PathLike, requirements: str | os.PathLike = REQUIREMENTS,
               python: str = sys.executable, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
               upgrade_pip: bool = True, force: bool = False) -> Path:
    """Create (or update) the VBench venv from ``requirements``; stamps what it was built from.  A venv
    already built from these requirements (``env_is_current``) is kept as it is unless ``force``."""
    requirements = Path(requirements)
    if not requirements.is_file():
        raise ConfigError("vbench setup --requirements", str(requirements), "an existing requirements file")
    if not force and env_is_current(venv, requirements):
        print(f"{venv} was built from {requirements} as it is now: nothing to install (--force rebuilds it)",
              flush=True)
        return python_of(venv)
    commands = setup_commands(venv, requirements, python)
    if not upgrade_pip:
        commands = [commands[0], commands[2]]
    for cmd in commands:
        print("+", " ".join(cmd), flush=True)
        run(cmd, check=True)
    stamp = {"requirements": str(requirements.resolve()),
             "requirements_sha256": requirements_sha256(requirements), "python": python}
    (Path(venv) / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    return python_of(venv)


def requirements_sha256(requirements: str | os.PathLike = REQUIREMENTS) -> str:
    return hashlib.sha256(Path(requirements).read_bytes()).hexdigest()


def env_is_current(venv: str | os.PathLike, requirements: str | os.PathLike = REQUIREMENTS) -> bool:
    """Whether ``venv`` was built (by ``create_env``) from ``requirements`` as it is now (its stamp's
    hash)."""
    stamp = Path(venv) / STAMP_FILE
    if not (python_of(venv).exists() and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("requirements_sha256") == requirements_sha256(requirements)
    except (ValueError, AttributeError):
        return False


def check_env(venv: str | os.PathLike) -> Path:
    py = python_of(venv)
    if not py.exists():
        raise ConfigError("evaluation.vbench.venv", str(venv),
                          f"a VBench virtual environment: create it with `dcm vbench setup --venv {venv}`")
    return py


# ----------------------------------------------------------------------------------- dimensions


def dimensions_for(mode: str, requested: Sequence[str] = ()) -> list[str]:
    """The dimensions to score: ``requested`` (checked) or every dimension the mode supports."""
    if mode not in MODES:
        raise ConfigError("evaluation.vbench.mode", mode, f"one of {list(MODES)}")
    supported = [d for d in VBENCH if mode == "standard" or d not in CUSTOM_UNSUPPORTED]
    if not requested:
        return supported
    for d in requested:
        if d not in VBENCH:
            raise ConfigError("evaluation.vbench.dimensions", d, f"a VBench dimension: one of {list(VBENCH)}")
        if d not in supported:
            raise ConfigError("evaluation.vbench.dimensions", d,
                              f"not scorable in mode {mode!r} (vbench needs its prompt suite for "
                              f"{sorted(CUSTOM_UNSUPPORTED)}): use mode 'standard' or one of {supported}")
    return list(dict.fromkeys(requested))


def missing_weights(weights_dir: str | os.PathLike, dimensions: Sequence[str]) -> dict[str, list[str]]:
    """{dimension: [missing files relative to weights_dir]} for the dimensions that lack any."""
    root = Path(weights_dir)
    out = {}
    for d in dimensions:
        missing = [f for f in WEIGHTS[d] if not (root / f).is_file()]
        if missing:
            out[d] = missing
    return out


def check_weights(weights_dir: str | os.PathLike | None, dimensions: Sequence[str]) -> Path:
    """Fail, listing every missing file, unless the weights of all ``dimensions`` are in ``weights_dir``."""
    if not weights_dir:
        raise ConfigError("evaluation.vbench.weights_dir", weights_dir,
                          "a local directory holding VBench's pretrained weights (its VBENCH_CACHE_DIR "
                          "layout)")
    root = Path(os.path.expanduser(str(weights_dir)))
    missing = missing_weights(root, dimensions)
    if missing:
        files = sorted({f for fs in missing.values() for f in fs})
        lines = "\n".join(f"  {root / f}  (for {', '.join(d for d in missing if f in missing[d])})"
                          for f in files)
        raise ConfigError("evaluation.vbench.weights_dir", str(weights_dir),
                          f"a directory with every weight file the chosen dimensions need; missing:\n{lines}")
    return root


# ----------------------------------------------------------------------------------- invocation


def cuda_available() -> bool:
    """Whether vbench's launcher can start here (it needs CUDA and NCCL): else the CPU runner is used."""
    import torch

    return torch.cuda.is_available()


def command(venv: str | os.PathLike, videos_dir: str | os.PathLike, output_dir: str | os.PathLike,
            dimensions: Sequence[str], mode: str = "custom_input",
            prompt_file: str | os.PathLike | None = None, ngpus: int = 1, device: str = "cuda") -> list[str]:
    """The vbench command line: on ``cuda`` what ``vbench evaluate`` launches (without its shell string),
    on ``cpu`` the same flags to ``vbench_cpu.py`` in one process (``ngpus`` unused)."""
    if device == "cuda":
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ngpus),
                  "-m", "vbench.launch.evaluate"]
    elif device == "cpu":
        launch = ["-I", str(CPU_RUNNER)]  # -I: the runner's folder (this vbench.py) stays off sys.path
    else:
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    cmd = [str(python_of(venv)), *launch, "--videos_path", str(videos_dir), "--dimension", *dimensions,
           "--mode", MODES[mode], "--output_path", str(output_dir),
           "--load_ckpt_from_local", "True"]  # type=bool: never pass "False", it would read as True
    if prompt_file is not None:
        if mode != "custom_input":
            raise ValueError("a prompt file is only read in custom_input mode")
        cmd += ["--prompt_file", str(prompt_file)]
    return cmd


def environment(weights_dir: str | os.PathLike, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: weights from ``weights_dir``, every hub offline."""
    root = str(Path(weights_dir).resolve())
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)  # dcm's environment must not leak into vbench's
    env.pop("VIRTUAL_ENV", None)
    env.update({"VBENCH_CACHE_DIR": root, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HOME": str(Path(root) / "huggingface"), "TORCH_HOME": str(Path(root) / "torch")})
    return env


def _row_index(mp4: Path) -> int:
    match = re.match(r"(\d+)_", mp4.name)
    if not match:
        raise ValueError(f"{mp4}: sample file names start with the row index (NNN_<prompt id>_<seed>.mp4)")
    return int(match.group(1))


def stage_videos(rows: Sequence[dict], samples_dir: str | os.PathLike, work_dir: str | os.PathLike,
                 mode: str) -> tuple[Path, Path | None, dict[str, int]]:
    """Link the sampled mp4s into ``work_dir/videos`` under the names vbench reads.

    custom_input: original names + a prompt file {absolute path: prompt}; standard: ``{prompt}-{k}.mp4``.
    Returns (videos dir, prompt file or None, {absolute staged path: row index}).
    """
    samples_dir, videos = Path(samples_dir).resolve(), Path(work_dir).resolve() / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    mp4s = sorted(samples_dir.glob("*.mp4"), key=_row_index)
    if [_row_index(p) for p in mp4s] != list(range(len(rows))):
        raise ValueError(f"{samples_dir}: expected one mp4 per row 0..{len(rows) - 1}, "
                         f"found {[p.name for p in mp4s][:5]}… ({len(mp4s)} files): re-run `dcm run sample`")
    index, prompts, seen = {}, {}, {}
    for i, (row, mp4) in enumerate(zip(rows, mp4s)):
        if mode == "standard":
            k = seen[row["prompt"]] = seen.get(row["prompt"], -1) + 1
            if k >= VIDEOS_PER_PROMPT:
                raise ValueError(f"prompt {row['prompt']!r} has more than {VIDEOS_PER_PROMPT} videos; "
                                 "VBench's standard suite reads {prompt}-0 … {prompt}-4")
            name = f"{row['prompt']}-{k}.mp4"
        else:
            name = mp4.name
        link = videos / name
        link.symlink_to(mp4)
        index[str(link)] = i
        prompts[str(link)] = row["prompt"]
    if mode == "standard":
        wrong = {p: k + 1 for p, k in seen.items() if k + 1 != VIDEOS_PER_PROMPT}
        shown = dict(list(wrong.items())[:5])
        if wrong:
            raise ValueError(f"VBench's standard suite reads {VIDEOS_PER_PROMPT} videos per prompt "
                             f"({{prompt}}-0 … {{prompt}}-{VIDEOS_PER_PROMPT - 1}); these prompts have "
                             f"another count: {shown}{' …' if len(wrong) > 5 else ''}")
    prompt_file = None
    if mode == "custom_input":
        prompt_file = Path(work_dir).resolve() / "prompts.json"
        prompt_file.write_text(json.dumps(prompts, indent=1))
    return videos, prompt_file, index


# ----------------------------------------------------------------------------------- results


def parse_results(path: str | os.PathLike) -> dict[str, tuple[float, dict[str, float]]]:
    """vbench's ``*_eval_results.json`` → {dimension: (mean score, {video path: score})}."""
    raw = json.loads(Path(path).read_text())
    out = {}
    for dim, value in raw.items():
        if dim not in VBENCH:
            raise ValueError(f"{path}: unknown VBench dimension {dim!r}")
        if not (isinstance(value, list) and len(value) == 2):
            raise ValueError(f"{path}: {dim} is not [mean, per-video results] as vbench writes it")
        mean, per_video = value
        videos = {}
        for entry in per_video:
            score = entry["video_results"]
            if isinstance(score, bool) or score is None:  # human_action: correct or not
                score = float(bool(score))
            videos[str(entry["video_path"])] = float(score)
        out[dim] = (float(mean), videos)
    return out


def find_results(output_dir: str | os.PathLike) -> Path:
    found = sorted(Path(output_dir).glob(RESULTS_GLOB))
    if len(found) != 1:
        raise FileNotFoundError(f"{output_dir}: expected one vbench results file ({RESULTS_GLOB}), found "
                                f"{[f.name for f in found]}")
    return found[0]


def table_for(dimensions: Sequence[str]) -> dict[str, Dimension]:
    """VBench's table restricted to the scored dimensions (both groups must keep at least one)."""
    table = {d: VBENCH[d] for d in dimensions}
    for group in ("quality", "semantic"):
        if not any(dim.group == group for dim in table.values()):
            raise ConfigError("evaluation.vbench.dimensions", list(dimensions),
                              f"at least one {group} dimension (Total needs Quality and Semantic)")
    return table


def summarise(dimension_means: Mapping[str, float]) -> dict:
    """Quality / Semantic / Total from per-dimension means, and which of VBench's 16 were not scored."""
    table = table_for(list(dimension_means))
    return {**aggregate(dimension_means, table),
            "dimensions_not_scored": [d for d in VBENCH if d not in table]}


# ----------------------------------------------------------------------------------- the stage's work


def run_vbench(cfg, rows: Sequence[dict], samples_dir: str | os.PathLike, work_dir: str | os.PathLike,
               run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
               device: str | None = None) -> tuple[dict, list[dict]]:
    """Score one method's samples: (per-dimension means, per-row {dimension: score}), weights checked first.

    ``device``: ``cuda`` (vbench's launcher on ``cfg.ngpus`` GPUs) or ``cpu`` (``vbench_cpu.py``, one
    process); by default ``cuda`` where CUDA is available.
    """
    dimensions = dimensions_for(cfg.mode, cfg.dimensions)
    weights = check_weights(cfg.weights_dir, dimensions)
    check_env(os.path.expanduser(cfg.venv))
    videos, prompt_file, index = stage_videos(rows, samples_dir, work_dir, cfg.mode)
    out = Path(work_dir).resolve() / "results"
    venv = Path(os.path.expanduser(cfg.venv)).absolute()  # vbench runs in work_dir: no relative paths
    device = device or ("cuda" if cuda_available() else "cpu")
    cmd = command(venv, videos, out, dimensions, cfg.mode, prompt_file, cfg.ngpus, device)
    if device == "cpu":
        print("vbench on the CPU: one process through its Python API (vbench_cpu.py; its launcher needs "
              "CUDA)", flush=True)
    print("+", " ".join(cmd), flush=True)
    result = run(cmd, env=environment(weights), cwd=str(work_dir))
    if result.returncode != 0:
        raise RuntimeError(f"vbench exited with status {result.returncode} (command: {' '.join(cmd)})")
    parsed = parse_results(find_results(out))
    means = {d: parsed[d][0] for d in dimensions}
    per_row: list[dict] = [{} for _ in rows]
    for d in dimensions:
        for path, score in parsed[d][1].items():
            key = str(Path(path)) if str(Path(path)) in index else os.path.abspath(path)
            if key in index:
                per_row[index[key]][d] = score
    return means, per_row


def evaluate(params, method: str, teacher_metrics: dict | None = None,
             run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
             device: str | None = None) -> dict:
    """metrics/<method>.json content, in the shapes-bench schema, from a real vbench run."""
    from safetensors.torch import load_file

    from dcm import io, paths
    from dcm.evaluation.metrics import label
    from dcm.evaluation.shapes_bench import psnr

    cfg = params.evaluation.vbench
    table_for(dimensions_for(cfg.mode, cfg.dimensions))  # Total needs both groups: fail before any work
    record = io.read_json(paths.samples(method) / "samples.json")
    rows = record["rows"]
    suite = io.read_json(paths.PROMPTS).get("suite") if paths.PROMPTS.is_file() else None
    with tempfile.TemporaryDirectory(prefix=f"vbench-{method}-") as work:
        means, per_row = run_vbench(cfg, rows, paths.samples(method), work, run, device)
    summary = summarise(means)
    table = table_for(list(means))
    complete = [i for i, r in enumerate(per_row) if set(r) == set(table)]
    totals = np.array([aggregate(per_row[i], table)["total"] for i in complete])
    n, seed = params.evaluation.bootstrap, params.seed
    diff = None
    teacher_rows = (teacher_metrics or {}).get("per_row")
    if method == "teacher":
        diff = {"mean": 0.0, "ci95": [0.0, 0.0]}
    elif teacher_rows and teacher_metrics.get("backend") == "vbench" and len(teacher_rows) == len(rows):
        teacher_total = {i: r.get("total") for i, r in enumerate(teacher_rows)}
        paired = [(t, teacher_total[i]) for i, t in zip(complete, totals) if teacher_total.get(i) is not None]
        if paired:
            d = np.array([a - b for a, b in paired])
            diff = {"mean": float(d.mean()), "ci95": list(bootstrap(d, np.mean, n, seed))}
    videos = load_file(str(paths.samples(method) / "videos.safetensors"))["videos"].float()
    teacher_videos = load_file(str(paths.samples("teacher") / "videos.safetensors"))["videos"].float()
    psnrs = [psnr(v, t) for v, t in zip(videos, teacher_videos)]
    row_total = dict(zip(complete, totals.tolist()))
    return {
        "method": method, **label(params, method), "backend": "vbench", "vbench_mode": cfg.mode,
        "vbench_suite": suite,
        "steps": record["num_steps"],
        "nfe": record["nfe"], "latency_s": record["seconds_per_video"], "dimensions": means,
        "quality": summary["quality"], "semantic": summary["semantic"], "total": summary["total"],
        "dimensions_not_scored": summary["dimensions_not_scored"],
        "total_ci95": list(bootstrap(totals, np.mean, n, seed)) if len(totals) > 1 else None,
        "diff_vs_teacher": {"total": diff} if diff else {},
        "psnr_vs_teacher": float(np.mean(psnrs)) if psnrs and np.all(np.isfinite(psnrs)) else None,
        "per_row": [{"prompt": r["prompt"], "seed": r["seed"], "total": row_total.get(i), **per_row[i]}
                    for i, r in enumerate(rows)],
    }
