"""Wall-clock stage timing shared by the backends, the CLI and the benchmarks."""

from __future__ import annotations

import sys
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


def best_seconds(fn, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """The fastest of `repeats` timed calls of fn() after one warm-up call (CUDA work synchronised)."""
    cuda = torch.device(device).type == "cuda"

    def timed() -> float:
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()
    return min(timed() for _ in range(repeats))


class Progress:
    """One stderr line that rewrites itself: `progress(label, fraction)`; prints only when the shown
    percentage (or the label) changes, and ends the line at 100%."""

    def __init__(self) -> None:
        self.shown: tuple[str, int] | None = None
        self.width = 0

    def __call__(self, label: str, frac: float) -> None:
        shown = (label, int(frac * 100))
        if shown == self.shown:
            return
        self.shown = shown
        text = f"{label} {shown[1]:3d}%"
        pad = " " * max(0, self.width - len(text))  # blank what a longer previous label left
        self.width = 0 if frac >= 1.0 else len(text)
        print(f"\r{text}{pad}", end="\n" if frac >= 1.0 else "", file=sys.stderr, flush=True)
