"""What the serving tests run against either server: a policy that fails or stalls when a request asks it to
(so that a server in another process, a Ray replica, can be made to), the two limit profiles, and how a
refused connection is told apart from an answered one."""

from __future__ import annotations

import time
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from pi0.serving.limits import Limits

MIB = 1 << 20
# a budget for two connections (each reserves 3 messages) under a high connection limit, and the reverse
PROFILES = {
    # batch_wait_ms: room for two robots' requests through Ray's proxy on a loaded CPU (a lone connection never waits)
    "budget": Limits(max_message_bytes=MIB, max_connections=16, max_inflight_bytes=6 * MIB + MIB // 2, max_errors=4,
                     batch_wait_ms=100.0),
    "connections": Limits(max_message_bytes=MIB, max_connections=2, max_errors=4),
}


class Switchable:
    """The real policy, whose forward fails (`"test/fail": True`) or stalls (`"test/delay_s": s`) when a request
    carries those keys; counts its forwards and rows."""

    def __init__(self, policy: Any):
        self.policy, self.metadata = policy, policy.metadata
        self.forwards, self.rows = 0, 0

    def prepare_request(self, obs: dict[str, Any]) -> tuple[Any, bool, float]:
        obs = dict(obs)
        fail, delay = bool(obs.pop("test/fail", False)), float(obs.pop("test/delay_s", 0.0))
        return self.policy.prepare_request(obs), fail, delay

    def run_prepared(self, rows: list[tuple[Any, bool, float]]) -> list[dict[str, Any]]:
        self.forwards += 1
        self.rows += len(rows)
        time.sleep(max(d for _, _, d in rows))
        if any(f for _, f, _ in rows):
            raise RuntimeError("a CUDA error, say")
        return self.policy.run_prepared([p for p, _, _ in rows])

    def warmup(self, batches=(1,)) -> float:
        return self.policy.warmup()


def switchable(checkpoint: str) -> Switchable:
    """The factory a Ray replica calls (picklable by reference)."""
    from pi0.robot.policy import Policy

    return Switchable(Policy(checkpoint, preset="libero", dtype="float32", seed=3))


def refusal(port: int, path: str = "") -> str | None:
    """Why a new connection is refused (the single server answers the handshake with HTTP 503 and a reason; Ray's
    proxy accepts it and the replica closes it with code 1013 and the reason), or None when it is served."""
    try:
        ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30)
    except InvalidStatus as e:
        assert e.response.status_code == 503, e.response.status_code
        return e.response.body.decode()
    with ws:
        try:
            ws.recv(timeout=30)  # the metadata frame
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 1013, e.rcvd
            return e.rcvd.reason
    return None
