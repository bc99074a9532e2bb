"""A real teacher's own data (issue 29): prompt files and a captioned video set in, the preprocess stage's
sharded stores out (every rank its own shards, resumable shard by shard), one pre-flight report of every
problem before any work, and prompt dropout that never pairs the empty prompt with a step guided by the
prompt.  Tiny Wan pipelines built from the real diffusers classes; short mp4s the tests write themselves."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from dcm import cli, config, paths, shards
from dcm.backbones.base import PromptEmbeds
from dcm.backbones.real import PipelineBackbone
from dcm.config import ConfigError
from dcm.data import dataset
from dcm.data.prompts import build_prompt_sets
from dcm.distill import data as data_module
from dcm.distill.data import CachedSource, teacher_step
from helpers import (
    BUILDERS,
    EVAL_PROMPTS,
    REPO,
    TRAIN_PROMPTS,
    family_raw,
    real_data,
    shrunk_wan,
    smoke_params,
    video_source,
    write_video,
)

BIN = Path(sys.executable).parent


def run(*argv: str) -> None:
    assert cli.main(["run", *argv]) == 0


def project(root: Path, raw: dict, monkeypatch) -> Path:
    """``root`` as a project with ``raw`` as its params.yaml, made the working directory."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setenv("DCM_TRACKING", "off")
    return root


def with_videos(folder: Path, root: Path, videos: int = 4, shard_size: int = 2) -> dict:
    raw = config.deep_merge(family_raw("wan", folder), real_data(root, videos=videos))
    raw["data"]["shard_size"] = shard_size
    return raw


def store_digests(root: Path) -> dict[str, str]:
    """sha256 of every file of data/preprocessed but the stage's summary (it holds the wall time)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != paths.PREPROCESS_RECORD.name}


# ------------------------------------------------------------------------------------ the data files


def test_prompt_files_are_lines_or_jsonl_or_csv_with_a_prompt_column(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    (tmp_path / "p.jsonl").write_text('{"id": "x", "prompt": "a red circle"}\n{"prompt": "a blue square"}\n')
    (tmp_path / "p.csv").write_text('id,prompt\nx,"a red circle, slowly"\ny,a blue square\n')
    txt, jsonl, table = (dataset.read_prompts("data.prompts", str(tmp_path / f"p.{s}"))
                         for s in ("txt", "jsonl", "csv"))
    assert [r.prompt for r in txt] == ["a red circle", "a blue square"]
    assert [(r.id, r.prompt) for r in jsonl] == [("x", "a red circle"), ("2", "a blue square")]
    assert [(r.id, r.prompt) for r in table] == [("x", "a red circle, slowly"), ("y", "a blue square")]


def test_every_bad_prompt_row_is_reported_at_once_by_row(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": " "}\nnot json\n'
                   '{"id": "a", "prompt": "again"}\n{"text": "no prompt key"}\n')
    with pytest.raises(dataset.DatasetError) as err:
        dataset.read_prompts("data.prompts", str(bad))
    e = err.value
    assert (e.key, e.value) == ("data.prompts", str(bad)) and len(e.problems) == 4, str(e)
    text = str(e)
    for expected in ("row 2 (id 'b'): empty prompt", "row 3: not JSON", "row 5: no `prompt` column",
                     "row 4 (id 'a'): duplicate id (first at row 1)", "a `prompt` column"):
        assert expected in text, text


def test_clip_policies_take_the_official_frames_and_size():
    stride = dataset.ClipPolicy(9, 32, 32, "stride", 16.0, "cover_crop", seed=0)
    assert stride.frame_indices(40, 30.0, row=0) == [0, 4, 8, 12, 16, 20, 24, 28, 32]  # ⌊40/9⌋ apart
    assert stride.frame_indices(8, 30.0, row=0) is None  # too few frames
    fps = dataset.ClipPolicy(9, 32, 32, "fps", 8.0, "crop_resize", seed=0)
    picked = fps.frame_indices(100, 24.0, row=3)  # every 3rd frame, a seeded 9-frame window
    assert len(picked) == 9 and np.all(np.diff(picked) == 3) and picked == fps.frame_indices(100, 24.0, row=3)
    assert fps.frame_indices(20, 24.0, row=0) is None  # 7 frames at 8 fps
    frames = np.zeros((2, 48, 64, 3), dtype=np.uint8)
    frames[:, :, 32:] = 255  # right half white
    for policy in (stride, fps):
        clip = policy.resize_frames(frames)
        assert clip.shape == (3, 2, 32, 32) and clip.min() >= -1 and clip.max() <= 1
        assert clip[:, :, :, :8].max() < -0.9 and clip[:, :, :, -8:].min() > 0.9  # centre crop of 48×64


# ------------------------------------------------------------------------------------ the shapes grammar


def test_the_shapes_world_takes_no_data_files():
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["data"] = {"prompts": "prompts.txt"}
    with pytest.raises(ConfigError) as err:
        config.parse(raw)
    assert (err.value.key, err.value.value) == ("data.prompts", "prompts.txt") \
        and "the shapes world has its own prompt splits" in err.value.allowed


def test_a_real_family_without_prompt_files_refuses_the_shapes_grammar(wan_folder, tmp_path, monkeypatch,
                                                                       capsys):
    project(tmp_path / "p", family_raw("wan", wan_folder), monkeypatch)
    assert cli.main(["run", "prepare"]) == 2
    err = capsys.readouterr().err
    assert "data.prompts = None" in err and "the shapes world's captions belong to the toy teacher" in err
    assert "evaluation.prompts = None" in err
    assert not Path("data").exists()
    with pytest.raises(ConfigError, match=r"data\.prompts = None .*shapes world's captions"):
        build_prompt_sets(config.load("params.yaml"))


def test_a_real_family_trains_on_its_prompt_file_and_evaluates_on_its_own(wan_folder, tmp_path, monkeypatch):
    raw = config.deep_merge(family_raw("wan", wan_folder), real_data(tmp_path, per_prompt=3))
    project(tmp_path / "p", raw, monkeypatch)
    run("prepare")
    sets = json.loads(paths.PROMPTS.read_text())
    assert {r["prompt"] for r in sets["train"]} == set(TRAIN_PROMPTS) and len(sets["train"]) == 8
    assert [r["prompt"] for r in sets["eval"]] == [p for p in EVAL_PROMPTS for _ in range(3)]
    seeds = [r["seed"] for r in sets["train"] + sets["eval"]]
    assert len(set(seeds)) == len(seeds)  # no evaluation video shares a training row's noise


# ------------------------------------------------------------------------------------ the pre-flight check


def test_every_preflight_failure_is_in_one_report_and_nothing_is_written(wan_folder, tmp_path, monkeypatch,
                                                                         capsys):
    from dcm.pipeline import check

    broken = tmp_path / "wan"
    shutil.copytree(wan_folder, broken)
    cfg = broken / "transformer" / "config.json"
    cfg.write_text(cfg.read_text().replace('"WanTransformer3DModel"', '"CogVideoXTransformer3DModel"'))
    raw = config.deep_merge(family_raw("wan", broken), real_data(tmp_path, videos=2))
    videos = Path(raw["data"]["videos"])
    (videos / "captions.jsonl").write_text(
        '{"video": "clip0.mp4", "caption": "a red circle"}\n{"video": "gone.mp4", "caption": "a square"}\n'
        '{"video": "clip1.mp4", "caption": ""}\n{"id": "clip0", "video": "clip1.mp4", "caption": "again"}\n')
    raw["data"]["prompts"] = str(tmp_path / "no-such-prompts.txt")
    raw["methods"]["mcm"]["ablation"] = False  # MCM in the DAG: its discriminator needs the shapes world
    raw["evaluation"].update(prompts=None, backend="vbench")
    raw["evaluation"]["vbench"] = {"venv": str(tmp_path / "no-venv"), "weights_dir": None}
    monkeypatch.setattr(check.shutil, "disk_usage", lambda _: SimpleNamespace(free=1))  # one byte free
    project(tmp_path / "p", raw, monkeypatch)

    assert cli.main(["check"]) == 2
    report = capsys.readouterr().out
    assert cli.main(["run", "prepare"]) == 2  # the first stage of the DAG runs the same check first
    assert report.strip() in capsys.readouterr().err
    expected = [
        ("backbone.path transformer/config.json = 'CogVideoXTransformer3DModel'",
         "the class model_index.json names (WanTransformer3DModel)"),
        ("data.prompts = ", "no such file; a local path, never a hub id"),
        ("data.videos = ", "row 2 (id 'gone'): video 'gone.mp4' is missing"),
        ("", "row 3 (id 'clip1'): empty caption"),
        ("", "row 4 (id 'clip0'): duplicate id (first at row 1)"),
        ("evaluation.prompts = None", "a local prompt file of the evaluation prompts"),
        ("evaluation.vbench.venv = ", "dcm vbench setup"),
        ("evaluation.vbench.weights_dir = None", "VBench's pretrained weights"),
        ("methods.mcm.kind = 'mcm'", "the shapes world's high-quality stills (its image discriminator's"),
        ("disk = '0.0 GiB free", "for what the DAG writes"),
    ]
    for key, allowed in expected:
        assert key in report and allowed in report, (key, allowed, report)
    assert not Path("data").exists()


# ------------------------------------------------------------------------------------ the preprocess stage


def test_bad_videos_are_reported_together_before_any_model_loads(wan_folder, tmp_path, monkeypatch):
    from dcm.pipeline.stages import preprocess as stage

    raw = with_videos(wan_folder, tmp_path, videos=2)
    videos = Path(raw["data"]["videos"])
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    write_video(videos / "short.mp4", frames=5)  # the tiny Wan takes 9-frame clips
    with open(videos / "captions.jsonl", "a") as f:
        f.write('{"video": "broken.mp4", "caption": "a red circle"}\n'
                '{"video": "short.mp4", "caption": "a blue circle"}\n')
    project(tmp_path / "p", raw, monkeypatch)
    run("prepare")
    run("teacher")

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the bad rows were reported")

    monkeypatch.setattr(stage, "load_encoders", no_model)
    with pytest.raises(dataset.DatasetError) as err:
        stage.run(config.load("params.yaml"))
    problems = err.value.problems
    assert err.value.key == "data.videos" and len(problems) == 2, problems
    assert problems[0].startswith("row 3 (id 'broken'): video 'broken.mp4' is unreadable")
    assert problems[1].startswith("row 4 (id 'short'): video 'short.mp4' has 5 frames at 8 fps, fewer than "
                                  "the 9 a 9-frame clip needs")
    assert not paths.PREPROCESSED.exists()


def test_a_killed_preprocess_redoes_only_its_unfinished_shards(wan_folder, tmp_path, monkeypatch):
    raw = with_videos(wan_folder, tmp_path)
    reference = project(tmp_path / "reference", raw, monkeypatch)
    for stage in ("prepare", "teacher", "preprocess"):
        run(stage)
    want = store_digests(reference / paths.PREPROCESSED)
    total = sum(len(json.loads((reference / store / "index.json").read_text())["shards"])
                for store in (paths.PROMPT_STORE, paths.VIDEO_STORE))
    assert total == 6  # 7 distinct prompts and 4 videos, 2 a shard

    project(tmp_path / "killed", raw, monkeypatch)
    run("prepare")
    run("teacher")
    written = []
    original = shards.ShardWriter.write

    def counted(self, i, tensors, kill_at=None):
        if kill_at is not None and len(written) == kill_at:
            raise KeyboardInterrupt("simulated preemption")
        written.append((self.root.name, i))
        return original(self, i, tensors)

    monkeypatch.setattr(shards.ShardWriter, "write", lambda self, i, t: counted(self, i, t, kill_at=2))
    assert cli.main(["run", "preprocess"]) == 130
    assert not (paths.PROMPT_STORE / "index.json").exists() and not paths.PREPROCESS_RECORD.exists()
    (paths.PROMPT_STORE / ".shard-00002.safetensors.tmp-killed").write_bytes(b"half a shard")
    first = list(written)
    written.clear()
    monkeypatch.setattr(shards.ShardWriter, "write", lambda self, i, t: counted(self, i, t))
    run("preprocess")
    assert first == [("prompts", 0), ("prompts", 1)]
    assert written == [("prompts", 2), ("prompts", 3), ("videos", 0), ("videos", 1)]  # only the unfinished
    assert store_digests(paths.PREPROCESSED) == want


@pytest.mark.slow
def test_preprocess_at_two_ranks_writes_the_shards_of_one_rank(wan_folder, tmp_path, monkeypatch):
    raw = with_videos(wan_folder, tmp_path)
    one = project(tmp_path / "one", raw, monkeypatch)
    for stage in ("prepare", "teacher", "preprocess"):
        run(stage)
    two = project(tmp_path / "two", raw, monkeypatch)
    run("prepare")
    run("teacher")
    env = {**os.environ, "DCM_TRACKING": "off", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "dcm"),
                          "run", "preprocess"], cwd=two, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    record = json.loads((two / paths.PREPROCESS_RECORD).read_text())
    assert record["ranks"] == 2 and record["prompt_shards"] == 4 and record["video_shards"] == 2
    assert store_digests(two / paths.PREPROCESSED) == store_digests(one / paths.PREPROCESSED)


# ------------------------------------------------------------------------------------ prompt dropout


class ArrayStore:
    """A trajectory store in memory: ``pair`` reads consecutive points as TrajectoryStore does."""

    exact_steps = True

    def __init__(self, grid, rows: list[dict], shape, seed: int = 0):
        self.grid_sigmas = grid.extended
        self.rows = rows
        g = torch.Generator().manual_seed(seed)
        self.points = torch.randn(len(rows), len(grid.extended), *shape, generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, rows, n):
        rows, n = torch.tensor(rows), torch.tensor(n)
        return self.points[rows, n + 1], self.points[rows, n]


def test_a_dropped_cached_row_takes_the_unconditional_teacher_step_from_its_own_point(backbone, params):
    grid = params.teacher_grid()
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    store = ArrayStore(grid, [{"prompt_id": i, "prompt": p, "seed": i} for i, p in enumerate(TRAIN_PROMPTS)],
                       shape)
    source = CachedSource(store, backbone)
    rows, n = torch.tensor([0, 1, 2]), torch.tensor([5, 3, 7])
    drop = torch.tensor([False, True, False])
    kept = source.batch(rows, n, torch.Generator())
    dropped = source.batch(rows, n, torch.Generator(), drop=drop)
    torch.testing.assert_close(dropped.x_n, kept.x_n, rtol=0, atol=0)
    torch.testing.assert_close(dropped.x_prev[[0, 2]], kept.x_prev[[0, 2]], rtol=0, atol=0)  # stored steps
    null = backbone.null_prompts(1)
    sigma = torch.as_tensor(grid.extended, dtype=torch.float32)
    with torch.no_grad():  # the teacher's velocity under the empty prompt alone: v_u, no guidance left
        v_u = backbone.forward(backbone.transformer, kept.x_n[1:2], sigma[4:5], null)
    torch.testing.assert_close(dropped.x_prev[1:2], kept.x_n[1:2] + (sigma[3] - sigma[4]) * v_u)
    assert not torch.allclose(dropped.x_prev[1], kept.x_prev[1])  # never the prompt-guided stored step
    assert torch.equal(dropped.cond.hidden[1], null.hidden[0])
    assert torch.equal(dropped.cond.hidden[[0, 2]], kept.cond.hidden[[0, 2]])


def test_a_dropped_online_row_takes_its_teacher_step_under_the_empty_prompt(backbone, params):
    source = video_source(params, backbone, quality="clean", rows=3)
    rows, n = torch.tensor([0, 1, 2]), torch.tensor([5, 3, 7])
    drop = torch.tensor([True, False, False])
    kept = source.batch(rows, n, torch.Generator().manual_seed(0))
    dropped = source.batch(rows, n, torch.Generator().manual_seed(0), drop=drop)
    torch.testing.assert_close(dropped.x_n, kept.x_n, rtol=0, atol=0)  # the same data and noise
    torch.testing.assert_close(dropped.x_prev[1:], kept.x_prev[1:], rtol=0, atol=0)
    null = backbone.null_prompts(1)
    sigma = torch.as_tensor(params.teacher_grid().extended, dtype=torch.float32)
    expected = teacher_step(backbone, kept.x_n[:1], sigma[6:7], sigma[5:6], null, null)
    torch.testing.assert_close(dropped.x_prev[:1], expected)
    assert torch.equal(dropped.cond.hidden[0], null.hidden[0])


def test_prompt_dropout_is_per_method_and_off_for_dmd2():
    params = smoke_params(prompt_dropout=0.2)
    assert (params.prompt_dropout("lcm"), params.prompt_dropout("dcm", "seme"),
            params.prompt_dropout("dcm", "dete"), params.prompt_dropout("dmd2")) == (0.2, 0.2, 0.2, 0.0)
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["training"]["prompt_dropout"] = 0.2
    raw["methods"]["lcm"]["prompt_dropout"] = 0.0
    raw["methods"]["dcm"]["seme"]["prompt_dropout"] = 0.1
    params = config.parse(raw)
    assert (params.prompt_dropout("lcm"), params.prompt_dropout("dcm", "seme"),
            params.prompt_dropout("dcm", "dete")) == (0.0, 0.1, 0.2)
    for key, value, allowed in (("methods.dmd2.prompt_dropout", 0.1, "its training keeps every prompt"),
                                ("methods.dcm.prompt_dropout", 0.1, "methods.dcm.seme.prompt_dropout, "
                                                                    "methods.dcm.dete.prompt_dropout")):
        bad = copy.deepcopy(raw)
        bad["methods"][key.split(".")[1]]["prompt_dropout"] = value
        with pytest.raises(ConfigError) as err:
            config.parse(bad)
        assert (err.value.key, err.value.value) == (key, value) and allowed in err.value.allowed


# ------------------------------------------------------------------------------------ the wan rehearsal


def test_wan_rehearsal_preprocess_trajectories_online_training_sample_without_the_text_encoder(
        wan_folder, tmp_path, monkeypatch):
    raw = shrunk_wan(wan_folder, tmp_path)
    project(tmp_path / "p", raw, monkeypatch)
    params = config.load("params.yaml")
    assert params.training.source == "online" and params.training.prompt_dropout == 0.1
    for stage in ("prepare", "teacher", "preprocess"):
        run(stage)

    def no_text_encoder(*args, **kwargs):
        raise AssertionError("the text encoder ran after preprocessing")

    monkeypatch.setattr(PipelineBackbone, "load_text_encoders", no_text_encoder)
    monkeypatch.setattr(PipelineBackbone, "encode_text", no_text_encoder)
    run("trajectories")  # the cached store: 4 guided solves of the user's prompts
    run("train_seme", "--method", "dcm")  # online: the videos' latents, one guided teacher step
    run("train_dete", "--method", "dcm")
    cached = copy.deepcopy(raw)
    cached["training"]["source"] = "cached"  # LCM on the trajectory store, dropout's unconditional steps
    cached["methods"]["lcm"]["prompt_dropout"] = 0.75
    Path("params-cached.yaml").write_text(yaml.safe_dump(cached, sort_keys=False))
    steps = []
    monkeypatch.setattr(data_module, "teacher_step", lambda *a: steps.append(len(a[1])) or teacher_step(*a))
    assert cli.main(["run", "train_baseline", "--method", "lcm", "--params", "params-cached.yaml"]) == 0
    assert sum(steps) >= 1  # dropped rows took the teacher's step under the empty prompt
    run("sample", "--method", "dcm")

    index = json.loads((paths.TRAJECTORIES / "index.json").read_text())
    assert {r["prompt"] for s in index["shards"] for r in s["rows"]} <= set(TRAIN_PROMPTS)
    videos = json.loads((paths.VIDEO_STORE / "index.json").read_text())
    assert videos["count"] == 4 and videos["latent_shape"] == index["latent_shape"]
    for run_dir in (paths.checkpoint("dcm", "seme"), paths.checkpoint("dcm", "dete"),
                    paths.checkpoint("lcm")):
        assert json.loads((run_dir / "train.json").read_text())["steps"] == 2
    record = json.loads((paths.samples("dcm") / "samples.json").read_text())
    assert [r["prompt"] for r in record["rows"]] == EVAL_PROMPTS
    assert len(list(paths.samples("dcm").glob("*.mp4"))) == 2
    prompts = shards.ShardStore(paths.PROMPT_STORE)
    assert {r["prompt"] for r in prompts.rows} >= set(TRAIN_PROMPTS) | {""}
    # VBench's staging of these videos (custom_input: the files and the prompt file vbench reads)
    from dcm.evaluation.vbench import stage_videos

    staged, prompt_file, index = stage_videos(record["rows"], paths.samples("dcm"), Path("vbench-work"),
                                              "custom_input")
    assert sorted(json.loads(prompt_file.read_text()).values()) == sorted(EVAL_PROMPTS)
    assert len(index) == 2 and all(Path(p).resolve().is_file() for p in index)


def test_the_stored_embeddings_are_the_encoders_and_a_missing_prompt_is_an_error(wan_folder, tmp_path,
                                                                                  monkeypatch):
    from dcm.backbones import adapter_class, load_teacher

    raw = config.deep_merge(family_raw("wan", wan_folder), real_data(tmp_path))
    project(tmp_path / "p", raw, monkeypatch)
    for stage in ("prepare", "teacher", "preprocess"):
        run(stage)
    params = config.load("params.yaml")
    stored = load_teacher(params, paths.TEACHER)
    assert all(getattr(stored.pipe, n) is None for n in stored.text_components)
    bb = params.backbone
    fresh = adapter_class("wan").from_folder(bb.path, bb.real, bb.guidance_scale)
    with torch.no_grad():
        direct = fresh.encode_prompts(TRAIN_PROMPTS[:2])
    got = stored.encode_prompts(TRAIN_PROMPTS[:2])
    assert isinstance(got, PromptEmbeds)
    torch.testing.assert_close(got.hidden, direct.hidden)  # encoded in another batch: rounding at most
    with pytest.raises(ConfigError, match=r"not in the preprocessed store; the text encoders are not loaded"):
        stored.encode_prompts(["a prompt nobody preprocessed"])


@pytest.mark.parametrize("family", ["hunyuan", "hunyuan15", "cogvideox"])
def test_hunyuan_and_cogvideox_preprocess_their_prompts_and_videos_with_their_own_encoders(family, tmp_path,
                                                                                          monkeypatch):
    """The other families through prepare → teacher → preprocess with a captioned video set: the stored
    conditioning (HunyuanVideo's two encoders: hidden states, pooled vector and mask; HunyuanVideo 1.5's:
    Qwen2.5-VL and ByT5 hidden states with their masks) is the encoders', the video store holds every clip's
    VAE latents at the family's latent shape."""
    from dcm.backbones import adapter_class, load_teacher

    torch.manual_seed(0)
    folder = tmp_path / f"tiny-{family}"
    BUILDERS[family](folder)
    raw = config.deep_merge(family_raw(family, folder), real_data(tmp_path, videos=2))
    project(tmp_path / "p", raw, monkeypatch)
    for stage in ("prepare", "teacher", "preprocess"):
        run(stage)
    params = config.load("params.yaml")
    stored = load_teacher(params, paths.TEACHER)
    assert all(getattr(stored.pipe, n) is None for n in stored.text_components)
    bb = params.backbone
    fresh = adapter_class(family).from_folder(bb.path, bb.real, bb.guidance_scale)
    with torch.no_grad():
        direct = fresh.encode_prompts(TRAIN_PROMPTS[:2])
    got = stored.encode_prompts(TRAIN_PROMPTS[:2])
    torch.testing.assert_close(got.hidden, direct.hidden)
    assert set(got.extra or {}) == set(direct.extra or {})
    for key, value in (direct.extra or {}).items():
        torch.testing.assert_close(got.extra[key], value)
    videos = json.loads((paths.VIDEO_STORE / "index.json").read_text())
    assert videos["count"] == 2
    assert tuple(videos["latent_shape"]) == tuple(stored.video_latent_shape(params))
