"""The trajectory store and the ``trajectories`` stage: exact fp32 teacher steps, random access, checksums,
atomic resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dcm import config, io, paths
from dcm.backbones import create_teacher, load_teacher
from dcm.backbones.base import PromptEmbeds
from dcm.data.prompts import build_prompt_sets
from dcm.data.trajectories import (
    TrajectoryStore,
    TrajectoryWriter,
    bytes_per_trajectory,
    initial_noise,
    solve,
    solve_velocity,
    store_header,
)
from dcm.distill.data import CachedSource
from dcm.pipeline.stages import trajectories as stage
from dcm.pipeline.table import STAGES
from dcm.sampling import sample, teacher_velocity
from dcm.schedule import teacher_grid, uniform_schedule
from dcm.shards import INDEX, PARTIAL_INDEX, StoreError, shard_name, sidecar_name

REPO = Path(__file__).resolve().parents[1]


def smoke_raw(**trajectories) -> dict:
    """The smoke params as one plain mapping (no preset overlay), with trajectory overrides."""
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["trajectories"].update(trajectories)
    return raw


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A random-weight toy teacher saved through the same save/from_pretrained path as real use."""
    root = tmp_path_factory.mktemp("teacher")
    create_teacher(config.parse(smoke_raw())).save(root / "teacher")
    return root / "teacher"


def make_project(root: Path, teacher_dir: Path, raw: dict) -> config.Params:
    """params.yaml, data/prompts.json and models/teacher in ``root``; returns the parsed params."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = config.parse(raw)
    io.write_json_atomic(root / paths.PROMPTS, build_prompt_sets(params))
    shutil.copytree(teacher_dir, root / paths.TEACHER)
    return params


@pytest.fixture
def no_tracking(monkeypatch):
    monkeypatch.setenv("DCM_TRACKING", "off")


def fake_header(rows, latent_shape=(3, 2, 2, 2), shard_size=2, **overrides):
    grid = teacher_grid(10, 3.0)
    args = {"grid": grid, "num_train_timesteps": 1000, "shift": 3.0, "guidance_mode": "cfg",
            "guidance_scale": 4.0,
            "dtype": "fp32", "latent_shape": latent_shape, "shard_size": shard_size, "batch_size": 2,
            "rows": rows, "teacher_sha256": "0" * 64}
    args.update(overrides)
    return store_header(**args)


ROWS = [{"prompt_id": i, "prompt": f"a red square moves left slowly {i}", "seed": 100 + i} for i in range(5)]


def write_random_store(root: Path, rows=ROWS, **overrides) -> torch.Tensor:
    """A complete store of random latents (no teacher): the writer and reader on their own."""
    header = fake_header(rows, **overrides)
    writer = TrajectoryWriter(root, header, rows)
    values = torch.randn(len(rows), 11, *header["latent_shape"], generator=torch.Generator().manual_seed(0))
    for i in writer.pending():
        lo = i * header["shard_size"]
        writer.write(i, values[lo:lo + len(writer.shard_rows[i])])
    writer.finish()
    return values


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# ------------------------------------------------------------------------------------ fast units


def test_store_layout_is_fixed_size_shards_plus_index(tmp_path):
    values = write_random_store(tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) \
        == [INDEX] + [shard_name(i) for i in range(3)]
    index = json.loads((tmp_path / "store" / INDEX).read_text())
    assert [len(s["rows"]) for s in index["shards"]] == [2, 2, 1]  # the last shard may be shorter
    assert index["grid"]["sigmas"] == [float(s) for s in teacher_grid(10, 3.0).extended]
    assert index["guidance"] == {"mode": "cfg", "scale": 4.0}
    assert index["format_version"] == 2 and index["dtype"] == "fp32" and index["exact_steps"] is True
    store = TrajectoryStore(tmp_path / "store")
    assert store.exact_steps
    assert len(store) == 5 and store.latent_shape == (3, 2, 2, 2)
    assert [r["seed"] for r in store.rows] == [r["seed"] for r in ROWS]
    assert store.prompts([4, 0]) == [ROWS[4]["prompt"], ROWS[0]["prompt"]]
    assert store.sigma(-1) == pytest.approx(teacher_grid(10, 3.0).sigma_min) and store.sigma(9) == 1.0
    got = store.latents(torch.tensor([4, 1, 2]), torch.tensor([-1, 9, 3]))
    want = torch.stack([values[4, 0], values[1, 10], values[2, 4]])
    assert got.dtype == torch.float32 and got.shape == (3, 3, 2, 2, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the shard files are the fp32 tensors plus a small header
    sizes = [(tmp_path / "store" / shard_name(i)).stat().st_size for i in range(3)]
    per_traj = bytes_per_trajectory((3, 2, 2, 2), 10)
    assert per_traj == 4 * 11 * 24 \
        and all(0 < size - rows * per_traj < 1024 for size, rows in zip(sizes, [2, 2, 1]))


def test_fp32_store_pairs_are_exact(tmp_path):
    values = write_random_store(tmp_path / "store", dtype="fp32")
    store = TrajectoryStore(tmp_path / "store")
    got = store.latents([3, 3], [0, 5])
    torch.testing.assert_close(got, torch.stack([values[3, 1], values[3, 6]]), rtol=0, atol=0)
    x_n, x_prev = store.pair([3, 0, 4], [0, 9, 5])  # n = 0 pairs σ_0 with σ_min
    torch.testing.assert_close(x_n, torch.stack([values[3, 1], values[0, 10], values[4, 6]]), rtol=0, atol=0)
    torch.testing.assert_close(x_prev, torch.stack([values[3, 0], values[0, 9], values[4, 5]]),
                               rtol=0, atol=0)
    with pytest.raises(IndexError, match="grid index -1 has no previous point"):
        store.pair([0], [-1])
    with pytest.raises(IndexError, match="grid index 10"):
        store.pair([0], [10])


def test_bf16_store_rounds_every_point_and_says_so(tmp_path):
    values = write_random_store(tmp_path / "store", dtype="bf16")
    store = TrajectoryStore(tmp_path / "store")
    assert not store.exact_steps \
        and json.loads((tmp_path / "store" / INDEX).read_text())["exact_steps"] is False
    got = store.latents([4, 1], [-1, 9])
    torch.testing.assert_close(got, torch.stack([values[4, 0], values[1, 10]]).to(torch.bfloat16).float(),
                               rtol=0, atol=0)
    assert bytes_per_trajectory((3, 2, 2, 2), 10, "bf16") == bytes_per_trajectory((3, 2, 2, 2), 10) // 2


def test_exact_store_takes_only_float32_latents(tmp_path):
    writer = TrajectoryWriter(tmp_path / "store", fake_header(ROWS), ROWS)
    with pytest.raises(ValueError, match="float32 latents, got torch.bfloat16"):
        writer.write(0, torch.zeros(2, 11, 3, 2, 2, 2, dtype=torch.bfloat16))


def test_format_1_store_is_refused_with_a_clear_error(tmp_path):
    write_random_store(tmp_path / "store")
    index_path = tmp_path / "store" / INDEX
    index = json.loads(index_path.read_text())
    index["format_version"] = 1
    index["dtype"] = "bf16"
    del index["exact_steps"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"format_version 1, this code reads only 2 \(format 1 rounded "
                                         r"every point.*not the fp32 step\).*re-run `dcm run trajectories`"):
        TrajectoryStore(tmp_path / "store")
    # bf16 claiming exact steps: not written by this code
    index["format_version"], index["exact_steps"] = 2, True
    index_path.write_text(json.dumps(index))
    with pytest.raises(StoreError, match="dtype 'bf16' with exact_steps True"):
        TrajectoryStore(tmp_path / "store", verify=False)


def test_bytes_per_trajectory_at_the_real_presets_latent_sizes():
    """Sizes of one 51-point trajectory (N = 50) at the presets' video sizes (latent: 16 channels,
    (frames − 1)/4 + 1 frames, height/8 × width/8; no models needed).  The exact layouts all need about
    4 bytes per element per point (bf16 points + fp32 steps: 302 B/element; fp32 noise + fp32 steps read
    by cumulative sum: 204; fp32 points: 204), so the exact store is plain fp32 points."""
    got = {}
    for preset in ("hunyuan", "wan"):
        # (parsing wants the weights)
        real = config.load_raw(REPO / "params.yaml", preset=preset)["backbone"]["real"]
        shape = (16, (real["frames"] - 1) // 4 + 1, real["height"] // 8, real["width"] // 8)
        got[preset] = (shape, bytes_per_trajectory(shape, 50, "fp32"),
                       bytes_per_trajectory(shape, 50, "bf16"))
    assert got["hunyuan"] == ((16, 32, 90, 160), 1_504_051_200, 752_025_600)  # 1.50 GB (bf16: 0.75 GB)
    assert got["wan"] == ((16, 21, 60, 104), 427_714_560, 213_857_280)  # 0.43 GB (bf16: 0.21 GB)


def test_latents_reject_indices_outside_the_store(tmp_path):
    write_random_store(tmp_path / "store")
    store = TrajectoryStore(tmp_path / "store")
    with pytest.raises(IndexError, match="grid index 10"):
        store.latents([0], [10])
    with pytest.raises(IndexError, match="grid index -2"):
        store.latents([0], [-2])
    with pytest.raises(IndexError, match="trajectory indices \\[5\\]"):
        store.latents([5], [0])
    with pytest.raises(ValueError, match="2 trajectories but 1 grid indices"):
        store.latents([0, 1], [0])


def test_corrupted_shard_is_detected_by_checksum(tmp_path):
    write_random_store(tmp_path / "store")
    shard = tmp_path / "store" / shard_name(1)
    expected = json.loads((tmp_path / "store" / INDEX).read_text())["shards"][1]["sha256"]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # one bit of the tensor data, the header stays readable
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors is corrupted") as err:
        TrajectoryStore(tmp_path / "store", verify=True)
    assert expected in str(err.value)
    TrajectoryStore(tmp_path / "store", verify=False)  # verification is what catches it


def test_unfinished_store_is_not_readable(tmp_path):
    header = fake_header(ROWS)
    writer = TrajectoryWriter(tmp_path / "store", header, ROWS)
    writer.write(0, torch.zeros(2, 11, 3, 2, 2, 2))
    assert (tmp_path / "store" / PARTIAL_INDEX).is_file() and not (tmp_path / "store" / INDEX).exists()
    with pytest.raises(StoreError, match="unfinished"):
        TrajectoryStore(tmp_path / "store")
    with pytest.raises(StoreError, match="not found"):
        TrajectoryStore(tmp_path / "elsewhere")


def test_fingerprint_covers_grid_guidance_dtype_rows_and_teacher():
    base = fake_header(ROWS)["fingerprint"]
    assert fake_header(ROWS)["fingerprint"] == base
    others = [fake_header(ROWS, grid=teacher_grid(10, 5.0), shift=5.0), fake_header(ROWS, guidance_scale=6.0),
              fake_header(ROWS, dtype="fp16"), fake_header(ROWS[:4]),
              fake_header(ROWS, teacher_sha256="1" * 64),
              fake_header([{**ROWS[0], "seed": 7}, *ROWS[1:]]), fake_header(ROWS, shard_size=3)]
    assert len({h["fingerprint"] for h in others} | {base}) == len(others) + 1


def test_writer_resumes_finished_shards_and_recomputes_a_damaged_one(tmp_path):
    header = fake_header(ROWS)
    writer = TrajectoryWriter(tmp_path / "store", header, ROWS)
    for i in (0, 1):
        writer.write(i, torch.full((2, 11, 3, 2, 2, 2), float(i)))
    (tmp_path / "store" / ".shard-00002.safetensors.tmp-dead").write_bytes(b"half a shard")
    assert TrajectoryWriter(tmp_path / "store", header, ROWS).pending() == [2]
    (tmp_path / "store" / shard_name(1)).write_bytes(b"garbage")
    resumed = TrajectoryWriter(tmp_path / "store", header, ROWS)
    assert resumed.pending() == [1, 2] and not resumed.started_over
    assert not list((tmp_path / "store").glob(".*.tmp-*"))  # a killed write's temp file is swept


# ------------------------------------------------- precision: the cached step is the fp32 teacher step

SHIFT17 = teacher_grid(50, 17.0, 1000)  # the real presets' grid
FIELD_SHAPE = (4, 3, 8, 8)
FIELD_MU = torch.randn(FIELD_SHAPE, generator=torch.Generator().manual_seed(3)) * 0.7 + 0.3


def field(x, sigma, cond):
    """A deterministic, elementwise teacher velocity: the exact flow towards FIELD_MU plus a nonlinearity."""
    return (x - FIELD_MU) / sigma.view(-1, 1, 1, 1, 1) + 0.2 * torch.sin(3.0 * x)


class _PromptStub:
    """What CachedSource needs of a backbone: a prompt encoder."""

    def encode_prompts(self, prompts):
        return PromptEmbeds(torch.arange(len(prompts), dtype=torch.float32).view(-1, 1, 1))


def cached_source(root: Path, dtype: str, paths_: torch.Tensor, backbone=None, rows=ROWS[:3]) -> CachedSource:
    header = fake_header(rows, latent_shape=tuple(paths_.shape[2:]), shard_size=len(rows), grid=SHIFT17,
                         shift=17.0, dtype=dtype)
    writer = TrajectoryWriter(root, header, rows)
    writer.write(0, paths_)
    writer.finish()
    if dtype == "fp32":
        return CachedSource(TrajectoryStore(root), backbone or _PromptStub())
    with pytest.warns(RuntimeWarning, match="rounded, not the fp32 step"):
        return CachedSource(TrajectoryStore(root), backbone or _PromptStub())


def step_errors(source: CachedSource, velocity, cond_of=lambda rows: None) -> np.ndarray:
    """Per grid index n: max |x_{n−1} (cache) − (x_n + (σ_{n−1} − σ_n)·v(x_n))|
    / mean |(σ_{n−1} − σ_n)·v(x_n)|, the online fp32 teacher step taken from the cache's own x_n; and the same
    for x_n − x_{n−1}."""
    rows = torch.arange(len(source))
    errors = []
    for n in range(SHIFT17.steps):
        batch = source.batch(rows, torch.full((len(rows),), n), torch.Generator())
        sigma_n, sigma_prev = SHIFT17.sigma(n), SHIFT17.sigma(n - 1)
        with torch.no_grad():
            step = (sigma_prev - sigma_n) * velocity(batch.x_n, torch.full((len(rows),), sigma_n),
                                                     cond_of(rows))
        size = step.abs().mean()
        errors.append([((batch.x_prev - (batch.x_n + step)).abs().max() / size).item(),
                       (((batch.x_prev - batch.x_n) - step).abs().max() / size).item()])
    return np.asarray(errors)


def test_cached_target_is_the_online_fp32_teacher_step_at_every_shift17_grid_index(tmp_path):
    noise = torch.randn(3, *FIELD_SHAPE, generator=torch.Generator().manual_seed(0))
    paths_ = solve_velocity(field, SHIFT17, noise, None)
    assert paths_.dtype == torch.float32 and paths_.shape == (3, 51, *FIELD_SHAPE)

    exact = step_errors(cached_source(tmp_path / "fp32", "fp32", paths_), field)
    # (measured: the target x_{n−1} is the online one bit for bit; x_n − x_{n−1} is the step up to
    # 1.7e-4 of its size, the solver's rounding of x_n + step to fp32)
    assert exact.max() <= 1e-3, exact.max(axis=0)

    # bf16 storage of both points fails the bound at every grid index: its max error is 0.03 of the
    # step at n = 0 (the largest step, Δσ = 0.24: 30x the bound) and 6.5x to 17.5x the step's mean size
    # over SemE's range n ∈ [38, 49] (Δσ ≈ 1.2e-3 to 2e-3): there the "step" is rounding noise.
    rounded = step_errors(cached_source(tmp_path / "bf16", "bf16", paths_), field)
    assert (rounded[:, 0] > 1e-3).all() and (rounded[:, 1] > 1e-3).all()
    assert rounded[0, 0] > 0.01 and rounded[38:, 0].min() > 3.0, rounded[:, 0]


def test_cached_target_from_the_toy_teacher_is_its_online_fp32_step(tmp_path, teacher_dir):
    """The same check with the tiny guided toy teacher (CFG) solving the shift-17, 50-step grid."""
    params = config.parse(smoke_raw())
    backbone = load_teacher(params, teacher_dir)
    rows = ROWS[:2]
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    noise = torch.stack([initial_noise(r["seed"], shape) for r in rows])
    paths_ = solve(backbone, SHIFT17, [r["prompt"] for r in rows], noise)
    source = cached_source(tmp_path / "fp32", "fp32", paths_, backbone=backbone, rows=rows)
    velocity = teacher_velocity(backbone, None)
    errors = step_errors(source, velocity, cond_of=lambda idx: source.embeds.index(idx))
    assert errors.max() <= 1e-3, errors.max(axis=0)


# ------------------------------------------------------------------------ the stage, end to end


@pytest.mark.slow
def test_store_roundtrip_random_access(tmp_path, teacher_dir, monkeypatch, no_tracking):
    params = make_project(tmp_path, teacher_dir, smoke_raw(dtype="fp32"))
    monkeypatch.chdir(tmp_path)
    stage.run(params)
    assert sorted(p.name for p in paths.TRAJECTORIES.iterdir()) == [INDEX, shard_name(0), shard_name(1)]
    store = TrajectoryStore(paths.TRAJECTORIES)
    grid = teacher_grid(params.grid.steps, params.grid.shift)
    np.testing.assert_allclose(store.grid_sigmas, grid.extended)

    # the solver's own latents, independently: guided Euler over the full grid, then one step to σ_min
    backbone = load_teacher(params, paths.TEACHER)
    picks = [1, 6]  # one trajectory in each shard
    rows = [store.rows[i] for i in picks]
    noise = torch.stack([initial_noise(r["seed"], store.latent_shape) for r in rows])
    cond = backbone.encode_prompts([r["prompt"] for r in rows])
    path = sample({"teacher": teacher_velocity(backbone, backbone.null_prompts(len(rows)))},
                  uniform_schedule(grid, grid.steps), noise, cond, final_sigma=grid.sigma_min,
                  keep_trajectory=True)
    N = grid.steps
    for n in range(-1, N):
        want = path[N - 1 - n]  # path[0] = noise at σ_{N−1}, path[N] = σ_min
        got = store.latents(picks, [n, n])  # fp32 store; the stage solved them in batches of 4, here 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert store.exact_steps
    torch.testing.assert_close(store.latents(picks, [N - 1, N - 1]), noise, rtol=0, atol=0)
    # σ_min is one more step
    assert not torch.equal(store.latents(picks, [-1, -1]), store.latents(picks, [0, 0]))


def _run_stage_subprocess(cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "DCM_TRACKING": "off", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dcm.cli", "run", "trajectories"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path, teacher_dir, monkeypatch, no_tracking):
    raw = smoke_raw(batch_size=2, shard_size=2)  # 4 shards of 2: room to kill between them
    killed = tmp_path / "killed"
    make_project(killed, teacher_dir, raw)
    store = killed / paths.TRAJECTORIES

    proc = _run_stage_subprocess(killed)
    deadline = time.monotonic() + 120
    while not (store / sidecar_name(0)).is_file():  # shard 0 and its sidecar written: shard 0 is done
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / INDEX).exists(), "the run finished before the kill: nothing was interrupted"
    assert (store / PARTIAL_INDEX).is_file()
    first = (store / shard_name(0)).stat()

    proc = _run_stage_subprocess(killed)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert "resuming" in log
    after = (store / shard_name(0)).stat()
    assert (after.st_ino, after.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not recomputed

    clean = tmp_path / "clean"
    params = make_project(clean, teacher_dir, raw)
    monkeypatch.chdir(clean)
    stage.run(params)
    assert tree_bytes(store) == tree_bytes(clean / paths.TRAJECTORIES)  # index.json + every shard
    assert sorted(tree_bytes(store)) == [INDEX] + [shard_name(i) for i in range(4)]
    TrajectoryStore(store, verify=True)


@pytest.mark.slow
def test_stale_partial_store_with_other_params_is_not_resumed(tmp_path, teacher_dir, monkeypatch,
                                                              no_tracking, capsys):
    params = make_project(tmp_path, teacher_dir, smoke_raw())
    monkeypatch.chdir(tmp_path)
    # a killed run of the same rows with another guidance scale left shard 0 behind
    rows = io.read_json(paths.PROMPTS)["train"]
    backbone = load_teacher(params, paths.TEACHER)
    latent_shape = backbone.latent_shape(params.world.frames, params.world.size)
    grid = teacher_grid(params.grid.steps, params.grid.shift)
    stale = store_header(grid, 1000, params.grid.shift, "cfg", params.backbone.guidance_scale + 1.0, "bf16",
                         latent_shape, params.trajectories.shard_size, params.trajectories.batch_size, rows,
                         teacher_sha256="stale")
    writer = TrajectoryWriter(paths.TRAJECTORIES, stale, rows)
    writer.write(0, torch.zeros(params.trajectories.shard_size, grid.steps + 1, *latent_shape))

    stage.run(params)
    assert "starting over" in capsys.readouterr().out
    store = TrajectoryStore(paths.TRAJECTORIES)
    assert json.loads((paths.TRAJECTORIES / INDEX).read_text())["fingerprint"] != stale["fingerprint"]
    assert store.latents([0], [0]).abs().sum() > 0  # shard 0 was solved, not the stale zeros
    assert store.guidance["scale"] == params.backbone.guidance_scale


def test_stage_without_prompts_fails_before_loading_the_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match=r"data/prompts.json.*`dcm run prepare`"):
        STAGES["trajectories"].run(config.parse(smoke_raw()))


def test_stage_rejects_a_row_count_other_than_num_trajectories(tmp_path, teacher_dir, monkeypatch):
    make_project(tmp_path, teacher_dir, smoke_raw())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match="trajectories.num_trajectories"):
        stage.run(config.parse(smoke_raw(num_trajectories=6)))
    assert not paths.TRAJECTORIES.exists()
