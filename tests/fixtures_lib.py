"""Read the LeRobot 0.6.1 golden fixtures (tools/make_fixtures.py) under tests/fixtures/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import pi0

ROOT = Path(__file__).parent / "fixtures"
# pi0 and pi0.5 (pipeline/ is apart; pi0_fast_*, from tools/make_fast_fixtures.py, are test_fast_model.py's)
MODELS = sorted(d.name for d in ROOT.iterdir() if (d / "model.safetensors").is_file()
                and json.loads((d / "config.json").read_text())["type"] != "pi0_fast")


@dataclass
class Case:
    model_dir: Path
    name: str
    obs: pi0.Observation
    noise: torch.Tensor
    num_steps: int
    expected: dict[str, torch.Tensor]  # actions, vision_0, prefix_out, v_t0


def cases(model_name: str) -> list[Case]:
    d = ROOT / model_name
    out = []
    for f in sorted(d.glob("*.safetensors")):
        if f.name == "model.safetensors":
            continue
        with safe_open(str(f), "pt") as h:
            t = {k: h.get_tensor(k) for k in h.keys()}
            steps = int(h.metadata()["num_steps"])
        n = sum(1 for k in t if k.startswith("image_mask_"))
        obs = pi0.Observation([t[f"image_{i}"] for i in range(n)], [t[f"image_mask_{i}"] for i in range(n)],
                              t["tokens"], t["token_masks"], t["state"])
        expected = {k: t[k] for k in ("actions", "vision_0", "prefix_out", "v_t0")}
        out.append(Case(d, f.stem, obs, t["noise"], steps, expected))
    return out


def scaled_err(got, want) -> float:
    """max |got - want| / max(1, max |want|): an error bound relative to the quantity's own scale, so that
    values larger than 1 (a prefix after 18 layers, a loss, robot units) allow the fp32 rounding that
    another CPU's summation order gives them; values of order 1 keep an absolute bound."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
