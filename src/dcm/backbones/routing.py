"""Two experts behind one transformer call, each sample sent to one of them by its timestep.

Two modules route this way: Wan 2.2 A14B's own experts (``BoundaryExperts``: the high-noise
``transformer`` for t ≥ the boundary, the low-noise ``transformer_2`` below it, ``WanPipeline.__call__``'s
rule) and DCM's SemE/DetE (the distillation layer's ``DualExpert``).  Both route *per sample* and reassemble
the outputs in batch order, so a batch that mixes noise levels (the consistency loop's draws) runs each
sample through the right expert; the pipeline switches the whole batch on its one timestep, which is the
same thing for its batches.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

EXPERTS_FILE = "experts.json"
HIGH_DIR, LOW_DIR = "transformer", "transformer_2"  # WanPipeline's component names


def row_timesteps(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) the timestep a sample routes on: the call's scalar or (B,) timestep, or for a per-token
    timestep (B, tokens) (Wan 2.2 TI2V's ``expand_timesteps``) its largest token's, the noise level
    of the sample's noised tokens."""
    t = torch.as_tensor(timestep)
    if t.ndim >= 2:
        return t.flatten(1).amax(1)
    return t.reshape(-1).expand(batch)


class TimestepRouted(nn.Module, ABC):
    """The routing both two-expert modules share: ``route`` names a sample's expert, ``run_expert`` runs
    one expert on a (sub-)batch; ``forward`` has the diffusers transformer's call signature, and the module
    reports the configuration and dtype of its ``primary`` transformer (the experts share one config)."""

    expert_names: tuple[str, str] = ("first", "second")

    @property
    @abstractmethod
    def primary(self) -> nn.Module:
        """The diffusers transformer whose configuration and dtype this module reports."""

    @abstractmethod
    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where a sample goes to ``expert_names[0]``."""

    @abstractmethod
    def run_expert(self, expert: str, **inputs) -> torch.Tensor:
        """One expert on the whole (sub-)batch; ``inputs`` are the transformer's keyword arguments."""

    @property
    def config(self):
        return self.primary.config

    @property
    def dtype(self) -> torch.dtype:
        return self.primary.dtype

    def record_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook, registered ahead of a wrapper's own (``dcm.parallel.fsdp.parallelize``): the
        timestep as the caller gave it, for ``route``.  FSDP2's bf16 mixed precision casts forward inputs,
        and bf16's spacing near t = 1000 is 4, enough to send a sample near the boundary to the wrong
        expert; the experts themselves still receive the cast timestep, as any FSDP2 student does."""
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._caller_timestep = None if timestep is None else torch.as_tensor(timestep).detach().clone()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, return_dict: bool = True, **kwargs):
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim < 2:
            timestep = timestep.reshape(-1).expand(batch)
        caller = self.__dict__.pop("_caller_timestep", None)
        exact = row_timesteps(timestep, batch)
        if caller is not None and (caller.ndim >= 2 or caller.numel() in (1, batch)):
            exact = row_timesteps(caller.to(hidden_states.device), batch)
        to_first = self.route(exact)
        out = None
        for expert, mask in ((self.expert_names[0], to_first), (self.expert_names[1], ~to_first)):
            idx = torch.nonzero(mask).flatten()
            if idx.numel() == 0:
                continue
            sub = {k: (v[idx] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v)
                   for k, v in kwargs.items()}
            if idx.numel() == batch:  # the whole batch to one expert: no gather/scatter
                return self._wrap(self.run_expert(expert, hidden_states=hidden_states, timestep=timestep,
                                                  encoder_hidden_states=encoder_hidden_states, **sub),
                                  return_dict)
            y = self.run_expert(expert, hidden_states=hidden_states[idx], timestep=timestep[idx],
                                encoder_hidden_states=encoder_hidden_states[idx], **sub)
            if out is None:
                out = y.new_zeros((batch, *y.shape[1:]))
            out = out.index_copy(0, idx, y)  # out of place: keeps the autograd graph of both experts
        return self._wrap(out, return_dict)

    @staticmethod
    def _wrap(sample: torch.Tensor, return_dict: bool):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


class BoundaryExperts(TimestepRouted):
    """Wan 2.2 A14B's two experts as one transformer: ``high`` (the pipeline's ``transformer``) for
    t ≥ ``boundary_t`` = boundary_ratio · num_train_timesteps, ``low`` (``transformer_2``) below it, as
    ``WanPipeline.__call__`` picks ``current_model``.  The frozen teacher is one; a student copied from it
    (LCM, PCM, DMD2's generator and fake score) is another, with both experts trainable, so every
    baseline keeps the teacher's split.

    ``save_pretrained(folder)`` writes ``transformer/``, ``transformer_2/`` (diffusers) and
    ``experts.json`` (the boundary); ``from_pretrained`` reads them back."""

    expert_names = ("high", "low")

    def __init__(self, high: nn.Module, low: nn.Module, boundary_t: float):
        super().__init__()
        self.high, self.low = high, low
        self.boundary_t = float(boundary_t)

    @property
    def primary(self) -> nn.Module:
        return self.high

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep.detach().double() >= self.boundary_t

    def run_expert(self, expert: str, **inputs) -> torch.Tensor:
        inputs["return_dict"] = False
        return {"high": self.high, "low": self.low}[expert](**inputs)[0]

    def expert_at(self, timestep: float) -> nn.Module:
        """The expert a sample at model timestep ``timestep`` runs through."""
        return self.high if float(timestep) >= self.boundary_t else self.low

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        folder = Path(folder)
        self.high.save_pretrained(folder / HIGH_DIR, **kwargs)
        self.low.save_pretrained(folder / LOW_DIR, **kwargs)
        (folder / EXPERTS_FILE).write_text(json.dumps(
            {"boundary_t": self.boundary_t, "class": type(self.high).__name__}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> BoundaryExperts:
        import diffusers

        folder = Path(folder)
        meta = json.loads((folder / EXPERTS_FILE).read_text())
        model_class = getattr(diffusers, meta["class"])
        return cls(model_class.from_pretrained(folder / HIGH_DIR, **kwargs),
                   model_class.from_pretrained(folder / LOW_DIR, **kwargs), meta["boundary_t"])
