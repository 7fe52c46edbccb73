"""The accuracy gates at full size (run by hand; ~19 GB peak RSS): the engine vs the reference in fp32 on the
same seeded random weights, PCC of the flattened actions per seed (odd seeds mask a camera).

    .venv/bin/python benchmarks/fullsize_gate.py [pi0|pi05] [seeds] [--dtype bfloat16|int8 [--all-only] [--qmax 63]
                                                                      [--outliers]]

bfloat16 (~5 min): SigLIP in bf16 (the engine's default) and in fp32 (LeRobot's choice); gate mean PCC >= 0.999,
min >= 0.995. int8 (~15 min): every int8 stage, then each stage alone (the others in the float dtype), with the
per-stage error of one unmasked case: SigLIP + projector features, the prefix's k, v (every VLM layer) and the
actions; gate mean PCC >= 0.99, min >= 0.98. --outliers: the same on a checkpoint with Gemma-like activation
outliers (the float model unchanged), int8 with and without its outlier channels in float. Prints one JSON line per
seed and a summary line per variant.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pi0  # noqa: E402
from pi0.backends.engine.model import Pi0Engine  # noqa: E402
from pi0.backends.engine.weights import INT8_STAGES, OUTLIER_GAIN, int8_quantizer  # noqa: E402
from pi0.backends.factory import random_state_dict  # noqa: E402
from pi0.backends.reference.model import Pi0Reference  # noqa: E402
from pi0.hardware import compute_dtype  # noqa: E402
from tests.stress import Chain, outlier_channels  # noqa: E402

GATES = {"bfloat16": (0.999, 0.995), "int8": (0.99, 0.98)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def stage_errors(ref, eng: Pi0Engine, obs) -> dict[str, float]:
    """Relative L2 error of the vision features, of the prefix k, v (all VLM layers) and nothing else, for
    one observation with every camera and token valid."""
    with torch.no_grad():
        images = torch.cat(obs.images)
        feats = rel_err(eng.embed_images(images).float(), ref.embed_image(images))
        prefix, mask, ar = ref.embed_prefix(obs)
        cache, _ = ref.fill_kv_cache(prefix, mask, ar)
        e_prefix, _, _ = eng.embed_prefix(obs)
        b, lp, g = 1, e_prefix.shape[1], eng.config.expert
        k_buf = [torch.zeros(b, g.num_kv_heads, lp, g.head_dim, dtype=eng.dtype) for _ in eng.w.expert_layers]
        v_buf = [torch.zeros_like(k) for k in k_buf]
        eng.fill_kv_cache(e_prefix, None, k_buf, v_buf)
        # the reference's k, v are [B, L, K, D]; the engine's [B, K, L, D]
        want = torch.cat([torch.cat([k.transpose(1, 2).flatten(), v.transpose(1, 2).flatten()]) for k, v in cache])
        got = torch.cat([torch.cat([k.flatten(), v.flatten()]) for k, v in zip(k_buf, v_buf)])
        return {"vision_features_rel_err": feats, "prefix_kv_rel_err": rel_err(got, want)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", nargs="?", default="pi0")
    ap.add_argument("seeds", nargs="?", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(GATES))
    ap.add_argument("--all-only", action="store_true", help="int8: every stage in int8, not each stage alone too")
    ap.add_argument("--qmax", type=int, default=None,
                    help="int8 weight range (default: what this CPU's kernel takes; 63 = the 7-bit weights of CPUs "
                         "without VNNI, whose numerics any CPU reproduces)")
    ap.add_argument("--outliers", action="store_true",
                    help="the outlier checkpoint (pi0.backends.factory.outlier_channels: 4 channels of every norm-fed product's "
                         "input 100x the rest, the float model unchanged); int8 is run with and without the outlier "
                         "channels kept in float")
    args = ap.parse_args()
    cfg = pi0.size_config(args.kind)
    t0 = time.perf_counter()
    outliers = outlier_channels(cfg) if args.outliers else None
    with torch.device("meta"):
        ref = Pi0Reference(cfg).eval().requires_grad_(False)
    ref.load_state_dict(random_state_dict(cfg, 0, torch.float32, hook=outliers), strict=True, assign=True)
    print(json.dumps({"built_s": time.perf_counter() - t0}), flush=True)
    cases = []
    for s in range(args.seeds):
        obs = pi0.sample_observation(cfg, 1, 12 + 3 * s, seed=s, masked_cameras=s % 2, token_len=48)
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(s))
        cases.append((obs, noise, ref.sample_actions(obs, noise=noise)))
    full = pi0.sample_observation(cfg, 1, 48, seed=99, token_len=48)
    mean_gate, min_gate = GATES[args.dtype]

    if args.dtype == "bfloat16":
        # the engine gets the bf16 rounding of the very same weights; SigLIP in bf16 (default) or fp32 (as LeRobot)
        variants = {}
        for vision in ("bfloat16", "float32"):
            keep = vision == "float32"
            variants[f"vision {vision}"] = lambda keep=keep, vision=vision: Pi0Engine(cfg, {
                k: v.clone() if keep and k.startswith(("vision.", "projector.")) else v.to(torch.bfloat16)
                for k, v in ref.state_dict().items()}, vision_dtype=getattr(torch, vision))
    else:
        # int8 through the path users run (load_model / build_model with dtype int8): the seed's weights written
        # in the float dtype int8 computes in here (bf16 where native), each quantised as it is made
        dt = compute_dtype(torch.int8)
        variants = {}
        gains = [OUTLIER_GAIN, None] if args.outliers else [OUTLIER_GAIN]
        for stages in [INT8_STAGES] + ([] if args.all_only else [(s,) for s in INT8_STAGES]):
            for gain in gains if stages == INT8_STAGES else [OUTLIER_GAIN]:
                def make(stages=stages, gain=gain) -> Pi0Engine:
                    quantize = int8_quantizer(dt, stages, args.qmax, outlier_gain=gain)
                    state = random_state_dict(cfg, 0, dt, hook=Chain(outliers, quantize) if outliers else quantize)
                    return Pi0Engine(cfg, state)
                variants["int8 " + "+".join(stages) + ("" if gain else " (per-token scales only)")] = make

    for name, make in variants.items():
        eng = make()
        pccs, errs = [], []
        for s, (obs, noise, a) in enumerate(cases):
            b = eng.sample_actions(obs, noise=noise)
            pccs.append(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item())
            errs.append((a - b).abs().max().item())
            print(json.dumps({"variant": name, "seed": s, "pcc": pccs[-1], "max_abs": errs[-1], "masked_cameras": s % 2}),
                  flush=True)
        summary = {"model": args.kind, "engine": args.dtype, "variant": name, "seeds": args.seeds, "qmax": args.qmax,
                   "outlier_checkpoint": args.outliers, "int8_outlier_columns": eng.kernels.get("int8_outlier_columns"),
                   "dtype_between": str(eng.dtype).replace("torch.", ""),
                   "mean_pcc": statistics.mean(pccs), "min_pcc": min(pccs), "max_abs": max(errs),
                   "pass": statistics.mean(pccs) >= mean_gate and min(pccs) >= min_gate,
                   "kernels": eng.kernels.get("why")}
        summary.update(stage_errors(ref, eng, full))
        print(json.dumps(summary), flush=True)
        del eng


if __name__ == "__main__":
    main()
