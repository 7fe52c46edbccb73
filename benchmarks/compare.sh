#!/usr/bin/env bash
# W1 / W2 side by side in one run (issue targets): LeRobot 0.6.1 bf16 (oracle venv), then pi0's engine
# and reference, each in its own process, one after the other (never concurrently: 2 cores).
#   bash benchmarks/compare.sh [pi0|pi05] > results.jsonl
# Needs the oracle venv: bash ../shared/oracles/lerobot/setup.sh /tmp/lerobot-oracle
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-pi0}
oracle=${ORACLE_VENV:-/tmp/lerobot-oracle}
size=$kind
"$oracle/bin/python" benchmarks/lerobot_bench.py --kind "$kind" --dtype bfloat16 --workload W1 W2 2>/dev/null
for backend in engine reference; do
  for w in W1 W2; do
    if [ $w = W1 ]; then extra="--valid-tokens 48"; else extra="--masked-cameras 1 --valid-tokens 12"; fi
    .venv/bin/pi0 bench --json --size "$size" --backend $backend --dtype bfloat16 --tokens 48 $extra 2>/dev/null \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r.pop('times_s'); r['workload']='$w'; print(json.dumps(r))"
  done
done
