#!/usr/bin/env bash
# Run the whole smoke DAG (default methods, the ablation and paper rows switched on) in a scratch folder, stage by stage
# through `dcm run`, and print the sha256 of every metrics/<method>.json with the wall-time key
# (latency_s) removed: two commits that compute the same thing print the same digests.
#   benchmarks/smoke_digest.sh [workdir]     (needs `dcm` on PATH, e.g. .venv/bin)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work" && cd "$work"
export DCM_TRACKING=off OMP_NUM_THREADS=1 TQDM_DISABLE=1
dcm params --params "$repo/params.yaml" --preset smoke --enable ablations --enable paper -o params.yaml
dcm stages --params params.yaml | grep -v "^off:" | while read -r stage methods; do
  if [ "$methods" = "-" ]; then
    dcm run "$stage" >/dev/null
  else
    for m in ${methods//,/ }; do dcm run "$stage" --method "$m" >/dev/null; done
  fi
done
python3 - <<'PY'
import hashlib, json, pathlib
for f in sorted(pathlib.Path("metrics").glob("*.json")):
    d = {k: v for k, v in json.loads(f.read_text()).items() if k != "latency_s"}
    print(f"{hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()}  {f.name}")
PY
