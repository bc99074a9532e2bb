"""Wall time of local stages launched cold (a fresh process each) and warm (forked by the warm server,
``DCM_WARM_START=1``), side by side in one run.

Run it in a project whose DAG has run (after ``make demo``): each repeat launches every stage once cold
and once warm, in alternating order so that a machine's drift hits both alike, and prints each
launch's wall time, the median per stage and way, the median of the per-repeat differences and ratios,
and whether every launch wrote the same outputs (the sha256 of each output file; JSON, JSON-lines and
torch checkpoints without the fields that measure the process: wall time, peak memory).  The warm server is started by an untimed launch first and stopped at
the end.  Each launch first removes the stage's outputs, as ``dvc repro`` does (a resumable training stage
would resume its finished run), and writes them again: the same bytes, except those fields
(so ``dvc status`` shows them modified: remove them and ``dvc checkout <stage>`` brings back the pipeline's).

    python benchmarks/stage_start.py [--stages "sample --method lcm" "evaluate --method lcm" report] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dcm import config
from dcm.pipeline import table, warm

# what differs between two runs of a deterministic stage: wall time, and the peak memory of the process
TIMING_KEYS = {"latency_s", "seconds_per_video", "wall_s", "steps_per_s", "step_s", "peak_rss_mb"}


def digest(paths: list[str]) -> str:
    """sha256 over the stage's output files; JSON, JSON-lines and torch checkpoints without their
    ``TIMING_KEYS``, tensors by their bytes."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]
        for f in (f for f in files if f.is_file()):
            if f.suffix == ".json":
                data = _canonical(json.loads(f.read_bytes()))
            elif f.suffix == ".jsonl":
                data = "\n".join(_canonical(json.loads(line)) for line in f.read_text().splitlines())
            elif f.suffix == ".pt":
                data = _canonical(torch.load(f, map_location="cpu", weights_only=False))
            else:
                data = f.read_bytes()
            data = data.encode() if isinstance(data, str) else data
            h.update(str(f).encode() + hashlib.sha256(data).digest())
    return h.hexdigest()[:12]


def _canonical(obj) -> str:
    def strip(o):
        if isinstance(o, dict):
            return {str(k): strip(v) for k, v in o.items() if k not in TIMING_KEYS}
        if isinstance(o, list | tuple):
            return [strip(v) for v in o]
        if hasattr(o, "detach"):  # a tensor: dtype, shape and bytes (bf16 too)
            flat = o.detach().cpu().contiguous().reshape(-1)
            return f"{o.dtype}{tuple(o.shape)}" + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
        if hasattr(o, "tobytes"):  # a numpy array
            return f"{o.dtype}{o.shape}" + hashlib.sha256(o.tobytes()).hexdigest()
        return repr(o) if not isinstance(o, str | int | float | bool | None) else o
    return json.dumps(strip(obj), sort_keys=True)


def launch(args: list[str], env: dict, outs: list[str]) -> float:
    for out in outs:  # as `dvc repro` does: a resumable stage would otherwise resume its finished run
        shutil.rmtree(out, ignore_errors=True) if Path(out).is_dir() else Path(out).unlink(missing_ok=True)
    t0 = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "dcm"), "launch", *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"dcm launch {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["sample --method lcm", "evaluate --method lcm", "report"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = config.load(args.params)
    stages = [s.split() for s in args.stages]
    outs = {}
    for s in stages:
        method = s[s.index("--method") + 1] if "--method" in s else None
        outs[" ".join(s)] = table.get(s[0]).resolve(params, method)["outs"]
    tmp = Path(tempfile.mkdtemp(prefix="dcmb", dir="/tmp"))  # a server of this run's own
    cold_env = {**os.environ, warm.ENV: "0"}
    warm_env = {**os.environ, warm.ENV: "1", "TMPDIR": str(tmp)}
    bin_dir = str(Path(sys.executable).parent)
    for env in (cold_env, warm_env):
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    times: dict[tuple[str, str], list[float]] = {}
    digests: dict[str, set[str]] = {name: set() for name in outs}
    try:
        launch(stages[0], warm_env, outs[" ".join(stages[0])])  # starts the server (untimed)
        print(f"{'repeat':>6}  {'stage':<24} {'cold s':>7} {'warm s':>7}")
        for r in range(args.repeats):
            for s in stages:
                name = " ".join(s)
                order = [("cold", cold_env), ("warm", warm_env)]
                for way, env in order if r % 2 == 0 else order[::-1]:
                    times.setdefault((name, way), []).append(launch(s, env, outs[name]))
                    digests[name].add(digest(outs[name]))
                print(f"{r:>6}  {name:<24} {times[name, 'cold'][-1]:>7.2f} {times[name, 'warm'][-1]:>7.2f}")
    finally:
        warm.stop(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'stage':<24} {'cold median':>11} {'warm median':>11} {'saved (median)':>14} "
          f"{'ratio (median)':>14}  outputs")
    for name in outs:
        cold, hot = times[name, "cold"], times[name, "warm"]
        saved = statistics.median(c - w for c, w in zip(cold, hot))
        ratio = statistics.median(c / w for c, w in zip(cold, hot))
        same = "identical" if len(digests[name]) == 1 else f"DIFFER ({len(digests[name])} digests)"
        print(f"{name:<24} {statistics.median(cold):>10.2f}s {statistics.median(hot):>10.2f}s "
              f"{saved:>13.2f}s {ratio:>13.2f}x  {same}")


if __name__ == "__main__":
    main()
