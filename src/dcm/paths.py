"""Where every stage writes: one place, read by the stages, dvc.yaml and the Snakefile's rules."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcm.config import Params

DATA = Path("data")
PROMPTS = DATA / "prompts.json"
# the preprocess stage: text embeddings and video latents of the real families' data, as sharded stores
PREPROCESSED = DATA / "preprocessed"
PROMPT_STORE = PREPROCESSED / "prompts"
VIDEO_STORE = PREPROCESSED / "videos"
PREPROCESS_RECORD = PREPROCESSED / "preprocess.json"  # written last: what the stage made (toy: nothing)
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
# MCM in its own setting: the `mcm` preset's pipeline in this folder (`make paper`)
MCM_SETTING = Path("mcm_setting")
TEACHERS = Path("teachers")  # the paper's other teachers: teachers/s<k>/ (stage teachers)


def checkpoint(method: str, expert: str | None = None) -> Path:
    """checkpoints/<method>/ (single-model methods) or checkpoints/<method>/<expert>/ (seme, dete)."""
    return CHECKPOINTS / method / expert if expert else CHECKPOINTS / method


def teacher_folder(k: int) -> Path:
    """teachers/s<k>/: the project of the teacher trained with seed + k (stage teachers)."""
    return TEACHERS / f"s{k}"


def samples(method: str) -> Path:
    return SAMPLES / method


def metrics(method: str) -> Path:
    return METRICS / f"{method}.json"


def weights_path(params: Params, method: str) -> str:
    """What a method samples from: the teacher, or the checkpoint folder it (or checkpoint_from) trained."""
    from dcm.config import METHOD_KINDS

    m = params.method(method)
    if not METHOD_KINDS[m.kind].trains:
        return str(TEACHER)
    return str(checkpoint(m.checkpoint_from or method))


def weights_paths(params: Params, method: str) -> list[str]:
    """The stage outputs a method's sampling depends on (its kind's ``weights``: DCM's seme/ and dete/)."""
    from dcm.config import METHOD_KINDS

    root = weights_path(params, method)
    return [f"{root}/{part}" for part in METHOD_KINDS[params.method(method).kind].weights] or [root]
