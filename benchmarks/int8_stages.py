"""int8 stage by stage, for speed: one process builds the engine with each given set of int8 stages in turn
(the rest in the float dtype int8 computes in here) and times W1 (3 cameras, 48 tokens, 10 steps, batch 1;
best of 3 warm calls). An empty set is the float engine, side by side.

    .venv/bin/python benchmarks/int8_stages.py vision+prefix+expert+embedding vision+prefix+embedding ""

Prints one JSON line per set. The accuracy side is benchmarks/fullsize_gate.py --dtype int8.
"""

import gc
import json
import sys
import time

import torch

import pi0
from pi0.hardware import weights_allocation
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.engine.weights import int8_quantizer
from pi0.hardware import compute_dtype
from pi0.backends.factory import random_state_dict


def main() -> None:
    cfg = pi0.size_config("pi0")
    dt = compute_dtype(torch.int8)
    obs = pi0.sample_observation(cfg, 1, 48, num_cameras=3, token_len=48)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    for arg in sys.argv[1:] or ["vision+prefix+expert+embedding", ""]:
        stages = tuple(s for s in arg.split("+") if s)
        with weights_allocation():
            eng = Pi0Engine(cfg, random_state_dict(cfg, 0, dt, hook=int8_quantizer(dt, stages)))
        eng.sample_actions(obs, noise=noise)
        runs = []
        for _ in range(3):
            st: dict[str, float] = {}
            t = time.perf_counter()
            eng.sample_actions(obs, noise=noise, stages=st)
            runs.append((time.perf_counter() - t, st))
        best, st = min(runs, key=lambda r: r[0])
        print(json.dumps({"int8_stages": list(stages), "dtype_between": str(dt).replace("torch.", ""), "w1_s": best,
                          "stages_s": st, "kernels": eng.kernels["why"]}), flush=True)
        del eng
        gc.collect()


if __name__ == "__main__":
    main()
