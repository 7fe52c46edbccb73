"""The robot side of real-time chunking: one action per control tick, the next chunk requested in the
background before the queue runs out, stitched on without a jump, and a control loop that survives its server.
Plain numpy and threads (no torch): it works with openpi's `WebsocketClientPolicy` talking to `pi0 serve`, or
with a local `pi0.Policy`.

    stream = ActionStream.connect("robot-server", 8000, control_hz=50)
    while True:
        action = stream.next_action(robot.observation())   # never waits once the first chunk is in
        robot.apply(action)

When the queue falls to `refill_at` actions, the current observation goes out with
`"rtc": {"prev_actions": <the unexecuted rows of the chunk, in model space>, "inference_delay": d}`,
d = ceil(latency x control rate) from the slowest request so far (as LeRobot does). When the reply arrives,
its first n actions are dropped, n being the ticks that passed meanwhile (the robot executed the old
chunk's actions then); the rest replaces the queue. A reply without `model_actions` (a server that does not
do RTC) still gives plain chunking.

Faults: a request that fails or takes longer than `timeout_s` is reported once (`on_error`, the log,
`errors`), the robot keeps executing the actions it has, and the request is retried with exponential backoff
(a new client from `reconnect`, when given, after a failure: a dropped connection or a restarted server).
When the queue runs dry, `on_empty` decides: "hold" repeats the last action (a robot commanding positions
stays put), "raise" raises `StreamStarved`, "wait" blocks until the chunk comes (simulations).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

import numpy as np

log = logging.getLogger("pi0.serving.stream")
ON_EMPTY = ("hold", "raise", "wait")


class InferClient(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...


class StreamStarved(RuntimeError):
    """The queue ran dry (on_empty="raise"): no chunk arrived in time."""


class ActionStream:
    """control_hz: the robot's control rate. refill_at: request the next chunk when this many actions are
    left (default: half a chunk, known after the first reply). rtc: send the leftover for real-time
    chunking (False: plain chunking, each new chunk replaces the queue where it starts). execution_horizon,
    schedule, max_guidance_weight: passed in the request when given (else the server's defaults).
    timeout_s: a request not answered by then counts as failed (its late answer is ignored). on_empty: "hold",
    "raise" or "wait" (module docstring). on_error(exc): called once per failed request. reconnect: makes a new
    client after a failure (e.g. `lambda: WebsocketClientPolicy(host, port)`). backoff_s: (first, max) delay
    between retries. executor / clock: where requests run and what time is (a thread per request and
    time.monotonic; tests and simulations pass a simulated pair). record: a directory to record every tick into as a
    LeRobot v3 dataset (`pi0.data.recorder`: the observation, the action executed, its chunk and latency; episodes
    end at `end_episode()` and `close()`; `pip install 'pi0[train]'`), written in the background, never
    stalling the loop."""

    def __init__(self, policy: InferClient, control_hz: float, *, refill_at: int | None = None, rtc: bool = True,
                 execution_horizon: int | None = None, schedule: str | None = None,
                 max_guidance_weight: float | None = None, timeout_s: float = 10.0, on_empty: str = "hold",
                 on_error: Callable[[BaseException], None] | None = None,
                 reconnect: Callable[[], InferClient] | None = None, backoff_s: tuple[float, float] = (0.1, 5.0),
                 executor: Executor | None = None, clock: Callable[[], float] = time.monotonic,
                 record: str | None = None):
        if control_hz <= 0:
            raise ValueError(f"control_hz must be > 0, got {control_hz}")
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, got {on_empty!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.policy, self.control_hz, self.refill_at, self.rtc = policy, control_hz, refill_at, rtc
        self.rtc_options = {k: v for k, v in (("execution_horizon", execution_horizon), ("schedule", schedule),
                                               ("max_guidance_weight", max_guidance_weight)) if v is not None}
        self.timeout_s, self.on_empty, self.on_error, self.reconnect = timeout_s, on_empty, on_error, reconnect
        self.backoff = backoff_s
        self._own_executor = executor is None
        self.executor = executor or _new_executor()
        self.clock = clock
        self.queue: deque[tuple[np.ndarray, np.ndarray | None]] = deque()  # (robot action, model-space action)
        self.pending: Future | None = None
        self.pending_start = 0.0
        self.ticks = 0  # actions handed out so far
        self.pending_since_tick = 0
        self.max_latency_s = 0.0
        self.starved = 0  # ticks after the first chunk with no fresh action (held, raised or waited)
        self.chunks = 0
        self.errors = 0  # failed or timed-out requests
        self.last_error: BaseException | None = None
        self.last_action: np.ndarray | None = None
        self.last_delay = 0
        self._retry_at = -math.inf
        self._failures_in_a_row = 0
        self._lock = threading.Lock()
        self.last_latency_s = 0.0
        self.record_errors = 0
        self.recorder = None
        if record is not None:
            from pi0.data.recorder import ObservationRecorder

            self.recorder = ObservationRecorder(record, fps=max(1, round(control_hz)), robot_type=None,
                                                info={"side": "robot", "control_hz": control_hz, "rtc": rtc})

    @classmethod
    def connect(cls, host: str, port: int, control_hz: float, *, api_key: str | None = None,
                **kw: Any) -> "ActionStream":
        """A stream to `pi0 serve` through openpi's client, reconnecting after failures."""
        from openpi_client import websocket_client_policy

        def client() -> InferClient:
            return websocket_client_policy.WebsocketClientPolicy(host, port, api_key=api_key)

        return cls(client(), control_hz, reconnect=client, **kw)

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, obs: dict[str, Any]) -> None:
        request = dict(obs)
        leftover = [m for _, m in self.queue]
        if self.rtc and leftover and all(m is not None for m in leftover):
            # ceil(latency x rate), forgiving float noise in the measured latency
            self.last_delay = min(len(leftover), math.ceil(self.max_latency_s * self.control_hz - 1e-6))
            request["rtc"] = {"prev_actions": np.stack(leftover).astype(np.float32),
                              "inference_delay": self.last_delay, **self.rtc_options}
        start = self.pending_start = self.clock()
        self.pending_since_tick = self.ticks
        policy = self.policy

        def call() -> tuple[dict[str, Any], float]:
            reply = policy.infer(request)
            return reply, self.clock() - start

        self.pending = self.executor.submit(call)

    def _fail(self, error: BaseException) -> None:
        """A failed or timed-out request: reported once, retried after a backoff, a new client if we can."""
        self.errors += 1
        self.last_error = error
        self._failures_in_a_row += 1
        first, most = self.backoff
        self._retry_at = self.clock() + min(most, first * 2 ** (self._failures_in_a_row - 1))
        self.pending = None
        log.warning("pi0 stream: request failed (%s: %s); %d actions left, retrying in %.2f s",
                    type(error).__name__, error, len(self.queue), self._retry_at - self.clock())
        if self.on_error is not None:
            self.on_error(error)
        if self.reconnect is not None:
            if self._own_executor:  # a request stuck in the old client must not hold up the new one
                self.executor.shutdown(wait=False)
                self.executor = _new_executor()
            reconnect = self.reconnect

            def renew() -> None:
                try:
                    self.policy = reconnect()
                except Exception as e:  # noqa: BLE001 - the next request fails and retries again
                    log.warning("pi0 stream: reconnecting failed (%s)", e)

            self.executor.submit(renew)

    def _poll(self) -> None:
        """Take a finished request (or time one out) without waiting."""
        if self.pending is None:
            return
        if self.pending.done():
            future, self.pending = self.pending, None
            try:
                reply, latency = future.result()
            except Exception as e:  # noqa: BLE001 - any failure of the client or the server
                self._fail(e)
                return
            self._take(reply, latency)
        elif self.clock() - self.pending_start > self.timeout_s:
            self._fail(TimeoutError(f"no reply within {self.timeout_s} s"))

    def _take(self, reply: dict[str, Any], latency: float) -> None:
        """Replace the queue by a reply's chunk, minus the actions executed while it ran."""
        self.max_latency_s = max(self.max_latency_s, latency)
        self.last_latency_s = latency
        actions = np.asarray(reply["actions"], dtype=np.float32)
        model = reply.get("model_actions")
        model = None if model is None else np.asarray(model, dtype=np.float32)
        executed = self.ticks - self.pending_since_tick
        self.queue = deque((actions[i], None if model is None else model[i]) for i in range(executed, len(actions)))
        if self.refill_at is None:
            self.refill_at = max(1, len(actions) // 2)
        self.chunks += 1
        self._failures_in_a_row = 0

    def _wait_first_chunk(self, obs: dict[str, Any]) -> None:
        """Block for the very first chunk (there is nothing to execute before it), retrying failures, up to
        timeout_s in all."""
        deadline = self.clock() + self.timeout_s
        while not self.queue:
            if self.pending is None:
                if self.clock() >= self._retry_at:
                    self._request(obs)
                else:
                    time.sleep(max(0.0, min(self._retry_at, deadline) - self.clock()))
            if self.pending is not None:
                try:
                    reply, latency = self.pending.result(timeout=max(0.0, deadline - self.clock()))
                    self.pending = None
                    self._take(reply, latency)
                except Exception as e:  # noqa: BLE001 - a timeout or a failure: retried until the deadline
                    self._fail(e if not isinstance(e, TimeoutError) else TimeoutError("no first chunk yet"))
            if not self.queue and self.clock() >= deadline:
                raise StreamStarved(f"no first chunk within {self.timeout_s} s ({self.errors} failed requests; last: "
                                    f"{self.last_error!r})")

    # -- the control loop -------------------------------------------------------------------------

    def next_action(self, obs: dict[str, Any]) -> np.ndarray:
        """The action for this tick. obs: the robot's current observation (used when a request goes out).
        Blocks only for the first chunk; afterwards a dry queue is handled by `on_empty` (counted in
        `starved`)."""
        with self._lock:
            self._poll()
            if not self.queue and self.chunks == 0:
                self._wait_first_chunk(obs)
            if not self.queue and self.on_empty == "wait":
                if self.pending is None:
                    self._request(obs)
                self.starved += 1
                try:
                    reply, latency = self.pending.result()
                    self.pending = None
                    self._take(reply, latency)
                except Exception as e:  # noqa: BLE001
                    self._fail(e)
            if self.queue:
                action = self.queue.popleft()[0]
            else:
                self.starved += 1
                if self.on_empty == "raise" or self.last_action is None:
                    raise StreamStarved(f"no action to execute: the next chunk has not arrived ({self.errors} failed "
                                        f"requests; last: {self.last_error!r})")
                action = self.last_action  # hold
            self.last_action = action
            self.ticks += 1
            if self.pending is None and len(self.queue) <= (self.refill_at or 0) and self.clock() >= self._retry_at:
                self._request(obs)
            if self.recorder is not None:
                self._record(obs, action)
            return action

    def _record(self, obs: dict[str, Any], action: np.ndarray) -> None:
        try:
            self.recorder.add(obs, action, chunk_index=max(0, self.chunks - 1), latency_s=self.last_latency_s)
        except Exception as e:  # noqa: BLE001 - the robot keeps moving; the count and the log say what was lost
            self.record_errors += 1
            if self.record_errors == 1:
                log.error("recording stopped for this tick and may miss others: %s", e)

    def end_episode(self, success: bool | None = None) -> None:
        """Recording: the episode ends here (`success` if known); the next tick starts another."""
        if self.recorder is not None:
            self.recorder.end_episode(success)

    def close(self) -> dict[str, Any] | None:
        """Stop requesting; with `record`, end the episode, write what is queued and return the recording's counts."""
        self.executor.shutdown(wait=False)
        return None if self.recorder is None else {**self.recorder.close(), "record_errors": self.record_errors}


def _new_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="pi0-stream")


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

    def result(self, timeout: float | None = None) -> Any:
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
