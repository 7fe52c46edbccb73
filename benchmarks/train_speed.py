"""Training throughput and memory of `pi0 train` on this CPU or GPU: steps/s, samples/s and peak RSS (and GPU
memory) for a few model sizes, each in its own process, on a synthetic LeRobot dataset (two 64-px cameras, a
4-dim state and action). One JSON line per configuration.

    .venv/bin/python benchmarks/train_speed.py                          # tiny and the Meta-World size, batch 8 / 32
    .venv/bin/python benchmarks/train_speed.py --sizes pi0 --batch 8 --lora 16 --device cuda   # full size on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=["tiny", str(ROOT / "configs" / "metaworld_small.json")])
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lora", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    from tests.train.test_train import write_dataset

    tmp = Path(tempfile.mkdtemp())
    data = write_dataset(tmp / "data", episodes=20, frames=30, size=64)
    for size in args.sizes:
        for batch in args.batch:
            out = tmp / f"run-{Path(size).stem}-{batch}"
            cmd = [sys.executable, "-m", "pi0.cli.main", "train", "--dataset", str(data), "--size", size, "--out", str(out),
                   "--steps", str(args.steps), "--batch", str(batch), "--log-every", "1", "--quiet", "--device",
                   args.device, "--dtype", args.dtype, "--action-horizon", "10"]
            if args.lora:
                cmd += ["--lora", str(args.lora)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(json.dumps({"size": size, "batch": batch, "error": r.stderr[-500:]}), flush=True)
                continue
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            warm = log[len(log) // 4:]  # the first steps decode the dataset's videos
            seconds = statistics.median(r["seconds"] for r in warm)
            rec = {"size": Path(size).stem, "batch": batch, "lora": args.lora, "steps_per_s": 1 / seconds,
                   "samples_per_s": batch / seconds, "peak_rss_gib": log[-1]["peak_rss_gib"],
                   "peak_gpu_gib": log[-1].get("peak_gpu_gib"), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
                   "device_and_dtype": next((line for line in r.stderr.splitlines() if "dtype" in line), "")[-160:]}
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
