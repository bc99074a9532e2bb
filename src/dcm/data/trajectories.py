"""Teacher ODE solves and the sharded, checksummed trajectory store.

A trajectory is the guided teacher's Euler path from noise at σ_{N−1} = 1 down the whole grid to
σ_0 and one more step to σ_min (METHODS.md: x ← x + (σ_next − σ)·v_T, CFG v_T = v_u + w·(v_c − v_u)).
It is stored at every point of ``TeacherGrid.extended`` = [σ_min, σ_0, …, σ_{N−1}], ascending, so
grid index n lives at position n + 1 and n = −1 (σ_min) at position 0.

On disk (``trajectories/``, format version 2)::

    shard-00000.safetensors   tensor "latents" (S, N+1, C, T, H, W), S = shard_size, fp32 by default
    shard-00001.safetensors   (the last shard may hold fewer trajectories)
    index.json                format version, fingerprint, grid, guidance, dtype, exact_steps, latent
                              shape and, per shard, its file name, sha256 and rows (prompt_id, prompt, seed)

Precision (METHODS.md, Consistency distillation step).  The consistency signal is the teacher step
x_n − x_{n−1} = (σ_n − σ_{n−1})·v_T.  On the shift-17 grid Δσ ≈ 1.2e-3 near σ = 1, so the step is
~1e-3 of a latent of size ~1, below bf16's rounding of that latent (up to 2⁻⁸ relative); rounding
both points to bf16 independently makes the stored difference mostly rounding noise across SemE's
range (and still off by far more than 1e-3 of the step at every grid index, tests/test_trajectories.py).
The solve runs in fp32, and an fp32 store keeps every point bit for bit as the solver made it, so
``TrajectoryStore.pair`` returns x_n, x_{n−1} whose difference is the solver's fp32 step
(``exact_steps: true``).  Every layout that keeps the step exact needs ~4 bytes per element per grid
point, and fp32 points are the smallest one with O(1) random access to x_n (layouts that store steps
read up to N slices per sample to sum them), so an exact store is plain fp32.  ``dtype`` bf16/fp16 is
still accepted (half the bytes) but the store records ``exact_steps: false`` and
``dcm.distill.data.CachedSource`` warns that its teacher step is rounded.

``TrajectoryWriter`` builds the folder shard by shard so that a killed run resumes, on any number of
ranks (shard i on rank i mod world size; batches never span shards, so the values do not depend on
the rank count): each shard is written to a temporary file, fsynced and renamed (a reader never sees
half a shard), carries the store's fingerprint in its safetensors metadata, and is followed by its
sidecar ``shard-00000.json`` (fingerprint, rows, sha256 and size of the bytes written).  On resume a
shard is reused when its sidecar matches the store and its file has the recorded size: nothing is
re-hashed.  ``index.partial.json`` marks a store in progress; rank 0 writes ``index.json`` last, from
the sidecars.  Readers check each shard's size when the store opens and its fingerprint when they
first read it; the full sha256 of every shard (``TrajectoryStore.verify``) is there to be asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from dcm import distributed, io
from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.sampling import Velocity, sample, teacher_velocity
from dcm.schedule import SIGMA_MIN_INDEX, TeacherGrid, uniform_schedule

# the stores' shared layout (one StoreError: the writer's finish and the reader raise the same class)
from dcm.shards import INDEX, METADATA_KEY, PARTIAL_INDEX, ShardWriter, StoreError, file_sha256

FORMAT_VERSION = 2  # 2: exact_steps in the header; fp32 = exact teacher steps (1: bf16 points, steps rounded)
TENSOR = "latents"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXACT_DTYPE = "fp32"  # the faithful storage: x_n − x_{n−1} is the solver's fp32 step
LAYOUT = "(S, N+1, C, T, H, W); axis 1 ascending over grid.sigmas: position n+1 = grid index n, 0 = sigma_min"


def folder_digest(path: str | os.PathLike, exclude: Sequence[str] = ("training.json",)) -> str:
    """sha256 over every file (relative path + content) of a folder: identifies the teacher's weights."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ teacher solve


def initial_noise(seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """The contract of data/prompts.json: a row's noise is randn(latent_shape) from its own seed."""
    return torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def solve(backbone: Backbone, grid: TeacherGrid, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """Guided teacher Euler solves over the full grid, σ_{N−1} → … → σ_0 → σ_min.

    Returns (B, N+1, C, T, H, W) float32 in ``grid.extended`` order (ascending σ; noise last).
    """
    device = next(backbone.transformer.parameters()).device
    cond = backbone.encode_prompts(prompts)
    uncond = backbone.null_prompts(len(prompts)) if backbone.guidance_mode == "cfg" else None
    return solve_velocity(teacher_velocity(backbone, uncond), grid, noise.to(device), cond)


@torch.no_grad()
def solve_velocity(velocity: Velocity, grid: TeacherGrid, noise: torch.Tensor,
                   cond: PromptEmbeds) -> torch.Tensor:
    """Euler solve of any velocity field over the full grid in fp32 (the points stay fp32 whatever the
    field returns); (B, N+1, C, T, H, W) float32 in ``grid.extended`` order."""
    path = sample({"teacher": velocity}, uniform_schedule(grid, grid.steps), noise.to(dtype=torch.float32),
                  cond, final_sigma=grid.sigma_min, keep_trajectory=True)
    return torch.stack(path[::-1], dim=1).cpu()


# ------------------------------------------------------------------------------------ header


def bytes_per_trajectory(latent_shape: Sequence[int], steps: int, dtype: str = EXACT_DTYPE) -> int:
    """Tensor bytes of one stored trajectory: N + 1 points of ``latent_shape`` (shard headers aside)."""
    return int(np.prod(latent_shape)) * (steps + 1) * DTYPES[dtype].itemsize


def store_header(grid: TeacherGrid, num_train_timesteps: int, shift: float, guidance_mode: str,
                 guidance_scale: float, dtype: str, latent_shape: Sequence[int], shard_size: int,
                 batch_size: int, rows: list[dict], teacher_sha256: str) -> dict[str, Any]:
    """Everything the stored values depend on; its hash is the fingerprint a resume must match.

    ``dtype`` "fp32" is the exact store (``exact_steps``); "bf16"/"fp16" round every point.
    """
    if dtype not in DTYPES:
        raise ValueError(f"trajectory dtype {dtype!r} is not one of {list(DTYPES)}")
    header = {
        "format_version": FORMAT_VERSION,
        "grid": {"steps": grid.steps, "shift": float(shift), "num_train_timesteps": int(num_train_timesteps),
                 "sigmas": [float(s) for s in grid.extended]},
        "guidance": {"mode": guidance_mode, "scale": float(guidance_scale)},
        "dtype": dtype,
        "exact_steps": dtype == EXACT_DTYPE,  # x_n − x_{n−1} read back = the solver's fp32 step
        "latent_shape": [int(d) for d in latent_shape],
        "layout": LAYOUT,
        "shard_size": int(shard_size),
        "batch_size": int(batch_size),  # batch composition changes float rounding: part of the identity
        "num_trajectories": len(rows),
        "teacher_sha256": teacher_sha256,
    }
    identity = {**header, "rows": [[r["prompt_id"], r["prompt"], r["seed"]] for r in rows]}
    header["fingerprint"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return header


# ------------------------------------------------------------------------------------ writer


class TrajectoryWriter(ShardWriter):
    """The trajectory store's ``ShardWriter``: one (S, N+1, C, T, H, W) tensor per shard of
    ``header["shard_size"]`` rows, stored in the header's dtype; a re-run with the same header resumes,
    another header starts over."""

    def __init__(self, root: str | os.PathLike, header: dict[str, Any], rows: list[dict],
                 world: distributed.World | None = None):
        self.rows = [{"prompt_id": int(r["prompt_id"]), "prompt": str(r["prompt"]), "seed": int(r["seed"])}
                     for r in rows]
        size = header["shard_size"]
        super().__init__(root, header, [self.rows[i:i + size] for i in range(0, len(self.rows), size)], world)

    def write(self, i: int, latents: torch.Tensor) -> dict:
        """Store shard ``i`` (``ShardWriter.write``: atomic, then its sidecar); its rows join the file's
        metadata so a shard names its trajectories on its own."""
        expected = (len(self.shard_rows[i]), len(self.header["grid"]["sigmas"]), *self.header["latent_shape"])
        if tuple(latents.shape) != expected:
            raise ValueError(f"shard {i}: latents of shape {tuple(latents.shape)}, expected {expected}")
        if self.header["exact_steps"] and latents.dtype != torch.float32:
            raise ValueError(f"shard {i}: an exact ({EXACT_DTYPE}) store takes the solver's float32 latents, "
                             f"got {latents.dtype} (its steps would already be rounded)")
        tensor = latents.detach().to("cpu", DTYPES[self.header["dtype"]])
        return super().write(i, {TENSOR: tensor}, metadata={"rows": self.shard_rows[i]})


# ------------------------------------------------------------------------------------ reader


class TrajectoryStore:
    """Random access to stored teacher trajectories: ``latents(traj, n)`` reads only the slices it needs."""

    def __init__(self, root: str | os.PathLike, verify: bool = False):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            if (self.root / PARTIAL_INDEX).is_file():
                raise StoreError(f"{self.root} is an unfinished trajectory store (no {INDEX}, only "
                                 f"{PARTIAL_INDEX}): re-run `dcm run trajectories` to finish it")
            raise StoreError(f"{index_path} not found: run `dcm run trajectories` first")
        self.index = io.read_json(index_path)
        version = self.index.get("format_version")
        if version != FORMAT_VERSION:
            why = (" (format 1 rounded every point to its dtype, bf16 by default, so the teacher step "
                   "x_n − x_{n−1} it returns is not the fp32 step)" if version == 1 else "")
            raise StoreError(f"{index_path}: trajectory store format_version {version!r}, this code reads "
                             f"only {FORMAT_VERSION}{why}: delete {self.root} and re-run "
                             "`dcm run trajectories`")
        if (self.index.get("dtype") not in DTYPES
                or self.index.get("exact_steps") != (self.index["dtype"] == EXACT_DTYPE)):
            raise StoreError(f"{index_path}: dtype {self.index.get('dtype')!r} with exact_steps "
                             f"{self.index.get('exact_steps')!r} is not a store this code writes")
        self.grid_sigmas = np.asarray(self.index["grid"]["sigmas"], dtype=np.float64)
        self.latent_shape = tuple(self.index["latent_shape"])
        self.dtype = DTYPES[self.index["dtype"]]
        self.exact_steps: bool = self.index["exact_steps"]
        self.shards = self.index["shards"]
        self.rows: list[dict] = [row for shard in self.shards for row in shard["rows"]]
        self._shard_of = np.concatenate([np.full(len(s["rows"]), k) for k, s in enumerate(self.shards)]
                                        or [np.zeros(0)]).astype(np.int64)
        self._local = np.concatenate([np.arange(len(s["rows"])) for s in self.shards]
                                     or [np.zeros(0)]).astype(np.int64)
        self._handles: dict[int, Any] = {}
        self._check_sizes()
        if verify:
            self.verify()

    def _check_sizes(self) -> None:
        """Every shard is there with the size written (a stat per shard: cheap at any store size)."""
        for shard in self.shards:
            path = self.root / shard["file"]
            if not path.is_file():
                raise StoreError(f"trajectory shard {path} listed in {INDEX} is missing")
            if "bytes" in shard and path.stat().st_size != shard["bytes"]:
                raise StoreError(f"trajectory shard {path} is truncated or replaced: {path.stat().st_size} "
                                 f"bytes, {INDEX} expects {shard['bytes']}")

    def verify(self) -> None:
        """sha256 of every shard against index.json (reads the whole store); the error names the shard and
        both hashes."""
        for shard in self.shards:
            path = self.root / shard["file"]
            if not path.is_file():
                raise StoreError(f"trajectory shard {path} listed in {INDEX} is missing")
            actual = file_sha256(path)
            if actual != shard["sha256"]:
                raise StoreError(f"trajectory shard {path} is corrupted: sha256 {actual}, "
                                 f"{INDEX} expects {shard['sha256']}")

    # --- metadata
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def steps(self) -> int:
        """N, the teacher grid size (grid indices 0 … N−1, plus −1 for σ_min)."""
        return len(self.grid_sigmas) - 1

    @property
    def guidance(self) -> dict:
        return dict(self.index["guidance"])

    def sigma(self, n: int) -> float:
        return float(self.grid_sigmas[self._position(n)])

    def prompts(self, traj) -> list[str]:
        return [self.rows[i]["prompt"] for i in self._trajectories(traj)]

    def seeds(self, traj) -> list[int]:
        return [self.rows[i]["seed"] for i in self._trajectories(traj)]

    # --- values
    def latents(self, traj: Sequence[int] | torch.Tensor,
                n: Sequence[int] | torch.Tensor | int) -> torch.Tensor:
        """float32 (B, C, T, H, W): trajectory traj[i] at grid index n[i] (−1 = σ_min, N−1 = the noise)."""
        rows = self._trajectories(traj)
        ns = [int(n)] * len(rows) if isinstance(n, (int, np.integer)) else _as_ints(n)
        if len(ns) != len(rows):
            raise ValueError(f"latents: {len(rows)} trajectories but {len(ns)} grid indices")
        out = torch.empty((len(rows), *self.latent_shape), dtype=torch.float32)
        for b, (row, step) in enumerate(zip(rows, ns, strict=True)):
            position = self._position(step)
            piece = self._slice(int(self._shard_of[row]))[int(self._local[row]), position]
            out[b] = piece.float()
        return out

    def pair(self, traj: Sequence[int] | torch.Tensor,
             n: Sequence[int] | torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_n, x_{n−1}), float32 (B, C, T, H, W) each, for grid indices n ∈ [0, N−1] (n − 1 = −1: σ_min).

        Both points come from one read of two neighbouring stored positions.  In an exact store
        (``exact_steps``) they are the solver's fp32 values, so x_n − x_{n−1} is its fp32 teacher step
        (σ_n − σ_{n−1})·v_T, up to the rounding of the solver's own addition (≤ half an ulp of x).
        """
        rows = self._trajectories(traj)
        ns = [int(n)] * len(rows) if isinstance(n, (int, np.integer)) else _as_ints(n)
        if len(ns) != len(rows):
            raise ValueError(f"pair: {len(rows)} trajectories but {len(ns)} grid indices")
        x_n = torch.empty((len(rows), *self.latent_shape), dtype=torch.float32)
        x_prev = torch.empty_like(x_n)
        for b, (row, step) in enumerate(zip(rows, ns, strict=True)):
            if step == SIGMA_MIN_INDEX:
                raise IndexError(f"grid index {step} has no previous point (σ_min ends the trajectory)")
            position = self._position(step)
            both = self._slice(int(self._shard_of[row]))[int(self._local[row]), position - 1:position + 1]
            x_prev[b], x_n[b] = both[0].float(), both[1].float()
        return x_n, x_prev

    def _slice(self, shard: int):
        if shard not in self._handles:  # first read: the shard must be this store's (its metadata)
            path = self.root / self.shards[shard]["file"]
            handle = safe_open(path, framework="pt")
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            if meta.get("fingerprint") != self.index.get("fingerprint") or meta.get("shard") != shard:
                raise StoreError(f"trajectory shard {path} belongs to another store (fingerprint "
                                 f"{meta.get('fingerprint')!r}, shard {meta.get('shard')!r}; {INDEX} expects "
                                 f"{self.index.get('fingerprint')!r}, shard {shard})")
            self._handles[shard] = handle
        return self._handles[shard].get_slice(TENSOR)

    def _position(self, n: int) -> int:
        if not SIGMA_MIN_INDEX <= n < self.steps:
            raise IndexError(f"grid index {n} outside [-1, {self.steps - 1}]")
        return n + 1

    def _trajectories(self, traj) -> list[int]:
        rows = _as_ints(traj)
        bad = [t for t in rows if not 0 <= t < len(self)]
        if bad:
            raise IndexError(f"trajectory indices {bad[:5]} outside [0, {len(self) - 1}]")
        return rows

    def __getstate__(self):  # open safetensors handles do not pickle (DataLoader workers reopen them)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _as_ints(values) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(values).reshape(-1)]
