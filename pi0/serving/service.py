"""A policy service that does not care how bytes arrive: what `pi0 serve` and each Ray Serve replica share.

One `Service` per process: the policy, the limits, one queue of prepared requests answered by a model thread in
dynamic batches, a pool of (lower-priority) threads that decode and validate requests, the in-flight budget,
metrics, and the per-connection session: metadata first, then request -> reply, with the connection's conduct
(bad requests in a row are held back, then cut off). A transport (websockets in `pi0.serving.server`,
Starlette under Ray in `pi0.serving.ray_serve`) hands it a `Link` per connection and does nothing else.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from pi0.errors import BadRequest
from pi0.serving import msgpack_numpy
from pi0.serving.metrics import ServerMetrics
from pi0.serving.msgpack_numpy import BadMessage

log = logging.getLogger("pi0.serve")
PREPARE_NICE = 10  # the request-preparing threads' nice value: below the model's forward


class InferPolicy(Protocol):
    metadata: dict[str, Any]

    def prepare_request(self, obs: dict[str, Any]) -> Any: ...  # raises BadRequest

    def run_prepared(self, rows: list[Any]) -> list[dict[str, Any]]: ...

    def warmup(self) -> float: ...


class InternalError(Exception):
    """A failure that is not the client's: logged once with its traceback under `error_id`; the client gets
    the id only."""

    def __init__(self, cause: BaseException, where: str):
        self.error_id = uuid.uuid4().hex[:12]
        super().__init__(f"internal error {self.error_id} ({where})")
        log.error("internal error %s (%s)", self.error_id, where, exc_info=cause)


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


def failed_request(reply: bytes | str, rows: list[Any] | None) -> bool:
    """Did a reply answer nothing the client asked for through its own fault (a text frame for a bad request, or
    an explicit batch whose rows were all bad)? Internal errors are the server's, never counted."""
    if isinstance(reply, str):
        return reply.startswith("bad request")
    return bool(rows) and all(isinstance(r, BadRequest) for r in rows)


@dataclass
class Job:
    """Prepared rows waiting for the model, and where their answer goes."""

    rows: list[Any]
    explicit_batch: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # its connection went away: never computed


def prepare_rows(policy: InferPolicy, observations: list[dict[str, Any]]) -> list[Any]:
    """Each row validated and prepared on its own: a Prepared, a BadRequest, or an InternalError."""
    out: list[Any] = []
    for o in observations:
        try:
            out.append(policy.prepare_request(o))
        except BadRequest as e:
            out.append(e)
        except Exception as e:  # noqa: BLE001 - a bug of ours, reported with an id
            out.append(InternalError(e, "preparing a request"))
    return out


def run_rows(policy: InferPolicy, rows: list[Any]) -> list[Any]:
    """One forward over the prepared rows: their results, or (an internal failure) the same InternalError for
    each. Never retried row by row: rows are validated before, so a failure here is not one row's fault."""
    try:
        return list(policy.run_prepared(rows))
    except Exception as e:  # noqa: BLE001 - reported with an id
        return [InternalError(e, f"a forward of {len(rows)} rows")] * len(rows)


def error_text(e: BaseException) -> str:
    """What a client is told: the problem with its input, or an internal error's id (never a traceback)."""
    if isinstance(e, BadRequest):
        return "bad request: " + str(e)
    if not isinstance(e, InternalError):
        e = InternalError(e, "answering a request")
    return f"{e}: the server's log has the details under this id"


def decode_request(message: bytes | str, max_message_bytes: int) -> dict[str, Any]:
    """A request frame -> its map (string keys). Raises BadMessage naming what is wrong."""
    if isinstance(message, str):
        raise BadMessage("expected a binary msgpack frame, got a text frame")
    if len(message) > max_message_bytes:
        raise BadMessage(f"message of {len(message)} bytes exceeds the server's limit of "
                         f"{max_message_bytes} bytes (pi0 serve --max-message-mb)")
    obs = msgpack_numpy.unpackb(message)
    if not isinstance(obs, dict):
        raise BadMessage(f"an observation must be a msgpack map, got {type(obs).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obs.items()}


def batch_rows(request: dict[str, Any], max_rows: int) -> list[dict[str, Any]]:
    """The observations of an explicit {"batch": [...]} request (at most max_rows)."""
    rows = request["batch"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise BadMessage("'batch' must be a non-empty list of observation maps")
    if len(rows) > max_rows:
        raise BadMessage(f"'batch' has {len(rows)} rows; this server answers at most {max_rows} per request "
                         "(pi0 serve --max-batch): split it")
    return [{k.decode() if isinstance(k, bytes) else k: v for k, v in r.items()} for r in rows]


def encode_reply(rows: list[Any], timing: dict[str, Any], explicit: bool, prev_total_ms: float | None) -> bytes | str:
    """Results (or a row's exception) -> the reply frame: msgpack, or a text frame for a failed single request."""
    timing = dict(timing)
    if prev_total_ms is not None:
        timing["prev_total_ms"] = prev_total_ms
    if not explicit:
        if isinstance(rows[0], BaseException):
            log.warning("request failed: %s", rows[0])
            return error_text(rows[0])
        return msgpack_numpy.packb({**rows[0], "server_timing": timing})
    # explicit batch: a failed row is answered as {"error": text}, the others as usual
    out = [{"error": error_text(r)} if isinstance(r, BaseException) else r for r in rows]
    return msgpack_numpy.packb({"batch": out, "server_timing": timing})


def decode_and_prepare(policy: InferPolicy, message: bytes | str, max_message_bytes: int, max_batch: int,
                       metrics: ServerMetrics) -> tuple[list[Any], bool]:
    """(each row prepared, or its BadRequest / InternalError; whether it was an explicit batch): run off the
    event loop. A message that is not even a request raises (see `refusal`)."""
    t0 = time.perf_counter()
    request = decode_request(message, max_message_bytes)
    explicit = "batch" in request
    observations = batch_rows(request, max_batch) if explicit else [request]
    rows = prepare_rows(policy, observations)
    metrics.observe("preprocess", (time.perf_counter() - t0) / len(rows))
    return rows, explicit


def refusal(e: BaseException, metrics: ServerMetrics) -> str:
    """The text reply to a message that could not be read as a request, counted."""
    if isinstance(e, BadRequest):
        log.warning("bad request: %s", e)
        metrics.count("bad_request")
        return error_text(e)
    metrics.count("internal_error")
    return error_text(InternalError(e, "decoding a request"))


def record(results: list[Any], metrics: ServerMetrics) -> None:
    """Count each row's outcome and observe the model's stages of the answered ones."""
    for r in results:
        if isinstance(r, BadRequest):
            metrics.count("bad_request")
        elif isinstance(r, Exception):
            metrics.count("internal_error")
        else:
            metrics.count("ok")
            for stage, seconds in r.get("policy_timing", {}).get("stages_s", {}).items():
                metrics.observe(stage, seconds)


def merge(rows: list[Any], answers: list[Any]) -> list[Any]:
    """Each row's answer in request order: its own error, or the next answer of the good rows."""
    it = iter(answers)
    return [r if isinstance(r, Exception) else next(it) for r in rows]


AUTH_ERROR = "missing or wrong 'Authorization: Api-Key <key>' header"


def authorized(header: str | None, api_key: str | None) -> bool:
    """Does a handshake's Authorization header carry the key (always, when no key is set)? Constant-time."""
    return api_key is None or hmac.compare_digest((header or "").encode(), f"Api-Key {api_key}".encode())


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


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: threads have their own nice value), so that request decoding
    and validation take the cores only when the model's forward leaves them idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the threads run at the process's priority
        pass


class Gone(Exception):
    """The client closed the connection (or it broke)."""


class Link(Protocol):
    """One client connection as a transport gives it to `Service.session`."""

    peer: str
    closed: asyncio.Future  # done once the client is gone

    async def recv(self) -> bytes | str: ...  # the next message; raises Gone

    async def send(self, data: bytes | str) -> None: ...  # raises Gone

    async def close(self, code: int, reason: str) -> None: ...


class Service:
    """The policy behind any transport: admission (connection limit, in-flight budget), decoding and validation
    off the event loop in lower-priority threads, dynamic batching on one model thread, errors, metrics, and each
    connection's session. `start()` before the first session, `stop()` at the end."""

    def __init__(self, policy: InferPolicy, limits: Limits, name: str | None = None, prepare_threads: int = 2):
        self.policy, self.limits, self.name = policy, limits, name  # name: server_timing.replica when set
        self.budget = Budget(limits.inflight_bytes)
        self.metrics = ServerMetrics(name)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.decoder = ThreadPoolExecutor(max_workers=max(1, prepare_threads), thread_name_prefix="pi0-prepare",
                                          initializer=lower_priority)
        self.worker = threading.Thread(target=self._work, name="pi0-infer", daemon=True)
        self.connections = 0

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=60)
        self.decoder.shutdown(wait=False)

    # -- admission --------------------------------------------------------------------------------

    def cannot_admit(self) -> str | None:
        """Why a new connection cannot be served now (counted), or None: checked at the handshake."""
        if self.connections >= self.limits.max_connections:
            self.metrics.refused("limit")
            return f"at its connection limit ({self.limits.max_connections}; pi0 serve --max-connections)"
        if self.budget.used + self.limits.reserved > self.budget.limit:
            self.metrics.refused("budget")
            return (f"the memory budget is full ({self.budget.limit >> 20} MiB; pi0 serve --max-inflight-mb): "
                    "try again later")
        return None

    async def session(self, link: Link) -> None:
        """One connection from start to end: its reservation, the metadata frame, then requests one at a time."""
        if not self.budget.take(self.limits.reserved):  # all it can make the server hold: never waits on others
            log.warning("connection from %s refused: the in-flight budget is full", link.peer)
            self.metrics.refused("budget")
            await link.close(1013, f"the memory budget is full ({self.budget.limit >> 20} MiB; pi0 serve "
                                   "--max-inflight-mb): try again later")
            return
        self.connections += 1
        self.metrics.set_connections(self.connections)
        self.metrics.set_inflight(self.budget.used)
        log.info("connection from %s (%d open)", link.peer, self.connections)
        try:
            await link.send(msgpack_numpy.packb(self.policy.metadata))
            await self._requests(link)
        except Gone:
            pass
        finally:
            self.connections -= 1
            self.budget.give(self.limits.reserved)
            self.metrics.set_connections(self.connections)
            self.metrics.set_inflight(self.budget.used)
            log.info("connection from %s closed", link.peer)

    async def _requests(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        prev_total_ms: float | None = None
        conduct = Conduct(self.limits.max_errors)
        while True:
            message = await link.recv()
            t0 = time.perf_counter()
            if len(message) > self.limits.max_message_bytes:  # a transport that buffers whole messages
                await link.close(1009, f"message of {len(message)} bytes over the limit of "
                                       f"{self.limits.max_message_bytes} (pi0 serve --max-message-mb)")
                return
            answer = await self.answer(loop, message, link.closed, prev_total_ms)  # within the reservation
            if answer is None:  # the client went away: its request is dropped
                return
            reply, rows = answer
            await link.send(reply)
            prev_total_ms = (time.perf_counter() - t0) * 1000.0
            wait = conduct.answered(failed_request(reply, rows))
            if conduct.exhausted:
                log.warning("closing the connection from %s: %d bad requests in a row", link.peer, conduct.in_row)
                self.metrics.refused("errors")
                await link.close(1008, f"{conduct.in_row} bad requests in a row: fix the request (the replies said "
                                       "what was wrong), then reconnect")
                return
            if wait:  # held back: nothing more is read from this client meanwhile
                self.metrics.held_back(wait)
                await asyncio.wait({link.closed}, timeout=wait)

    async def answer(self, loop: asyncio.AbstractEventLoop, message: bytes | str, closed: asyncio.Future,
                     prev_total_ms: float | None) -> tuple[bytes | str, list[Any] | None] | None:
        """(the reply, each row's result or exception; None for a message that was no request), or None when the
        client left before its answer."""
        try:
            rows, explicit = await loop.run_in_executor(self.decoder, decode_and_prepare, self.policy, message,
                                                        self.limits.max_message_bytes, self.limits.max_batch,
                                                        self.metrics)
        except Exception as e:  # noqa: BLE001 - a bad request, or a bug of ours (an id for the client)
            return refusal(e, self.metrics), None
        good = [r for r in rows if not isinstance(r, Exception)]
        results: list[Any] = list(rows)
        timing: dict[str, Any] = {"infer_ms": 0.0, "queue_ms": 0.0, "batch_size": 0}
        if good:
            job = Job(good, explicit, loop, loop.create_future())
            self.jobs.put(job)
            done, _ = await asyncio.wait({job.future, closed}, return_when=asyncio.FIRST_COMPLETED)
            if job.future not in done:
                job.cancelled = True
                return None
            answers, timing = job.future.result()
            results = merge(rows, answers)
        record(results, self.metrics)
        t = time.perf_counter()
        reply = encode_reply(results, timing, explicit, prev_total_ms)
        self.metrics.observe("postprocess", time.perf_counter() - t)
        return reply, results

    # -- the model thread -------------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """The next job, plus up to max_batch - 1 single requests that arrive within batch_wait."""
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        if first.explicit_batch:
            return batch
        deadline = time.perf_counter() + self.limits.batch_wait_ms / 1000.0
        # each connection has at most one request in flight: once every open connection is in the batch,
        # nobody else can join it, so there is nothing to wait for (a lone robot never waits)
        while len(batch) < min(self.limits.max_batch, self.connections):
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            if job.explicit_batch:  # it runs on its own, next
                self.jobs.put(job)
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            dropped = [j for j in batch if j.cancelled]
            self.metrics.count("dropped", sum(len(j.rows) for j in dropped))
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            started = time.perf_counter()
            rows = [r for j in batch for r in j.rows]
            results = run_rows(self.policy, rows)
            infer_ms = (time.perf_counter() - started) * 1000.0
            self.metrics.batch(len(rows))
            at = 0
            for job in batch:
                part = results[at: at + len(job.rows)]
                at += len(job.rows)
                self.metrics.observe("queue", started - job.enqueued)
                timing = {"infer_ms": infer_ms, "queue_ms": (started - job.enqueued) * 1000.0, "batch_size": len(rows)}
                if self.name is not None:
                    timing["replica"] = self.name
                job.loop.call_soon_threadsafe(_finish, job, part, timing)


def _finish(job: Job, rows: list[Any], timing: dict[str, Any]) -> None:
    if not job.future.done():
        job.future.set_result((rows, timing))


def reserved_bytes(max_message_bytes: int) -> int:
    """What one connection can make the server hold, reserved when it opens: one frame queued by websockets, and
    one message in flight counted twice (raw, decoded). A connection that fits is never refused a request, so
    flooding clients can keep new connections out but never hurt one already served."""
    return 3 * max_message_bytes


def default_inflight_bytes(max_message_bytes: int, max_connections: int) -> int:
    """Room for every allowed connection."""
    return reserved_bytes(max_message_bytes) * max_connections
