"""Resume state of a distillation run: everything needed for the next step to equal an
uninterrupted run's (trainable weights, optimizer, EMA, objectives, every RNG, step), written
atomically to ``<out>/resume/state.pt`` together with the fingerprint of the settings that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESUME_DIR = "resume"
STATE_FILE = "state.pt"


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings a resume must match (canonical JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / RESUME_DIR / STATE_FILE


def rng_state(sampler: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "sampler": sampler.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], sampler: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the resume state atomically (temp file in the same folder, then rename)."""
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(out_dir: str | os.PathLike, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it exists and was made with the same settings; a stale one is removed."""
    path = state_path(out_dir)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != expected_fingerprint:
        print(f"resume: {path} was made with other settings (fingerprint {state.get('fingerprint')} "
              f"!= {expected_fingerprint}); starting afresh")
        shutil.rmtree(path.parent, ignore_errors=True)
        return None
    return state
