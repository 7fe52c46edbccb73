#!/usr/bin/env bash
# From nothing to the small pi0 shipped in pi0/assets/metaworld: scripted-expert demonstrations of five
# Meta-World tasks, `pi0 train` from seeded random weights, the closed-loop evaluation, and the copy that ships.
#
#   bash tools/train_metaworld.sh [WORK_DIR]        # default /tmp/pi0-metaworld; needs `make install` first
#
# Environment knobs (defaults are what made the shipped weights): EPISODES (demonstrations per task), STEPS,
# BATCH, LR, EMA (weight average decay; the saved weights are the average), EVAL_EPISODES, SHIP=1 to copy the result into pi0/assets/metaworld.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/pi0-metaworld}
PI0=${PI0:-.venv/bin/pi0}
EPISODES=${EPISODES:-50}
STEPS=${STEPS:-7000}
BATCH=${BATCH:-32}
LR=${LR:-3e-4}
EMA=${EMA:-0.999}
EVAL_EPISODES=${EVAL_EPISODES:-20}
TASKS=drawer-open-v3,drawer-close-v3,button-press-topdown-v3,window-open-v3,window-close-v3
mkdir -p "$WORK"

if [ ! -f "$WORK/data/meta/info.json" ]; then
  rm -rf "$WORK/data"
  "$PI0" sim collect --env metaworld --tasks "$TASKS" --episodes "$EPISODES" --out "$WORK/data" \
    --image-size 64 --camera corner --noise 0.3 --seed 0 > "$WORK/collect.json" 2> "$WORK/collect.log"
fi

start=$(date +%s)
if [ -f "$WORK/run/latest/train_state.pt" ]; then
  "$PI0" train --resume "$WORK/run" --steps "$STEPS"
else
  "$PI0" train --dataset "$WORK/data" --size configs/metaworld_small.json --out "$WORK/run" --steps "$STEPS" \
    --batch "$BATCH" --lr "$LR" --ema "$EMA" --seed 0 --save-every 1000 --log-every 20 --tokenizer-vocab 128
fi
echo "{\"train_seconds\": $(( $(date +%s) - start ))}" > "$WORK/train_time.json"

"$PI0" eval --env metaworld --checkpoint "$WORK/run/latest" --tasks "$TASKS" --episodes "$EVAL_EPISODES" \
  --workers 2 --out "$WORK/eval.json" --video "$WORK/eval.mp4" --plot "$WORK/eval.png" > /dev/null
.venv/bin/python - "$WORK/eval.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"mean success {r['mean_success'] * 100:.0f}% (expert {r['expert']['mean_success'] * 100:.0f}%)",
      {t: round(v["success"] * 100) for t, v in r["tasks"].items()})
EOF

if [ "${SHIP:-0}" = 1 ]; then
  rm -rf pi0/assets/metaworld
  mkdir -p pi0/assets/metaworld
  src=$(readlink -f "$WORK/run/latest")
  cp -r "$src"/{model.safetensors,config.json,paligemma_tokenizer.model,stats.safetensors,assets} pi0/assets/metaworld/
  cp "$WORK/eval.json" pi0/assets/metaworld/eval.json            # written by pi0 eval --out: command, seeds, machine
  cp "$WORK/collect.json" pi0/assets/metaworld/collect.json      # the demonstrations' report, the same way
  echo "shipped $src -> pi0/assets/metaworld ($(du -sh pi0/assets/metaworld | cut -f1))"
fi
