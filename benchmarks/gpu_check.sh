#!/usr/bin/env bash
# On a machine with a CUDA GPU and PyTorch (no install step: it uses the python3 that holds torch):
#   bash benchmarks/gpu_check.sh            # ~5 min on an H100
# 1. the CUDA tests (tests/backends/test_cuda.py: both backends on the GPU vs the CPU reference, bf16 gate; tiny sizes);
# 2. benchmarks/gpu_check.py at full size: parity on the GPU and `pi0 bench` W1 / W2 in bf16.
# The last line is one JSON object with both results. OUT (if set) receives the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SIZE=${SIZE:-pi0}
DEVICE=${DEVICE:-cuda}
LOG=${OUT:-/tmp}/gpu_check
mkdir -p "$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$LOG/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/backends/test_cuda.py 2>&1 | tee "$LOG/pytest.txt"
tests_rc=${PIPESTATUS[0]}
$PY benchmarks/gpu_check.py --device "$DEVICE" --size "$SIZE" 2>"$LOG/check.err" | tee "$LOG/check.json"
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
