"""The engine backend as `pi0.backends.factory` builds it: packed weights, int8 and fp8 quantised as they load."""

from __future__ import annotations

import os

import torch

from pi0.backends.engine.fast import Pi0FastEngine
from pi0.backends.engine.fp8 import Fp8Quantizer
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.engine.weights import int8_quantizer
from pi0.hardware import compute_dtype
from pi0.model.backend import LoadHook
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig


def load_hook(dtype: torch.dtype, device: torch.device) -> LoadHook | None:
    """For int8 and fp8, the quantiser applied to each tensor as it is loaded (so only one float tensor is ever
    held)."""
    if dtype == torch.float8_e4m3fn:
        return Fp8Quantizer(compute_dtype(dtype, device))
    return int8_quantizer(compute_dtype(dtype, device)) if dtype == torch.int8 else None


def build(config: Pi0Config | FastConfig, state: dict[str, torch.Tensor], device: str | torch.device) -> Pi0Engine:
    """The engine over canonical tensors; it consumes (empties) `state` as it packs. On a GPU its calls run as
    buckets replayed from CUDA graphs (`Pi0Engine.use_buckets`; PI0_GRAPHS=0 runs them as they come). π0-FAST:
    `Pi0FastEngine`, greedy decoding against a static KV cache."""
    if isinstance(config, FastConfig):
        return Pi0FastEngine(config, state)
    engine = Pi0Engine(config, state)
    if torch.device(device).type == "cuda" and os.environ.get("PI0_GRAPHS", "1") != "0":
        engine.use_buckets()
    return engine
