#!/usr/bin/env bash
# W1 / W2 side by side in one run: LeRobot 0.6.1 (oracle venv), then pi0's engine and reference, each in its
# own process, one after the other (never concurrently: 2 cores), all in the same dtype.
#   bash benchmarks/compare.sh [pi0|pi05] [bfloat16|float32] > results.jsonl
# BACKENDS="engine" skips the reference. Environment variables reach every process, e.g. to compare on
# AVX2 kernels only on an AVX-512 machine:
#   ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 bash ...
# Needs the oracle venv: bash ../shared/oracles/lerobot/setup.sh /tmp/lerobot-oracle
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-pi0}
dtype=${2:-bfloat16}
oracle=${ORACLE_VENV:-/tmp/lerobot-oracle}
"$oracle/bin/python" benchmarks/lerobot_bench.py --kind "$kind" --dtype "$dtype" --workload W1 W2 2>/dev/null
for backend in ${BACKENDS:-engine reference}; do
  for w in W1 W2; do
    if [ $w = W1 ]; then extra="--valid-tokens 48"; else extra="--masked-cameras 1 --valid-tokens 12"; fi
    .venv/bin/pi0 bench --json --size "$kind" --backend $backend --dtype "$dtype" --device cpu --tokens 48 $extra 2>/dev/null \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r.pop('times_s'); r['workload']='$w'; print(json.dumps(r))"
  done
done
