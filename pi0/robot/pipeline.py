"""The observation pipeline seam: a robot's observation dict to the model's inputs and its actions back, one
convention per implementation (openpi's: `pi0.robot.openpi`; a LeRobot checkpoint's own processors:
`pi0.robot.lerobot`), used alike by `pi0.Policy` (serving) and `pi0 train` (training targets and inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from pi0.model.observation import Observation


@dataclass
class Frame:
    """One dataset frame in the robot's units, as training hands it over: camera images in the model's slot order
    (uint8 HWC, None for an empty slot), the state vector (empty: none), the instruction."""

    images: list[np.ndarray | None]
    state: np.ndarray
    prompt: str


class Pipeline(Protocol):
    """A robot's observations in, the model's inputs out; the model's actions in, the robot's out (and back)."""

    cameras: list[str | None]  # the robot's camera keys of the model's slots, in order (None: an empty slot)
    state_len: int | None  # robot state values a request must carry (None: any up to the model's)
    action_dim: int  # robot action values answered
    stats_source: str  # where the normalisation stats came from (for metadata and logs)

    def prepare(self, obs: dict[str, Any]) -> Observation:
        """A robot's observation dict -> the model's inputs (batch 1), everything checked first: BadRequest
        (MissingKey) names the key, what it should be and what came."""

    def frame_inputs(self, frame: Frame) -> Observation:
        """A dataset frame -> the model's inputs (batch 1), exactly as `prepare` makes them from the same values."""

    def actions_out(self, actions: np.ndarray) -> np.ndarray:
        """The model's actions [H, model width] -> the robot's [H, action_dim], in the robot's units."""

    def actions_in(self, actions: np.ndarray) -> np.ndarray:
        """The robot's actions [H, action_dim] -> the model's space (the inverse of `actions_out`: training targets)."""

    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to know: preset, cameras, state keys, expected keys."""


class TokenPipeline(Pipeline, Protocol):
    """A pipeline whose model answers token ids (π0-FAST): which ids end an answer, and an answer's chunk."""

    end_ids: list[int]  # generation stops at any of them

    def chunk(self, generated: Sequence[int]) -> np.ndarray:
        """One row of generated ids -> the chunk [H, action_dim] in the model's space; `pi0.robot.fast.FastDecodeError`
        (a `pi0.errors.NoActions`) saying what the ids held when they hold none."""
