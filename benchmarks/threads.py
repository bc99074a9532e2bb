"""Teacher training steps per second: one process on every core against one process per core side by side.

What `dcm repro -j N` trades: one run with all the machine's threads, or N runs with one thread each at once.
Each measurement is a separate process that builds the toy teacher of ``--params`` and times ``--steps``
steps of the teacher stage's own training loop (``train_teacher``) after ``--warmup`` untimed ones.
Per repeat, in this order: one process with ``--cores`` threads, then ``--cores`` one-thread processes
started together; printed: each repeat's steps/s, the side-by-side sum, the ratio sum / wide, and the medians.

    python benchmarks/threads.py [--params params.yaml] [--steps 200] [--warmup 20] [--repeats 3] [--cores N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys


def worker(params_path: str, steps: int, warmup: int) -> None:
    """The teacher stage's own training loop (``train_teacher``): ``warmup`` steps untimed, then ``steps``
    (a fresh optimizer on the warmed-up model; its loop's wall time, the stage's ``wall_s``)."""
    import torch

    from dcm import config
    from dcm.backbones import create_teacher
    from dcm.distill.teacher_pretraining import train_teacher

    raw = config.load_raw(params_path)
    backbone = create_teacher(config.parse(raw))

    def with_steps(n: int) -> config.Params:
        return config.parse(config.deep_merge(raw, {"teacher": {"train_steps": n, "warmup_steps": 0}}))

    train_teacher(backbone, with_steps(warmup))
    timed = train_teacher(backbone, with_steps(steps))
    print(f"{steps / timed.wall_s:.4f} {torch.get_num_threads()}")


def measure(args: argparse.Namespace, threads: int, processes: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--worker", "--params", args.params, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed (exit {proc.returncode})")
        rate, used = out.split()
        assert int(used) == threads, (used, threads)
        rates.append(float(rate))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.params, args.steps, args.warmup)
        return
    wide, side, ratios = [], [], []
    print(f"teacher training steps/s, {args.steps} timed steps per process, {args.cores} cores")
    for r in range(args.repeats):
        one = measure(args, args.cores, 1)[0]
        many = measure(args, 1, args.cores)
        wide.append(one)
        side.append(sum(many))
        ratios.append(sum(many) / one)
        print(f"  repeat {r}: 1 process x {args.cores} threads {one:.2f}; {args.cores} processes x 1 thread "
              f"{' + '.join(f'{x:.2f}' for x in many)} = {sum(many):.2f}; ratio {ratios[-1]:.2f}")
    print(f"median: {statistics.median(wide):.2f} steps/s on {args.cores} threads, "
          f"{statistics.median(side):.2f} steps/s in all from {args.cores} one-thread processes; "
          f"ratio {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
