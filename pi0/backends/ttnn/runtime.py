"""Where the TTNN model's ops run: a Tenstorrent card when one is present (`ttnn.open_device`), else the host executor
(`pi0.backends.ttnn.host`). The model holds one and calls it as it would call ttnn; it never asks which."""

from __future__ import annotations

import glob
import os
from collections import Counter
from typing import Any

import torch

import ttnn

from pi0.backends.ttnn.host import HostExecutor


def card_present() -> bool:
    """A Tenstorrent card is present when its kernel driver exposes a device node (/dev/tenstorrent/<n>)."""
    return bool(glob.glob("/dev/tenstorrent/*"))


class DeviceRuntime:
    """ttnn on an open card: every attribute is ttnn's own; `from_torch` places tensors on the card, `to_torch` brings
    them back."""

    emulated = False

    def __init__(self, device_id: int = 0):
        self.device = ttnn.open_device(device_id=device_id)
        self.counts: dict[str, Counter] = {}
        self.seconds: dict[str, float] = {}
        self.stage = "setup"

    def describe(self) -> str:
        return f"Tenstorrent card {self.device}"

    def __getattr__(self, name: str) -> Any:
        target = getattr(ttnn, name)
        if getattr(target, "golden_function", None) is None:
            return target  # dtypes, layouts, memory configs

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts.setdefault(self.stage, Counter())[name] += 1
            return target(*args, **kwargs)

        return counted

    def from_torch(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return ttnn.from_torch(tensor, *args, device=self.device, **kwargs)

    def to_torch(self, tensor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return ttnn.to_torch(tensor, *args, **kwargs)


def open_runtime(device: str | torch.device) -> Any:
    """The card when one is present, else the host executor. `device` is where actions come back, the host ("cpu" or
    "auto"), or "tt" to require a card; PI0_TTNN_EMULATE=1 emulates on the host even beside a card."""
    where = str(device)
    if where not in ("auto", "tt", "cpu"):
        raise ValueError(f"backend 'ttnn' takes device auto or cpu (a Tenstorrent card when one is present, else "
                         f"emulated on the host) or tt (a card, required); got {where!r}")
    emulate = os.environ.get("PI0_TTNN_EMULATE", "0") == "1"
    if where == "tt" and (emulate or not card_present()):
        why = "PI0_TTNN_EMULATE=1 is set" if emulate else "no Tenstorrent card found (/dev/tenstorrent/* is absent)"
        raise RuntimeError(f"device 'tt': {why}; use device 'cpu' to run the TTNN model emulated on the host")
    return DeviceRuntime() if card_present() and not emulate else HostExecutor()
