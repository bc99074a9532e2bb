"""Sharded, checksummed stores on disk, written by every rank of a stage and resumable shard by shard.

A store is a folder::

    shard-00000.safetensors   one shard's tensors; its safetensors metadata names the store's fingerprint
    shard-00000.json          its sidecar, written after the shard: fingerprint, rows, sha256 and size
    index.json                the header (its fingerprint included) and every shard's entry, written last

The trajectory store (``dcm.data.trajectories.TrajectoryWriter``, a subclass) and the preprocessed data
are such stores: shard i is computed by rank i mod N (``ShardWriter.mine``); a shard is written to a
temporary file, fsynced and renamed, then its sidecar, so a kill leaves finished shards and at most a
temporary file, which the next run removes. A run with the same fingerprint reuses every shard whose
sidecar matches and whose file has the size written (nothing is re-hashed); another fingerprint starts the
store over. After every rank's shards rank 0 writes ``index.json`` from the sidecars
(``index.partial.json`` marks a store in progress). ``ShardStore`` reads a finished store: shard sizes
checked when it opens, a shard's fingerprint when it is first read, every sha256 on request (``verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from dcm import distributed, io

INDEX = "index.json"
PARTIAL_INDEX = "index.partial.json"
METADATA_KEY = "dcm"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, corrupted or made for other inputs."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def fingerprint(identity: Any) -> str:
    """sha256 of everything a store's values depend on (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_rows(rows: Sequence[dict], shard_size: int) -> list[list[dict]]:
    """Consecutive rows, ``shard_size`` a shard (the last may hold fewer)."""
    return [list(rows[i:i + shard_size]) for i in range(0, len(rows), shard_size)]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_or_none(path: Path) -> Any:
    try:
        return io.read_json(path)
    except (OSError, ValueError):
        return None


class ShardWriter:
    """Builds a store shard by shard on every rank of the stage; a re-run with the same fingerprint resumes,
    another fingerprint starts over.  ``header`` must hold ``fingerprint``; ``shard_rows`` are the JSON rows
    (ids, prompts, file names) each shard holds, recorded in its sidecar and the index."""

    def __init__(self, root: str | os.PathLike, header: dict[str, Any], shard_rows: list[list[dict]],
                 world: distributed.World | None = None):
        if "fingerprint" not in header:
            raise ValueError("a store header needs its fingerprint")
        self.root = Path(root)
        self.header = header
        self.shard_rows = shard_rows
        self.world = world or distributed.world()
        self.entries: dict[int, dict] = {}
        self.started_over = False
        self._open()

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    def _open(self) -> None:
        """Rank 0 starts a store of other inputs over and marks it in progress; then every rank finds the
        finished shards from their sidecars."""
        index, partial = self.root / INDEX, self.root / PARTIAL_INDEX
        recorded = None
        for path in (index, partial):
            if recorded is None and path.is_file():
                recorded = read_json_or_none(path) or {}
        distributed.barrier()  # every rank has read what was there before rank 0 changes it
        self.started_over = bool(recorded) and recorded.get("fingerprint") != self.fingerprint
        if self.world.is_main:
            if self.started_over:
                shutil.rmtree(self.root)  # made from other inputs: never resume it
            self.root.mkdir(parents=True, exist_ok=True)
            for stray in self.root.glob(".*.tmp-*"):  # temporary files of a killed write
                stray.unlink(missing_ok=True)
        distributed.barrier()
        finished = {e["file"]: e for e in (recorded or {}).get("shards", [])} if index.is_file() else {}
        for i in range(self.num_shards):
            entry = self._reusable(i, finished.get(shard_name(i)))
            if entry is not None:
                self.entries[i] = entry
        if self.world.is_main and len(self.entries) < self.num_shards:
            index.unlink(missing_ok=True)
            io.write_json_atomic(partial, {**self.header, "shards": []})
        distributed.barrier()

    def _reusable(self, i: int, indexed: dict | None) -> dict | None:
        """A finished shard of this very store: its sidecar (or a finished index's entry) names this store's
        fingerprint and rows, and the file has the size written."""
        path = self.root / shard_name(i)
        entry = indexed
        if entry is None:
            side = read_json_or_none(self.root / sidecar_name(i))
            if not side or side.get("fingerprint") != self.fingerprint or side.get("shard") != i:
                return None
            entry = side["entry"]
        if entry.get("rows") != self.shard_rows[i] or not path.is_file():
            return None
        if path.stat().st_size != entry.get("bytes"):
            return None
        return entry

    def pending(self) -> list[int]:
        """Shard indices still to compute, in order."""
        return [i for i in range(self.num_shards) if i not in self.entries]

    def mine(self) -> list[int]:
        """The pending shards this rank computes: shard i on rank i mod world size."""
        return [i for i in self.pending() if i % self.world.size == self.world.rank]

    def write(self, i: int, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> dict:
        """Store shard ``i`` atomically (temporary file, fsync, rename), then its sidecar; ``metadata`` joins
        the fingerprint and the shard number in the file's safetensors metadata."""
        meta = {**(metadata or {}), "fingerprint": self.fingerprint, "shard": i}
        data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                 metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        io.write_bytes_atomic(self.root / shard_name(i), data)
        fsync_dir(self.root)
        entry = {"file": shard_name(i), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "rows": self.shard_rows[i]}
        io.write_json_atomic(self.root / sidecar_name(i), {"fingerprint": self.fingerprint, "shard": i,
                                                           "entry": entry})
        self.entries[i] = entry
        return entry

    def finish(self) -> dict:
        """After every rank's shards: rank 0 writes index.json last (from the sidecars) and leaves only
        index.json and the shards in the folder; every rank returns the index."""
        distributed.barrier()
        if self.world.is_main:
            entries = {i: self._reusable(i, self.entries.get(i)) for i in range(self.num_shards)}
            missing = [i for i, e in entries.items() if e is None]
            if missing:
                raise StoreError(f"{self.root}: shards {missing} are not written yet")
            index = {**self.header, "shards": [entries[i] for i in range(self.num_shards)]}
            keep = {INDEX} | {e["file"] for e in index["shards"]}
            for path in self.root.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            io.write_json_atomic(self.root / INDEX, index)
            fsync_dir(self.root)
        distributed.barrier()
        return io.read_json(self.root / INDEX)


class ShardStore:
    """A finished store: its header, its rows in order and each shard's tensors.  ``producer`` names the
    command that writes it (for the error when it is missing)."""

    def __init__(self, root: str | os.PathLike, producer: str = "the stage that writes it",
                 verify: bool = False):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            state = "in progress (interrupted?)" if (self.root / PARTIAL_INDEX).is_file() else "missing"
            raise StoreError(f"store {self.root} is {state}: run {producer}")
        self.index = io.read_json(index_path)
        self.shards: list[dict] = self.index["shards"]
        self.rows = [row for shard in self.shards for row in shard["rows"]]
        for shard in self.shards:  # a stat per shard: cheap at any store size
            path = self.root / shard["file"]
            if not path.is_file():
                raise StoreError(f"shard {path} listed in {INDEX} is missing: run {producer}")
            if path.stat().st_size != shard["bytes"]:
                raise StoreError(f"shard {path} is truncated or replaced: {path.stat().st_size} bytes, "
                                 f"{INDEX} expects {shard['bytes']}: run {producer}")
        if verify:
            self.verify()

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    def __len__(self) -> int:
        return len(self.rows)

    def verify(self) -> None:
        """sha256 of every shard against index.json (reads the whole store)."""
        for shard in self.shards:
            digest = file_sha256(self.root / shard["file"])
            if digest != shard["sha256"]:
                raise StoreError(f"shard {self.root / shard['file']} has sha256 {digest}, {INDEX} records "
                                 f"{shard['sha256']}")

    def open(self, i: int):
        """Shard ``i``'s safetensors handle, after checking that the shard belongs to this store."""
        path = self.root / self.shards[i]["file"]
        handle = safe_open(str(path), framework="pt")
        meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
        if meta.get("fingerprint") != self.fingerprint or meta.get("shard") != i:
            raise StoreError(f"shard {path} belongs to another store (fingerprint "
                             f"{meta.get('fingerprint')!r}, shard {meta.get('shard')!r}; {INDEX} expects "
                             f"{self.fingerprint!r}, shard {i})")
        return handle

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Every tensor of shard ``i``."""
        handle = self.open(i)
        return {key: handle.get_tensor(key) for key in handle.keys()}
