"""Math that both backends need, in one place (the reference and the engine never import each other):
the attention mask value, the flow-time embedding and the SigLIP position-embedding resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_VALUE = -2.3819763e38  # big_vision's finite "minus infinity": a fully masked row softmaxes to uniform


def posemb(t: Tensor, width: int, min_period: float, max_period: float) -> Tensor:
    """Sine-cosine embedding of the flow time t [B] -> [B, width] (sin first).
    Computed in fp64 like LeRobot (the top frequency reaches ~1571 rad), then cast to t's dtype."""
    frac = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    ang = (1.0 / period * 2 * math.pi)[None, :] * t.double()[:, None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(t.dtype)


def interpolate_position_embedding(pos: Tensor, grid: int) -> Tensor:
    """[N, W] learned embedding of a sqrt(N) x sqrt(N) grid -> [grid*grid, W] (bicubic, as HF SigLIP)."""
    n, w = pos.shape
    old = math.isqrt(n)
    if old == grid:
        return pos
    x = pos.reshape(1, old, old, w).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, w)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """Rotate-half RoPE frequencies [head_dim / 2] in fp32, on `device`."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
