"""LeRobot 0.6.1's pi0, eager in bf16, on a checkpoint pi0 wrote in LeRobot's layout and on inputs pi0's GPU check
saved (`benchmarks/gpu_check.py --lerobot PY` runs it in a Python with LeRobot installed: benchmarks/gpu_wheels.sh).
Prints one JSON line (per workload: latency, first call) and saves the actions for the PCC with pi0's engine.

    PY benchmarks/lerobot_gpu.py --checkpoint DIR --inputs inputs.pt --out actions.pt [--device cuda] [--repeats 10]
"""

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.pi0 import PI0Policy

    t0 = time.perf_counter()
    config = PreTrainedConfig.from_pretrained(args.checkpoint)
    config.dtype, config.device = "bfloat16", args.device
    policy = PI0Policy.from_pretrained(args.checkpoint, config=config).eval()
    model = policy.model
    load_s = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    report, actions = {"impl": "lerobot-0.6.1 eager", "dtype": "bfloat16", "load_s": load_s}, {}
    for workload, x in torch.load(args.inputs).items():
        dev = [t.to(args.device) for t in x["images"]]
        masks = [m.to(args.device) for m in x["image_masks"]]
        tokens, token_masks = x["tokens"].to(args.device), x["token_masks"].to(args.device)
        state, noise = x["state"].to(args.device), x["noise"].to(args.device)

        def call() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                actions[workload] = model.sample_actions(dev, masks, tokens, token_masks, state, noise=noise.clone())
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t

        first = call()
        times = [call() for _ in range(args.repeats)]
        report[workload] = {"latency_ms": statistics.median(times) * 1e3, "first_call_s": first}
    torch.save({w: a.float().cpu() for w, a in actions.items()}, args.out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
