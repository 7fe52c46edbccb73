"""An openpi-compatible websocket policy server (`pi0 serve`).

Wire protocol as openpi's: on connect one binary frame with msgpack(metadata); then per request
msgpack(observation) -> msgpack(result) with `policy_timing` and `server_timing`; `GET /healthz` -> 200 OK.
Unlike openpi's server, inference runs in a worker thread (requests from all clients queue there in
arrival order), so health checks and other clients are never blocked by a slow call; a bad request gets a
text frame naming the problem (openpi's client raises it as RuntimeError) and the connection stays open;
with an API key, clients without `Authorization: Api-Key <key>` are refused at the handshake. Before it
reports ready the server warms the policy up with one full call (kernel compilation), so the first robot
request costs what every other one costs; until then `/healthz` and new connections get 503.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pi0.serving import msgpack_numpy
from pi0.serving.msgpack_numpy import BadMessage

log = logging.getLogger("pi0.serve")


class InferPolicy(Protocol):
    metadata: dict[str, Any]

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...

    def warmup(self) -> float: ...


class PolicyServer:
    def __init__(self, policy: InferPolicy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 64 << 20):
        self.policy = policy
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pi0-infer")  # one model, FIFO queue
        self.bound_port: int | None = None
        self.ready = False  # set once the warm-up call is done

    # -- handshake ------------------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if not self.ready:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "warming up (first model call)\n")
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Api-Key {self.api_key}".encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong 'Authorization: Api-Key <key>' header\n")
        return None

    # -- per connection -------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        log.info("connection from %s", peer)
        await ws.send(msgpack_numpy.packb(self.policy.metadata))
        loop = asyncio.get_running_loop()
        prev_total_ms: float | None = None
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:
                log.info("connection from %s closed", peer)
                return
            t0 = time.perf_counter()
            try:
                obs = self._decode(message)
                t_infer = time.perf_counter()
                result = await loop.run_in_executor(self.executor, self.policy.infer, obs)
                infer_ms = (time.perf_counter() - t_infer) * 1000.0
                result = dict(result)
                result["server_timing"] = {"infer_ms": infer_ms}
                if prev_total_ms is not None:
                    result["server_timing"]["prev_total_ms"] = prev_total_ms
                reply: bytes | str = msgpack_numpy.packb(result)
            except (BadMessage, KeyError, ValueError, TypeError) as e:
                text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                log.warning("bad request from %s: %s", peer, text)
                reply = f"bad request: {text}"
            except Exception:  # noqa: BLE001 - report, keep serving
                log.exception("inference failed for %s", peer)
                reply = "inference failed:\n" + traceback.format_exc()
            try:
                await ws.send(reply)
            except ConnectionClosed:
                return
            prev_total_ms = (time.perf_counter() - t0) * 1000.0

    def _decode(self, message: bytes | str) -> dict[str, Any]:
        if isinstance(message, str):
            raise BadMessage("expected a binary msgpack frame, got a text frame")
        if len(message) > self.max_message_bytes:
            raise BadMessage(f"message of {len(message)} bytes exceeds the server's limit of "
                             f"{self.max_message_bytes} bytes (pi0 serve --max-message-mb)")
        obs = msgpack_numpy.unpackb(message)
        if not isinstance(obs, dict):
            raise BadMessage(f"an observation must be a msgpack map, got {type(obs).__name__}")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in obs.items()}

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve(self, started: asyncio.Event | None = None, stop: asyncio.Future | None = None) -> None:
        async with serve(self.handler, self.host, self.port, process_request=self.process_request,
                         compression=None, max_size=4 * self.max_message_bytes + (1 << 20),
                         ping_interval=None) as server:
            self.bound_port = server.sockets[0].getsockname()[1] if server.sockets else self.port
            log.info("serving %s on ws://%s:%d (healthz: http://%s:%d/healthz)", self.policy.metadata.get("model", "policy"),
                     self.host, self.bound_port, self.host, self.bound_port)
            if started is not None:
                started.set()
            seconds = await asyncio.get_running_loop().run_in_executor(self.executor, self.policy.warmup)
            self.ready = True
            log.info("warm-up call took %.2f s; ready", seconds)
            await (stop if stop is not None else asyncio.get_running_loop().create_future())

    def run(self) -> None:
        asyncio.run(self.serve())
