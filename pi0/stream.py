"""The robot side of real-time chunking: one action per control tick, the next chunk requested in the
background before the queue runs out, and stitched on without a jump. Plain numpy and a thread (no torch):
it works with openpi's `WebsocketClientPolicy` talking to `pi0 serve`, or with a local `pi0.Policy`.

    stream = ActionStream(client, control_hz=50)
    while True:
        action = stream.next_action(robot.observation())   # never waits once the first chunk is in
        robot.apply(action)

When the queue falls to `refill_at` actions, the current observation goes out with
`"rtc": {"prev_actions": <the unexecuted rows of the chunk, in model space>, "inference_delay": d}`,
d = ceil(latency x control rate) from the slowest request so far (as LeRobot does). When the reply arrives,
its first n actions are dropped, n being the ticks that passed meanwhile (the robot executed the old
chunk's actions then); the rest replaces the queue. A reply without `model_actions` (a server that does not
do RTC) still gives plain chunking.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

import numpy as np


class InferClient(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...


class ActionStream:
    """control_hz: the robot's control rate. refill_at: request the next chunk when this many actions are
    left (default: half a chunk, known after the first reply). rtc: send the leftover for real-time
    chunking (False: plain chunking, each new chunk replaces the queue where it starts). execution_horizon,
    schedule, max_guidance_weight: passed in the request when given (else the server's defaults).
    executor / clock: where requests run and what time is (a thread and time.monotonic; tests simulate both)."""

    def __init__(self, policy: InferClient, control_hz: float, *, refill_at: int | None = None, rtc: bool = True,
                 execution_horizon: int | None = None, schedule: str | None = None,
                 max_guidance_weight: float | None = None, executor: Executor | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if control_hz <= 0:
            raise ValueError(f"control_hz must be > 0, got {control_hz}")
        self.policy, self.control_hz, self.refill_at, self.rtc = policy, control_hz, refill_at, rtc
        self.rtc_options = {k: v for k, v in (("execution_horizon", execution_horizon), ("schedule", schedule),
                                               ("max_guidance_weight", max_guidance_weight)) if v is not None}
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="pi0-stream")
        self.clock = clock
        self.queue: deque[tuple[np.ndarray, np.ndarray | None]] = deque()  # (robot action, model-space action)
        self.pending: Future | None = None
        self.ticks = 0  # actions handed out so far
        self.pending_since_tick = 0
        self.max_latency_s = 0.0
        self.starved = 0  # ticks that had to wait for a chunk (after the first one)
        self.chunks = 0
        self.last_delay = 0

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, obs: dict[str, Any]) -> Future:
        request = dict(obs)
        leftover = [m for _, m in self.queue]
        if self.rtc and leftover and all(m is not None for m in leftover):
            # ceil(latency x rate), forgiving float noise in the measured latency
            self.last_delay = min(len(leftover), math.ceil(self.max_latency_s * self.control_hz - 1e-6))
            request["rtc"] = {"prev_actions": np.stack(leftover).astype(np.float32),
                              "inference_delay": self.last_delay, **self.rtc_options}
        start = self.clock()
        self.pending_since_tick = self.ticks

        def call() -> tuple[dict[str, Any], float]:
            reply = self.policy.infer(request)
            return reply, self.clock() - start

        return self.executor.submit(call)

    def _take(self, future: Future) -> None:
        """Replace the queue by a finished request's chunk, minus the actions executed while it ran."""
        reply, latency = future.result()
        self.max_latency_s = max(self.max_latency_s, latency)
        actions = np.asarray(reply["actions"], dtype=np.float32)
        model = reply.get("model_actions")
        model = None if model is None else np.asarray(model, dtype=np.float32)
        executed = self.ticks - self.pending_since_tick
        self.queue = deque((actions[i], None if model is None else model[i]) for i in range(executed, len(actions)))
        if self.refill_at is None:
            self.refill_at = max(1, len(actions) // 2)
        self.chunks += 1
        self.pending = None

    # -- the control loop -------------------------------------------------------------------------

    def next_action(self, obs: dict[str, Any]) -> np.ndarray:
        """The action for this tick. obs: the robot's current observation (used when a request goes out).
        Blocks only for the first chunk, or when a request takes longer than the queue lasts (counted in
        `starved`)."""
        if self.pending is not None and self.pending.done():
            self._take(self.pending)
        if not self.queue:
            if self.pending is None:
                self.pending = self._request(obs)
            elif self.chunks:
                self.starved += 1
            self._take(self.pending)
        action = self.queue.popleft()[0]
        self.ticks += 1
        if self.pending is None and len(self.queue) <= (self.refill_at or 0):
            self.pending = self._request(obs)
        return action

    def close(self) -> None:
        self.executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# A simulated clock, for robot loops in tests and demos (`pi0 demo --rtc`)


class SimulatedClock:
    """Time that moves only when told: `clock.t += 1 / control_hz` per tick."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _SimulatedFuture:
    def __init__(self, fn: Callable[[], Any], clock: SimulatedClock, latency_s: float):
        self.fn, self.clock, self.end = fn, clock, clock.t + latency_s

    def done(self) -> bool:
        return self.clock.t >= self.end

    def result(self) -> Any:
        self.clock.t = max(self.clock.t, self.end)  # waiting for it moves time to when it finishes
        return self.fn()


class SimulatedExecutor:
    """Runs each request when its result is taken, and reports it done `latency_s` simulated seconds
    after it was submitted: a slow policy on a simulated clock, deterministic whatever the machine."""

    def __init__(self, clock: SimulatedClock, latency_s: float):
        self.clock, self.latency_s = clock, latency_s

    def submit(self, fn: Callable[[], Any]) -> _SimulatedFuture:
        return _SimulatedFuture(fn, self.clock, self.latency_s)

    def shutdown(self, wait: bool = True) -> None:
        pass
