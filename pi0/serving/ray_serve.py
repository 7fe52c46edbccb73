"""`pi0 serve --replicas N [--ray-address ADDR]`: the same openpi-protocol websocket server on Ray Serve
(`pip install 'pi0[ray]'`). N replicas each load the model once; Ray's proxy listens on --host/--port and
pins each websocket connection to one replica; inside a replica, requests of all its connections are
batched by Ray Serve's own `@serve.batch` (up to --max-batch, waiting --batch-wait-ms); every reply's
`server_timing.replica` names the replica that answered; `GET /healthz` goes through the proxy. Without
--ray-address a local Ray instance is started on this machine (and stopped on exit); with it, the
deployment joins an existing cluster, whose nodes must all see the checkpoint path. Ctrl-C / SIGTERM
delete the deployment and shut down what this command started.

Wire behaviour is the single-process server's: metadata frame on connect, msgpack-numpy both ways, a text
frame naming the problem for a bad request (the connection stays open), API key at the handshake.
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
from pi0.serving.server import AUTH_ERROR, BAD_INPUT, authorized, error_text, batch_rows, decode_request, encode_reply, infer_rows

log = logging.getLogger("pi0.serve")
APP_NAME = "pi0"


def build_app(policy_args: dict[str, Any], api_key: str | None, max_message_bytes: int, max_batch: int,
              batch_wait_ms: float, num_replicas: int, num_cpus: float | None = None):
    """The Ray Serve application: a FastAPI ingress (websocket at /, GET /healthz) over N replicas."""
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect
    from fastapi.responses import PlainTextResponse
    from ray import serve

    app = FastAPI()
    options = {} if num_cpus is None else {"num_cpus": num_cpus}

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=options, max_ongoing_requests=1024)
    @serve.ingress(app)
    class PolicyReplica:
        def __init__(self) -> None:
            from pi0.policy import Policy

            self.policy = Policy(**policy_args)
            self.policy.warmup()  # the replica reports healthy only after its one-time costs are paid
            ctx = serve.get_replica_context()
            self.name = str(getattr(ctx, "replica_tag", None) or getattr(ctx, "replica_id", "replica"))
            self.batched.set_max_batch_size(max(1, max_batch))
            self.batched.set_batch_wait_timeout_s(max(0.0, batch_wait_ms) / 1000.0)

        @app.get("/healthz")
        def healthz(self) -> PlainTextResponse:
            return PlainTextResponse("OK\n")

        async def forward(self, observations: list[dict[str, Any]]) -> list[Any]:
            """(result or exception, server_timing) per row, from one forward off the event loop."""
            started = time.perf_counter()
            rows = await asyncio.to_thread(infer_rows, self.policy, observations)
            timing = {"infer_ms": (time.perf_counter() - started) * 1000.0, "batch_size": len(observations),
                      "replica": self.name}
            return [(r, timing) for r in rows]

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def batched(self, observations: list[dict[str, Any]]) -> list[Any]:
            """One forward for the requests of every connection that waited together."""
            return await self.forward(observations)

        @app.websocket("/")
        async def robot(self, ws: WebSocket) -> None:
            if not authorized(ws.headers.get("authorization"), api_key):
                await ws.close(code=1008, reason=AUTH_ERROR)
                return
            await ws.accept()
            await ws.send_bytes(msgpack_numpy.packb(self.policy.metadata))
            prev_total_ms = None
            try:
                while True:
                    message = await ws.receive()
                    if message.get("type") == "websocket.disconnect":
                        return
                    t0 = time.perf_counter()
                    data = message.get("bytes") if message.get("bytes") is not None else message.get("text")
                    try:
                        obs = await asyncio.to_thread(decode_request, data, max_message_bytes)
                        if "batch" in obs:
                            rows = await self.forward(batch_rows(obs))  # an explicit batch: its own forward
                            reply = encode_reply([r for r, _ in rows], rows[0][1], True, prev_total_ms)
                        else:
                            row, timing = await self.batched(obs)
                            timing = {**timing, "queue_ms": max(0.0, (time.perf_counter() - t0) * 1000.0
                                                               - timing["infer_ms"])}
                            reply = encode_reply([row], timing, False, prev_total_ms)
                    except BAD_INPUT as e:
                        reply = error_text(e)
                    if isinstance(reply, str):
                        await ws.send_text(reply)
                    else:
                        await ws.send_bytes(reply)
                    prev_total_ms = (time.perf_counter() - t0) * 1000.0
            except WebSocketDisconnect:
                return


    return PolicyReplica.bind()


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started_ray = args.ray_address is None
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             **({} if args.ray_address else {"num_cpus": max(args.replicas, 1) * 1 + 1}))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(policy_args, api_key, int(args.max_message_mb * (1 << 20)), args.max_batch,
                        args.batch_wait_ms, args.replicas, num_cpus=1 if started_ray else None)
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
