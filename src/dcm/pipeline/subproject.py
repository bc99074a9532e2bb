"""A pipeline run inside a folder of this project (``mcm_setting/``, ``teachers/s<k>/``): the same stage code
with its own params, one run after another, resumable.

``<folder>/progress.json`` lists the finished runs with a fingerprint of the folder's params; a rerun skips
those (the trajectory and training runs pick up their own shards and checkpoints) and starts over, folder
removed, when the params changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from dcm import io
from dcm.config import Params

PROGRESS = "progress.json"


def absolute_tracking(raw: dict) -> dict:
    """``raw`` params whose relative sqlite tracking URI is made absolute, so that the folder's runs land in
    this project's database."""
    uri = raw["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        raw["tracking"]["uri"] = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return raw


def reduced(params: Params, rows: Sequence[str]) -> dict:
    """``params`` as a raw dict with only ``rows`` in ``methods``, each one training seed (its own)."""
    raw = params.to_dict()
    drop = ("train_seed", "replicate_of")
    raw["methods"] = {m: {k: v for k, v in raw["methods"][m].items() if k not in drop} for m in rows}
    raw["paper"] = {**raw["paper"], "seeds": 1, "rows": [], "teachers": 1}
    return absolute_tracking(raw)


def fingerprint(settings: Params, extra: str = "") -> str:
    """A digest of the settings (less where runs are logged and how they are launched), and of ``extra``."""
    kept = {k: v for k, v in settings.to_dict().items() if k not in ("tracking", "launcher")}
    return hashlib.sha256((json.dumps(kept, sort_keys=True, default=str) + extra).encode()).hexdigest()[:16]


def run(root: Path, key: str, runs: Sequence[tuple[str, str | None]], params_for: Callable[[str], Params],
        label: str, note: str, record: dict | None = None) -> None:
    """The ``runs`` (stage, method) in ``root`` in order, each with ``params_for(stage)``; finished runs of
    the same ``key`` are skipped.  ``record``: more keys for progress.json."""
    from dcm.pipeline.table import STAGES

    progress = io.read_json(root / PROGRESS) if (root / PROGRESS).is_file() else {}
    if progress.get("params") != key:
        if root.exists():
            print(f"{label}: the params changed ({progress.get('params')} -> {key}): starting over")
            shutil.rmtree(root)
        progress = {"params": key, **(record or {}), "done": []}
    root.mkdir(parents=True, exist_ok=True)
    io.write_json_atomic(root / PROGRESS, progress)
    with contextlib.chdir(root):
        for i, (stage, method) in enumerate(runs, 1):
            name = stage + (f" --method {method}" if method else "")
            if name in progress["done"]:
                print(f"{label} [{i}/{len(runs)}] {name}: done before, skipped")
                continue
            print(f"{label} [{i}/{len(runs)}] {name} ({note}, in {root}/)", flush=True)
            STAGES[stage].run(params_for(stage), method)
            progress["done"].append(name)
            io.write_json_atomic(PROGRESS, progress)

