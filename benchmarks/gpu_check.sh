#!/usr/bin/env bash
# The GPU check of the real-scale work, in one call that fits 9 minutes on one H100:
#   1. the memory plan (`dcm plan`) of Wan 2.1 1.3B SemE and DetE at 81×480×832 on one 80 GiB GPU;
#   2. a SemE and a DetE training step at that size (benchmarks/gpu_train_step.py: median step time, peak
#      memory, model FLOP utilisation), then the plan's peak beside the measured one;
#   3. the 50-step CFG teacher against the 4-step DCM sampler, in the precision the stages use
#      (benchmarks/gpu_teacher_vs_dcm.py).
# `--tiny` runs the same scripts on tiny random transformers on the CPU (what the test suite runs: it checks
# the check works, not a GPU's figures); the plan is then printed but not compared.
#   benchmarks/gpu_check.sh [--tiny]        (OUT=<folder> keeps the outputs; PYTHON, DCM pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DCM=${DCM:-.venv/bin/dcm}
tiny=()
if [ "${1:-}" = "--tiny" ]; then tiny=(--tiny); fi
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
repeats=3
[ ${#tiny[@]} -gt 0 ] && repeats=1

echo "== device"
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else 'CPU only')"

echo "== memory plan: Wan 2.1 1.3B at 81x480x832, 1 GPU of 80 GiB"
"$DCM" plan --family wan --variant 1.3B --gpus 1 --gpu-mem-gb 80 --json-out "$out/plan.json" | tail -n 25

echo "== SemE and DetE training steps (bf16 autocast, fp32 master weights, activation checkpointing)"
"$PY" benchmarks/gpu_train_step.py --family wan --experts seme,dete --repeats "$repeats" "${tiny[@]}" \
  | tee "$out/train_step.txt"

echo "== 50-step CFG teacher vs 4-step DCM"
"$PY" benchmarks/gpu_teacher_vs_dcm.py --family wan --teacher-steps 50 --dcm-steps 4 --repeats "$repeats" \
  "${tiny[@]}" | tee "$out/latency.txt"

echo "== plan vs measured peak memory"
"$PY" - "$out" "${tiny[@]}" <<'PY'
import json, re, sys
from pathlib import Path

out, tiny = Path(sys.argv[1]), "--tiny" in sys.argv[2:]
plan = json.loads((out / "plan.json").read_text())["per_gpu"]
measured = dict(re.findall(r"^(seme|dete): .*?peak memory ([0-9.]+) GiB", (out / "train_step.txt").read_text(),
                           re.MULTILINE))
for expert, key in (("seme", "SemE"), ("dete", "DetE")):
    predicted = plan[key]["total, checkpointing"] / 2**30
    if tiny or expert not in measured:
        why = "tiny models on the CPU" if tiny else "no CUDA peak measured"
        print(f"{key}: plan {predicted:.1f} GiB ({why}: not compared)")
        continue
    got = float(measured[expert])
    print(f"{key}: plan {predicted:.1f} GiB, measured {got:.1f} GiB ({100 * (predicted - got) / got:+.1f}%)")
PY
echo "outputs: $out"
