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
- bounded memory per connection: one request in flight per connection (its next message is not read before
  the reply), websockets' incoming queue held to `MAX_QUEUED_FRAMES` frames of at most 4x the message
  limit; a disconnected client's queued requests are dropped; pings reap dead connections;
  `max_connections` refuses extra connections (HTTP 503 with the reason) at the handshake;
- with an API key, clients without `Authorization: Api-Key <key>` are refused at the handshake;
- the policy is warmed up with one full call before the server reports ready: until then `/healthz`
  and new connections get 503.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pi0.serving import msgpack_numpy
from pi0.serving.msgpack_numpy import BadMessage

log = logging.getLogger("pi0.serve")
MAX_QUEUED_FRAMES = 2  # websockets' per-connection incoming queue (its default is 16)
BAD_INPUT = (BadMessage, KeyError, ValueError, TypeError)


class InferPolicy(Protocol):
    metadata: dict[str, Any]

    def infer_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def warmup(self) -> float: ...


@dataclass
class Job:
    """Observations waiting for the model, and where their answer goes."""

    observations: list[dict[str, Any]]
    explicit_batch: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # its connection went away: never computed


def infer_rows(policy: InferPolicy, observations: list[dict[str, Any]]) -> list[Any]:
    """policy.infer_batch over all rows; if that fails, row by row, so that a bad row spoils no other:
    each entry is a result or the exception of its row."""
    try:
        return list(policy.infer_batch(observations))
    except Exception as e:  # noqa: BLE001 - reported per row
        if len(observations) == 1:
            return [e]
    rows: list[Any] = []
    for o in observations:
        try:
            rows.append(policy.infer_batch([o])[0])
        except Exception as e:  # noqa: BLE001
            rows.append(e)
    return rows


def error_text(e: BaseException) -> str:
    if isinstance(e, BAD_INPUT):
        return "bad request: " + (e.args[0] if isinstance(e, KeyError) and e.args else str(e))
    return "inference failed:\n" + "".join(traceback.format_exception(e))


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


def batch_rows(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The observations of an explicit {"batch": [...]} request."""
    rows = request["batch"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise BadMessage("'batch' must be a non-empty list of observation maps")
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


AUTH_ERROR = "missing or wrong 'Authorization: Api-Key <key>' header"


def authorized(header: str | None, api_key: str | None) -> bool:
    """Does a handshake's Authorization header carry the key (always, when no key is set)? Constant-time."""
    return api_key is None or hmac.compare_digest((header or "").encode(), f"Api-Key {api_key}".encode())


class PolicyServer:
    def __init__(self, policy: InferPolicy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 64 << 20, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 max_connections: int = 256, ping_interval_s: float | None = 20.0, name: str | None = None):
        self.policy = policy
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.max_batch, self.batch_wait_s = max(1, max_batch), max(0.0, batch_wait_ms) / 1000.0
        self.max_connections = max_connections
        self.ping_interval_s = ping_interval_s
        self.name = name  # reported as server_timing.replica when set
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pi0-decode")
        self.worker = threading.Thread(target=self._work, name="pi0-infer", daemon=True)
        self.bound_port: int | None = None
        self.ready = False  # set once the warm-up call is done
        self.connections = 0

    # -- handshake ------------------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
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
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            started = time.perf_counter()
            observations = [o for j in batch for o in j.observations]
            results = infer_rows(self.policy, observations)
            infer_ms = (time.perf_counter() - started) * 1000.0
            at = 0
            for job in batch:
                rows = results[at: at + len(job.observations)]
                at += len(job.observations)
                timing = {"infer_ms": infer_ms, "queue_ms": (started - job.enqueued) * 1000.0,
                          "batch_size": len(observations)}
                if self.name is not None:
                    timing["replica"] = self.name
                job.loop.call_soon_threadsafe(self._finish, job, rows, timing)

    @staticmethod
    def _finish(job: Job, rows: list[Any], timing: dict[str, Any]) -> None:
        if not job.future.done():
            job.future.set_result((rows, timing))

    # -- per connection -------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        self.connections += 1
        log.info("connection from %s (%d open)", peer, self.connections)
        try:
            await ws.send(msgpack_numpy.packb(self.policy.metadata))
            await self._serve_connection(ws)
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            log.info("connection from %s closed", peer)

    async def _serve_connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        prev_total_ms: float | None = None
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            while True:
                message = await ws.recv()
                t0 = time.perf_counter()
                try:
                    request = await loop.run_in_executor(self.decoder, decode_request, message, self.max_message_bytes)
                    explicit = "batch" in request
                    observations = batch_rows(request) if explicit else [request]
                    job = Job(observations, explicit, loop, loop.create_future())
                    self.jobs.put(job)
                    done, _ = await asyncio.wait({job.future, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if job.future not in done:  # the client went away: its request is dropped
                        job.cancelled = True
                        return
                    rows, timing = job.future.result()
                    reply: bytes | str = encode_reply(rows, timing, explicit, prev_total_ms)
                except BAD_INPUT as e:
                    log.warning("bad request from %s: %s", ws.remote_address, e)
                    reply = error_text(e)
                await ws.send(reply)
                prev_total_ms = (time.perf_counter() - t0) * 1000.0
        finally:
            closed.cancel()

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve(self, started: asyncio.Event | None = None, stop: asyncio.Future | None = None) -> None:
        self.worker.start()
        try:
            async with serve(self.handler, self.host, self.port, process_request=self.process_request,
                             compression=None, max_size=4 * self.max_message_bytes + (1 << 20),
                             max_queue=MAX_QUEUED_FRAMES, ping_interval=self.ping_interval_s,
                             ping_timeout=self.ping_interval_s) as server:
                self.bound_port = server.sockets[0].getsockname()[1] if server.sockets else self.port
                log.info("serving %s on ws://%s:%d (healthz: http://%s:%d/healthz)",
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
