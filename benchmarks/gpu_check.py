"""The GPU check (run by benchmarks/gpu_check.sh on a machine with a CUDA GPU), one JSON line: parity of both backends
on the device against the CPU fp32 reference (fp32 with and without the buckets' graphs, the bf16 and fp8 gates),
then the engine's latency on W1 / W2 at batch 1 and W1 at batch 8, in bf16 and fp8, with the buckets' CUDA graphs
and (bf16) without them and with the compiled step, each bucket's capture time and memory, all side by side in one
run. --lerobot PY adds LeRobot 0.6.1 eager (in the Python PY) on the same weights and inputs.

    python3 benchmarks/gpu_check.py [--device cuda] [--size pi0] [--seeds 3] [--repeats 10] [--lerobot PY]

--device cpu --size tiny runs the same steps here in seconds (the test suite does, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import pi0
from pi0.hardware import resolve_dtype

WORKLOADS = {  # as README's table: W1 3 cameras, 48 tokens; W2 2 cameras + 1 masked, 12 of 48 tokens
    "W1": {"num_cameras": 3, "masked_cameras": 0, "token_len": 48, "num_valid_tokens": 48},
    "W2": {"num_cameras": 3, "masked_cameras": 1, "token_len": 48, "num_valid_tokens": 12},
}
CASES = (("W1", 1), ("W2", 1), ("W1", 8))  # (workload, batch)


def fp8_available(device: str) -> str | None:
    """None where dtype fp8 runs on `device`, else why not."""
    try:
        resolve_dtype("fp8", device)
    except ValueError as e:
        return str(e)
    return None


def observation(cfg: pi0.Pi0Config, workload: str, batch: int, seed: int = 0) -> tuple[pi0.Observation, torch.Tensor]:
    w = dict(WORKLOADS[workload], token_len=min(48, cfg.max_token_len))
    w["num_valid_tokens"] = min(w["num_valid_tokens"], w["token_len"])
    obs = pi0.sample_observation(cfg, batch, seed=seed, **w)
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))
    return obs, noise


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(size: str, device: str, seeds: int) -> dict:
    """Each backend / dtype on `device` vs the CPU fp32 reference on the same seeded weights: max-abs, max-abs over
    the actions' std, PCC. fp32 passes at <= 1e-4; bf16 at PCC mean >= 0.999, min >= 0.995, error <= 5 % of the std;
    fp8 at PCC mean >= 0.99, min >= 0.98 (the CPU tests' fp8 gate)."""
    cfg = pi0.size_config(size)
    cpu = pi0.build_model(cfg, seed=0)
    cases = []
    for s in range(seeds):
        obs = pi0.sample_observation(cfg, 1, 12 + 3 * s, seed=s, masked_cameras=s % 2,
                                     token_len=min(48, cfg.max_token_len))
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(s))
        cases.append((obs, noise, cpu.sample_actions(obs, noise=noise)))
    del cpu
    runs = [("reference_fp32", "reference", "float32", True), ("engine_fp32", "engine", "float32", True),
            ("engine_fp32_direct", "engine", "float32", False), ("engine_bf16", "engine", "bfloat16", True)]
    if fp8_available(device) is None:
        runs.append(("engine_fp8", "engine", "fp8", True))
    out = {}
    for name, backend, dtype, graphs in runs:
        model = pi0.build_model(cfg, seed=0, backend=backend, dtype=dtype, device=device)
        if backend == "engine":
            model.runner = None if not graphs else model.runner or model.use_buckets()
        errs, rels, pccs = [], [], []
        for obs, noise, want in cases:
            got = model.sample_actions(obs, noise=noise).float().cpu()
            errs.append((got - want).abs().max().item())
            rels.append(errs[-1] / want.std().item())
            pccs.append(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1].item())
        r = {"max_abs": max(errs), "max_abs_over_std": max(rels), "mean_pcc": statistics.mean(pccs),
             "min_pcc": min(pccs),
             "graphs": backend == "engine" and graphs}
        if dtype == "float32":
            r["pass"] = max(errs) <= 1e-4
        elif dtype == "bfloat16":
            r["pass"] = statistics.mean(pccs) >= 0.999 and min(pccs) >= 0.995 and max(rels) <= 0.05
        else:
            r["pass"] = statistics.mean(pccs) >= 0.99 and min(pccs) >= 0.98
        out[name] = r
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def timed(model, obs, noise, device: str, repeats: int) -> dict:
    """The first call (captures its bucket), then the median of `repeats` calls; GPU memory the first call took."""
    synchronize(device)
    mem = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    t = time.perf_counter()
    model.sample_actions(obs, noise=noise)
    synchronize(device)
    first = time.perf_counter() - t
    grown = (torch.cuda.memory_allocated() - mem) / 2**20 if device.startswith("cuda") else None
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.sample_actions(obs, noise=noise)
        synchronize(device)
        times.append(time.perf_counter() - t)
    return {"latency_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "first_call_s": first,
            "first_call_memory_mib": grown}


def speed(size: str, device: str, repeats: int, compile_step: bool) -> dict:
    """Latency per (dtype, runner, workload, batch), and each bucket's capture seconds; one model per dtype."""
    cfg = pi0.size_config(size)
    out: dict = {}
    dtypes = ["bfloat16"] + (["fp8"] if fp8_available(device) is None else [])
    for dtype in dtypes:
        model = pi0.build_model(cfg, seed=0, backend="engine", dtype=dtype, device=device)
        variants = [("graphs", dict())] + ([("direct", None)] if dtype == "bfloat16" else [])
        if compile_step and dtype == "bfloat16":
            variants.append(("graphs_compiled_step", dict(compile=True)))
        for variant, options in variants:
            key = f"{dtype}_{variant}"
            try:
                cuda = device.startswith("cuda")
                model.runner = None if options is None else model.use_buckets(capture=cuda, **options)
                out[key] = {f"{w}_b{b}": timed(model, *observation(cfg, w, b), device, repeats) for w, b in CASES}
                if model.runner is not None:
                    out[key]["buckets"] = [{**vars(bucket), "prepare_s": e.seconds, "graph": e.graph is not None,
                                            "why": e.why} for bucket, e in model.runner.entries.items()]
            except Exception as e:  # noqa: BLE001 - one variant's failure is reported, the rest still measured
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[f"{dtype}_kernels"] = {k: v for k, v in model.kernels.items() if k != "why"}
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = out.get("bfloat16_direct", {}).get("W1_b1", {}).get("latency_ms")
    if base:
        out["speedup_over_direct_W1_b1"] = {k: base / v["W1_b1"]["latency_ms"] for k, v in out.items()
                                           if isinstance(v, dict) and "W1_b1" in v}
    return out


def lerobot(size: str, device: str, python: str, repeats: int) -> dict:
    """LeRobot 0.6.1 eager (bf16) on the same weights (written in LeRobot's layout) and the same W1 / W2 inputs, in
    the Python `python` (benchmarks/lerobot_gpu.py): its latency, and the PCC of its actions with the engine's."""
    cfg = pi0.size_config(size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, inputs = Path(tmp) / "lerobot", Path(tmp) / "inputs.pt"
        pi0.save_model(pi0.build_model(cfg, seed=0, backend="reference", dtype="bfloat16"), ckpt, layout="lerobot")
        cases = {w: observation(cfg, w, 1) for w in WORKLOADS}
        engine = pi0.build_model(cfg, seed=0, backend="engine", dtype="bfloat16", device=device)
        ours = {w: engine.sample_actions(obs, noise=noise).float().cpu() for w, (obs, noise) in cases.items()}
        del engine
        torch.save({w: {"images": obs.images, "image_masks": obs.image_masks, "tokens": obs.tokens,
                        "token_masks": obs.token_masks, "state": obs.state, "noise": noise}
                    for w, (obs, noise) in cases.items()}, inputs)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        r = subprocess.run([python, str(Path(__file__).parent / "lerobot_gpu.py"), "--checkpoint", str(ckpt),
                            "--inputs", str(inputs), "--device", device, "--repeats", str(repeats),
                            "--out", str(Path(tmp) / "actions.pt")], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout)[-1500:]}
        report = json.loads(r.stdout.strip().splitlines()[-1])
        theirs = torch.load(Path(tmp) / "actions.pt")
        for w in WORKLOADS:
            a, b = ours[w].flatten(), theirs[w].float().flatten()[: ours[w].numel()]
            report[w]["pcc_with_engine"] = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="pi0", help="pi0, pi05, tiny or tiny-pi05")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled-step variant")
    ap.add_argument("--lerobot", default=None, metavar="PY", help="a Python with LeRobot 0.6.1 installed")
    args = ap.parse_args()
    t0 = time.perf_counter()
    report = {"device": args.device, "size": args.size, "torch": torch.__version__, "fp8": fp8_available(args.device)
              or "available"}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity is checked
        torch.backends.cudnn.allow_tf32 = False
    report["parity"] = parity(args.size, args.device, args.seeds)
    report["seconds_parity"] = time.perf_counter() - t0
    report["speed"] = speed(args.size, args.device, args.repeats, args.compile and "PI0_NO_COMPILE" not in os.environ)
    report["seconds_speed"] = time.perf_counter() - t0 - report["seconds_parity"]
    if args.lerobot:
        report["lerobot"] = lerobot(args.size, args.device, args.lerobot, args.repeats)
    report["seconds"] = time.perf_counter() - t0
    report["pass"] = all(v["pass"] for v in report["parity"].values())
    print(json.dumps(report))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
