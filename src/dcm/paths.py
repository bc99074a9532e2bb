"""Where every stage writes: one place, read by the stages, dvc.yaml and the Snakefile's rules."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
PROMPTS = DATA / "prompts.json"
TEACHER = Path("models/teacher")
TRAJECTORIES = Path("trajectories")
CHECKPOINTS = Path("checkpoints")
SAMPLES = Path("samples")
METRICS = Path("metrics")
ANALYSIS = Path("analysis")
REPORTS = Path("reports")
ABLATIONS = Path("ablations")  # the ablation report (`make ablations`)
PAPER = Path("paper")  # the paper report: claims with verdicts, NFE curves (`make paper`)
EXPORT = Path("export")
MCM_SETTING = Path("mcm_setting")  # MCM in its own setting: the `mcm` preset's pipeline in this folder (`make paper`)


def checkpoint(method: str, expert: str | None = None) -> Path:
    """checkpoints/<method>/ (single-model methods) or checkpoints/<method>/<expert>/ (seme, dete)."""
    return CHECKPOINTS / method / expert if expert else CHECKPOINTS / method


def samples(method: str) -> Path:
    return SAMPLES / method


def metrics(method: str) -> Path:
    return METRICS / f"{method}.json"
