"""pi0: inference for the pi0 / pi0.5 vision-language-action policies."""

from pi0.checkpoint import CheckpointError, inspect_checkpoint
from pi0.config import GemmaConfig, Pi0Config, SiglipConfig, infer_config, preset
from pi0.models import build_model, load_model
from pi0.observation import Observation, sample_observation
from pi0.policy import Policy

__all__ = [
    "CheckpointError", "GemmaConfig", "Observation", "Pi0Config", "Policy", "SiglipConfig", "build_model",
    "infer_config", "inspect_checkpoint", "load_model", "preset", "sample_observation",
]
__version__ = "0.1.0"
