"""VBench's own prompt suite as the evaluation rows (``evaluation.vbench.mode: standard``).

The standard protocol samples every prompt of ``VBench_full_info.json`` (946 prompts, each with the
dimensions it serves) ``VIDEOS_PER_PROMPT`` = 5 times and scores ``{prompt}-{k}.mp4``.  The suite is
read from the vbench package installed in the VBench venv (``evaluation.vbench.venv``), never copied
into this repository.  ``evaluation.vbench.subset: N`` takes N prompts instead, balanced over the
dimensions (round robin over VBench's dimension order, each time the next prompt of that dimension
not taken yet), for cheaper runs; every report marks such a run as a subset.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dcm.config import ConfigError
from dcm.evaluation.scoring import VBENCH

SUITE_FILE = "VBench_full_info.json"
VIDEOS_PER_PROMPT = 5  # the standard suite reads {prompt}-0 … {prompt}-4
# where the suite's seeds start: apart from the shapes world's train/eval/validation seed ranges
SEED_BASE = 3_000_000

_FIND = ("import importlib.util, pathlib; spec = importlib.util.find_spec('vbench'); "
         f"print(pathlib.Path(spec.origin).parent / '{SUITE_FILE}' if spec else '')")


def suite_path(venv: str | os.PathLike) -> Path:
    """``VBench_full_info.json`` of the vbench package in ``venv`` (found without importing vbench)."""
    python = Path(os.path.expanduser(str(venv))) / "bin" / "python"
    if not python.exists():
        raise ConfigError("evaluation.vbench.venv", str(venv),
                          f"a VBench virtual environment (its prompt suite is read from its vbench package): "
                          f"create it with `dcm vbench setup --venv {venv}`")
    found = subprocess.run([str(python), "-I", "-c", _FIND], capture_output=True, text=True, timeout=120)
    path = Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None
    if path is None or not path.is_file():
        raise ConfigError("evaluation.vbench.venv", str(venv),
                          f"a venv whose vbench package ships {SUITE_FILE} (found: {path or 'no vbench'})")
    return path


def read_suite(path: str | os.PathLike) -> list[dict]:
    """The suite's entries, each ``{"prompt": …, "dimensions": [...]}``, in the file's order; an entry
    without a prompt or with an unknown dimension is an error naming its position."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("VBench prompt suite", str(path), f"a readable JSON list ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError("VBench prompt suite", str(path), "a non-empty JSON list of prompt entries")
    entries = []
    for i, entry in enumerate(raw):
        prompt = entry.get("prompt_en") if isinstance(entry, dict) else None
        dims = entry.get("dimension") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(dims, list):
            raise ConfigError(f"{path}[{i}]", entry, "an entry with prompt_en (text) and dimension (a list)")
        unknown = [d for d in dims if d not in VBENCH]
        if unknown:
            raise ConfigError(f"{path}[{i}].dimension", unknown, f"VBench dimensions: {list(VBENCH)}")
        entries.append({"prompt": prompt, "dimensions": list(dims)})
    return entries


def balanced_subset(entries: list[dict], count: int) -> list[int]:
    """The positions of ``count`` entries balanced over the dimensions: round robin over VBench's
    dimension order, each turn the first entry of that dimension not taken yet (deterministic; suite
    order within a dimension), sorted."""
    if not 1 <= count <= len(entries):
        raise ConfigError("evaluation.vbench.subset", count,
                          f"between 1 and the suite's {len(entries)} prompts")
    taken: set[int] = set()
    by_dimension = {d: [i for i, e in enumerate(entries) if d in e["dimensions"]] for d in VBENCH}
    while len(taken) < count:
        progressed = False
        for d in VBENCH:
            nxt = next((i for i in by_dimension[d] if i not in taken), None)
            if nxt is not None and len(taken) < count:
                taken.add(nxt)
                progressed = True
        if not progressed:  # entries that list no dimension: in suite order
            taken.update([i for i in range(len(entries)) if i not in taken][:count - len(taken)])
    return sorted(taken)


def evaluation_rows(entries: list[dict], positions: list[int] | None = None,
                    videos_per_prompt: int = VIDEOS_PER_PROMPT) -> list[dict]:
    """The evaluation rows of the suite's entries at ``positions`` (all by default), prompt-major:
    prompt_id (the position in the suite, so a subset's rows are the full suite's), prompt, seed (distinct
    per video, from the position), k (the video's number: ``{prompt}-{k}.mp4``) and the dimensions."""
    positions = range(len(entries)) if positions is None else positions
    return [{"prompt_id": i, "prompt": entries[i]["prompt"], "seed": SEED_BASE + videos_per_prompt * i + k,
             "k": k, "dimensions": entries[i]["dimensions"]}
            for i in positions for k in range(videos_per_prompt)]


def suite_rows(venv: str | os.PathLike, subset: int | None = None) -> tuple[list[dict], dict]:
    """The standard protocol's evaluation rows from the venv's suite, and a record of what was taken
    (``{"suite": path, "prompts": n, "of": 946, "subset": bool}``) that the reports print."""
    path = suite_path(venv)
    entries = read_suite(path)
    positions = balanced_subset(entries, subset) if subset else list(range(len(entries)))
    return evaluation_rows(entries, positions), {"suite": str(path), "prompts": len(positions),
                                                 "of": len(entries), "subset": len(positions) < len(entries)}


def standard_rows(params) -> tuple[list[dict], dict] | None:
    """The evaluation rows of ``params`` when they are VBench's standard suite (``evaluation.backend:
    vbench`` with ``evaluation.vbench.mode: standard``), with the record of what was taken; None when the
    evaluation prompts are the user's (``evaluation.prompts``) or the shapes world's.  A prompt file or
    another videos-per-prompt count beside the standard mode is an error: the protocol is VBench's."""
    ev = params.evaluation
    if ev.backend != "vbench" or ev.vbench.mode != "standard":
        return None
    if params.backbone.family == "toy":
        raise ConfigError("evaluation.vbench.mode", "standard",
                          "custom_input for the shapes world (VBench's suite describes real scenes; the toy "
                          "teacher knows only the shapes grammar)")
    if ev.prompts is not None:
        raise ConfigError("evaluation.prompts", ev.prompts,
                          "null with evaluation.vbench.mode: standard (the evaluation rows are VBench's own "
                          "suite); mode custom_input scores a prompt file of your own")
    if ev.videos_per_prompt != VIDEOS_PER_PROMPT:
        raise ConfigError("evaluation.videos_per_prompt", ev.videos_per_prompt,
                          f"{VIDEOS_PER_PROMPT} with evaluation.vbench.mode: standard "
                          f"(VBench reads {{prompt}}-0 … {{prompt}}-{VIDEOS_PER_PROMPT - 1})")
    return suite_rows(ev.vbench.venv, ev.vbench.subset)


def describe(suite: dict | None) -> str | None:
    """One line for the reports: which prompts were scored (None: not VBench's suite)."""
    if not suite:
        return None
    if suite.get("subset"):
        return (f"VBench standard suite, SUBSET: {suite['prompts']} of its {suite['of']} prompts (balanced "
                f"over the dimensions, evaluation.vbench.subset) × {VIDEOS_PER_PROMPT} videos; not "
                f"comparable with scores on the whole suite")
    return f"VBench standard suite: all {suite['of']} prompts × {VIDEOS_PER_PROMPT} videos"
