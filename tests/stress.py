"""Weights and load hooks that stress the engine, for tests and benchmarks: activation outliers, hooks chained, a
weight quantised as the engine quantises it."""

from __future__ import annotations

from typing import Any

import torch

from pi0.backends.engine import int8, kernels
from pi0.model.backend import LoadHook
from pi0.model.config import Pi0Config, feeding_norm, norm_param


class Chain:
    """Load hooks applied one after the other; the tensors any of them wants `first` are read first."""

    def __init__(self, *hooks: LoadHook):
        self.hooks = hooks

    def first(self, name: str) -> bool:
        return any(getattr(t, "first", lambda _: False)(name) for t in self.hooks)

    def __call__(self, name: str, t: Any) -> Any:
        for fn in self.hooks:
            t = fn(name, t)
        return t


def outlier_channels(config: Pi0Config, channels: int = 4, factor: float = 100.0, seed: int = 0) -> LoadHook:
    """A hook that gives a checkpoint the activation outliers trained Gemma layers are known for, leaving the
    float model unchanged: in every norm with a static gain (SigLIP's LayerNorms, Gemma's RMSNorms; not pi0.5's
    adaptive ones) the same `channels` channels (seeded, per width) get `factor` x the gain, and the columns of the
    linear weights that read them are divided by `factor`. Those inputs of q/k/v, gate|up, fc1 and the projector
    are then ~`factor` x the rest in every token: the stress test for per-token int8 activation scales."""
    chosen: dict[int, torch.Tensor] = {}

    def pick(width: int) -> torch.Tensor:
        if width not in chosen:
            chosen[width] = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:channels]
        return chosen[width]

    def hook(name: str, t: torch.Tensor) -> torch.Tensor:
        param, norm = norm_param(name), feeding_norm(name)
        if param is not None:
            out, ch = t.float().clone(), pick(t.shape[0])
            out[ch] = factor * (1 + out[ch]) - 1 if not param[0].startswith("vision") else factor * out[ch]
            return out.to(t.dtype)
        if norm is not None and not (config.pi05 and norm.startswith("expert")):  # pi0.5's expert norms are adaptive
            out, ch = t.float().clone(), pick(t.shape[1])
            out[:, ch] /= factor
            return out.to(t.dtype)
        return t

    return hook


def int8_weight(w: torch.Tensor, rows_hint: int, dtype: torch.dtype, device_type: str = "cpu") -> int8.Int8Weight:
    """`w` quantised and packed as an int8 engine does it here: the machine's kernel and weight range
    (`int8_kernel`), its quantise / rescale compiled where `fusion_works` passes them (benchmarks use it)."""
    kernel, qmax, _ = int8.int8_kernel(dtype, device_type)
    offset = int8.activation_offset(kernel)
    fused = frozenset(n for n in ("quantize_rows", "rescale") if kernels.fusion_works(dtype, device_type, n, offset)[0])
    return int8.pack_int8(int8.quantize_weight(w, dtype, qmax), rows_hint, kernel, fused)
