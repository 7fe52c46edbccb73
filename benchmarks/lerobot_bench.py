"""LeRobot 0.6.1's pi0 / pi0.5 on the same workloads as `pi0 bench`, for side-by-side ratios.

Runs in the oracle venv (../shared/oracles/lerobot/setup.sh), never in CI:
    /tmp/lerobot-oracle/bin/python benchmarks/lerobot_bench.py --kind pi0 --dtype bfloat16 --workload W1 W2
Prints one JSON line per workload: latency_s (median after a warm-up call), first_call_s, load_s, peak_rss_gib.
Inputs go straight to `policy.model.sample_actions` (images in [-1,1] at 224, state padded to 32, tokens
and masks as `pi0 bench` builds them), so the tokenizer and image preprocessing are not timed.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "oracles" / "lerobot"))

WORKLOADS = {  # cameras, masked cameras, tokens, valid tokens
    "W1": (3, 0, 48, 48),
    "W2": (3, 1, 48, 12),
}


def inputs(cfg, cameras, masked, tokens, valid, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(1, 3, 224, 224, generator=g) * 2 - 1 for _ in range(cameras)]
    masks = [torch.tensor([i < cameras - masked]) for i in range(cameras)]
    tok = torch.zeros(1, tokens, dtype=torch.long)
    tok[0, 0] = 2
    tok[0, 1:valid] = torch.randint(3, 257152, (valid - 1,), generator=g)
    tmask = torch.zeros(1, tokens, dtype=torch.bool)
    tmask[0, :valid] = True
    state = torch.randn(1, cfg.max_state_dim, generator=g)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return images, masks, tok, tmask, state, noise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="pi0", choices=["pi0", "pi05"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--workload", nargs="+", default=["W1", "W2"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import build

    t0 = time.perf_counter()
    policy = build.build_full(args.kind, args.dtype)
    load_s = time.perf_counter() - t0
    m = policy.model

    def call(images, masks, tok, tmask, state, noise) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            if args.kind == "pi0":
                m.sample_actions(images, masks, tok, tmask, state, noise=noise.clone())
            else:
                m.sample_actions(images, masks, tok, tmask, noise=noise.clone())
        return time.perf_counter() - t

    for w in args.workload:
        batch = inputs(policy.config, *WORKLOADS[w])
        first = call(*batch)
        times = [call(*batch) for _ in range(args.repeats)]
        print(json.dumps({
            "impl": "lerobot-0.6.1", "kind": args.kind, "dtype": args.dtype, "workload": w,
            "latency_s": statistics.median(times), "first_call_s": first, "times_s": times, "load_s": load_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }), flush=True)


if __name__ == "__main__":
    main()
