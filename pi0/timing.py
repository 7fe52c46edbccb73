"""Wall-clock stage timing shared by the backends, the CLI and the benchmarks."""

from __future__ import annotations

import time

import torch


class StageClock:
    """`lap(name)` adds the seconds since the previous lap to stages[name]; a no-op when stages is None.
    On CUDA it synchronises first, so a lap measures finished work."""

    def __init__(self, stages: dict[str, float] | None):
        self.stages = stages
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.stages is None:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.t
        self.t = now
