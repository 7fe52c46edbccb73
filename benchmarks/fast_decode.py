"""π0-FAST decoding speed at full size, side by side in one run: pi0's engine and reference and LeRobot 0.6.1's
`pi0_fast` (each in its own process, one after the other, the same shapes and dtype), and the floor a decoded token
cannot beat on the machine: one read of Gemma-2B's layers and the tied head at the rate a one-row product streams
weights there.

Random weights (nothing is downloaded), so no end id ever comes and every run decodes `--steps` tokens. Three cameras
at 224 px, a prompt of `--tokens` valid tokens. Reports the prefill (images + prompt, to the first token) and the
time between the following tokens (stamped at each call of the head), medians over `--repeats` timed runs.

    .venv/bin/python benchmarks/fast_decode.py --dtype bfloat16 --lerobot-python /tmp/lerobot-oracle/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CAMERAS, RES = 3, 224


def inputs(tokens: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, RES, RES, generator=g) * 2 - 1 for _ in range(CAMERAS)]
    masks = [torch.ones(1, dtype=torch.bool) for _ in range(CAMERAS)]
    ids = torch.randint(3, vocab, (1, tokens), generator=g)
    ids[:, 0] = 2
    return images, masks, ids, torch.ones(1, tokens, dtype=torch.bool)


def clocked(decode, stamps: list[float], steps: int, repeats: int) -> dict[str, float]:
    """decode(n) runs a prefill and n decoded tokens, appending a time stamp to `stamps` at each head call (one a
    token): a prefill is the time to the first stamp, a token a time between stamps. After a short warm-up run,
    `repeats` timed runs: the median prefill and the median of every token's time (a shared host's timings
    move between runs)."""
    decode(2)
    prefills, gaps = [], []
    for _ in range(repeats):
        stamps.clear()
        t = time.perf_counter()
        decode(steps)
        prefills.append(stamps[0] - t)
        gaps += [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prefill_s": statistics.median(prefills), "per_token_s": statistics.median(gaps), "steps": steps,
            "repeats": repeats, "prefill_range_s": [min(prefills), max(prefills)]}


def run_pi0(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import pi0
    from pi0.model.fast_config import FastConfig

    t = time.perf_counter()
    model = pi0.build_model(FastConfig(), backend=args.impl, seed=0, dtype=args.dtype)
    if args.decode_int8:
        model.quantize_decoding()
    build = time.perf_counter() - t
    images, masks, ids, id_masks = inputs(args.tokens, model.config.vlm.vocab_size)
    stamps: list[float] = []
    name = "logits" if args.impl == "reference" else "_head"  # each backend's head, called once a token
    head = getattr(model, name)
    setattr(model, name, lambda x: (head(x), stamps.append(time.perf_counter()))[0])
    with torch.no_grad():
        row = clocked(lambda n: model.generate(images, masks, ids, id_masks, end_ids=[-1], max_steps=n), stamps,
                      args.steps, args.repeats)
    label = f"pi0 {args.impl}" + (" + int8 decoding" if args.decode_int8 else "")
    return {"impl": label, "dtype": args.dtype, "build_s": build, **row}


def run_lerobot(args) -> dict:
    import lerobot.policies.pi0_fast.modeling_pi0_fast as mod
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

    class Ids:  # the decoding loop's two questions to the PaliGemma tokenizer (which would come from the hub)
        bos_token_id = 2

        def convert_tokens_to_ids(self, token: str) -> int:
            return -1  # never emitted: every run decodes max_decoding_steps tokens

    t = time.perf_counter()
    torch.manual_seed(0)
    model = mod.PI0FastPytorch(PI0FastConfig(device="cpu", dtype=args.dtype), paligemma_tokenizer=Ids()).eval()
    build = time.perf_counter() - t
    images, masks, ids, id_masks = inputs(args.tokens - 1, 257152)  # LeRobot appends BOS: the same prefix length
    stamps: list[float] = []
    model.paligemma_with_expert.paligemma.lm_head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    with torch.no_grad():
        row = clocked(lambda n: model.sample_actions_fast_kv_cache(images, masks, ids, id_masks, max_decoding_steps=n),
                      stamps, args.steps, args.repeats)
    return {"impl": "LeRobot 0.6.1 pi0_fast", "dtype": args.dtype, "build_s": build, **row}


def bandwidth_floor(dtype: str) -> dict:
    """The machine's memory read rate, measured two ways (best of 5 each): a one-row product over a 1 GiB weight
    (F.linear: what a decoded token does to every weight) and a sum over a 1 GiB fp32 tensor (a plain stream); the
    faster is the rate. The floor: Gemma-2B's 18 layers plus the 257 152 x 2048 tied head, each read once a token in
    `dtype`, at that rate."""
    dt = getattr(torch, dtype)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    weight = torch.empty(16384, (1 << 30) // 16384 // torch.finfo(dt).bits * 8, dtype=dt).uniform_()
    row = torch.randn(1, weight.shape[1]).to(dt)
    gemv = weight.numel() * weight.element_size() / best(lambda: torch.nn.functional.linear(row, weight)) / 1e9
    flat = torch.empty(1 << 28, dtype=torch.float32).uniform_()
    stream = flat.numel() * 4 / best(flat.sum) / 1e9
    params = 18 * (2048 * 2048 + 2 * 2048 * 256 + 2048 * 2048 + 3 * 2048 * 16384 + 2 * 2048) + 257152 * 2048
    nbytes = params * torch.finfo(dt).bits // 8
    rate = max(gemv, stream)
    return {"gemv_gb_s": gemv, "stream_gb_s": stream, "weights_read_gb": nbytes / 1e9,
            "per_token_floor_s": nbytes / (rate * 1e9), "int8_weights_read_gb": params / 1e9,
            "int8_per_token_floor_s": params / (rate * 1e9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["all", "engine", "reference", "lerobot"], default="all")
    p.add_argument("--skip-reference", action="store_true", help="with --impl all: the engine and LeRobot only")
    p.add_argument("--int8", action="store_true", help="with --impl all: the engine in int8 too (pi0 only has it; "
                   "with --decode-int8, its decoding steps too)")
    p.add_argument("--decode-int8", action="store_true", help="the engine's decoding steps with weight-only int8 "
                   "(`quantize_decoding`); with --impl all: a run of its own beside the others")
    p.add_argument("--lerobot-python", default="/tmp/lerobot-oracle/bin/python",
                   help="the oracle venv's Python (../shared/oracles/lerobot/setup.sh)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--tokens", type=int, default=48, help="valid prompt tokens")
    p.add_argument("--steps", type=int, default=16, help="tokens decoded in a timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (medians reported)")
    args = p.parse_args()
    if args.decode_int8 and args.impl not in ("all", "engine"):
        p.error("--decode-int8 is the engine's")
    if args.impl != "all":
        print(json.dumps(run_lerobot(args) if args.impl == "lerobot" else run_pi0(args)))
        return
    rows = []
    impls = [("engine", sys.executable)] + ([] if args.skip_reference else [("reference", sys.executable)])
    runs = [(impl, python, args.dtype) for impl, python in impls + [("lerobot", args.lerobot_python)]]
    runs += [("engine+", sys.executable, args.dtype)] if args.decode_int8 else []
    runs += [("engine+" if args.decode_int8 else "engine", sys.executable, "int8")] if args.int8 else []
    for impl, python, dtype in runs:
        extra = ["--decode-int8"] if impl == "engine+" else []
        argv = ["--impl", impl.rstrip("+"), "--dtype", dtype, "--tokens", str(args.tokens), "--steps", str(args.steps),
                "--repeats", str(args.repeats), *extra]
        out = subprocess.run([python, __file__, *argv], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from pi0.hardware import describe_machine

    print(json.dumps({"hardware": describe_machine(), "threads": torch.get_num_threads(), "runs": rows,
                      "floor": bandwidth_floor(args.dtype)}, indent=1))


if __name__ == "__main__":
    main()
