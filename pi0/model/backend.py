"""The contracts a backend meets: the model it builds (`Backend`), and the load hook it may hand the loader.

A backend is a package under `pi0/backends/` whose `spec.py` is named in `pi0.backends.factory.BACKENDS` and
provides `load_hook(dtype, state_device)` (its `LoadHook`, or None: what happens to each canonical tensor as it is
read, such as int8 quantisation), `build(config, state, device)` (its model over the canonical state dict, placed by
the backend itself on `device`, the device the caller asked for) and, optionally, `state_device(device)` (the torch
device the canonical tensors are loaded on; default: `device` itself, so a backend whose device is no torch device
returns the CPU)."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from pi0.model.config import Pi0Config
from pi0.model.observation import Observation
from pi0.model.rtc import RTC


@runtime_checkable
class Backend(Protocol):
    """What `pi0.build_model` / `pi0.load_model` return, whatever runs it: actions from observations."""

    config: Pi0Config

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def sample_actions(self, obs: Observation, *, noise: torch.Tensor | None = None, num_steps: int | None = None,
                       rtc: RTC | list[RTC | None] | None = None,
                       stages: dict[str, float] | None = None) -> torch.Tensor:
        """[B, action_horizon, action_dim] fp32 on the backend's device: the flow integrated from `noise`
        (None: standard normal) over `num_steps` Euler steps (None: the config's), guided by `rtc` (one per row
        or one for all); `stages`, if given, receives seconds per stage (vision, prefix, denoise)."""
        ...


class Trainable(Backend, Protocol):
    """A backend that trains (the reference): the flow-matching loss per action value."""

    def compute_loss(self, obs: Observation, actions: torch.Tensor, *, noise: torch.Tensor | None = None,
                     time: torch.Tensor | None = None) -> torch.Tensor: ...


class Rows(Protocol):
    """A 2-D+ tensor handed over as consecutive blocks of whole rows (read from a file or drawn at random), so that
    a hook that compresses it never holds it whole. Iterate once."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __iter__(self) -> Iterator[torch.Tensor]: ...


class LoadHook(Protocol):
    """Called by the loader on each canonical tensor as soon as it is read: (name, tensor) -> what the state dict
    keeps (int8 quantises there, so that one float tensor at most is ever held). Optional methods: `first(name)`
    (read these before the rest) and `streams(name)` (hand these over as `Rows` instead of whole)."""

    def __call__(self, name: str, tensor: torch.Tensor | Rows) -> Any: ...
