"""DVC on a cluster's shared filesystem (`dcm dvc-setup`): workspaces link their outputs into one
group-shared cache instead of copying them, and a local-directory remote round-trips them."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from dcm import cli
from dcm.config import ConfigError
from dcm.pipeline import dvc_cache
from helpers import run_dvc

MB = 2**20


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=test@example.org", "-c", "user.name=test", *args], cwd=repo,
                   check=True, capture_output=True)


def _cached(cache: Path, payload: bytes) -> Path:
    digest = hashlib.md5(payload).hexdigest()
    return cache / "files" / "md5" / digest[:2] / digest[2:]


def _assert_linked(path: Path, cache: Path, payload: bytes) -> None:
    """``path`` is a symlink to its content's file in ``cache`` (no second copy in the workspace)."""
    assert path.is_symlink(), f"{path} is a copy, not a link into the cache"
    assert path.resolve() == _cached(cache, payload).resolve()
    assert path.read_bytes() == payload


def test_shared_cache_links_outputs_and_round_trips_through_a_local_directory_remote(tmp_path):
    repo, cache, remote = tmp_path / "repo", tmp_path / "shared" / "dvc-cache", tmp_path / "remote"
    repo.mkdir()
    _git(repo, "init", "-q")
    run_dvc(repo, "init", "-q")
    assert cli.main(["dvc-setup", "--shared-cache", str(cache), "--link-types", "symlink,hardlink",
                     "--remote", str(remote), "--repo", str(repo)]) == 0
    config = (repo / ".dvc" / "config").read_text()
    assert "shared = group" in config and "symlink,hardlink" in config and str(remote) in config

    # a checkpoint-sized file and a trajectory-store-like folder of shards
    checkpoint = os.urandom(12 * MB)
    shards = {f"shard-{i:04d}.safetensors": os.urandom(2 * MB) for i in range(2)}
    (repo / "model.safetensors").write_bytes(checkpoint)
    (repo / "trajectories").mkdir()
    for name, data in shards.items():
        (repo / "trajectories" / name).write_bytes(data)
    run_dvc(repo, "add", "model.safetensors", "trajectories")
    _assert_linked(repo / "model.safetensors", cache, checkpoint)
    for name, data in shards.items():
        _assert_linked(repo / "trajectories" / name, cache, data)
    # group-shared: folders group-writable and setgid, the content read-only
    assert cache.stat().st_mode & (stat.S_ISGID | stat.S_IWGRP) == stat.S_ISGID | stat.S_IWGRP
    assert not _cached(cache, checkpoint).stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)

    run_dvc(repo, "push")
    pushed = _cached(remote, checkpoint)
    assert not pushed.is_symlink() and pushed.read_bytes() == checkpoint  # the remote holds real bytes
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "outputs")

    # another clone on the same cluster: its checkout links the same cache files, nothing is fetched
    other = tmp_path / "other"
    _git(tmp_path, "clone", "-q", str(repo), str(other))
    run_dvc(other, "checkout")
    _assert_linked(other / "model.safetensors", cache, checkpoint)

    # a fresh cluster (no cache yet): a new clone pulls from the remote into its shared cache, linked
    shutil.rmtree(cache)
    fresh = tmp_path / "fresh"
    _git(tmp_path, "clone", "-q", str(repo), str(fresh))
    run_dvc(fresh, "pull")
    _assert_linked(fresh / "model.safetensors", cache, checkpoint)
    for name, data in shards.items():
        _assert_linked(fresh / "trajectories" / name, cache, data)


def test_dvc_setup_refuses_copying_link_types_and_a_folder_without_dvc(tmp_path):
    with pytest.raises(ConfigError, match="--link-types"):
        dvc_cache.link_types("symlink,copy")
    with pytest.raises(ConfigError, match="dvc init"):
        dvc_cache.setup_shared_cache(tmp_path, tmp_path / "cache")
    assert dvc_cache.dvc_commands("/c", "symlink", local=True)[0] == ["cache", "dir", "--local", "/c"]
