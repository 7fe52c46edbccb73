"""pi0: inference for the pi0 / pi0.5 vision-language-action policies.

The names below are imported on first use, so that robot-side modules (`pi0.stream`) import without
torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "pi0.checkpoint", "inspect_checkpoint": "pi0.checkpoint",
    "GemmaConfig": "pi0.config", "Pi0Config": "pi0.config", "SiglipConfig": "pi0.config", "infer_config": "pi0.config",
    "preset": "pi0.config",
    "build_model": "pi0.models", "load_model": "pi0.models",
    "Observation": "pi0.observation", "sample_observation": "pi0.observation",
    "Policy": "pi0.policy",
    "RTC": "pi0.rtc",
    "ActionStream": "pi0.stream",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pi0' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
