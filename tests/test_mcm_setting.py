"""MCM in its own setting (stage mcm_setting): the `mcm` preset's pipeline run by the same stage code in
mcm_setting/ -- a teacher trained on the world's low-quality videos, LCM and MCM distilled from it, sampled
and scored -- resumable, and refused before any work where it cannot apply."""

from __future__ import annotations

import json

import pytest

from dcm import config, io
from dcm.pipeline.stages import mcm_setting
from dcm.pipeline.table import STAGES


def test_the_setting_is_the_mcm_preset_on_these_params_with_its_three_rows(project):
    params = config.load("params.yaml", preset="smoke")
    setting = mcm_setting.setting_params(params)
    overlay = config.preset_overlay("mcm")
    assert setting.world.quality == overlay["world"]["quality"] == "low" and params.world.quality == "clean"
    assert setting.experiment == overlay["experiment"]
    assert list(setting.methods) == list(mcm_setting.ROWS) and setting.paper.rows == []
    assert setting.methods["mcm"] == params.methods["mcm"] and setting.teacher == params.teacher
    # this project's database, not the folder's
    assert setting.tracking.uri == f"sqlite:///{project / 'mlflow.db'}"
    other = config.parse(config.deep_merge(config.load_raw("params.yaml", "smoke"),
                                           {"training": {"huber_c": 0.5}}))
    assert mcm_setting.fingerprint(mcm_setting.setting_params(other)) != mcm_setting.fingerprint(setting)


def test_the_setting_is_refused_without_its_rows_or_off_the_shapes_world(project):
    params = config.load("params.yaml", preset="smoke")
    lcm = params.methods.pop("lcm")
    with pytest.raises(config.ConfigError, match=r"methods.*\['lcm'\].*MCM's setting compares them"):
        mcm_setting.setting_params(params)
    params.methods["lcm"] = lcm
    params.backbone.family = "wan"
    with pytest.raises(config.ConfigError, match=r"backbone.family.*shapes world with the toy backbone"):
        mcm_setting.setting_params(params)


def test_mcm_setting_runs_the_low_quality_teachers_pipeline_and_resumes(project, monkeypatch, capsys):
    monkeypatch.setenv("DCM_TRACKING", "off")
    params = config.load("params.yaml", preset="smoke")
    STAGES["mcm_setting"].run(params)
    root = project / "mcm_setting"
    progress = io.read_json(root / "progress.json")
    assert len(progress["done"]) == len(mcm_setting.RUNS) and progress["preset"] == "mcm"
    for row in mcm_setting.ROWS:
        record = io.read_json(root / "metrics" / f"{row}.json")
        assert record["method"] == row and len(record["per_row"]) == 4 \
            and "imaging_quality" in record["dimensions"]
    # nothing outside its folder
    assert not (project / "metrics").exists() and not (project / "models").exists()
    metrics = (root / "metrics" / "mcm.json").read_bytes()
    capsys.readouterr()
    STAGES["mcm_setting"].run(params)  # everything done: skipped, nothing rewritten
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == len(mcm_setting.RUNS)
    assert (root / "metrics" / "mcm.json").read_bytes() == metrics
    progress["done"].remove("evaluate --method mcm")  # a run killed before its last step
    (root / "progress.json").write_text(json.dumps(progress))
    STAGES["mcm_setting"].run(params)
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == len(mcm_setting.RUNS) - 1 \
        and "evaluate --method mcm (preset" in out
