"""``dcm dvc-setup --shared-cache DIR``: DVC on a cluster's shared filesystem, one cache for every clone.

Trajectory stores of real teachers hold gigabytes per trajectory and checkpoints tens of GB, so a cache
that copies every output once more (DVC's default ``cache.type`` falls back to copy) doubles the disk
and the time of every ``dvc add`` / ``dvc repro``.  This writes DVC's own settings with ``dvc config``:

- ``cache.dir DIR``: one cache on the shared filesystem, used by every clone of the project there; put it
  on the *same* filesystem as the workspaces, so that adding an output moves it into the cache (a rename)
  and links it back, instead of copying it across filesystems;
- ``cache.shared group``: DVC makes the folders it creates in the cache group-writable and setgid and
  its files group-readable, so every member of the project's group adds to one cache (a folder created
  beforehand needs the same: ``mkdir -m 2775 DIR && chgrp <group> DIR``);
- ``cache.type`` (default ``reflink,symlink,hardlink``): workspace files are copy-on-write clones where the
  filesystem has them (XFS, Btrfs), else symlinks into the cache (NFS, Lustre, GPFS: across filesystems
  too), else hard links; never ``copy``.  Linked files are read-only: ``dvc unprotect`` before editing one
  by hand (the stages write new files and never edit outputs in place);
- optionally a default remote (``--remote URL``: a directory on the shared filesystem, or s3://, ...).

Outputs checked out before the change stay copies until ``dvc checkout --relink``.  Equivalent by hand::

    dvc cache dir /shared/dcm/dvc-cache
    dvc config cache.shared group
    dvc config cache.type reflink,symlink,hardlink
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dcm.config import ConfigError

LINK_TYPES = ("reflink", "symlink", "hardlink")  # DVC's link types that never copy (the default's order)
DEFAULT_LINK_TYPES = "reflink,symlink,hardlink"
REMOTE_NAME = "shared"


def link_types(value: str) -> list[str]:
    """``reflink,symlink`` → the list, each one a DVC link type that never copies."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names or any(t not in LINK_TYPES for t in names) or len(set(names)) != len(names):
        raise ConfigError("--link-types", value, f"a comma list of distinct {list(LINK_TYPES)} (never copy)")
    return names


def dvc_commands(cache_dir: str | Path, types: str = DEFAULT_LINK_TYPES, remote: str | None = None,
                 local: bool = False) -> list[list[str]]:
    """The ``dvc`` argument lists that configure the shared cache (``local``: in .dvc/config.local)."""
    level = ["--local"] if local else []
    out = [["cache", "dir", *level, str(Path(cache_dir).expanduser().absolute())],
           ["config", *level, "cache.shared", "group"],
           ["config", *level, "cache.type", ",".join(link_types(types))]]
    if remote:
        out.append(["remote", "add", *level, "--default", "--force", REMOTE_NAME, remote])
    return out


def setup_shared_cache(repo: str | Path, cache_dir: str | Path, types: str = DEFAULT_LINK_TYPES,
                       remote: str | None = None, local: bool = False) -> list[list[str]]:
    """Configure the DVC project at ``repo`` (``dvc init`` done) for a shared cache; returns the commands
    run."""
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        raise ConfigError("--repo", str(repo), "a DVC project (run `dvc init` there first)")
    commands = dvc_commands(cache_dir, types, remote, local)  # DVC creates the cache's folders, group-shared
    for args in commands:
        out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"dvc {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return commands
