"""Soak and chaos against `pi0 serve` (a real server process, openpi's real client), one JSON line per scenario:

1. soak: R requests from 8 clients; the server's RSS after a warm-up and at the end (growth);
2. flood: 64 clients sending maximum-size messages without reading replies, against --max-message-mb M and
   --max-inflight-mb B: the server's peak RSS against its base + B, and a good robot's latency meanwhile
   (target: at most FAIR x its latency alone);
3. error loop: 2 clients sending a state of the wrong width in a loop beside a good robot: its latency
   (target: at most FAIR x alone) and what the loopers got; killed clients: clients that send a request and
   vanish (socket closed at once) beside a good robot;
4. a bad row in every batch: explicit batches of 8 with one bad row against 8 good ones (latency ratio);
5. restart: an ActionStream loop at 50 Hz while the server process is killed and started again (late ticks,
   errors, ticks until chunks come back).

    .venv/bin/python benchmarks/serve_soak.py --requests 10000          # the full soak
    .venv/bin/python benchmarks/serve_soak.py --short                   # what CI runs (tests/serving/test_soak.py)

Tiny weights, 224-px images. Exits 1 when a target fails (--check).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import robot_obs, rss_mb  # noqa: E402


FAIR = 1.3  # a well-behaved robot's median latency beside abusive clients, over its latency alone


def start(ckpt: str, tokenizer: str, port: int, *extra: str) -> subprocess.Popen:
    import urllib.request

    cmd = [sys.executable, "-m", "pi0.cli.main", "serve", "--checkpoint", ckpt, "--preset", "libero", "--port", str(port),
           "--tokenizer", tokenizer, "--dtype", "float32", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("pi0 serve did not come up")
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak(port: int, proc: subprocess.Popen, total: int, clients: int = 8) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    per = total // clients
    warm = min(25, per // 3)  # the same warm-up (25 a client) in the short form as in the full soak
    counts = [0] * clients
    barrier = threading.Barrier(clients + 1)
    errors = []

    def client(i: int) -> None:
        try:
            c = WebsocketClientPolicy(host="127.0.0.1", port=port)
            obs = robot_obs(i)
            for _ in range(warm):
                c.infer(obs)
            barrier.wait()
            for _ in range(per - warm):
                c.infer(obs)
                counts[i] += 1
        except Exception as e:  # noqa: BLE001 - reported in the result
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    base = rss_mb(proc.pid)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    end = rss_mb(proc.pid)
    return {"scenario": "soak", "requests": total, "clients": clients, "seconds": seconds,
            "requests_per_s": sum(counts) / seconds, "rss_after_warmup_mb": base, "rss_end_mb": end,
            "rss_growth_mb": end - base, "errors": errors[:3]}


def _latency(port: int, n: int = 10, client=None) -> float:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    c = client or WebsocketClientPolicy(host="127.0.0.1", port=port)
    c.infer(robot_obs(0))
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.infer(robot_obs(0))
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def _flooders(port: int, clients: int, message_mb: float, seconds: float, started, out) -> None:
    """In a process of its own (so that the good robot's client shares no interpreter with them): `clients`
    threads, each connecting and sending maximum-size frames without reading a reply."""
    from websockets.sync.client import connect

    payload = os.urandom(int(message_mb * 2**20) - 4096)  # just under the limit: accepted frames, then refused
    stop_at = time.perf_counter() + seconds
    refused, sent = [0], [0]

    def flooder() -> None:
        try:
            with connect(f"ws://127.0.0.1:{port}", max_size=None, open_timeout=30) as ws:
                ws.socket.settimeout(2.0)
                while time.perf_counter() < stop_at:
                    ws.send(payload)
                    sent[0] += 1
        except Exception:  # noqa: BLE001 - refused by the budget (503), closed, or blocked by backpressure
            refused[0] += 1

    _side_by_side(flooder, clients, started, seconds + 10)
    out.put({"frames_sent": sent[0], "flooders_refused_or_blocked": refused[0]})


def _side_by_side(client, n: int, started, timeout: float) -> None:
    """`n` threads running `client`; `started` set once they all run; back when they end (or after timeout)."""
    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join(timeout)


def _error_loopers(port: int, clients: int, seconds: float, started, out) -> None:
    """In a process of its own: `clients` openpi clients in a loop sending a state of the wrong width (each catches
    its error and sends again, and reconnects when closed)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    bad = {**robot_obs(3), "observation/state": np.zeros(3, np.float32)}
    stop_at = time.perf_counter() + seconds
    answered, closed = [0], [0]

    def looper() -> None:
        c = WebsocketClientPolicy(host="127.0.0.1", port=port)
        while time.perf_counter() < stop_at:
            try:
                c.infer(bad)
            except RuntimeError:  # the text error, as openpi's client raises it
                answered[0] += 1
            except Exception:  # noqa: BLE001 - closed for its errors: it comes back
                closed[0] += 1
                c = WebsocketClientPolicy(host="127.0.0.1", port=port)

    _side_by_side(looper, clients, started, seconds + 30)
    out.put({"errors_answered_per_client_per_s": answered[0] / clients / seconds, "closed_for_errors": closed[0]})


def _beside(port: int, target, args: tuple, good, settle_s: float, n: int = 40) -> tuple[float, float, dict]:
    """A good robot's median latency alone, then while `target(port, *args)` runs in another process (from
    settle_s after it started), then alone again: (alone, during, what the other process reported)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    before = _latency(port, n, client=good)
    started, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=target, args=(port, *args, started, out), daemon=True)
    proc.start()
    started.wait(60)
    time.sleep(settle_s)
    during = _latency(port, n, client=good)
    report = out.get(timeout=300)
    proc.join(30)
    after = _latency(port, n, client=good)
    return float(np.median([before, after])), during, report


def flood(ckpt: str, tokenizer: str, clients: int, message_mb: float, inflight_mb: float, seconds: float) -> dict:
    port = free_port()
    proc = start(ckpt, tokenizer, port, "--max-message-mb", str(message_mb), "--max-inflight-mb", str(inflight_mb))
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        good = WebsocketClientPolicy(host="127.0.0.1", port=port)  # connected before the flood: its share is reserved
        base = rss_mb(proc.pid)
        peak = [base]
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        alone, during, report = _beside(port, _flooders, (clients, message_mb, seconds), good, settle_s=0.5)
        watching.set()
        watcher.join()
        return {"scenario": "flood", "clients": clients, "message_mb": message_mb, "max_inflight_mb": inflight_mb,
                **report, "rss_base_mb": base, "rss_peak_mb": peak[0], "rss_over_base_mb": peak[0] - base,
                "good_latency_alone_s": alone, "good_latency_during_s": during, "ratio": during / alone}
    finally:
        stop(proc)


def error_loop(port: int, clients: int, seconds: float) -> dict:
    """`clients` clients sending a state of the wrong width in a loop (another process) beside a good robot: its
    latency alone and meanwhile, and what the loopers got (answers per second, connections closed)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    good = WebsocketClientPolicy(host="127.0.0.1", port=port)
    alone, during, report = _beside(port, _error_loopers, (clients, seconds), good, settle_s=0.5)
    return {"scenario": "error_loop", "clients": clients, "seconds": seconds, "good_latency_alone_s": alone,
            "good_latency_during_s": during, "ratio": during / alone, **report}


def killed_clients(port: int, n: int) -> dict:
    from websockets.sync.client import connect

    from pi0.serving import msgpack_numpy

    alone = _latency(port)
    msg = msgpack_numpy.packb(robot_obs(5))

    def vanish() -> None:
        for _ in range(n):
            with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
                ws.recv()
                ws.send(msg)  # and gone before the reply

    t = threading.Thread(target=vanish)
    t.start()
    during = _latency(port, 10)
    t.join()
    return {"scenario": "killed_clients", "vanished_requests": n, "good_latency_alone_s": alone,
            "good_latency_during_s": during, "still_serving": _latency(port, 3) > 0}


def bad_row(port: int, repeats: int) -> dict:
    from websockets.sync.client import connect

    from pi0.serving import msgpack_numpy

    good = [robot_obs(i) for i in range(8)]
    bad = good[:7] + [{**good[7], "observation/state": np.zeros(3, np.float32)}]

    def timed(rows) -> float:
        with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            ws.recv()
            msg = msgpack_numpy.packb({"batch": rows})
            ws.send(msg)
            ws.recv()
            t = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ws.send(msg)
                ws.recv()
                t.append(time.perf_counter() - t0)
        return float(np.median(t))

    all_good, with_bad = timed(good), timed(bad)
    return {"scenario": "bad_row", "batch_of_8_s": all_good, "batch_of_8_with_1_bad_s": with_bad,
            "ratio": with_bad / all_good}


def restart(ckpt: str, tokenizer: str, hz: float = 50.0, ticks: int = 600) -> dict:
    from pi0.serving.stream import ActionStream

    port = free_port()
    proc = start(ckpt, tokenizer, port)
    stream = ActionStream.connect("127.0.0.1", port, control_hz=hz, timeout_s=1.0, backoff_s=(0.05, 0.5))
    obs = robot_obs(0)
    stream.next_action(obs)
    late, took = 0, []
    box = {"proc": proc}

    def bounce() -> None:
        time.sleep(2.0)
        box["proc"].send_signal(signal.SIGKILL)  # mid-stream, requests in flight
        box["proc"].wait()
        box["proc"] = start(ckpt, tokenizer, port)

    t = threading.Thread(target=bounce)
    t.start()
    chunks_at_restart, restarted_at = None, None
    # at least `ticks` ticks, and 2 s more once the new server is up (however long its start took: at most 120 s)
    deadline = time.perf_counter() + 120
    while len(took) < ticks or restarted_at is None or time.perf_counter() < restarted_at + 2.0:
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        stream.next_action(obs)
        dt = time.perf_counter() - t0
        took.append(dt)
        late += dt > 1 / hz
        if chunks_at_restart is None and box["proc"] is not proc:  # the new server answers /healthz
            chunks_at_restart, restarted_at = stream.chunks, time.perf_counter()
        time.sleep(max(0.0, 1 / hz - dt))
    t.join()
    stream.close()
    stop(box["proc"])
    return {"scenario": "restart", "control_hz": hz, "ticks": len(took), "late_ticks": late,
            "worst_tick_ms": max(took) * 1000, "errors": stream.errors, "chunks": stream.chunks,
            "chunks_after_restart": 0 if chunks_at_restart is None else stream.chunks - chunks_at_restart}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--flood-clients", type=int, default=64)
    ap.add_argument("--short", action="store_true", help="a minute or two: 600 requests, 16 flooders")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args()
    if args.short:
        args.requests, args.flood_clients = 600, 16
    from tests.conftest import train_tokenizer, write_policy_checkpoint

    tmp = Path(tempfile.mkdtemp())
    tokenizer = train_tokenizer(tmp / "sp")
    ckpt = str(write_policy_checkpoint(tmp / "ck", "tiny", tokenizer))
    results = []

    def add(r: dict) -> None:  # printed as it comes: a later scenario's crash loses nothing
        results.append(r)
        print(json.dumps(r), flush=True)

    port = free_port()
    proc = start(ckpt, tokenizer, port)
    try:
        add(soak(port, proc, args.requests))
        add(error_loop(port, 2, 4.0 if args.short else 15.0))
        add(killed_clients(port, 20))
        add(bad_row(port, 10 if args.short else 30))
    finally:
        stop(proc)
    add(flood(ckpt, tokenizer, args.flood_clients, 4.0, 64.0, 4.0 if args.short else 10.0))
    add(restart(ckpt, tokenizer, ticks=300 if args.short else 600))
    by = {r["scenario"]: r for r in results}
    failed = []
    if by["soak"]["rss_growth_mb"] > 20 or by["soak"]["errors"]:
        failed.append("soak")
    f = by["flood"]
    if f["rss_over_base_mb"] > f["max_inflight_mb"] + 64 or f["ratio"] > FAIR:  # + one batch's working set
        failed.append("flood")
    if by["error_loop"]["ratio"] > FAIR:
        failed.append("error_loop")
    if by["bad_row"]["ratio"] > 1.10:
        failed.append("bad_row")
    if by["restart"]["late_ticks"] or by["restart"]["chunks_after_restart"] < 1:
        failed.append("restart")
    print(json.dumps({"targets_failed": failed}))
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
