"""The process group of a multi-rank stage: opened with params' ``distributed.timeout_min`` (NCCL's own
10 min is shorter than rank 0's saves of a large student), which is what a waiting rank's collective gives
up after.  Ranks are real processes (torchrun, gloo), as in tests/test_parallel.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from dcm import config, distributed
from dcm.config import ConfigError
from helpers import smoke_params

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def test_the_timeout_defaults_to_an_hour_and_is_checked_with_its_key():
    assert config.load(REPO / "params.yaml").distributed.timeout_min == 60
    raw = config.load_raw(REPO / "params.yaml")
    raw["distributed"] = {"timeout_min": 0}
    with pytest.raises(ConfigError, match=r"distributed\.timeout_min = 0 .*> 0"):
        config.parse(raw)


def test_a_stage_opens_its_process_group_with_the_params_timeout(project, monkeypatch):
    """Stage.run hands ``distributed.timeout_min`` to ``process_group`` (every stage: the data-parallel
    inference stages wait on rank 0's writes too)."""
    from dcm.pipeline.table import STAGES

    seen = []

    @contextlib.contextmanager
    def recording(timeout=None):
        seen.append(timeout)
        yield distributed.World(0, 1)

    monkeypatch.setattr(distributed, "process_group", recording)
    monkeypatch.setenv("DCM_TRACKING", "off")
    params = smoke_params()
    params.distributed = config.DistributedConfig(timeout_min=2.5)
    STAGES["prepare"].run(params)
    assert seen == [timedelta(minutes=2.5)] and Path("data/prompts.json").is_file()


def test_process_group_passes_the_timeout_to_torch(monkeypatch):
    """With WORLD_SIZE > 1 the group is opened with that timeout (None: torch's default)."""
    import torch.distributed as dist

    calls = []
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    with distributed.process_group(timeout=timedelta(seconds=90)):
        pass
    with distributed.process_group():
        pass
    assert [c["timeout"] for c in calls] == [timedelta(seconds=90), None]


def test_a_failing_rank_leaves_without_waiting_at_the_closing_barrier(monkeypatch):
    """A rank whose stage raises closes its group and re-raises at once: the closing barrier would wait on
    ranks blocked in a collective it never reaches (until the timeout, its traceback held back)."""
    import torch.distributed as dist

    calls = []
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.raises(ValueError, match="the stage failed"):
        with distributed.process_group():
            raise ValueError("the stage failed")
    assert calls == ["init", "destroy"]
    calls.clear()
    with distributed.process_group():
        pass
    assert calls == ["init", "barrier", "destroy"]


WAIT_S, SLEEP_S = 2.0, 12.0  # rank 1's timeout, and how long rank 0 keeps it waiting


def wait_for_a_late_rank(out: str) -> None:
    """Worker (``torchrun --nproc_per_node 2 tests/test_process_group.py OUT``): a group with a WAIT_S
    timeout; rank 0 arrives at the barrier SLEEP_S late, rank 1 writes how long it waited and what failed."""
    with distributed.process_group(timeout=timedelta(seconds=WAIT_S)) as world:
        if world.rank == 0:
            time.sleep(SLEEP_S)
            os._exit(0)  # no barrier on the way out: rank 1 is gone
        start = time.perf_counter()
        try:
            distributed.barrier()
            error = None
        except Exception as e:  # gloo's timeout error (RuntimeError / DistBackendError)
            error = f"{type(e).__name__}: {e}"
        Path(out, "rank1.json").write_text(json.dumps({"waited_s": time.perf_counter() - start,
                                                       "error": error}))
        os._exit(0)


@pytest.mark.slow
def test_a_rank_waiting_past_the_timeout_fails_instead_of_hanging(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__,
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads((tmp_path / "rank1.json").read_text())
    assert result["error"] is not None and "timed out" in result["error"].lower(), result
    assert WAIT_S * 0.9 <= result["waited_s"] < SLEEP_S - 2, result


if __name__ == "__main__":
    wait_for_a_late_rank(sys.argv[1])
