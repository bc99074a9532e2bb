"""Resume state of a distillation run: everything needed for the next step to equal an
uninterrupted run's (trainable weights, optimizer, EMA, objectives, every RNG, step), together with
the fingerprint of the settings that made it.

One process writes it atomically to ``<out>/resume/state.pt`` (one ``torch.save``).  A multi-rank
job writes a DCP folder ``<out>/resume/dcp/`` (``dcm.parallel.checkpoint``): every rank its shards
of the sharded weights and Adam moments, the replicated rest once.  Either form resumes at any
world size: DCP reshards on load, and a ``state.pt`` is spread over the ranks of a larger job.
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
SHARDED_DIR = "dcp"


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings a resume must match (canonical JSON), its first 16 hex digits."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / RESUME_DIR / STATE_FILE


def sharded_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / RESUME_DIR / SHARDED_DIR


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


# ----------------------------------------------------------------------------- any world size


class ResumeState:
    """The loop's resume state, bound to the objects it restores into: ``save(step, wall_s)`` and
    ``load(max_step)``.  ``sharded``: written as a DCP folder (a multi-rank job; every rank calls both).

    ``optimized`` is a module whose named parameters cover the optimizer's (the student and any
    learnable consistency space), so the optimizer is saved keyed by names and reshards with them.
    """

    def __init__(self, out_dir: str | os.PathLike, fingerprint: str, *, names: list[str],
                 trainable: list[torch.Tensor], ema: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 optimized: torch.nn.Module, objectives: list, space, sampler: torch.Generator,
                 sharded: bool):
        self.out_dir, self.fingerprint, self.names = Path(out_dir), fingerprint, names
        self.trainable, self.ema, self.optimizer, self.optimized = trainable, ema, optimizer, optimized
        self.objectives, self.space, self.sampler, self.sharded = objectives, space, sampler, sharded

    # --- saving
    def _replicated(self, step: int, wall_s: float) -> dict[str, Any]:
        """What every rank holds alike (from rank 0), with each rank's RNG states."""
        from dcm import distributed

        rngs = distributed.gather_objects(_to_cpu(rng_state(self.sampler)))
        mine = {"step": step, "wall_s": wall_s, "fingerprint": self.fingerprint,
                "objectives": {o.name: _without(o.state_dict(), o.sharded_parts()) for o in self.objectives},
                "consistency_space": self.space.state_dict()}
        return {**distributed.gather_objects(_to_cpu(mine))[0], "rng": rngs}

    def _parts(self, replicated: dict | None = None) -> dict:
        from dcm.parallel import checkpoint as dcp_parts

        parts = {"trainable": dcp_parts.TensorsState(dict(zip(self.names, self.trainable, strict=True))),
                 "optimizer": dcp_parts.OptimizerState(self.optimized, self.optimizer),
                 "replicated": dcp_parts.ObjectState(replicated)}
        if self.ema:
            parts["ema"] = dcp_parts.TensorsState(dict(zip(self.names, self.ema, strict=True)))
        for obj in self.objectives:  # e.g. DMD2's sharded fake score and its optimizer
            parts.update({f"objectives.{obj.name}.{key}": part for key, part in obj.sharded_parts().items()})
        return parts

    def save(self, step: int, wall_s: float) -> str:
        """Write the state after ``step`` steps; returns 'path (step k)'."""
        if not self.sharded:
            path = save(self.out_dir, {
                "step": step, "wall_s": wall_s, "fingerprint": self.fingerprint,
                "trainable": {n: p.detach().cpu().clone()
                              for n, p in zip(self.names, self.trainable, strict=True)},
                "ema": ({n: p.detach().cpu().clone() for n, p in zip(self.names, self.ema, strict=True)}
                        if self.ema else None),
                "optimizer": self.optimizer.state_dict(),
                "objectives": {o.name: o.state_dict() for o in self.objectives},
                "consistency_space": self.space.state_dict(),
                "rng": rng_state(self.sampler)})
            shutil.rmtree(sharded_path(self.out_dir), ignore_errors=True)  # superseded
            return f"{path} (step {step})"
        from dcm import distributed
        from dcm.parallel import checkpoint as dcp_parts

        path = dcp_parts.save(sharded_path(self.out_dir), self._parts(self._replicated(step, wall_s)))
        if distributed.is_main():
            state_path(self.out_dir).unlink(missing_ok=True)  # superseded
        return f"{path} (step {step})"

    # --- loading
    def load(self, max_step: int) -> tuple[int, float, str] | None:
        """Restore the saved state if it was made with the same settings and is not past ``max_step``;
        returns (step, wall_s, 'path (step k)') or None (a state made with other settings is removed)."""
        from dcm import distributed
        from dcm.parallel import checkpoint as dcp_parts

        folder = dcp_parts.latest(sharded_path(self.out_dir))
        if folder is not None:
            replicated = dcp_parts.read_object(folder, "replicated")
            path = folder
        elif state_path(self.out_dir).is_file():
            replicated = torch.load(state_path(self.out_dir), map_location="cpu", weights_only=False)
            path = state_path(self.out_dir)
        else:
            return None
        if replicated.get("fingerprint") != self.fingerprint:
            print(f"resume: {path} was made with other settings (fingerprint {replicated.get('fingerprint')} "
                  f"!= {self.fingerprint}); starting afresh")
            distributed.barrier()
            if distributed.is_main():
                shutil.rmtree(self.out_dir / RESUME_DIR, ignore_errors=True)
            distributed.barrier()
            return None
        step = replicated["step"]
        if step > max_step:
            print(f"resume state {path} is at step {step} > train_steps {max_step}; starting afresh")
            return None
        if path == folder:
            parts = self._parts()
            del parts["replicated"]
            dcp_parts.load(folder, parts)
        else:
            self._load_state_file(replicated)
        for obj in self.objectives:
            obj.load_state_dict(replicated["objectives"].get(obj.name, {}))
        self.space.load_state_dict(replicated.get("consistency_space") or {})
        rng = replicated["rng"]
        if isinstance(rng, list):  # every rank's (DCP): this rank's where the world size is the same
            rank, size = distributed.world().rank, distributed.world().size
            rng = rng[rank] if len(rng) == size else rng[0]
        restore_rng(rng, self.sampler)
        return step, replicated["wall_s"], f"{path} (step {step})"

    def _load_state_file(self, state: dict[str, Any]) -> None:
        """A one-process ``state.pt``: copied in as saved, or spread over the ranks of a sharded job."""
        if not self.sharded:
            with torch.no_grad():
                for name, p in zip(self.names, self.trainable, strict=True):
                    p.copy_(state["trainable"][name])
                for name, p in zip(self.names, self.ema, strict=True) if self.ema else ():
                    p.copy_(state["ema"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            return
        from dcm.parallel.checkpoint import load_optimizer_state
        from dcm.parallel.fsdp import copy_full_

        for name, p in zip(self.names, self.trainable, strict=True):
            copy_full_(p, state["trainable"][name])
        for name, p in zip(self.names, self.ema, strict=True) if self.ema else ():
            copy_full_(p, state["ema"][name])
        # the saved optimizer is keyed by position; this job's names them (the same order: the stepped list)
        load_optimizer_state(self.optimized, self.optimizer, state["optimizer"])


def _without(state: dict, sharded: dict) -> dict:
    """An objective's state less its sharded parts (those are DCP parts of their own: ``_parts``)."""
    return {k: v for k, v in state.items() if k not in sharded}


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (replicated state is pickled the same on any device)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
