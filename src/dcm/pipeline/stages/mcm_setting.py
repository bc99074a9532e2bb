"""``mcm_setting``: MCM in its own setting, beside the paper report (``make paper``).

MCM (Zhai et al., arXiv 2406.06890) distils a teacher that learnt from low-quality videos (WebVid) and lifts
the student's frames with an image discriminator on high-quality stills.  The default DAG's teacher learnt
from the clean world, so its ``mcm`` row is MCM outside its setting.  This stage runs the ``mcm`` preset's
pipeline (``src/dcm/presets/mcm.yaml``: the teacher trains on ``shapes.degrade``d videos) in
``mcm_setting/``, with the same stage code and this params file's settings otherwise: prepare, teacher,
trajectories, LCM and MCM distilled from that teacher, the teacher at 50 steps, LCM-4 and MCM-4 sampled and
scored.  ``report_paper`` reads ``mcm_setting/metrics/{teacher,lcm,mcm}.json`` for MCM's three claims.

Resumable like the training stages: ``mcm_setting/progress.json`` lists the finished runs with a
fingerprint of the setting's params; a rerun skips those (the trajectory and training runs pick up their
own shards and checkpoints) and starts over when the params changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

from dcm import config, io, paths
from dcm.config import ConfigError, Params

PRESET = "mcm"
ROWS = ("teacher", "lcm", "mcm")  # the setting's rows: the low-quality teacher, LCM and MCM distilled from it
RUNS = (("prepare", None), ("teacher", None), ("trajectories", None), ("train_baseline", "lcm"),
        ("train_baseline", "mcm"), *(("sample", m) for m in ROWS), *(("evaluate", m) for m in ROWS))
PROGRESS = "progress.json"


def setting_params(params: Params) -> Params:
    """These params with the ``mcm`` preset overlaid, reduced to the setting's rows (one training seed
    each); a relative sqlite tracking URI is made absolute so the runs land in this project's database."""
    if params.world.name != "shapes" or params.backbone.family != "toy":
        raise ConfigError("world.name / backbone.family", f"{params.world.name} / {params.backbone.family}",
                          "the shapes world with the toy backbone: MCM's setting degrades the world's videos")
    missing = [m for m in ROWS if m not in params.methods]
    if missing:
        raise ConfigError("methods", missing, f"rows {list(ROWS)}: MCM's setting compares them")
    raw = params.to_dict()
    drop = ("train_seed", "replicate_of")
    raw["methods"] = {m: {k: v for k, v in raw["methods"][m].items() if k not in drop} for m in ROWS}
    raw["paper"] = {"seeds": 1, "rows": []}
    raw = config.deep_merge(raw, config.preset_overlay(PRESET))
    uri = raw["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        raw["tracking"]["uri"] = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return config.parse(raw)


def fingerprint(params: Params) -> str:
    settings = {k: v for k, v in params.to_dict().items() if k not in ("tracking", "launcher")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(params: Params) -> None:
    from dcm.pipeline.table import STAGES

    setting = setting_params(params)
    root, key = paths.MCM_SETTING, fingerprint(setting)
    progress = io.read_json(root / PROGRESS) if (root / PROGRESS).is_file() else {}
    if progress.get("params") != key:
        if root.exists():
            print(f"mcm_setting: the setting's params changed ({progress.get('params')} -> {key}): "
                  "starting over")
            shutil.rmtree(root)
        progress = {"params": key, "preset": PRESET, "done": []}
    root.mkdir(parents=True, exist_ok=True)
    io.write_json_atomic(root / PROGRESS, progress)
    with contextlib.chdir(root):
        for i, (stage, method) in enumerate(RUNS, 1):
            name = stage + (f" --method {method}" if method else "")
            if name in progress["done"]:
                print(f"mcm_setting [{i}/{len(RUNS)}] {name}: done before, skipped")
                continue
            print(f"mcm_setting [{i}/{len(RUNS)}] {name} (preset {PRESET}, in {root}/)", flush=True)
            STAGES[stage].run(setting, method)
            progress["done"].append(name)
            io.write_json_atomic(PROGRESS, progress)
    print(f"mcm_setting: {root}/metrics/{{{','.join(ROWS)}}}.json")
