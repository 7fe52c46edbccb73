"""The engine backend as `pi0.backends.factory` builds it: packed weights, int8 and fp8 quantised as they load."""

from __future__ import annotations

import torch

from pi0.backends.engine.fp8 import Fp8Quantizer
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.engine.weights import int8_quantizer
from pi0.hardware import compute_dtype
from pi0.model.backend import LoadHook
from pi0.model.config import Pi0Config


def load_hook(dtype: torch.dtype, device: torch.device) -> LoadHook | None:
    """For int8 and fp8, the quantiser applied to each tensor as it is loaded (so only one float tensor is ever
    held)."""
    if dtype == torch.float8_e4m3fn:
        return Fp8Quantizer(compute_dtype(dtype, device))
    return int8_quantizer(compute_dtype(dtype, device)) if dtype == torch.int8 else None


def build(config: Pi0Config, state: dict[str, torch.Tensor], device: str | torch.device) -> Pi0Engine:
    """The engine over canonical tensors; it consumes (empties) `state` as it packs."""
    return Pi0Engine(config, state)
