"""How a policy drives a simulated robot: synchronous chunks in process (`ChunkRunner`), or as a robot runs,
through `ActionStream` on a simulated clock (`StreamRunner`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


class ChunkRunner:
    """In process, synchronous chunking: a chunk from the current observation, its first `replan` actions
    executed (the simulation waits for the policy), then a new chunk."""

    def __init__(self, infer: Callable[[dict[str, Any]], dict[str, Any]], replan: int | None):
        self.infer, self.replan = infer, replan
        self.queue: list[np.ndarray] = []
        self.inference_s: list[float] = []

    def reset(self) -> None:
        self.queue = []

    def next_action(self, obs: dict[str, Any]) -> np.ndarray:
        if not self.queue:
            t = time.perf_counter()
            actions = np.asarray(self.infer(obs)["actions"])
            self.inference_s.append(time.perf_counter() - t)
            self.queue = list(actions[: self.replan or max(1, len(actions) // 2)])
        return self.queue.pop(0)


class StreamRunner:
    """As a robot runs: `pi0.serving.stream.ActionStream` (real-time chunking on or off) on a simulated clock that
    advances 1 / control_hz per step and, while a chunk is computed, by its latency (`latency_s`, measured
    once before the episodes: the same for every request, so runs repeat)."""

    def __init__(self, client: Any, control_hz: float, rtc: bool, latency_s: float):
        self.client, self.control_hz, self.rtc, self.latency_s = client, control_hz, rtc, latency_s
        self.stream = None
        self.inference_s: list[float] = []

    def reset(self) -> None:
        from pi0.serving.stream import ActionStream, SimulatedClock, SimulatedExecutor

        self.clock = SimulatedClock()
        self.stream = ActionStream(self.client, self.control_hz, rtc=self.rtc,
                                   executor=SimulatedExecutor(self.clock, self.latency_s), clock=self.clock,
                                   on_empty="wait")

    def next_action(self, obs: dict[str, Any]) -> np.ndarray:
        n = self.stream.chunks
        action = self.stream.next_action(obs)
        if self.stream.chunks != n:
            self.inference_s.append(self.latency_s)
        self.clock.t += 1.0 / self.control_hz
        return action
