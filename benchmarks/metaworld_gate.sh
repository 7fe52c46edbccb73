#!/usr/bin/env bash
# The closed-loop gate across backends and dtypes: the shipped Meta-World pi0 (or CKPT) evaluated on the five
# tasks with the reference in fp32, the engine in `auto` (bf16 where the CPU or GPU has native bf16, fp32
# elsewhere), the engine in int8, and through `pi0 serve` with real-time chunking at a simulated control rate
# (BF16=1 adds the engine in bf16 where it is not what `auto` runs: emulated, slow). One JSON line per configuration, then a
# summary line; exit 1 if one is more than 5 points below the fp32 reference (the target).
#
#   bash benchmarks/metaworld_gate.sh [CKPT] [EPISODES]      # default: pi0/assets/metaworld, 20 episodes per task
set -uo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:-pi0/assets/metaworld}
EPISODES=${2:-20}
PI0=${PI0:-.venv/bin/pi0}
OUT=${OUT:-/tmp/metaworld_gate}
WORKERS=${WORKERS:-2}
mkdir -p "$OUT" && rm -f "$OUT"/*.json

run() {  # name, pi0 eval arguments...
  local name=$1; shift
  "$PI0" eval --env metaworld --episodes "$EPISODES" --json --no-expert --workers "$WORKERS" "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.log" || echo "{\"error\": \"$name failed, see $OUT/$name.log\"}" > "$OUT/$name.json"
}

run reference_fp32 --checkpoint "$CKPT" --backend reference --dtype float32
run engine_auto --checkpoint "$CKPT" --backend engine --dtype auto
[ "${BF16:-0}" = 1 ] && run engine_bf16 --checkpoint "$CKPT" --backend engine --dtype bfloat16
run engine_int8 --checkpoint "$CKPT" --backend engine --dtype int8

port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$PI0" serve --checkpoint "$CKPT" --preset metaworld --port "$port" --seed 0 > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break; sleep 0.5; done
run served_rtc --server "127.0.0.1:$port" --rtc --control-hz 10
kill "$server"; wait "$server" 2> /dev/null

.venv/bin/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for name in ("reference_fp32", "engine_auto", "engine_bf16", "engine_int8", "served_rtc"):
    if not (out / f"{name}.json").exists():
        continue
    r = json.loads((out / f"{name}.json").read_text())
    rows[name] = r
    keep = {k: r.get(k) for k in ("mean_success", "ci95", "episodes", "dtype", "backend", "reason", "latency_ms",
                                  "inference_delay_ticks", "inference_ms_median", "seconds", "error")}
    keep["tasks"] = {t: v["success"] for t, v in r.get("tasks", {}).items()}
    print(json.dumps({"config": name, **keep}))
ref = rows["reference_fp32"].get("mean_success")
gaps = {n: round((ref - r["mean_success"]) * 100, 1) for n, r in rows.items() if "mean_success" in r and ref is not None}
ok = ref is not None and all("mean_success" in r for r in rows.values()) and max(gaps.values()) <= 5
print(json.dumps({"reference_mean_success": ref, "points_below_reference": gaps, "within_5_points": ok}))
sys.exit(0 if ok else 1)
EOF
