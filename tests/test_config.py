"""params.yaml: typed loading, presets, and bad input failing early with key, value and what is allowed."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from dcm import config, schedule
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
    (lambda r: _set(r, "grid.kappa", 60),
     r"grid\.kappa = 60 is invalid: must lie inside the teacher grid: 0 <= kappa <= 48"),
    (lambda r: _set(r, "grid.kappa", -1), r"grid\.kappa = -1 is invalid: must be >= 0"),
    (lambda r: _set(r, "grid.steps", 0), r"grid\.steps = 0 is invalid: must be >= 2"),
    (lambda r: _set(r, "world.frames", 12),
     r"world\.frames = 12 is invalid: must be a multiple of backbone\.toy\.patch_size\[0\] \(8\)"),
    (lambda r: _set(r, "world.position_jitter", -1.0),
     r"world\.position_jitter = -1\.0 is invalid: must be >= 0"),
    (lambda r: _set(r, "grid.steps", 30),
     r"grid\.steps = 30 is invalid: must divide grid\.num_train_timesteps \(1000\)"),
    (lambda r: _set(r, "methods.dcm.dete.lora_rank", -4),
     r"methods\.dcm\.dete\.lora_rank = -4 is invalid: must be >= 0"),
    (lambda r: _set(r, "methods.lcm.sample_steps", 0),
     r"methods\.lcm\.sample_steps = 0 is invalid: must be >= 1"),
    (lambda r: _set(r, "teacher.lr", "fast"), r"teacher\.lr = 'fast' is invalid: a number > 0"),
    (lambda r: _set(r, "teacher.batch_size", 2.5), r"teacher\.batch_size = 2\.5 is invalid: an integer >= 1"),
    (lambda r: _set(r, "grid.kapa", 37),
     r"grid\.kapa = 37 is invalid: unknown key; allowed keys here: steps, shift, num_train_timesteps, kappa"),
    (lambda r: _set(r, "launcher", "kubernetes"),
     r"launcher = 'kubernetes' is invalid: one of 'local', 'slurm', 'debug'"),
    (lambda r: _set(r, "training.source", "disk"),
     r"training\.source = 'disk' is invalid: one of 'cached', 'online'"),
    (lambda r: _set(r, "teacher.cfg_dropout", 1.0), r"teacher\.cfg_dropout = 1\.0 is invalid: must be < 1"),
    (lambda r: _drop(r, "world.size"), r"world\.size = None is invalid: missing required key \(an integer\)"),
    (lambda r: _set(r, "world.size", 18),
     r"world\.size = 18 is invalid: must be a multiple of codec_factor·patch \(4\)"),
    (lambda r: _set(r, "methods.dcm8.checkpoint_from", "dcm_typo"),
     r"methods\.dcm8\.checkpoint_from = 'dcm_typo' is invalid: one of"),
    (lambda r: _set(r, "methods.dcm.sample_steps", 1), r"methods\.dcm\.sample_steps = 1 is invalid: >= 2"),
    (lambda r: _set(r, "methods", {}),
     r"methods = \{\} is invalid: a mapping of names to a mapping \(at least one\)"),
    (lambda r: _set(_set(r, "backbone.family", "wan"), "backbone.path", "/nonexistent/Wan2.1-T2V-1.3B"),
     r"backbone\.path = '/nonexistent/Wan2\.1-T2V-1\.3B' is invalid: an existing local directory"),
    (lambda r: _set(r, "backbone.family", "hunyuan"),
     r"backbone\.path = None is invalid: a local diffusers folder is required"),
    (lambda r: _set(r, "methods.pcm.phases", 80),
     r"methods\.pcm\.phases = 80 is invalid: must be <= grid\.steps \(50\)"),
    # SemE and DetE keys are separate types: the other expert's key names where it belongs
    (lambda r: _set(r, "methods.dcm.seme.gan_weight", 0.5),
     r"methods\.dcm\.seme\.gan_weight = 0\.5 is invalid: a DetE key, not a SemE one \(set "
     r"methods\.dcm\.dete\.gan_weight\); allowed keys here: train_steps, lr, prompt_dropout, tc_weight, "
     r"tc_offset$"),
    (lambda r: _set(r, "methods.dcm.dete.tc_weight", 1.0),
     r"methods\.dcm\.dete\.tc_weight = 1\.0 is invalid: a SemE key, not a DetE one \(set "
     r"methods\.dcm\.seme\.tc_weight\)"),
    (lambda r: _set(r, "methods.od.dete.tc_offset", 2),
     r"methods\.od\.dete\.tc_offset = 2 is invalid: a SemE key"),
    (lambda r: _set(r, "methods.dcm.seme.lora_rank", 8),
     r"methods\.dcm\.seme\.lora_rank = 8 is invalid: a DetE key"),
    (lambda r: _set(r, "methods.lcm.seme", {"train_steps": 1, "lr": 1.0}),
     r"methods\.lcm\.seme = .* is invalid: only for kind 'dcm' \(this method is kind 'consistency'\)"),
    # non-finite numbers
    (lambda r: _set(r, "methods.dcm.dete.gan_weight", float("nan")),
     r"methods\.dcm\.dete\.gan_weight = nan is invalid: a finite number >= 0"),
    (lambda r: _set(r, "grid.shift", float("inf")), r"grid\.shift = inf is invalid: a finite number > 0"),
    (lambda r: _set(r, "world.position_jitter", -float("inf")),
     r"world\.position_jitter = -inf is invalid: a finite number >= 0"),
    # training.prompt_dropout
    (lambda r: _set(r, "training.prompt_dropout", 1.0),
     r"training\.prompt_dropout = 1\.0 is invalid: must be < 1 and >= 0"),
    (lambda r: _set(r, "training.prompt_dropout", -0.1),
     r"training\.prompt_dropout = -0\.1 is invalid: must be >= 0 and < 1"),
    # explicit sampling schedules
    (lambda r: _set(r, "methods.dcm.schedule", [[1000, "seme"], [900, "dete"]]),
     r"methods\.dcm\.schedule = \[\[1000\.0, 'seme'\], \[900\.0, 'dete'\]\] is invalid: 4 \[t, expert\] "
     r"pairs, one per sampling step"),
    (lambda r: _set(r, "methods.dcm.schedule", [[1000, "seme"], [990, "seme"], [995, "dete"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[2\] = \[995\.0, 'dete'\] is invalid: t must decrease strictly: < 990\.0"),
    (lambda r: _set(r, "methods.dcm.schedule", [[1000, "seme"], [990, "dete"], [950, "seme"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[2\] = \[950\.0, 'seme'\] is invalid: every seme step comes before every dete "
     r"step"),
    (lambda r: _set(r, "methods.dcm.schedule",
                    [[1000, "seme"], [990, "student"], [950, "dete"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[1\] = \[990\.0, 'student'\] is invalid: the expert must be 'seme' or 'dete' "
     r"for a dcm method"),
    (lambda r: _set(r, "methods.dcm.schedule", [[1200, "seme"], [990, "seme"], [950, "dete"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[0\] = \[1200\.0, 'seme'\] is invalid: t \(a teacher timestep\) must be > 0 "
     r"and <= grid\.num_train_timesteps \(1000\)"),
    (lambda r: _set(r, "methods.dcm.schedule", [[1000, "seme"], [990, "seme"], [950, "dete"], [0, "dete"]]),
     r"methods\.dcm\.schedule\[3\] = \[0\.0, 'dete'\] is invalid: t \(a teacher timestep\) must be > 0"),
    (lambda r: _set(r, "methods.dcm.schedule", [[1000, "seme"], [990, "seme"], [950, "seme"], [900, "seme"]]),
     r"methods\.dcm\.schedule = .* is invalid: at least one seme and one dete step"),
    (lambda r: _set(r, "methods.dcm.schedule",
                    [[1000, "seme"], ["high", "seme"], [950, "dete"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[1\] = \['high', 'seme'\] is invalid: a \[t, expert\] pair: t a finite number, "
     r"expert a name"),
    (lambda r: _set(r, "methods.dcm.schedule",
                    [[1000, "seme"], [990, "seme", 1], [950, "dete"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[1\] = \[990, 'seme', 1\] is invalid: a \[t, expert\] pair"),
    (lambda r: _set(r, "methods.dcm.schedule",
                    [[1000, "seme"], [float("nan"), "seme"], [950, "dete"], [900, "dete"]]),
     r"methods\.dcm\.schedule\[1\] = \[nan, 'seme'\] is invalid: a \[t, expert\] pair: t a finite number"),
    (lambda r: _set(r, "methods.dcm.schedule", "official"),
     r"methods\.dcm\.schedule = 'official' is invalid: a list of \[t, expert\] pairs"),
    (lambda r: _set(r, "methods.lcm.schedule",
                    [[1000, "student"], [750, "student"], [500, "teacher"], [250, "student"]]),
     r"methods\.lcm\.schedule\[2\] = \[500\.0, 'teacher'\] is invalid: the expert must be 'student' for a "
     r"consistency method"),
    (lambda r: _set(r, "methods.euler4.schedule",
                    [[1000, "teacher"], [750, "teacher"], [500, "student"], [250, "teacher"]]),
     r"methods\.euler4\.schedule\[2\] = \[500\.0, 'student'\] is invalid: the expert must be 'teacher' for a "
     r"teacher method"),
    # paper.seeds: the rows it adds are the loader's
    (lambda r: _set(r, "paper.rows", ["lcm", "nope"]), r"paper\.rows\[1\] = 'nope' is invalid: one of \["),
    (lambda r: _set(r, "paper.rows", ["teacher"]), r"paper\.rows\[0\] = 'teacher' is invalid: a trained row"),
    (lambda r: _set(r, "paper.rows", ["dcm8"]),
     r"paper\.rows\[0\] = 'dcm8' is invalid: listed together with 'dcm'"),
    (lambda r: _set(r, "paper.rows", ["lcm", "lcm"]),
     r"paper\.rows = \['lcm', 'lcm'\] is invalid: each row once"),
    (lambda r: _set(r, "paper.seeds", 0), r"paper\.seeds = 0 is invalid: must be >= 1"),
    (lambda r: _set(r, "methods.lcm_s1", {"kind": "teacher", "sample_steps": 4}),
     r"methods\.lcm_s1 = 'lcm_s1' is invalid: a name of its own: paper\.seeds \(3\) adds lcm_s1"),
    (lambda r: _set(r, "methods.lcm.train_seed", 2),
     r"methods\.lcm\.train_seed = 2 is invalid: unset: the loader"),
    (lambda r: _set(r, "methods.lcm.replicate_of", "pcm"),
     r"methods\.lcm\.replicate_of = 'pcm' is invalid: unset"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_params_fail_with_key_value_and_allowed(change, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(change(raw_params()))


def test_paper_seeds_add_each_rows_other_training_runs():
    """paper.seeds = 3: <row>_s1 and <row>_s2 for every row of paper.rows, the row itself but for its training
    seed; a weights-reusing row follows its source's seed; none of them in the default DAG."""
    raw = _set(_set(raw_params(), "paper.rows", ["lcm", "dcm", "dcm8"]), "paper.seeds", 3)
    params = config.parse(raw)
    added = [m for m, c in params.methods.items() if c.replicate_of]
    assert added == ["lcm_s1", "dcm_s1", "dcm8_s1", "lcm_s2", "dcm_s2", "dcm8_s2"]
    for name in added:
        row, k = name.rsplit("_s", 1)
        got = dataclasses.asdict(params.methods[name])
        assert got == {**dataclasses.asdict(params.methods[row]), "train_seed": int(k), "replicate_of": row,
                       "checkpoint_from": f"dcm_s{k}" if row == "dcm8" else None}, name
        assert params.params_row(name) == row and params.training_seed(name) == params.seed + int(k)
    assert params.replicates("dcm") == ["dcm", "dcm_s1", "dcm_s2"] and params.replicates("pcm") == ["pcm"]
    assert not set(added) & set(params.default_methods)
    assert [m for m, c in config.parse(_set(raw, "paper.seeds", 1)).methods.items() if c.replicate_of] == []


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


def _float_keys(cls: type, raw: dict, prefix: str = ""):
    """Dotted paths of every float key of ``cls`` (and the sections ``raw`` holds beneath it)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", config._non_null(hints[f.name])
        if tp is float:
            yield key
        elif dataclasses.is_dataclass(tp) and isinstance(raw.get(f.name), dict):
            yield from _float_keys(tp, raw[f.name], key + ".")
        elif typing.get_origin(tp) is dict and isinstance(raw.get(f.name), dict):
            for name, sub in raw[f.name].items():
                yield from _float_keys(typing.get_args(tp)[1], sub, f"{key}.{name}.")


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_every_float_key_rejects_non_finite_numbers(bad):
    raw = raw_params()
    raw["methods"]["mcm"]["mcm"] = {}  # its defaults' float keys too
    keys = list(_float_keys(config.Params, raw))
    assert {"grid.shift", "methods.dcm.dete.gan_weight", "methods.mcm.mcm.head_ema_decay",
            "training.prompt_dropout", "world.position_jitter", "analysis.lr"} <= set(keys)
    value = yaml.safe_load(f"x: {bad}")["x"]  # what YAML gives for it
    for key in keys:
        with pytest.raises(ConfigError,
                           match=rf"^params: {re.escape(key)} = -?(nan|inf) is invalid: a finite number"):
            config.parse(_set(copy.deepcopy(raw), key, value))


def test_dete_defaults_are_the_papers_and_the_ablation_rows_say_what_they_turn_off():
    dete = config.DeteConfig(train_steps=1, lr=5e-6)
    assert (dete.lora_rank, dete.lora_alpha, dete.gan_weight, dete.fm_weight,
            dete.disc_lr) == (128, 256.0, 1.0, 1.0, 1e-5)
    for preset in ("shapes", "smoke", "mcm"):
        methods = config.load(REPO / "params.yaml", preset).methods
        # no GAN and no feature matching, as before the split of the switch
        for row in ("od", "od_pe", "od_pe_tc"):
            assert (methods[row].dete.gan_weight, methods[row].dete.fm_weight) == (0.0, 0.0), (preset, row)
        assert methods["od"].dete.lora_rank == 0 and methods["od_pe"].dete.lora_rank > 0
    # every DetE key of the shapes rows is written out: none relies on a default
    for name, m in raw_params()["methods"].items():
        if m.get("dete"):
            assert {"lora_rank", "gan_weight", "fm_weight"} <= set(m["dete"]), name


def _real(preset: str, tmp_path: Path) -> config.Params:
    raw = config.load_raw(REPO / "params.yaml", preset)
    raw["backbone"]["path"] = str(tmp_path)
    return config.parse(raw)


def test_real_presets_carry_the_official_schedules_and_prompt_dropout(tmp_path):
    hunyuan, wan, cog = (_real(p, tmp_path) for p in ("hunyuan", "wan", "cogvideox"))
    assert hunyuan.method("dcm").schedule == [(1000.0, "seme"), (992.0, "seme"), (981.8, "dete"),
                                              (912.4, "dete")]
    assert [t / 1000 for t, _ in hunyuan.method("dcm").schedule] \
        == pytest.approx([1.0, 0.992, 0.9818, 0.9124])
    assert wan.method("dcm").schedule == [(1000.0, "seme"), (992.0, "seme"), (982.0, "seme"),
                                          (949.0, "dete"), (905.0, "dete"), (810.0, "dete")]
    for params in (hunyuan, wan, cog):
        assert params.method("dcm8").schedule is None  # other step counts: derived
        assert params.method("dcm").dete.lora_rank == 128 and params.method("od").dete.fm_weight == 0.0
    assert (hunyuan.training.prompt_dropout, wan.training.prompt_dropout,
            cog.training.prompt_dropout) == (0.0, 0.1, 0.0)
    assert config.load(REPO / "params.yaml").training.prompt_dropout == 0.0
    assert config.load(REPO / "params.yaml").method("dcm").schedule is None
    for preset in ("hunyuan", "hunyuan15", "wan", "wan22_ti2v", "wan22_a14b", "cogvideox"):
        jsonschema.validate(config.load_raw(REPO / "params.yaml", preset), config.json_schema())


def test_schedules_validate_per_kind():
    raw = raw_params()
    raw["methods"]["lcm"]["schedule"] = [[1000, "student"], [750, "student"], [500.5, "student"],
                                         [250, "student"]]
    raw["methods"]["teacher"] = {"kind": "teacher", "sample_steps": 2,
                                 "schedule": [[1000, "teacher"], [500, "teacher"]]}
    raw["methods"]["dcm"]["schedule"] = [[1000, "seme"], [990, "dete"], [950, "dete"], [900, "dete"]]
    params = config.parse(raw)
    assert params.method("lcm").schedule[2] == (500.5, "student")
    assert params.method("dcm").schedule[0] == (1000.0, "seme")


def test_teacher_grid_accessor_is_the_schedule_grid_computed_once():
    params = config.load(REPO / "params.yaml", "smoke")
    g = params.grid
    direct = schedule.teacher_grid(g.steps, g.shift, g.num_train_timesteps)
    grid = params.teacher_grid()
    assert np.array_equal(grid.sigmas, direct.sigmas) and grid.sigma_min == direct.sigma_min
    assert params.teacher_grid() is grid  # cached
    params.grid.shift = 17.0  # follows a changed grid
    assert np.array_equal(params.teacher_grid().sigmas,
                          schedule.teacher_grid(g.steps, 17.0, g.num_train_timesteps).sigmas)


def test_sections_stay_plain_dataclasses():
    """The rest of the code uses dataclasses.asdict / vars and builds sections by keyword."""
    real = config.RealBackboneConfig(height=480, width=832, frames=81)
    assert dataclasses.asdict(real)["vae_dtype"] == "fp32"
    params = config.load(REPO / "params.yaml")
    assert params.to_dict()["methods"]["dcm"]["dete"]["lora_rank"] == 16
    assert set(vars(params.grid)) == {"steps", "shift", "num_train_timesteps", "kappa"}
    with pytest.raises(Exception, match="lora_rank"):
        config.DeteConfig(train_steps=1, lr=1e-6, lora_rank=-1)


def test_lcm_sampler_only_for_consistency_students():
    from pathlib import Path

    raw = config.load_raw(Path(__file__).resolve().parents[1] / "params.yaml", "smoke")
    assert config.parse(raw).method("lcm").sampler == "lcm" \
        and config.parse(raw).method("pcm").sampler == "euler"
    raw["methods"]["dcm"]["sampler"] = "lcm"
    with pytest.raises(config.ConfigError, match=r"methods\.dcm\.sampler = 'lcm'.*'euler' for kind 'dcm'"):
        config.parse(raw)
