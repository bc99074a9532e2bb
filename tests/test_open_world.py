"""The open-caption world wired through the DAG (``world.open_share``, ``world.eval_open_prompts``): the
teacher's training captions and the train rows leave attributes open as often as the world says, the
evaluation and validation rows gain open prompts on their own streams (the full-caption rows unchanged),
the toy teacher's vocabulary reads the open shape noun, and a smoke run scores the open rows' coverage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcm import cli, config
from dcm.data.prompts import build_prompt_sets, validation_rows
from dcm.distill.teacher_pretraining import scene_batch
from dcm.worlds import shapes

REPO = Path(__file__).resolve().parents[1]


def smoke_raw(**world) -> dict:
    raw = config.load_raw(REPO / "params.yaml", "smoke")
    raw["world"].update(world)
    return raw


def test_params_yaml_holds_the_decided_open_world_and_the_smoke_and_mcm_presets_full_captions():
    """docs/world-decision.md, section 6: the open world, the 7600-step teacher and guidance 2 are the
    default experiment; the smoke DAG and MCM's own setting keep full captions."""
    params = config.load(REPO / "params.yaml")
    assert (params.world.open_share, params.world.eval_open_prompts) == (0.5, 32)
    assert (params.teacher.train_steps, params.backbone.guidance_scale) == (7600, 2.0)
    rows = build_prompt_sets(params)["eval"]
    assert sum(shapes.is_open(r["prompt"]) for r in rows) == 32 * params.world.eval_seeds == len(rows) // 2
    for preset in ("smoke", "mcm"):
        world = config.load(REPO / "params.yaml", preset=preset).world
        assert (world.open_share, world.eval_open_prompts) == (0.0, 0), preset


def test_the_full_caption_world_has_no_open_prompt_and_the_open_world_keeps_its_full_rows():
    closed = build_prompt_sets(config.parse(smoke_raw()))
    assert not any(shapes.is_open(r["prompt"]) for split in closed.values() for r in split)
    opened = build_prompt_sets(config.parse(smoke_raw(open_share=0.5, eval_open_prompts=6)))
    train_open = [shapes.is_open(r["prompt"]) for r in opened["train"]]
    assert 0.2 < np.mean(train_open) < 0.8  # half the rows, drawn per seed
    # the same seeds, and each row's prompt is its full caption or a coarsening of it
    for a, b in zip(closed["train"], opened["train"], strict=True):
        assert a["seed"] == b["seed"]
        named = shapes.parse_open_caption(b["prompt"])
        assert all(v is None or shapes.parse_caption(a["prompt"])[k] == v for k, v in named.items())
    n_full = len(closed["eval"])
    assert opened["eval"][:n_full] == closed["eval"]  # the full-caption rows: as in the closed world
    extra = opened["eval"][n_full:]
    assert len(extra) == 6 * config.parse(smoke_raw()).world.eval_seeds
    assert all(shapes.is_open(r["prompt"]) for r in extra)
    seeds = [r["seed"] for r in opened["train"] + opened["eval"]]
    assert len(set(seeds)) == len(seeds)
    captions = shapes.all_captions() + shapes.open_captions()
    assert all(captions[r["prompt_id"]] == r["prompt"] for split in opened.values() for r in split)
    val = validation_rows(config.parse(smoke_raw(open_share=0.5, eval_open_prompts=6)))
    assert sum(shapes.is_open(r["prompt"]) for r in val) == len(extra)
    assert not {r["seed"] for r in val} & set(seeds)


def test_too_many_open_prompts_name_the_key():
    params = config.parse(smoke_raw(eval_open_prompts=10_000))
    with pytest.raises(config.ConfigError, match=r"world\.eval_open_prompts = 10000"):
        build_prompt_sets(params)


def test_the_teachers_training_captions_leave_attributes_open_as_often_as_the_world_says():
    _, closed = scene_batch(np.random.default_rng(0), 64, 16, 4, "clean")
    videos, opened = scene_batch(np.random.default_rng(0), 64, 16, 4, "clean", open_share=0.5,
                                 open_attributes=["colour"])
    assert not any(shapes.is_open(c) for c in closed)
    share = np.mean([shapes.is_open(c) for c in opened])
    assert 0.3 < share < 0.7
    for full, caption in zip(closed, opened, strict=True):
        assert caption in (full, shapes.open_caption(full, ["colour"]))


@pytest.mark.slow
def test_a_smoke_run_of_the_open_world_scores_the_open_rows_coverage(tmp_path, monkeypatch):
    raw = smoke_raw(open_share=0.3, eval_open_prompts=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCM_TRACKING", "off")
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for argv in (["prepare"], ["teacher"], ["sample", "--method", "teacher"],
                 ["evaluate", "--method", "teacher"]):
        assert cli.main(["run", *argv]) == 0, argv
    from dcm.backbones import load_teacher

    teacher = load_teacher(config.load("params.yaml"), "models/teacher")
    assert shapes.OPEN_SHAPE_WORD in teacher.prompt_encoder.config.vocabulary
    metrics = json.loads(Path("metrics/teacher.json").read_text())
    block = metrics["open_world"]
    assert block["coverage"], block  # a coverage entry per attribute the open rows leave open
