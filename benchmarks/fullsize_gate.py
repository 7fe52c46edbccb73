"""The bf16 accuracy gate at full size (run by hand; ~19 GB peak RSS, ~5 min):
engine bf16 vs reference fp32 on the same seeded random weights, PCC of the flattened actions per seed,
once with SigLIP in bf16 (the engine's default) and once with SigLIP in fp32 (LeRobot's choice).

    .venv/bin/python benchmarks/fullsize_gate.py [pi0|pi05] [seeds]

Prints one JSON line per seed and a summary line (mean and min PCC, max-abs).
"""

import json
import statistics
import sys
import time

import torch

import pi0
from pi0.engine.model import Pi0Engine


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    cfg = pi0.preset(kind)
    t0 = time.perf_counter()
    ref = pi0.build_model(cfg, seed=0, dtype="float32")
    print(json.dumps({"built_s": time.perf_counter() - t0}), flush=True)
    cases = []
    for s in range(seeds):
        obs = pi0.sample_observation(cfg, 1, 12 + 3 * s, seed=s, masked_cameras=s % 2, token_len=48)
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(s))
        cases.append((obs, noise, ref.sample_actions(obs, noise=noise)))
    # the engine gets the bf16 rounding of the very same weights; SigLIP in bf16 (default) or fp32 (as LeRobot)
    for vision in ("bfloat16", "float32"):
        state = {k: v.to(torch.bfloat16) if not (vision == "float32" and (k.startswith("vision.") or k.startswith("projector.")))
                 else v.clone() for k, v in ref.state_dict().items()}
        eng = Pi0Engine(cfg, state, vision_dtype=getattr(torch, vision))
        pccs, errs = [], []
        for s, (obs, noise, a) in enumerate(cases):
            b = eng.sample_actions(obs, noise=noise)
            pccs.append(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item())
            errs.append((a - b).abs().max().item())
            print(json.dumps({"vision": vision, "seed": s, "pcc": pccs[-1], "max_abs": errs[-1], "masked_cameras": s % 2}), flush=True)
        print(json.dumps({"model": kind, "engine": "bfloat16", "vision": vision, "seeds": seeds,
                          "mean_pcc": statistics.mean(pccs), "min_pcc": min(pccs), "max_abs": max(errs)}), flush=True)
        del eng, state


if __name__ == "__main__":
    main()
