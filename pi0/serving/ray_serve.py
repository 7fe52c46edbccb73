"""`pi0 serve --replicas N [--ray-address ADDR]`: the same service on Ray Serve (`pip install 'pi0[ray]'`).

N replicas each load the model once and run the single server's `Service` (pi0.serving.service): the same
admission, limits, fair service, errors and dynamic batching of the requests of all their connections, behind
Ray's proxy on --host/--port, which pins each websocket connection to one replica. Every reply's
`server_timing.replica` names the replica that answered. `GET /healthz` answers 200 once every replica is running
and has served a websocket through the proxy; `GET /metrics` is every replica's Prometheus text in one (label
`replica`), from a small actor the replicas report to. Without --ray-address a local Ray instance is started and
stopped with the command; with it, the deployment joins an existing cluster, whose nodes must all see the
checkpoint path. Ctrl-C / SIGTERM delete the deployment and shut down what this command started.

Ray's proxy has read a whole message by the time a replica sees it: a message over --max-message-mb closes its
connection (code 1009) as the single server does, but the proxy has buffered it; size the proxy's own limits for
hostile clients.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations (WebSocket)
# at runtime, and they are imported inside build_app (Ray Serve is an optional extra).
import argparse
import asyncio
import functools
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable

from pi0.serving.limits import AUTH_ERROR, Limits, authorized
from pi0.serving.requests import InferPolicy
from pi0.serving.service import Gone, Service

log = logging.getLogger("pi0.serve")
APP_NAME = "pi0"
BOARD = "pi0-metrics"  # the named actor every replica reports its metrics to
REPORT_S = 1.0  # how often a replica reports; a replica silent for STALE_S is left out of /metrics
STALE_S = 30.0


class StarletteLink:
    """A Starlette websocket (Ray Serve's FastAPI ingress) as a `Link`. A reader task takes the next message off the
    connection while the current one is answered (so a client that vanishes is noticed, as websockets notices it),
    and at most that one: what the proxy holds beyond it is the proxy's."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Event()  # set while the inbox is empty: the reader may take the next message
        self.room.set()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                await self.room.wait()
                message = await self.ws.receive()
                if message.get("type") == "websocket.disconnect":
                    return
                self.room.clear()
                self.inbox.put_nowait(message.get("bytes") if message.get("bytes") is not None else message.get("text"))
        except Exception:  # noqa: BLE001 - a broken connection is a closed one
            return
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    async def recv(self) -> bytes | str:
        if self.inbox.empty():
            get = asyncio.ensure_future(self.inbox.get())
            await asyncio.wait({get, self.closed}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise Gone
            data = get.result()
        else:
            data = self.inbox.get_nowait()
        self.room.set()
        return data

    async def send(self, data: bytes | str) -> None:
        if self.closed.done():
            raise Gone
        try:
            await (self.ws.send_text(data) if isinstance(data, str) else self.ws.send_bytes(data))
        except Exception:  # noqa: BLE001 - WebSocketDisconnect, or a send after the close
            raise Gone from None

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code=code, reason=reason[:120])
        except Exception:  # noqa: BLE001 - already closed
            pass

    def stop(self) -> None:
        self.reader.cancel()


def merged_metrics(snapshots: list[list[Any]]) -> bytes:
    """One Prometheus exposition of every replica's metric families (each sample labelled by its replica already,
    but for the process collector's, which `snapshot` labels)."""
    from prometheus_client import generate_latest

    families: dict[str, Any] = {}
    for snapshot in snapshots:
        for fam in snapshot:
            if fam.name not in families:
                families[fam.name] = fam
            else:
                families[fam.name].samples.extend(fam.samples)

    class Merged:
        def collect(self):
            return families.values()

    return generate_latest(Merged())


def snapshot(registry: Any, replica: str) -> list[Any]:
    """A registry's metric families, every sample labelled with `replica` (picklable: sent to the board)."""
    out = []
    for fam in registry.collect():
        fam.samples = [s._replace(labels={**s.labels, "replica": replica}) if "replica" not in s.labels else s
                       for s in fam.samples]
        out.append(fam)
    return out


def build_app(policy_factory: Callable[[], InferPolicy], api_key: str | None, limits: Limits, num_replicas: int,
              num_cpus: float | None = None, board: str = BOARD):
    """The Ray Serve application: a FastAPI ingress (websocket at /, GET /healthz, GET /metrics) over N replicas,
    each running `policy_factory()` behind a `Service`, reporting to the metrics board named `board`."""
    import ray
    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import PlainTextResponse, Response
    from ray import serve

    app = FastAPI()
    options = {} if num_cpus is None else {"num_cpus": num_cpus}

    from ray.serve.config import RequestRouterConfig

    router = RequestRouterConfig(request_router_class="pi0.serving.ray_router:FewestConnections")

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=options, max_ongoing_requests=10_000,
                      request_router_config=router)
    @serve.ingress(app)
    class PolicyReplica:
        def __init__(self) -> None:
            policy = policy_factory()
            policy.warmup()  # the replica reports healthy only after its one-time costs are paid
            ctx = serve.get_replica_context()
            name = str(getattr(ctx, "replica_tag", None) or getattr(ctx, "replica_id", "replica"))
            self.service = Service(policy, limits, name)
            self.service.start()
            self.board = ray.get_actor(board)
            self.served = False  # a websocket has been served through the proxy
            self.reporter = threading.Thread(target=self._report, daemon=True)
            self.reporter.start()

        def _report(self) -> None:
            while True:
                try:
                    self.board.put.remote(self.service.name, snapshot(self.service.metrics.registry,
                                                                      self.service.name), self.served)
                except Exception:  # noqa: BLE001 - the board is gone: the deployment is being deleted
                    return
                time.sleep(REPORT_S)

        @app.get("/healthz")
        async def healthz(self) -> PlainTextResponse:
            ready, why = await self.board.ready.remote(num_replicas)
            return PlainTextResponse("OK\n" if ready else why + "\n", status_code=200 if ready else 503)

        @app.get("/metrics")
        async def metrics(self, request: Request) -> Response:
            if not authorized(request.headers.get("authorization"), api_key):
                return PlainTextResponse(AUTH_ERROR + "\n", status_code=401)
            from prometheus_client import CONTENT_TYPE_LATEST

            s = self.service
            await self.board.put.remote(s.name, snapshot(s.metrics.registry, s.name), self.served)
            return Response(merged_metrics(await self.board.all.remote()), media_type=CONTENT_TYPE_LATEST)

        @app.websocket("/")
        async def robot(self, ws: WebSocket) -> None:
            if not authorized(ws.headers.get("authorization"), api_key):
                await ws.close(code=1008, reason=AUTH_ERROR)
                return
            await ws.accept()
            why = self.service.cannot_admit()
            if why is not None:
                await ws.close(code=1013, reason=f"replica {why}"[:120])
                return
            link = StarletteLink(ws)
            self.served = True
            try:
                await self.service.session(link)
            finally:
                link.stop()

    return PolicyReplica.bind()


def start_board(ray: Any, name: str = BOARD) -> Any:
    """The named actor the replicas report their metrics and readiness to (no CPU of its own)."""

    @ray.remote(num_cpus=0)
    class MetricsBoard:
        def __init__(self) -> None:
            self.reports: dict[str, tuple[float, list[Any], bool]] = {}

        def put(self, replica: str, families: list[Any], served: bool) -> None:
            self.reports[replica] = (time.monotonic(), families, served)

        def _live(self) -> dict[str, tuple[float, list[Any], bool]]:
            now = time.monotonic()
            return {r: v for r, v in self.reports.items() if now - v[0] < STALE_S}

        def all(self) -> list[list[Any]]:
            return [families for _, families, _ in self._live().values()]

        def ready(self, replicas: int) -> tuple[bool, str]:
            live = self._live()
            if len(live) < replicas:
                return False, f"{len(live)} of {replicas} replicas running"
            served = sum(s for _, _, s in live.values())
            if served < replicas:
                return False, f"{served} of {replicas} replicas reached through the proxy"
            return True, ""

        def running(self) -> int:
            return len(self._live())

    return MetricsBoard.options(name=name).remote()


def deploy(policy_factory: Callable[[], InferPolicy], limits: Limits, api_key: str | None, replicas: int,
           num_cpus: float | None, host: str, port: int, app: str = APP_NAME, route_prefix: str = "/") -> Any:
    """Start Ray Serve's proxy on host:port (if it is not running) and the application at `route_prefix`; returns
    its metrics board (the caller keeps it, and kills it after `serve.delete(app)`)."""
    import ray
    from ray import serve

    board = start_board(ray, f"{BOARD}-{app}")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(policy_factory, api_key, limits, replicas, num_cpus, f"{BOARD}-{app}"), name=app,
              route_prefix=route_prefix, blocking=False)
    reach_every_replica(board, replicas, "127.0.0.1" if host in ("0.0.0.0", "::") else host, port, route_prefix,
                        api_key)
    return board


def reach_every_replica(board: Any, replicas: int, host: str, port: int, route_prefix: str, api_key: str | None,
                        timeout_s: float = 900.0) -> None:
    """Open a websocket to every replica through Ray's proxy before anyone is told the deployment is up: the proxy
    learns of new replicas a while after they run, and until it has, it sends every robot to the ones it knows
    (`/healthz` answers 200 only after this). `replicas` connections are held open at once, so the router (fewest
    connections first) spreads them; repeated until each replica has served one."""
    import ray
    from websockets.sync.client import connect

    url = f"ws://{host}:{port}{route_prefix.rstrip('/')}/"
    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
    deadline = time.monotonic() + timeout_s
    while not ray.get(board.ready.remote(replicas))[0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray Serve: {ray.get(board.ready.remote(replicas))[1]} after {timeout_s:.0f} s")
        if ray.get(board.running.remote()) >= replicas:
            held = []
            try:
                for _ in range(replicas):
                    ws = connect(url, additional_headers=headers, open_timeout=30, max_size=None)
                    held.append(ws)
                    ws.recv(timeout=30)  # the metadata frame: its replica has served a connection
            except Exception:  # noqa: BLE001 - the proxy is not routing yet: try again
                pass
            finally:
                for ws in held:
                    ws.close()
            time.sleep(REPORT_S + 0.2)  # the replicas report having served
        else:
            time.sleep(0.5)


def run(args: argparse.Namespace, api_key: str | None, policy_args: dict[str, Any], limits: Limits) -> int:
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
    from pi0.robot.policy import Policy
    from pi0.serving.logs import setup_logging

    setup_logging(getattr(args, "log_format", "text"))
    started_ray = args.ray_address is None
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             **({} if args.ray_address else {"num_cpus": args.replicas + 1}))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    board = None
    try:
        board = deploy(functools.partial(Policy, **policy_args), limits, api_key, args.replicas,
                       1 if started_ray else None, args.host, args.port)
        print(f"pi0 serve: {args.replicas} Ray Serve replica(s) on ws://{args.host}:{args.port} "
              f"(healthz: http://{args.host}:{args.port}/healthz)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.delete(APP_NAME)
            if board is not None:
                ray.kill(board)
            if started_ray:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
        print("pi0 serve: stopped", file=sys.stderr)
    return 0
