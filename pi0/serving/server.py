"""An openpi-compatible websocket policy server (`pi0 serve`).

Wire protocol as openpi's: on connect one binary frame with msgpack(metadata); then per request
msgpack(observation) -> msgpack(result) with `policy_timing` and `server_timing`; `GET /healthz` -> 200 OK.
Beyond openpi's server:
- dynamic batching: requests from all connections go to one queue; a worker thread takes up to
  `max_batch` waiting requests (waiting at most `batch_wait_ms` for more) and answers them with one
  forward (`server_timing.batch_size`, `queue_ms`); `{"batch": [obs, ...]}` is answered
  `{"batch": [reply, ...], "server_timing": ...}` with one forward of its own;
- inference and msgpack decoding run off the event loop, so health checks and other clients are never
  blocked; a bad request gets a text frame naming the problem (openpi's client raises it as RuntimeError)
  and the connection stays open; a bad row never spoils the other rows of its batch;
- bounded work and memory: a frame over `max_message_bytes` is refused by websockets itself (close code 1009:
  nothing larger is ever buffered); one request in flight per connection (its next message is not read before
  the reply) and one more frame queued; every open connection reserves one message's worth of a global
  budget (`max_inflight_bytes`) and every request in flight twice its size (raw and decoded): a connection
  that does not fit is closed at once (code 1013, try again later), a request that does not fit gets a
  "server busy" text frame, so no mix of clients holds more than the budget; an explicit batch longer than `max_batch` is refused; a disconnected client's
  queued requests are dropped; pings reap dead connections; `max_connections` refuses extra connections;
- every row is validated and prepared (decoding, images, tokens) on its own, in a thread pool, before the
  model sees it: a bad row gets its error and the others run in one forward; a forward that fails for an
  internal reason answers that batch with an error, never retried row by row;
- errors: bad input gets "bad request: <what was wrong>"; an internal error gets an error id, and its
  traceback goes to the server's log under that id (clients never see a traceback);
- `GET /metrics`: Prometheus text (requests and errors by kind, per-stage latency histograms, batch sizes,
  connections, bytes in flight, resident memory, GPU memory);
- with an API key, clients without `Authorization: Api-Key <key>` are refused at the handshake;
- the policy is warmed up with one full call before the server reports ready: until then `/healthz`
  and new connections get 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import http
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pi0.errors import BadRequest
from pi0.serving import msgpack_numpy
from pi0.serving.metrics import ServerMetrics
from pi0.serving.msgpack_numpy import BadMessage

log = logging.getLogger("pi0.serve")
MAX_QUEUED_FRAMES = 1  # websockets' per-connection incoming queue beyond the message being answered (default 16)


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


class PolicyServer:
    def __init__(self, policy: InferPolicy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 16 << 20, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 max_connections: int = 256, ping_interval_s: float | None = 20.0, name: str | None = None,
                 max_inflight_bytes: int | None = None, prepare_threads: int = 2):
        self.policy = policy
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.max_batch, self.batch_wait_s = max(1, max_batch), max(0.0, batch_wait_ms) / 1000.0
        self.max_connections = max_connections
        self.ping_interval_s = ping_interval_s
        self.name = name  # reported as server_timing.replica when set
        self.reserved = reserved_bytes(max_message_bytes)
        self.budget = Budget(max_inflight_bytes if max_inflight_bytes is not None
                             else default_inflight_bytes(max_message_bytes, max_connections))
        self.metrics = ServerMetrics(name)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.decoder = ThreadPoolExecutor(max_workers=max(1, prepare_threads), thread_name_prefix="pi0-prepare")
        self.worker = threading.Thread(target=self._work, name="pi0-infer", daemon=True)
        self.bound_port: int | None = None
        self.ready = False  # set once the warm-up call is done
        self.connections = 0

    # -- handshake ------------------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/metrics":
            if not authorized(request.headers.get("Authorization"), self.api_key):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, AUTH_ERROR + "\n")
            body, content_type = self.metrics.exposition()
            response = connection.respond(http.HTTPStatus.OK, "")
            del response.headers["Content-Type"], response.headers["Content-Length"]
            response.headers["Content-Type"] = content_type
            response.headers["Content-Length"] = str(len(body))
            return dataclasses.replace(response, body=body)
        if not self.ready:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "warming up (first model call)\n")
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if not authorized(request.headers.get("Authorization"), self.api_key):
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, AUTH_ERROR + "\n")
        if self.connections >= self.max_connections:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server is at its connection limit ({self.max_connections}; "
                                      "pi0 serve --max-connections)\n")
        return None

    # -- the model worker -----------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """The next job, plus up to max_batch - 1 single requests that arrive within batch_wait."""
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        if first.explicit_batch:
            return batch
        deadline = time.perf_counter() + self.batch_wait_s
        # each connection has at most one request in flight: once every open connection is in the batch,
        # nobody else can join it, so there is nothing to wait for (a lone robot never waits)
        while len(batch) < min(self.max_batch, self.connections):
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
                job.loop.call_soon_threadsafe(self._finish, job, part, timing)

    @staticmethod
    def _finish(job: Job, rows: list[Any], timing: dict[str, Any]) -> None:
        if not job.future.done():
            job.future.set_result((rows, timing))

    # -- per connection -------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        if not self.budget.take(self.reserved):  # all it can make the server hold: its requests never wait on others
            log.warning("connection from %s refused: the in-flight budget is full", peer)
            await ws.close(1013, f"the server's memory budget is full ({self.budget.limit >> 20} MiB; pi0 serve "
                                 "--max-inflight-mb): try again later")
            return
        self.connections += 1
        self.metrics.set_connections(self.connections)
        self.metrics.set_inflight(self.budget.used)
        log.info("connection from %s (%d open)", peer, self.connections)
        try:
            await ws.send(msgpack_numpy.packb(self.policy.metadata))
            await self._serve_connection(ws)
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            self.budget.give(self.reserved)
            self.metrics.set_connections(self.connections)
            self.metrics.set_inflight(self.budget.used)
            log.info("connection from %s closed", peer)

    async def _serve_connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        prev_total_ms: float | None = None
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            while True:
                message = await ws.recv()
                t0 = time.perf_counter()
                reply = await self._answer(loop, message, closed, prev_total_ms)  # within the connection's reservation
                if reply is None:  # the client went away: its request is dropped
                    return
                await ws.send(reply)
                prev_total_ms = (time.perf_counter() - t0) * 1000.0
        finally:
            closed.cancel()

    async def _answer(self, loop: asyncio.AbstractEventLoop, message: bytes | str, closed: asyncio.Future,
                      prev_total_ms: float | None) -> bytes | str | None:
        try:
            rows, explicit = await loop.run_in_executor(self.decoder, decode_and_prepare, self.policy, message,
                                                        self.max_message_bytes, self.max_batch, self.metrics)
        except Exception as e:  # noqa: BLE001 - a bad request, or a bug of ours (an id for the client)
            return refusal(e, self.metrics)
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
        return reply

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve(self, started: asyncio.Event | None = None, stop: asyncio.Future | None = None) -> None:
        self.worker.start()
        try:
            async with serve(self.handler, self.host, self.port, process_request=self.process_request,
                             compression=None, max_size=self.max_message_bytes, max_queue=MAX_QUEUED_FRAMES,
                             ping_interval=self.ping_interval_s, ping_timeout=self.ping_interval_s) as server:
                self.bound_port = server.sockets[0].getsockname()[1] if server.sockets else self.port
                log.info("serving %s on ws://%s:%d (healthz: http://%s:%d/healthz, metrics: /metrics)",
                         self.policy.metadata.get("model", "policy"), self.host, self.bound_port, self.host,
                         self.bound_port)
                if started is not None:
                    started.set()
                seconds = await asyncio.get_running_loop().run_in_executor(None, self.policy.warmup)
                self.ready = True
                log.info("warm-up call took %.2f s; ready", seconds)
                await (stop if stop is not None else asyncio.get_running_loop().create_future())
        finally:
            self.jobs.put(None)
            self.worker.join(timeout=60)
            self.decoder.shutdown(wait=False)

    def run(self) -> None:
        asyncio.run(self.serve())


def reserved_bytes(max_message_bytes: int) -> int:
    """What one connection can make the server hold, reserved when it opens: one frame queued by websockets, and
    one message in flight counted twice (raw, decoded). A connection that fits is never refused a request, so
    flooding clients can keep new connections out but never hurt one already served."""
    return 3 * max_message_bytes


def default_inflight_bytes(max_message_bytes: int, max_connections: int) -> int:
    """Room for every allowed connection."""
    return reserved_bytes(max_message_bytes) * max_connections
