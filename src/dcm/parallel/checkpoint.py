"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), finetrainers / torchtitan style.

A checkpoint is a DCP folder: every rank writes its own shards of the sharded state (FSDP2 DTensors:
weights, Adam moments), one copy of the replicated state, and rank 0 the metadata.  What is saved
is a mapping of ``Stateful`` parts:

- ``TensorsState``: named tensors (a model's trainable parameters, an EMA copy) loaded in place, so
  DCP reshards them into whatever layout the loading job has (N ranks → M ranks, or one process);
- ``OptimizerState``: the optimizer keyed by parameter names (``get_optimizer_state_dict``), so
  its moments reshard with the parameters;
- ``ObjectState``: a small replicated object (step, RNG states, discriminator heads) as one pickle.

The folder is written under a temporary name and renamed by rank 0 once complete, so a job killed
while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

METADATA_FILE = ".metadata"  # DCP's own: present once a save completed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


class TensorsState(Stateful):
    """Named tensors (parameters, plain or DTensor shards) that DCP saves and loads in place."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in self.tensors.items()}  # shares storage: loads land in place

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():  # DCP loads into the views of state_dict(); copy only what it replaced
            for name, t in self.tensors.items():
                if _local(state[name]).data_ptr() != _local(t).data_ptr():
                    t.copy_(state[name])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class OptimizerState(Stateful):
    """An optimizer's state keyed by the names of ``model``'s parameters (DCP reshards its moments)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from dcm.parallel.fsdp import reshard

        reshard(self.model)  # its parameters named as the optimizer holds them: the shards
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        from dcm.parallel.fsdp import reshard

        reshard(self.model)
        set_optimizer_state_dict(self.model, self.optimizer, state)


class ObjectState(Stateful):
    """A small replicated object, saved once as a pickle (identical on every rank when saved)."""

    def __init__(self, value: Any = None):
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.value, buffer)
        return {"pickle": buffer.getvalue()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = torch.load(io.BytesIO(state["pickle"]), map_location="cpu", weights_only=False)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """An optimizer ``state_dict()`` saved by one process (keyed by position) into ``optimizer`` over
    ``model``'s parameters, in the same order, sharded (DTensors: each rank keeps its shards of the moments)
    or not."""
    if not any(hasattr(p, "to_local") for p in model.parameters()):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    template = get_optimizer_state_dict(model, optimizer)  # names the positions
    fqns = [fqn for group in template["param_groups"] for fqn in group["params"]]
    by_name = {"state": {fqns[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]}
                                for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / METADATA_FILE).is_file()


def latest(folder: str | Path) -> Path | None:
    """``folder`` if it holds a complete checkpoint; else the one ``save`` was replacing when a job died
    between its two renames; else None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if is_checkpoint(candidate):
            return candidate
    return None


def save(folder: str | Path, parts: dict[str, Stateful]) -> Path:
    """Write ``parts`` as a DCP folder (every rank calls this), atomically: a temporary folder renamed
    over ``folder`` by rank 0 once every rank has written its shards."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(dict(parts), checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def load(folder: str | Path, parts: dict[str, Stateful]) -> None:
    """Load ``parts`` (a subset of what was saved) from a DCP folder, resharded to this job's layout."""
    dcp.load(dict(parts), checkpoint_id=str(folder))


def read_object(folder: str | Path, key: str) -> Any:
    """The ``ObjectState`` saved under ``key``, without touching the rest of the checkpoint."""
    part = ObjectState()
    load(folder, {key: part})
    return part.value
