"""What a server allows: its limits (checked at start), the shared in-flight byte budget, each connection's conduct
(fair service: errors cost it time, then the connection), and the API key."""

from __future__ import annotations

import hmac
import math
import threading
from dataclasses import dataclass


class Budget:
    """Bytes held by the server on behalf of clients, against one global limit (thread-safe)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


@dataclass
class Conduct:
    """One connection's failed requests in a row, and what they cost it (fair service): the first `free` are
    answered at once; after that the connection's next message is read only after a back-off that doubles from
    `backoff_s` up to `max_backoff_s` (its socket fills meanwhile, so the client is held back by TCP itself); at
    `limit` the connection is closed with a reason. A request with any answered row resets the count; internal
    errors never count (they are not the client's)."""

    limit: int = 20
    free: int = 2
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    in_row: int = 0

    def answered(self, failed: bool) -> float:
        """Record a reply; returns the seconds to wait before reading the connection's next message."""
        self.in_row = self.in_row + 1 if failed else 0
        if self.in_row <= self.free:
            return 0.0
        return min(self.max_backoff_s, self.backoff_s * 2 ** (self.in_row - self.free - 1))

    @property
    def exhausted(self) -> bool:
        return self.in_row >= self.limit


@dataclass(frozen=True)
class Limits:
    """What a server lets its clients make it do and hold (`pi0 serve` options), checked when it starts: limits
    that cannot admit one robot are refused then, not blamed on every client after."""

    max_message_bytes: int = 16 << 20
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_connections: int = 256
    max_inflight_bytes: int | None = None  # None: room for max_connections connections
    max_errors: int = 20  # bad requests in a row before a connection is closed

    def __post_init__(self) -> None:
        def positive(name: str, value: float, option: str, integer: bool = True) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
                    or (integer and int(value) != value):
                raise ValueError(f"{option} must be a positive {'integer' if integer else 'number'}, got {value!r}")

        positive("max_message_bytes", self.max_message_bytes, "--max-message-mb", integer=False)
        positive("max_batch", self.max_batch, "--max-batch")
        positive("max_connections", self.max_connections, "--max-connections")
        positive("max_errors", self.max_errors, "--max-errors")
        if isinstance(self.batch_wait_ms, bool) or not isinstance(self.batch_wait_ms, (int, float)) \
                or not 0 <= self.batch_wait_ms < 60_000:
            raise ValueError(f"--batch-wait-ms must be a number from 0 to 60000, got {self.batch_wait_ms!r}")
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < self.reserved:
            raise ValueError(f"--max-inflight-mb {self.max_inflight_bytes / 2**20:g} cannot admit a single robot: each "
                             f"connection reserves 3 x --max-message-mb = {self.reserved / 2**20:g} MiB (a frame queued, "
                             "and one in flight, raw and decoded); raise --max-inflight-mb or lower --max-message-mb")

    @property
    def reserved(self) -> int:
        return reserved_bytes(self.max_message_bytes)

    @property
    def inflight_bytes(self) -> int:
        return self.max_inflight_bytes if self.max_inflight_bytes is not None else \
            default_inflight_bytes(self.max_message_bytes, self.max_connections)


def reserved_bytes(max_message_bytes: int) -> int:
    """What one connection can make the server hold, reserved when it opens: one frame queued by websockets, and
    one message in flight counted twice (raw, decoded). A connection that fits is never refused a request, so
    flooding clients can keep new connections out but never hurt one already served."""
    return 3 * max_message_bytes


def default_inflight_bytes(max_message_bytes: int, max_connections: int) -> int:
    """Room for every allowed connection."""
    return reserved_bytes(max_message_bytes) * max_connections


AUTH_ERROR = "missing or wrong 'Authorization: Api-Key <key>' header"


def authorized(header: str | None, api_key: str | None) -> bool:
    """Does a handshake's Authorization header carry the key (always, when no key is set)? Constant-time."""
    return api_key is None or hmac.compare_digest((header or "").encode(), f"Api-Key {api_key}".encode())
