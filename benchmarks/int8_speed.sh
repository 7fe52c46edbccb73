#!/usr/bin/env bash
# int8 vs the float dtypes, W1 / W2 side by side in one run: each `pi0 bench` in its own process (its own peak
# RSS), one after the other (never concurrently: 2 cores), full size, batch 1, 10 steps, seeded random weights.
#   bash benchmarks/int8_speed.sh [pi0|pi05] [float dtypes...] > results.jsonl
# Default float dtypes: bfloat16 float32 where the CPU has native bf16, float32 elsewhere (bf16 without it is
# ~6x slower than fp32: never the fastest). The last line is a summary: each dtype's W1 / W2 latency, int8's
# speed-up over the fastest float dtype, peak RSS. Environment variables reach every process, e.g. AVX2 only:
#   ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PI0_NATIVE_BF16=0 bash ...
# CKPT=DIR loads that checkpoint in every process instead of building random weights (load_s is then the load
# time from disk; write one with `pi0.build_model(pi0.preset("pi0"), dtype="bfloat16").save_pretrained(DIR)`).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-pi0}
shift || true
floats=("$@")
if [ ${#floats[@]} -eq 0 ]; then
  if .venv/bin/python -c "import sys; from pi0.hardware import native_bf16; sys.exit(0 if native_bf16('cpu')[0] else 1)"; then
    floats=(bfloat16 float32)
  else
    floats=(float32)
  fi
fi
out=$(mktemp)
for dtype in "${floats[@]}" int8; do
  for w in W1 W2; do
    if [ $w = W1 ]; then extra="--valid-tokens 48"; else extra="--masked-cameras 1 --valid-tokens 12"; fi
    if [ -n "${CKPT:-}" ]; then src="--checkpoint $CKPT"; else src="--size $kind"; fi
    .venv/bin/pi0 bench --json $src --backend engine --dtype "$dtype" --device cpu --tokens 48 --repeats 5 $extra \
      2>/dev/null | python3 -c "import json,sys; r=json.load(sys.stdin); r.pop('times_s'); r['workload']='$w'; print(json.dumps(r))" \
      | tee -a "$out"
  done
done
python3 - "$out" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
lat = {(r["dtype"], r["workload"]): r["latency_s"] for r in rows}
rss = {r["dtype"]: max(x["peak_rss_gib"] for x in rows if x["dtype"] == r["dtype"]) for r in rows}
load = {r["dtype"]: min(x["load_s"] for x in rows if x["dtype"] == r["dtype"]) for r in rows}
summary = {"model": rows[0]["config"]["model"], "cpu_capability": rows[0]["cpu_capability"],
           "int8_kernels": next(r["kernels"]["why"] for r in rows if r["dtype"] == "int8"),
           "latency_s": {f"{d} {w}": round(v, 3) for (d, w), v in lat.items()}, "peak_rss_gib": rss,
           "load_s": {d: round(v, 1) for d, v in load.items()}}
for w in ("W1", "W2"):
    fastest = min((v, d) for (d, ww), v in lat.items() if ww == w and d != "int8")
    summary[f"int8_speedup_{w}"] = round(fastest[0] / lat[("int8", w)], 3)
    summary[f"fastest_float_{w}"] = fastest[1]
summary["int8_load_vs_float"] = {d: round(load["int8"] / v, 2) for d, v in load.items() if d != "int8"}
print(json.dumps(summary))
PYEOF
rm -f "$out"
