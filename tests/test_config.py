"""params.yaml: typed loading, presets, and bad input failing early with key, value and what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from dcm import config
from dcm.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_and_smoke_preset_load():
    shapes = config.load(REPO / "params.yaml")
    smoke = config.load(REPO / "params.yaml", preset="smoke")
    assert shapes.experiment == "shapes" and smoke.experiment == "smoke"
    assert shapes.grid.steps == 50 and smoke.grid.steps < shapes.grid.steps
    assert "dcm" in shapes.default_methods and "teacher" in shapes.default_methods


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"preset = 'huge'.*one of \['shapes', .*'smoke'"):
        config.load(REPO / "params.yaml", preset="huge")


def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def _drop(raw: dict, dotted: str) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    return raw


BAD_INPUTS = [
    # (change, expected message fragment)
    (lambda r: _set(r, "grid.kappa", 60), r"grid\.kappa = 60 is invalid: must lie inside the teacher grid: 0 <= kappa <= 48"),
    (lambda r: _set(r, "grid.kappa", -1), r"grid\.kappa = -1 is invalid: must be >= 0"),
    (lambda r: _set(r, "grid.steps", 0), r"grid\.steps = 0 is invalid: must be >= 2"),
    (lambda r: _set(r, "world.frames", 12), r"world\.frames = 12 is invalid: must be a multiple of backbone\.toy\.patch_size\[0\] \(8\)"),
    (lambda r: _set(r, "world.position_jitter", -1.0), r"world\.position_jitter = -1\.0 is invalid: must be >= 0"),
    (lambda r: _set(r, "grid.steps", 30), r"grid\.steps = 30 is invalid: must divide grid\.num_train_timesteps \(1000\)"),
    (lambda r: _set(r, "methods.dcm.dete.lora_rank", -4), r"methods\.dcm\.dete\.lora_rank = -4 is invalid: must be >= 0"),
    (lambda r: _set(r, "methods.lcm.sample_steps", 0), r"methods\.lcm\.sample_steps = 0 is invalid: must be >= 1"),
    (lambda r: _set(r, "teacher.lr", "fast"), r"teacher\.lr = 'fast' is invalid: a number > 0"),
    (lambda r: _set(r, "teacher.batch_size", 2.5), r"teacher\.batch_size = 2\.5 is invalid: an integer >= 1"),
    (lambda r: _set(r, "grid.kapa", 37), r"grid\.kapa = 37 is invalid: unknown key; allowed keys here: steps, shift, num_train_timesteps, kappa"),
    (lambda r: _set(r, "launcher", "kubernetes"), r"launcher = 'kubernetes' is invalid: one of 'local', 'slurm', 'debug'"),
    (lambda r: _set(r, "training.source", "disk"), r"training\.source = 'disk' is invalid: one of 'cached', 'online'"),
    (lambda r: _set(r, "teacher.cfg_dropout", 1.0), r"teacher\.cfg_dropout = 1\.0 is invalid: must be < 1"),
    (lambda r: _drop(r, "world.size"), r"world\.size = None is invalid: missing required key \(an integer\)"),
    (lambda r: _set(r, "world.size", 18), r"world\.size = 18 is invalid: must be a multiple of codec_factor·patch \(4\)"),
    (lambda r: _set(r, "methods.dcm8.checkpoint_from", "dcm2"), r"methods\.dcm8\.checkpoint_from = 'dcm2' is invalid: one of"),
    (lambda r: _set(r, "methods.dcm.sample_steps", 1), r"methods\.dcm\.sample_steps = 1 is invalid: >= 2"),
    (lambda r: _set(r, "methods", {}), r"methods = \{\} is invalid: a mapping of names to a mapping \(at least one\)"),
    (lambda r: _set(_set(r, "backbone.family", "wan"), "backbone.path", "/nonexistent/Wan2.1-T2V-1.3B"),
     r"backbone\.path = '/nonexistent/Wan2\.1-T2V-1\.3B' is invalid: an existing local directory"),
    (lambda r: _set(r, "backbone.family", "hunyuan"), r"backbone\.path = None is invalid: a local diffusers folder is required"),
    (lambda r: _set(r, "methods.pcm.phases", 80), r"methods\.pcm\.phases = 80 is invalid: must be <= grid\.steps \(50\)"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_params_fail_with_key_value_and_allowed(change, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(change(raw_params()))


def test_cli_reports_bad_params_before_any_work(tmp_path):
    bad = _set(raw_params(), "grid.kappa", 99)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "dcm.cli", "run", "prepare"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "grid.kappa = 99 is invalid" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_committed_schema_is_generated_from_the_dataclasses():
    committed = json.loads((REPO / "workflow/schemas/params.schema.json").read_text())
    assert committed == config.json_schema(), "run `dcm schema --write workflow/schemas/params.schema.json`"


def test_schema_accepts_presets_and_rejects_what_the_loader_rejects():
    schema = config.json_schema()
    jsonschema.validate(raw_params(), schema)
    jsonschema.validate(config.load_raw(REPO / "params.yaml", "smoke"), schema)
    for change in (lambda r: _set(r, "grid.kapa", 37), lambda r: _set(r, "teacher.lr", -1.0),
                   lambda r: _set(r, "launcher", "kubernetes"), lambda r: _drop(r, "world.size")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(change(raw_params()), schema)
