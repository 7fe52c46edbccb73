"""The simulator seam: what an environment provides (`Env`), what a simulator module provides (`Simulator`), and
the registry by name that evaluation, collection and the CLI look simulators up in.

A new simulator is one module beside `metaworld.py` that meets `Simulator`, and a line in `SIMULATORS`. Its
module is imported only when a simulator of that name is asked for, so that importing pi0 (or its CLI) sets no
simulator's environment variables."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

# name -> the module that meets `Simulator`
SIMULATORS: dict[str, str] = {"metaworld": "pi0.sim.metaworld"}


class Env(Protocol):
    """One task of a simulated robot: observations in a robot preset's keys, actions applied, success reported."""

    task: str
    prompt: str  # the task's instruction

    def reset(self, seed: int) -> None:
        """A new episode; the same seed gives the same scene."""

    def observation(self) -> dict[str, Any]:
        """What the robot sends pi0: the simulator's preset's keys, images uint8 HWC, and "prompt"."""

    def step(self, action: np.ndarray) -> bool:
        """Apply one action; True once the task is solved."""

    def render(self, camera: str | None = None, size: int | None = None) -> np.ndarray:
        """uint8 [size, size, 3] from `camera` (None: the policy's camera)."""

    def state(self) -> np.ndarray:
        """The robot's state vector, as the dataset records it."""

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action in the current state."""

    def close(self) -> None: ...


class Simulator(Protocol):
    """A simulator module: its tasks, its environments and what its datasets hold."""

    NAME: str  # its --env name
    TITLE: str  # its name in messages
    ROBOT: str  # the robot_type its datasets record
    PRESET: str  # the robot preset whose keys its observations use
    FPS: int  # the datasets' frame rate
    EVAL_SEED: int  # evaluation seeds start here (collection at 0): no episode is seen in both
    DEFAULT_TASKS: tuple[str, ...]
    CAMERA: str  # the policy's camera
    WRIST_CAMERA: str

    def make(self, task: str, size: int, wrist: bool, camera: str | None = None) -> Env:
        """An environment of `task` rendering `size` px from `camera` (None: CAMERA), with the wrist camera or not."""

    def check_tasks(self, tasks: list[str]) -> list[str]: ...

    def instruction(self, task: str) -> str: ...

    def features(self, size: int, wrist: bool) -> dict[str, dict[str, Any]]:
        """The LeRobot dataset features of its demonstrations (cameras as `observation.images.*`)."""

    def record_frame(self, obs: dict[str, Any], wrist: bool) -> dict[str, Any]:
        """An observation its environment made, as a dataset frame (the features' keys but `action`)."""


def simulator(name: str) -> Simulator:
    if name not in SIMULATORS:
        raise ValueError(f"unknown simulator {name!r}: choose one of {', '.join(SIMULATORS)}")
    return importlib.import_module(SIMULATORS[name])
