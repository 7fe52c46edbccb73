"""Math that the backends share, in one place (they never import each other): the attention mask value and rule,
positions, the flow-time embedding, SigLIP's patches and position-embedding resampling."""

from __future__ import annotations

import math

import numpy as np
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


def sample_time(batch: int, rng: np.random.Generator | None = None, alpha: float = 1.5, beta: float = 1.0) -> Tensor:
    """Flow-matching training times t = Beta(alpha, beta) * 0.999 + 0.001, [batch] fp32 (openpi, LeRobot),
    drawn by numpy's generator (seedable, the same on every machine; torch's Beta takes no generator)."""
    rng = np.random.default_rng() if rng is None else rng
    return torch.from_numpy(rng.beta(alpha, beta, batch).astype(np.float32)) * 0.999 + 0.001


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


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, L, 1, D] of rotate-half RoPE at integer positions [B, L], computed in fp32, then cast to `dtype`."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    ang = positions.float()[..., None] * inv_freq  # [B, L, D/2]
    ang = torch.cat([ang, ang], dim=-1)[:, :, None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def patchify(images: Tensor, patch: int) -> tuple[Tensor, int]:
    """[N, C, S, S] -> ([N, g*g, C*p*p], g): the non-overlapping p x p patches, row-major, each flattened in
    (channel, row, column) order, so SigLIP's stride-p convolution (VALID: a remainder is dropped) is one
    linear map with its kernel flattened, weight.flatten(1). A GEMM, not cuDNN's convolution, whose fp32
    default on Ampere and later GPUs is TF32 (a 10-bit mantissa: 4e-4 off the CPU's actions, measured)."""
    n, c, h, w = images.shape
    g, gw = h // patch, w // patch
    x = images[:, :, : g * patch, : gw * patch].reshape(n, c, g, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, g * gw, c * patch * patch), g


def make_attn_mask(input_mask: Tensor, ar_mask: Tensor) -> Tensor:
    """big_vision rule: query i sees key j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid.
    input_mask, ar_mask bool [B, L] -> bool [B, L, L]."""
    assert input_mask.shape == ar_mask.shape, f"input_mask {list(input_mask.shape)} != ar_mask {list(ar_mask.shape)}"
    cum = torch.cumsum(ar_mask.long(), dim=1)
    visible = cum[:, None, :] <= cum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return visible & valid


def positions_from_mask(input_mask: Tensor) -> Tensor:
    """Padding does not advance the position: cumsum(input_mask) - 1."""
    return torch.cumsum(input_mask.long(), dim=1) - 1


def suffix_ar_mask(batch: int, horizon: int, pi05: bool, device: torch.device | str | None = None) -> Tensor:
    """The suffix's ar_mask bool [B, Ls]: pi0's state token starts a block and the actions another ([state, H actions]);
    pi0.5's actions start one (H actions)."""
    ar = torch.zeros(batch, horizon + (0 if pi05 else 1), dtype=torch.bool, device=device)
    ar[:, : 1 if pi05 else 2] = True
    return ar


def suffix_rows(prefix_mask: Tensor, prefix_ar: Tensor, suffix_ar: Tensor) -> tuple[Tensor, Tensor]:
    """The suffix's rows of the joint [prefix + suffix] attention mask, bool [B, Ls, Lp + Ls], and its positions
    [B, Ls] (every suffix token is valid)."""
    lp, ls = prefix_mask.shape[1], suffix_ar.shape[1]
    input_mask = torch.cat([prefix_mask, torch.ones_like(suffix_ar)], dim=1)
    ar_mask = torch.cat([prefix_ar, suffix_ar], dim=1)
    assert input_mask.shape[1] == ar_mask.shape[1] == lp + ls, (
        f"prefix+suffix masks {input_mask.shape[1]} / {ar_mask.shape[1]} != {lp} + {ls}")
    return make_attn_mask(input_mask, ar_mask)[:, lp:], positions_from_mask(input_mask)[:, lp:]
