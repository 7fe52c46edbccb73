"""pi0: the pi0 / pi0.5 vision-language-action policies, run, served, fine-tuned and evaluated; the public names.

The names below are imported on first use, so that robot-side modules (`pi0.serving.stream`) import without
torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "pi0.errors", "inspect_checkpoint": "pi0.checkpoint.load",
    "GemmaConfig": "pi0.model.config", "Pi0Config": "pi0.model.config", "SiglipConfig": "pi0.model.config",
    "infer_config": "pi0.model.config", "size_config": "pi0.model.config",
    "build_model": "pi0.backends.factory", "load_model": "pi0.backends.factory", "save_model": "pi0.backends.factory",
    "Observation": "pi0.model.observation", "sample_observation": "pi0.model.observation",
    "Policy": "pi0.robot.policy",
    "RTC": "pi0.model.rtc",
    "ActionStream": "pi0.serving.stream",
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
