"""``mcm_setting``: MCM in its own setting, beside the paper report (``make paper``).

MCM (Zhai et al., arXiv 2406.06890) distils a teacher that learnt from low-quality videos (WebVid) and lifts
the student's frames with an image discriminator on high-quality stills.  The default DAG's teacher learnt
from the clean world, so its ``mcm`` row is MCM outside its setting.  This stage runs the ``mcm`` preset's
pipeline (``src/dcm/presets/mcm.yaml``: the teacher trains on ``shapes.degrade``d videos) in
``mcm_setting/``, with the same stage code and this params file's settings otherwise: prepare, teacher,
trajectories, LCM and MCM distilled from that teacher, the teacher at 50 steps, LCM-4 and MCM-4 sampled and
scored.  ``report_paper`` reads ``mcm_setting/metrics/{teacher,lcm,mcm}.json`` for MCM's three claims.

Resumable like the training stages (``dcm.pipeline.subproject``): ``mcm_setting/progress.json`` lists the
finished runs with a fingerprint of the setting's params; a rerun skips those and starts over when the
params changed.
"""

from __future__ import annotations

from dcm import config, paths
from dcm.config import ConfigError, Params
from dcm.pipeline import subproject

PRESET = "mcm"
ROWS = ("teacher", "lcm", "mcm")  # the setting's rows: the low-quality teacher, LCM and MCM distilled from it
RUNS = (("prepare", None), ("teacher", None), ("trajectories", None), ("train_baseline", "lcm"),
        ("train_baseline", "mcm"), *(("sample", m) for m in ROWS), *(("evaluate", m) for m in ROWS))


def setting_params(params: Params) -> Params:
    """These params with the ``mcm`` preset overlaid, reduced to the setting's rows (one training seed
    each); a relative sqlite tracking URI is made absolute so the runs land in this project's database."""
    if params.world.name != "shapes" or params.backbone.family != "toy":
        raise ConfigError("world.name / backbone.family", f"{params.world.name} / {params.backbone.family}",
                          "the shapes world with the toy backbone: MCM's setting degrades the world's videos")
    missing = [m for m in ROWS if m not in params.methods]
    if missing:
        raise ConfigError("methods", missing, f"rows {list(ROWS)}: MCM's setting compares them")
    return config.parse(config.deep_merge(subproject.reduced(params, ROWS), config.preset_overlay(PRESET)))


def fingerprint(params: Params) -> str:
    return subproject.fingerprint(params)


def run(params: Params) -> None:
    setting = setting_params(params)
    subproject.run(paths.MCM_SETTING, fingerprint(setting), RUNS, lambda _stage: setting, "mcm_setting",
                   f"preset {PRESET}", {"preset": PRESET})
    print(f"mcm_setting: {paths.MCM_SETTING}/metrics/{{{','.join(ROWS)}}}.json")
