"""`pi0 serve`: an openpi-compatible websocket policy server, the `Service` of `pi0.serving.service` over websockets.

Wire protocol as openpi's: on connect one binary frame with msgpack(metadata); then per request
msgpack(observation) -> msgpack(result) with `policy_timing` and `server_timing`; `GET /healthz` -> 200 OK.
Beyond openpi's server (docs/serving.md has the whole story):
- dynamic batching: requests from all connections share forwards (`server_timing.batch_size`, `queue_ms`);
  `{"batch": [obs, ...]}` is answered `{"batch": [reply, ...], "server_timing": ...}` with a forward of its own;
- decoding and validation in lower-priority threads and the model on its own thread, so health checks and other
  clients are never blocked; bad input gets a text frame naming the problem (openpi's client raises it) and the
  connection stays open; a bad row never spoils the other rows of its batch; internal errors get an id only;
- bounded work and memory: a frame over `max_message_bytes` is refused by websockets itself (close code 1009:
  nothing larger is buffered); one request in flight per connection and one more frame queued; every connection
  reserves all it can make the server hold when it opens, against one budget (`max_inflight_bytes`), and one that
  does not fit, or one over `max_connections`, is refused at the handshake (HTTP 503 with the reason);
- fair service: a connection whose requests keep failing is held back (its next message read only after a
  back-off) and closed after `max_errors` in a row (code 1008, with the reason);
- `GET /metrics`: Prometheus text; an API key, when set, is required at the handshake;
- the policy is warmed up with one full call before the server reports ready (until then 503).
"""

from __future__ import annotations

from typing import Any

import asyncio
import dataclasses
import http
import logging

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pi0.serving.limits import AUTH_ERROR, Limits, authorized
from pi0.serving.requests import InferPolicy
from pi0.serving.service import Gone, Service

log = logging.getLogger("pi0.serve")
MAX_QUEUED_FRAMES = 1  # websockets' per-connection incoming queue beyond the message being answered (default 16)


class WebsocketLink:
    """A websockets connection as a `Link`."""

    def __init__(self, ws: ServerConnection):
        self.ws, self.peer = ws, str(ws.remote_address)
        self.closed = asyncio.ensure_future(ws.wait_closed())

    async def recv(self) -> bytes | str:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            raise Gone from None

    async def send(self, data: bytes | str) -> None:
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            raise Gone from None

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


class PolicyServer(Service):
    def __init__(self, policy: InferPolicy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 16 << 20, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 max_connections: int = 256, ping_interval_s: float | None = 20.0, name: str | None = None,
                 max_inflight_bytes: int | None = None, prepare_threads: int = 2, max_errors: int = 20,
                 recorder: Any = None):
        super().__init__(policy, Limits(max_message_bytes, max_batch, batch_wait_ms, max_connections,
                                        max_inflight_bytes, max_errors), name, prepare_threads, recorder)
        self.host, self.port = host, port
        self.api_key = api_key
        self.ping_interval_s = ping_interval_s
        self.bound_port: int | None = None
        self.ready = False  # set once the warm-up call is done

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake: /metrics, /healthz, the API key and admission (refused before it is a websocket)."""
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
        why = self.cannot_admit()
        if why is not None:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"server is {why}\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        link = WebsocketLink(ws)
        try:
            await self.session(link)
        finally:
            link.closed.cancel()

    async def serve(self, started: asyncio.Event | None = None, stop: asyncio.Future | None = None) -> None:
        self.start()
        try:
            async with serve(self.handler, self.host, self.port, process_request=self.process_request,
                             compression=None, max_size=self.limits.max_message_bytes, max_queue=MAX_QUEUED_FRAMES,
                             ping_interval=self.ping_interval_s, ping_timeout=self.ping_interval_s) as server:
                self.bound_port = server.sockets[0].getsockname()[1] if server.sockets else self.port
                log.info("serving %s on ws://%s:%d (healthz: http://%s:%d/healthz, metrics: /metrics)",
                         self.policy.metadata.get("model", "policy"), self.host, self.bound_port, self.host,
                         self.bound_port)
                if started is not None:
                    started.set()
                batches = tuple(range(1, self.limits.max_batch + 1))  # the sizes dynamic batching makes
                seconds = await asyncio.get_running_loop().run_in_executor(None, self.policy.warmup, batches)
                self.ready = True
                log.info("warm-up call took %.2f s; ready", seconds)
                await (stop if stop is not None else asyncio.get_running_loop().create_future())
        finally:
            self.stop()

    def run(self) -> None:
        asyncio.run(self.serve())
