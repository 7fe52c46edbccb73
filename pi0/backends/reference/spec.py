"""The reference backend as `pi0.backends.factory` builds it: the fp32 specification over canonical tensors."""

from __future__ import annotations

import torch

from pi0.backends.reference.fast import Pi0FastReference
from pi0.backends.reference.model import Pi0Reference
from pi0.model.backend import LoadHook
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig


def load_hook(dtype: torch.dtype, device: torch.device) -> LoadHook | None:
    """None: the reference keeps every tensor as read (float32 or bfloat16)."""
    if dtype in (torch.int8, torch.float8_e4m3fn):
        name = "int8" if dtype == torch.int8 else "fp8"
        raise ValueError(f"{name} is an engine dtype: the reference backend is the fp32 specification (use "
                         "backend='engine', or float32 / bfloat16 for the reference)")
    return None


def build(config: Pi0Config | FastConfig, state: dict[str, torch.Tensor],
          device: str | torch.device) -> Pi0Reference | Pi0FastReference:
    """The reference module (pi0 / pi0.5, or π0-FAST) holding `state`'s tensors themselves (already on `device`)."""
    family = Pi0FastReference if isinstance(config, FastConfig) else Pi0Reference
    with torch.device("meta"):
        model = family(config).eval().requires_grad_(False)
    model.load_state_dict(state, strict=True, assign=True)
    return model
