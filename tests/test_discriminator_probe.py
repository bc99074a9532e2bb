"""benchmarks/discriminator_probe.py on a smoke project with a trained (4-step) DetE: parsable figures."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, smoke_params

LINE = re.compile(r"^(σ_adv ([0-9.]+)-([0-9.]+)|all σ_adv) \| n (\d+) \| fresh ([0-9.]+|nan)( \| trained "
                  r"([0-9.]+|nan))?$")


def run_probe(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "discriminator_probe.py"), "--preset", "smoke", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_probe_prints_held_out_accuracy_per_sigma_adv_bucket(smoke):
    from dcm.pipeline.stages import train

    refused = run_probe()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and "train_dete" in refused.stderr
    params = smoke_params(source="online")
    train.run(params, "dcm", "train_seme")
    train.run(params, "dcm", "train_dete")

    done = run_probe("--steps", "20", "--batches", "2", "--buckets", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [LINE.match(line) for line in done.stdout.splitlines() if "| n " in line]
    assert len(rows) == 3 and all(rows), done.stdout
    *buckets, total = rows
    assert total.group(1) == "all σ_adv" and int(total.group(4)) == 2 * params.training.batch_size
    assert sum(int(r.group(4)) for r in buckets) == int(total.group(4))
    lows = [float(r.group(2)) for r in buckets]
    assert lows == sorted(lows) and lows[0] < 0.05  # the first bucket starts at σ_min
    assert total.group(7) is not None  # the run's own heads (gan_weight > 0) are scored too
    for r in rows:
        for figure in (r.group(5), r.group(7)):
            assert figure == "nan" or 0.0 <= float(figure) <= 1.0
    assert re.search(r"fresh heads: final hinge L_D [0-9.]+ \(2 = chance\)", done.stdout)
