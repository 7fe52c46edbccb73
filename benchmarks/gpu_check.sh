#!/usr/bin/env bash
# On a machine with a CUDA GPU and PyTorch, no network needed (it uses the python3 that holds torch):
#   bash benchmarks/gpu_wheels.sh           # first, where the package registry is reachable: .gpu_wheels/ (carry it)
#   bash benchmarks/gpu_check.sh            # fits in 8 minutes on an NVIDIA H200
# 1. wheels from .gpu_wheels/ (if there) into a venv over the system's torch: pytest, pi0's small dependencies,
#    LeRobot 0.6.1;
# 2. the CUDA tests (tests/backends/test_cuda.py: both backends vs the CPU reference, the bf16 gate, the buckets'
#    graphs vs the direct call, fp8; tiny sizes);
# 3. benchmarks/gpu_check.py at full size: parity (fp32 with and without graphs, bf16, fp8), latency of W1 / W2 at
#    batch 1 and W1 at batch 8 in bf16 and fp8 with graphs, bf16 without them and with the compiled step, each
#    bucket's capture, and LeRobot 0.6.1 eager on the same weights (where step 1 installed it).
# The last line is one JSON object with all of it. OUT (if set) receives the logs. COMPILE=0 skips the compiled step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SIZE=${SIZE:-pi0}
DEVICE=${DEVICE:-cuda}
LOG=${OUT:-/tmp}/gpu_check
mkdir -p "$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$LOG/gpu.txt"
lerobot=()
if [ -d .gpu_wheels ] && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  venv=${VENV:-/tmp/pi0-gpu-venv}
  $PY -m venv --system-site-packages "$venv" && "$venv/bin/pip" install -q --no-index --no-deps .gpu_wheels/*.whl \
    > "$LOG/wheels.txt" 2>&1 && PY=$venv/bin/python
  "$PY" -c "import lerobot.policies.pi0" >> "$LOG/wheels.txt" 2>&1 && lerobot=(--lerobot "$PY")
fi
$PY -m pytest -q -p no:cacheprovider tests/backends/test_cuda.py 2>&1 | tee "$LOG/pytest.txt"
tests_rc=${PIPESTATUS[0]}
compile=()
[ "${COMPILE:-1}" = 0 ] && compile=(--no-compile)
$PY benchmarks/gpu_check.py --device "$DEVICE" --size "$SIZE" "${compile[@]}" "${lerobot[@]}" 2>"$LOG/check.err" \
  | tee "$LOG/check.json"
check_rc=${PIPESTATUS[0]}
summary=$(tail -n 1 "$LOG/pytest.txt")
$PY - "$LOG/check.json" "$tests_rc" "$summary" <<'PYEOF'
import json, sys
path, rc, summary = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    check = json.loads(open(path).read().strip().splitlines()[-1])
except (OSError, IndexError, json.JSONDecodeError) as e:
    check = {"error": f"gpu_check.py gave no JSON ({e}); see check.err"}
print(json.dumps({"cuda_tests": {"exit_code": rc, "summary": summary}, "check": check}))
PYEOF
exit $(( tests_rc != 0 || check_rc != 0 ))
