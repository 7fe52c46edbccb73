"""`pi0 bench`: latency, stage times, FLOP efficiency and memory of one configuration, in one process.

The FLOP count is what the VALID work needs (valid cameras and tokens only; the last VLM layer's k, v
only), so a backend that skips padding and masked cameras is not credited for work it avoids, and one
that computes them is not credited for wasted work. `efficiency` = achieved GFLOP/s over a GEMM of the
same dtype measured in the same process just before the model runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

import pi0
from pi0.backends.engine import int8 as int8_ops
from pi0.backends.engine import ops
from pi0.cli.options import add_device_args, device_and_dtype
from pi0.hardware import peak_rss_gib
from pi0.model.config import SIZES, Pi0Config
from pi0.model.rtc import RTC
from pi0.timing import Progress, best_seconds


def _gemma_layer_flops(n_q: int, n_k: int, width: int, cfg, attn: bool = True) -> float:
    qkv = 2 * n_q * width * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    if not attn:  # k, v only
        return 2 * n_q * width * 2 * cfg.num_kv_heads * cfg.head_dim
    att = 4 * n_q * n_k * cfg.num_heads * cfg.head_dim
    o = 2 * n_q * cfg.num_heads * cfg.head_dim * width
    mlp = 3 * 2 * n_q * width * cfg.mlp_dim
    return qkv + att + o + mlp


def model_flops(cfg: Pi0Config, images_per_row: list[int], tokens_per_row: list[int], num_steps: int) -> float:
    """Matmul FLOPs of one sample_actions call counting only valid cameras and tokens."""
    v = cfg.vision
    n = v.num_patches
    per_image = 2 * n * 3 * v.patch_size**2 * v.width + 2 * n * v.width * cfg.vlm.width
    per_image += v.depth * (2 * n * v.width * 3 * v.width + 4 * n * n * v.width + 2 * n * v.width**2
                            + 2 * 2 * n * v.width * v.mlp_dim)
    total = per_image * sum(images_per_row)
    e, ew, h = cfg.expert, cfg.expert.width, cfg.action_horizon
    n_state = 0 if cfg.pi05 else 1
    for imgs, toks in zip(images_per_row, tokens_per_row):
        lp = imgs * n + toks
        total += (cfg.vlm.depth - 1) * _gemma_layer_flops(lp, lp, cfg.vlm.width, cfg.vlm)
        total += _gemma_layer_flops(lp, lp, cfg.vlm.width, cfg.vlm, attn=False)
        if n_state:
            total += (e.depth - 1) * _gemma_layer_flops(1, lp + 1, ew, e) + _gemma_layer_flops(1, lp + 1, ew, e, attn=False)
            total += 2 * cfg.state_dim * ew
        step = e.depth * _gemma_layer_flops(h, lp + n_state + h, ew, e)
        step += 2 * h * cfg.action_dim * ew * 2  # action_in_proj, action_out_proj
        step += 2 * h * ew * ew * (2 if not cfg.pi05 else 0)  # action_time_mlp (action half + out)
        total += num_steps * step
    return float(total)


def gemm_gflops(dtype: torch.dtype, device: torch.device, packed: bool, m: int, k: int, n: int, repeats: int = 5,
                int8: bool = False) -> float:
    """The best rate the machine reaches for a GEMM of the model's dominant shape ([m, k] x [k, n]: the VLM's
    MLP over the workload's prefix; 816 x 2048 x 16384 for pi0's W1) in `dtype`: F.linear, and the oneDNN-packed
    product too where the engine packs (`packed`),
    best of `repeats`, so that `efficiency` is measured against the fastest GEMM on offer. With `int8`: the best
    raw int8 product here (oneDNN's or torch._int_mm on already quantised activations, whichever runs and is
    faster: no quantisation or rescaling passes, which are the engine's own cost)."""
    def best_rate(fn) -> float:
        return 2 * m * k * n / best_seconds(fn, repeats, device) / 1e9

    if int8:  # int8 levels and scales made as they are, no float weight (it would count in the int8 peak RSS)
        qmax = int8_ops.int8_kernel(dtype, device.type)[1]
        q = int8_ops.Int8Weight(torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8), torch.rand(n) + 0.5, dtype)
        rates = []
        for kernel, xq in (("onednn", torch.randint(0, 256, (m, k), dtype=torch.uint8)),
                           ("int_mm", torch.randint(-qmax, qmax + 1, (m, k), dtype=torch.int8))):
            try:
                w = int8_ops.pack_int8(q, m, kernel)
                rates.append(best_rate(lambda w=w, xq=xq: int8_ops.int8_matmul(xq, w)))
            except (RuntimeError, NotImplementedError) as e:  # a kernel this build or CPU lacks
                print(f"pi0 bench: int8 {kernel} product unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
        return max(rates) if rates else float("nan")
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    rate = best_rate(lambda: torch.nn.functional.linear(a, b))
    if packed:
        w = ops.pack(b, m, True)
        rate = max(rate, best_rate(lambda: ops.linear(a, w)))
    return rate


def run(args) -> dict[str, Any]:
    device, dtype, dtype_reason = device_and_dtype(args)  # its one line goes to stderr, out of the JSON
    torch.manual_seed(0)
    progress = None if args.json else Progress()
    t0 = time.perf_counter()
    if args.checkpoint:
        model = pi0.load_model(args.checkpoint, backend=args.backend, dtype=dtype, device=device,
                               action_horizon=args.action_horizon,
                               progress=(lambda f: progress("reading", f)) if progress else None)
    else:
        model = pi0.build_model(pi0.size_config(args.size), backend=args.backend, dtype=dtype, device=device,
                                progress=(lambda f: progress(f"building {args.size}", f)) if progress else None)
    load_s = time.perf_counter() - t0
    cfg = model.config
    steps = args.steps or cfg.num_steps
    tokens = args.tokens or cfg.max_token_len
    valid = args.valid_tokens or tokens
    obs = pi0.sample_observation(cfg, args.batch, valid, num_cameras=args.cameras, masked_cameras=args.masked_cameras,
                                 token_len=tokens)
    noise = torch.randn(args.batch, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    kernels = getattr(model, "kernels", {"packed_weights": False, "fused_kernels": False, "why": "reference backend"})
    prefix_len = (args.cameras - args.masked_cameras) * cfg.vision.num_patches + valid
    gemm = gemm_gflops(getattr(model, "dtype", dtype), device, kernels["packed_weights"], prefix_len, cfg.vlm.width,
                       cfg.vlm.mlp_dim, int8="int8_kernel" in kernels)
    flops = model_flops(cfg, [args.cameras - args.masked_cameras] * args.batch, [valid] * args.batch, steps)

    rtc = None
    if args.rtc_delay is not None:  # a previous chunk's unexecuted half, guided over all of it
        half = cfg.action_horizon // 2
        prev = torch.randn(args.batch, half, cfg.action_dim, generator=torch.Generator().manual_seed(1))
        rtc = RTC(prev, inference_delay=args.rtc_delay, execution_horizon=half)

    def call() -> tuple[float, dict[str, float]]:
        stages: dict[str, float] = {}
        t = time.perf_counter()
        model.sample_actions(obs, noise=noise, num_steps=steps, stages=stages, rtc=rtc)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, stages

    first, _ = call()
    if progress:
        progress(f"first call {first:.2f} s; timing", 0.0)
    times, stage_runs = [], []
    for i in range(args.repeats):
        dt, st = call()
        times.append(dt)
        stage_runs.append(st)
        if progress:
            progress(f"call {i + 1}/{args.repeats} {dt:.2f} s", (i + 1) / args.repeats)
    latency = statistics.median(times)
    stages = {k: statistics.median(st[k] for st in stage_runs) for k in stage_runs[0]}  # one "graph" when replayed
    achieved = flops / latency / 1e9
    return {
        "latency_s": latency,
        "first_call_s": first,
        "load_s": load_s,
        "stages_s": stages,
        "model_tflop": flops / 1e12,
        "achieved_gflops": achieved,
        "gemm_gflops": gemm,
        "efficiency": achieved / gemm,
        "peak_rss_gib": peak_rss_gib(),
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_reason": dtype_reason,
        "kernels": kernels,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": {
            "model": cfg.kind, "size": None if args.checkpoint else args.size, "checkpoint": args.checkpoint,
            "backend": args.backend, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "cameras": args.cameras, "masked_cameras": args.masked_cameras, "tokens": tokens,
            "valid_tokens": valid, "steps": steps, "batch": args.batch, "repeats": args.repeats, "rtc_delay": args.rtc_delay,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        },
        "times_s": times,
    } | ({"ttnn_ops": model.ops} if hasattr(model, "ops") else {})


def add_arguments(p) -> None:
    p.add_argument("--size", default="pi0", choices=SIZES)
    p.add_argument("--checkpoint", help="real weights instead of seeded random ones")
    p.add_argument("--action-horizon", type=int, default=None, help="override the checkpoint's action horizon")
    add_device_args(p)
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--masked-cameras", type=int, default=0, help="how many of the cameras are masked (the last ones)")
    p.add_argument("--tokens", type=int, default=None, help="prompt length incl. padding (default: the model's)")
    p.add_argument("--valid-tokens", type=int, default=None, help="valid prompt tokens (default: all)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rtc-delay", type=int, default=None, help="time real-time chunking too: a previous chunk of "
                   "half the horizon, guided with this inference delay")
    p.add_argument("--json", action="store_true")


def main(args) -> int:
    rep = run(args)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    c = rep["config"]
    print(f"{c['model']} {c['backend']} {c['dtype']} batch {c['batch']}, {c['cameras']} cameras "
          f"({c['masked_cameras']} masked), {c['valid_tokens']}/{c['tokens']} tokens, {c['steps']} steps")
    print(f"latency   {rep['latency_s']:.3f} s (median of {c['repeats']}; first call {rep['first_call_s']:.3f} s)")
    print("stages    " + ", ".join(f"{k} {v:.3f} s" for k, v in rep["stages_s"].items()))
    print(f"compute   {rep['model_tflop']:.3f} TFLOP -> {rep['achieved_gflops']:.0f} GFLOP/s; GEMM {rep['gemm_gflops']:.0f} "
          f"GFLOP/s; efficiency {rep['efficiency']:.2f}")
    print(f"memory    peak RSS {rep['peak_rss_gib']:.2f} GiB; load/build {rep['load_s']:.1f} s")
    if "ttnn_ops" in rep:
        ops = rep["ttnn_ops"]
        if ops["emulated"]:
            print("ttnn      EMULATED on the host (each op its ttnn golden function): the times above are the host's, "
                  "not a Tenstorrent card's")
        for stage, counts in ops["stages"].items():
            top = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
            host = f"; host {ops['host_s'][stage]:.3f} s in ops" if stage in ops["host_s"] else ""
            print(f"ttnn ops  {stage}: {sum(counts.values())} calls ({top}){host}")
    return 0
