"""The inference stages spread over the ranks of a job: ``trajectories`` (shard i on rank i mod N) and
``sample`` (batch b on rank b mod N) write the same files at 2 ranks (real torchrun processes, gloo) as
at 1, and ``sample`` resumes a killed run batch by batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dcm import config
from dcm.pipeline.table import STAGES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {**os.environ, "DCM_TRACKING": "off", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def dcm(folder: Path, *args: str, ranks: int = 1, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [str(BIN / "dcm"), "run", *args]
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks), *command]
    if popen:
        return subprocess.Popen(command, cwd=folder, env=_env(), **popen)
    out = subprocess.run(command, cwd=folder, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The smoke preset with 3 shards of trajectories and 3 sampling batches: prompts, a random teacher."""
    from dcm.backbones import create_teacher

    root = tmp_path_factory.mktemp("ranks")
    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["trajectories"].update(num_trajectories=12, shard_size=4, batch_size=4)
    raw["world"].update(eval_prompts=8, eval_seeds=3)  # 24 rows: 3 batches of 8
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dcm(root, "prepare")
    here = Path.cwd()
    os.chdir(root)
    try:
        create_teacher(config.parse(raw)).save("models/teacher")
    finally:
        os.chdir(here)
    if "preprocess" in STAGES:  # the encoders' pass over the prompts (a record only, for the toy teacher)
        dcm(root, "preprocess")
    return root


def copy_project(project: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(project, folder)
    return folder


def test_trajectories_at_two_ranks_write_the_store_of_one_process(project, tmp_path):
    one, two = copy_project(project, tmp_path / "one"), copy_project(project, tmp_path / "two")
    dcm(one, "trajectories")
    out = dcm(two, "trajectories", ranks=2)
    assert "on 2 rank(s)" in out.stdout
    index_one = json.loads((one / "trajectories/index.json").read_text())
    index_two = json.loads((two / "trajectories/index.json").read_text())
    assert len(index_one["shards"]) == 3 and index_one == index_two
    for shard in index_one["shards"]:
        path = Path("trajectories") / shard["file"]
        assert (one / path).read_bytes() == (two / path).read_bytes()
    assert sorted(p.name for p in (two / "trajectories").iterdir()) == sorted(
        ["index.json", *(s["file"] for s in index_one["shards"])])  # no sidecar or partial index left


def _sample_files(folder: Path, method: str) -> dict[str, bytes]:
    root = folder / "samples" / method
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.mark.parametrize("method", ["teacher", "euler4"])
def test_sampling_at_two_ranks_writes_what_one_process_writes(project, tmp_path, method):
    one, two = copy_project(project, tmp_path / "one"), copy_project(project, tmp_path / "two")
    dcm(one, "sample", "--method", method)
    dcm(two, "sample", "--method", method, ranks=2)
    files_one, files_two = _sample_files(one, method), _sample_files(two, method)
    assert sorted(files_one) == sorted(files_two) and len([f for f in files_one if f.endswith(".mp4")]) == 24
    record_one = json.loads(files_one.pop("samples.json"))
    record_two = json.loads(files_two.pop("samples.json"))
    for key in ("rows", "steps", "nfe", "num_steps", "kind"):
        assert record_one[key] == record_two[key], key
    assert files_one == files_two  # latents, decoded videos and every mp4, byte for byte
    assert not (two / "samples" / f".{method}.parts").exists()


def test_a_killed_sample_run_resumes_with_the_batches_it_has_not_written(project, tmp_path):
    folder = copy_project(project, tmp_path / "p")
    parts = folder / "samples" / ".teacher.parts"
    run = dcm(folder, "sample", "--method", "teacher", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
              text=True)
    deadline = time.monotonic() + 600
    while not list(parts.glob("part-*.json")):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    done = sorted(p.stem for p in parts.glob("part-*.json"))
    assert done and len(done) < 3 and not (folder / "samples" / "teacher").exists()
    out = dcm(folder, "sample", "--method", "teacher")
    assert f"{len(done)}/3 batches already sampled" in out.stdout
    fresh = copy_project(project, tmp_path / "fresh")
    dcm(fresh, "sample", "--method", "teacher")
    assert _sample_files(folder, "teacher").keys() == _sample_files(fresh, "teacher").keys()
    for name in ("latents.safetensors", "videos.safetensors"):
        assert _sample_files(folder, "teacher")[name] == _sample_files(fresh, "teacher")[name]
    assert not parts.exists()  # the parts were used, then removed
