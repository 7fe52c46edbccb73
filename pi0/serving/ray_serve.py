"""`pi0 serve --replicas N [--ray-address ADDR]`: the same openpi-protocol websocket server on Ray Serve
(`pip install 'pi0[ray]'`). N replicas each load the model once; Ray's proxy listens on --host/--port and
pins each websocket connection to one replica; inside a replica, requests of all its connections are
batched by Ray Serve's own `@serve.batch` (up to --max-batch, waiting --batch-wait-ms); every reply's
`server_timing.replica` names the replica that answered. Without --ray-address a local Ray instance is
started locally (and stopped on exit); with it, the deployment joins an existing cluster, whose nodes
must all see the checkpoint path. Ctrl-C / SIGTERM delete the deployment and shut down what this command
started.

The single-process server's rules, per replica and with its own functions (pi0.serving.server): each row
validated and prepared on its own before the model (a bad row gets its error, the others one forward), one
forward at a time, internal errors answered with an id only, the connection limit (--max-connections per
replica), the frame limit (a larger message closes its connection, code 1009 — Ray's proxy has buffered it by
then: size the proxy's own limits for hostile clients), the in-flight budget (--max-inflight-mb per replica),
a vanished client's queued request dropped before its forward, explicit batches capped at --max-batch.
`GET /healthz` answers 200 only when every replica of the deployment is running; `GET /metrics` is the
answering replica's Prometheus text (label `replica`).
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations (WebSocket)
# at runtime, and they are imported inside build_app (Ray Serve is an optional extra).
import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from typing import Any

from pi0.serving import msgpack_numpy
from pi0.serving.server import (
    AUTH_ERROR, Budget, authorized, decode_and_prepare, default_inflight_bytes, reserved_bytes, encode_reply, merge,
    record, refusal, run_rows,
)

log = logging.getLogger("pi0.serve")
APP_NAME = "pi0"


def build_app(policy_args: dict[str, Any], api_key: str | None, max_message_bytes: int, max_batch: int,
              batch_wait_ms: float, num_replicas: int, num_cpus: float | None = None, max_connections: int = 256,
              max_inflight_bytes: int | None = None):
    """The Ray Serve application: a FastAPI ingress (websocket at /, GET /healthz, GET /metrics) over N replicas."""
    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import PlainTextResponse, Response
    from ray import serve

    app = FastAPI()
    options = {} if num_cpus is None else {"num_cpus": num_cpus}

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=options, max_ongoing_requests=1024)
    @serve.ingress(app)
    class PolicyReplica:
        def __init__(self) -> None:
            from pi0.policy import Policy
            from pi0.serving.metrics import ServerMetrics

            self.policy = Policy(**policy_args)
            self.policy.warmup()  # the replica reports healthy only after its one-time costs are paid
            ctx = serve.get_replica_context()
            self.name = str(getattr(ctx, "replica_tag", None) or getattr(ctx, "replica_id", "replica"))
            self.batched.set_max_batch_size(max(1, max_batch))
            self.batched.set_batch_wait_timeout_s(max(0.0, batch_wait_ms) / 1000.0)
            self.forward_lock = asyncio.Lock()  # one forward at a time: explicit batches and dynamic ones alike
            self.connections = 0
            self.reserved = reserved_bytes(max_message_bytes)  # all one connection can make the replica hold
            self.budget = Budget(max_inflight_bytes if max_inflight_bytes is not None
                                 else default_inflight_bytes(max_message_bytes, max_connections))
            self.metrics = ServerMetrics(self.name)

        @app.get("/healthz")
        def healthz(self) -> PlainTextResponse:
            status = serve.status().applications.get(APP_NAME)
            running = status is not None and str(getattr(status.status, "value", status.status)) == "RUNNING"
            return PlainTextResponse("OK\n" if running else "not every replica is running\n",
                                     status_code=200 if running else 503)

        @app.get("/metrics")
        def metrics(self, request: Request) -> Response:
            if not authorized(request.headers.get("authorization"), api_key):
                return PlainTextResponse(AUTH_ERROR + "\n", status_code=401)
            body, content_type = self.metrics.exposition()
            return Response(body, media_type=content_type)

        async def forward(self, rows: list[Any]) -> list[Any]:
            """(result or exception, server_timing) per prepared row (None: its client is gone), one forward."""
            live = [r for r in rows if r is not None]
            if not live:
                return [None] * len(rows)
            async with self.forward_lock:
                started = time.perf_counter()
                results = iter(await asyncio.to_thread(run_rows, self.policy, live))
                timing = {"infer_ms": (time.perf_counter() - started) * 1000.0, "batch_size": len(live),
                          "replica": self.name}
            self.metrics.batch(len(live))
            return [None if r is None else (next(results), timing) for r in rows]

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def batched(self, requests: list[Any]) -> list[Any]:
            """One forward for the requests of every connection that waited together (a request whose client
            went away meanwhile is skipped)."""
            return await self.forward([None if r.gone() else r.prepared for r in requests])

        async def _answer(self, data: Any, watch: "asyncio.Task", prev_total_ms: Any) -> Any:
            try:
                rows, explicit = await asyncio.to_thread(decode_and_prepare, self.policy, data, max_message_bytes,
                                                         max_batch, self.metrics)
            except Exception as e:  # noqa: BLE001 - a bad request, or a bug of ours (an id for the client)
                return refusal(e, self.metrics)
            good = [r for r in rows if not isinstance(r, Exception)]
            timing: dict[str, Any] = {"infer_ms": 0.0, "batch_size": 0, "replica": self.name}
            results: list[Any] = list(rows)
            if good:
                t0 = time.perf_counter()
                answered = await self.forward(good) if explicit else [await self.batched(_Pending(good[0], watch))]
                if any(a is None for a in answered):
                    self.metrics.count("dropped", len(good))
                    return None
                timing = {**answered[0][1], "queue_ms": max(0.0, (time.perf_counter() - t0) * 1000.0
                                                            - answered[0][1]["infer_ms"])}
                results = merge(rows, [a for a, _ in answered])
            record(results, self.metrics)
            return encode_reply(results, timing, explicit, prev_total_ms)

        @app.websocket("/")
        async def robot(self, ws: WebSocket) -> None:
            if not authorized(ws.headers.get("authorization"), api_key):
                await ws.close(code=1008, reason=AUTH_ERROR)
                return
            if self.connections >= max_connections:
                await ws.close(code=1013, reason=f"this replica is at its connection limit ({max_connections}; "
                                                 "pi0 serve --max-connections)")
                return
            if not self.budget.take(self.reserved):
                await ws.close(code=1013, reason="the replica's memory budget is full (pi0 serve --max-inflight-mb)")
                return
            self.connections += 1
            self.metrics.set_connections(self.connections)
            await ws.accept()
            await ws.send_bytes(msgpack_numpy.packb(self.policy.metadata))
            prev_total_ms = None
            early = None  # a message the client sent before its previous reply came
            try:
                while True:
                    message, early = early or await ws.receive(), None
                    if message.get("type") == "websocket.disconnect":
                        return
                    t0 = time.perf_counter()
                    data = message.get("bytes") if message.get("bytes") is not None else message.get("text")
                    if data is not None and len(data) > max_message_bytes:
                        await ws.close(code=1009, reason=f"message of {len(data)} bytes over the limit of "
                                                         f"{max_message_bytes} (pi0 serve --max-message-mb)")
                        return
                    watch = asyncio.ensure_future(ws.receive())  # a disconnect while the request waits
                    reply = await self._answer(data, watch, prev_total_ms)  # within the connection's reservation
                    if reply is None or _gone(watch):
                        return
                    if watch.done():
                        early = watch.result()
                    else:
                        watch.cancel()
                    if isinstance(reply, str):
                        await ws.send_text(reply)
                    else:
                        await ws.send_bytes(reply)
                    prev_total_ms = (time.perf_counter() - t0) * 1000.0
            except WebSocketDisconnect:
                return
            finally:
                self.connections -= 1
                self.budget.give(self.reserved)
                self.metrics.set_connections(self.connections)

    return PolicyReplica.bind()


class _Pending:
    """A single request in Ray's batch queue: its prepared row, and the watch on its client's connection."""

    def __init__(self, prepared: Any, watch: "asyncio.Task"):
        self.prepared, self.watch = prepared, watch

    def gone(self) -> bool:
        return _gone(self.watch)


def _gone(watch: "asyncio.Task") -> bool:
    return watch.done() and not watch.cancelled() and watch.result().get("type") == "websocket.disconnect"


def run(args: argparse.Namespace, api_key: str | None, policy_args: dict[str, Any]) -> int:
    """Deploy on Ray Serve, block until Ctrl-C / SIGTERM, then tear down what was started. policy_args: what
    each replica passes to pi0.Policy (dtype and device stay "auto" where asked: each replica decides for its node)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("pi0 serve --replicas needs Ray Serve: pip install 'pi0[ray]'", file=sys.stderr)
        return 2
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    from pi0.serving.logs import setup_logging

    setup_logging(getattr(args, "log_format", "text"))
    started_ray = args.ray_address is None
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             **({} if args.ray_address else {"num_cpus": max(args.replicas, 1) * 1 + 1}))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(policy_args, api_key, int(args.max_message_mb * (1 << 20)), args.max_batch,
                        args.batch_wait_ms, args.replicas, num_cpus=1 if started_ray else None,
                        max_connections=args.max_connections,
                        max_inflight_bytes=None if args.max_inflight_mb is None else int(args.max_inflight_mb * (1 << 20)))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        print(f"pi0 serve: {args.replicas} Ray Serve replica(s) on ws://{args.host}:{args.port} "
              f"(healthz: http://{args.host}:{args.port}/healthz)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
        print("pi0 serve: stopped", file=sys.stderr)
    return 0
