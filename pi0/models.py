"""Build or load a pi0 / pi0.5 model: `build_model` (seeded random weights) and `load_model` (a checkpoint)."""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch import nn

from pi0.checkpoint import CheckpointInfo, inspect_checkpoint, load_state_dict
from pi0.config import Pi0Config
from pi0.reference.model import Pi0Reference

BACKENDS = ("reference",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")


def _empty_model(config: Pi0Config) -> Pi0Reference:
    with torch.device("meta"):
        return Pi0Reference(config).eval().requires_grad_(False)


def init_random_(model: nn.Module, seed: int, progress: Callable[[float], None] | None = None) -> None:
    """Fill every parameter from one seeded generator, in name order, with scales that keep
    activations O(1): linear/conv weights N(0, 1/fan_in), biases N(0, 0.02^2), LayerNorm 1 + N(0, 0.1^2),
    Gemma RMSNorm (used as 1 + w) N(0, 0.1^2), embeddings N(0, 1/width)."""
    g = torch.Generator().manual_seed(seed)
    params = sorted(model.named_parameters())
    total, done = sum(p.numel() for _, p in params), 0
    for name, p in params:
        leaf = name.rsplit(".", 2)
        if name.endswith("embed_tokens.weight"):
            std, mean = p.shape[1] ** -0.5, 0.0
        elif name.endswith("position_embedding.weight"):
            std, mean = 0.1, 0.0
        elif "layer_norm" in name or "post_layernorm" in name:
            std, mean = (0.1, 1.0) if leaf[-1] == "weight" else (0.02, 0.0)
        elif p.ndim == 1 and leaf[-1] == "weight":  # RMSNorm (1 + w)
            std, mean = 0.1, 0.0
        elif leaf[-1] == "bias":
            std, mean = 0.02, 0.0
        else:
            std, mean = math.prod(p.shape[1:]) ** -0.5, 0.0
        chunk = torch.empty(p.shape, dtype=torch.float32)
        chunk.normal_(mean, std, generator=g)
        with torch.no_grad():
            p.copy_(chunk)
        done += p.numel()
        if progress is not None:
            progress(done / total)


def build_model(config: Pi0Config, *, backend: str = "reference", seed: int = 0, device: str = "cpu",
                dtype: str | torch.dtype = "float32", progress: Callable[[float], None] | None = None) -> Pi0Reference:
    """A model with seeded random weights, allocated directly in `dtype` on `device`.
    progress: called with the fraction of parameters filled so far."""
    _check_backend(backend)
    model = _empty_model(config).to(parse_dtype(dtype)).to_empty(device=device)
    init_random_(model, seed, progress)
    return model


def load_model(path_or_repo_id: str | os.PathLike, *, backend: str = "reference", device: str = "cpu",
               dtype: str | torch.dtype = "float32") -> Pi0Reference:
    """Load a checkpoint in any known layout (directory, .safetensors file, sharded, or hub id)."""
    _check_backend(backend)
    info = inspect_checkpoint(path_or_repo_id)
    return model_from_info(info, device=device, dtype=parse_dtype(dtype))


def model_from_info(info: CheckpointInfo, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Pi0Reference:
    model = _empty_model(info.config)
    state = load_state_dict(info, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.checkpoint_info = info
    return model

