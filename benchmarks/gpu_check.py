"""The GPU check (run by benchmarks/gpu_check.sh on a machine with a CUDA GPU): parity of both backends on
the device against the CPU fp32 reference, the bf16 gate, and `pi0 bench` W1 / W2, as one JSON line.

    python3 benchmarks/gpu_check.py [--device cuda] [--size pi0] [--seeds 3]

--device cpu --size tiny runs the same steps here in seconds (the test suite does, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import pi0
from pi0.cli import bench

WORKLOADS = {  # as README's table: W1 3 cameras, 48 tokens; W2 2 cameras + 1 masked, 12 of 48 tokens
    "W1": {"cameras": 3, "masked_cameras": 0, "tokens": 48, "valid_tokens": 48},
    "W2": {"cameras": 3, "masked_cameras": 1, "tokens": 48, "valid_tokens": 12},
}


def parity(size: str, device: str, seeds: int) -> dict:
    """fp32 reference and engine on `device` vs the CPU fp32 reference (max-abs), engine bf16 (PCC and
    max-abs over the actions' std), on the same seeded weights."""
    cfg = pi0.size_config(size)
    cpu = pi0.build_model(cfg, seed=0)
    cases = []
    for s in range(seeds):
        obs = pi0.sample_observation(cfg, 1, 12 + 3 * s, seed=s, masked_cameras=s % 2, token_len=min(48, cfg.max_token_len))
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(s))
        cases.append((obs, noise, cpu.sample_actions(obs, noise=noise)))
    del cpu
    out = {}
    for name, backend, dtype in (("reference_fp32", "reference", "float32"), ("engine_fp32", "engine", "float32"),
                                 ("engine_bf16", "engine", "bfloat16")):
        model = pi0.build_model(cfg, seed=0, backend=backend, dtype=dtype, device=device)
        errs, rels, pccs = [], [], []
        for obs, noise, want in cases:
            got = model.sample_actions(obs, noise=noise).float().cpu()
            errs.append((got - want).abs().max().item())
            rels.append(errs[-1] / want.std().item())
            pccs.append(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1].item())
        out[name] = {"max_abs": max(errs), "max_abs_over_std": max(rels), "mean_pcc": statistics.mean(pccs),
                     "min_pcc": min(pccs)}
        if dtype == "float32":
            out[name]["pass"] = max(errs) <= 1e-4
        else:
            out[name]["pass"] = statistics.mean(pccs) >= 0.999 and min(pccs) >= 0.995 and max(rels) <= 0.05
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def bench_workloads(size: str, device: str, dtype: str, repeats: int) -> dict:
    out = {}
    for name, w in WORKLOADS.items():
        args = SimpleNamespace(size=size, checkpoint=None, action_horizon=None, backend="engine", dtype=dtype,
                               device=device, steps=None, batch=1, repeats=repeats, json=True, rtc_delay=None, **w)
        rep = bench.run(args)
        out[name] = {k: rep[k] for k in ("latency_s", "first_call_s", "stages_s", "efficiency", "gemm_gflops", "dtype",
                                         "kernels")}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="pi0", help="pi0, pi05, tiny or tiny-pi05")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    t0 = time.perf_counter()
    report = {"device": args.device, "size": args.size, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    report["parity"] = parity(args.size, args.device, args.seeds)
    report["bench_bf16"] = bench_workloads(args.size, args.device, "bfloat16", args.repeats)
    report["seconds"] = time.perf_counter() - t0
    report["pass"] = all(v["pass"] for v in report["parity"].values())
    print(json.dumps(report))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
