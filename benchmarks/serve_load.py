"""Requests per second through `pi0 serve` for 1, 4 and 8 concurrent robots (openpi's real client, one
thread each), batching on (--max-batch 8) and off (--max-batch 1), and the server's RSS under a client
that floods it with requests it never reads. One JSON line per measurement.

    .venv/bin/python benchmarks/serve_load.py --size tiny --seconds 10
    .venv/bin/python benchmarks/serve_load.py --size tiny --seconds 10 --replicas 2 --robots 1 8   # Ray Serve
    .venv/bin/python benchmarks/serve_load.py --checkpoint DIR --preset libero --seconds 60   # full size

--size tiny writes a tiny checkpoint (with a small tokenizer) to a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


DTYPE = "float32"  # --dtype


def robot_obs(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": f"pick up object {i}"}


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(ckpt: str, preset: str, max_batch: int, tokenizer: str | None,
                 replicas: int | None = None) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pi0.cli.main", "serve", "--checkpoint", ckpt, "--preset", preset, "--port", str(port),
           "--dtype", DTYPE,
           "--max-batch", str(max_batch), "--batch-wait-ms", "5"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if replicas:
        cmd += ["--replicas", str(replicas)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("pi0 serve did not come up")
            time.sleep(0.5)


def throughput(port: int, robots: int, seconds: float) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    counts, sizes, done_at = [0] * robots, [], [0.0] * robots
    ready = threading.Barrier(robots + 1)
    start = [0.0]

    def robot(i: int) -> None:
        c = WebsocketClientPolicy(host="127.0.0.1", port=port)
        obs = robot_obs(i)
        c.infer(obs)  # connected and served once before the clock runs
        ready.wait()
        while time.perf_counter() < start[0] + seconds:
            r = c.infer(obs)
            counts[i] += 1
            sizes.append(r["server_timing"]["batch_size"])
        done_at[i] = time.perf_counter()

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(robots)]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    ready.wait()
    start[0] = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = max(done_at) - start[0]  # every request counted was finished inside this span
    return {"robots": robots, "requests_per_s": sum(counts) / elapsed, "requests": sum(counts),
            "mean_batch_size": float(np.mean(sizes)) if sizes else 0.0}


def flood_rss(proc: subprocess.Popen, port: int, seconds: float) -> dict:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from pi0.serving import msgpack_numpy

    before = rss_mb(proc.pid)
    peak = before
    msg = msgpack_numpy.packb(robot_obs(99))
    sent = 0
    with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        ws.recv()
        ws.socket.settimeout(1.0)
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            try:
                ws.send(msg)
                sent += 1
            except (TimeoutError, OSError, ConnectionClosed):
                break  # the server stopped reading: backpressure reached the socket
            peak = max(peak, rss_mb(proc.pid))
        time.sleep(1.0)
        peak = max(peak, rss_mb(proc.pid))
    return {"flood_sent": sent, "message_mb": len(msg) / 2**20, "server_rss_before_mb": before,
            "server_rss_peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default=None, help="tiny: write a tiny checkpoint first")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="libero")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--robots", type=int, nargs="*", default=[1, 4, 8], help="none: only the flood")
    ap.add_argument("--replicas", type=int, default=None, help="serve from N Ray Serve replicas (pi0 serve "
                    "--replicas N), batching on only")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    global DTYPE
    DTYPE = args.dtype
    ckpt, tokenizer = args.checkpoint, args.tokenizer
    if args.size == "tiny":
        from tests.conftest import train_tokenizer, write_policy_checkpoint

        tmp = Path(tempfile.mkdtemp())
        tokenizer = train_tokenizer(tmp / "sp")
        ckpt = str(write_policy_checkpoint(tmp / "ck", "tiny", tokenizer))
    for max_batch in (1, 8) if args.robots and not args.replicas else (8,):
        proc, port = start_server(ckpt, args.preset, max_batch, tokenizer, args.replicas)
        try:
            for robots in args.robots:
                print(json.dumps({"max_batch": max_batch, "replicas": args.replicas,
                                  **throughput(port, robots, args.seconds)}), flush=True)
            if max_batch == 8 and not args.replicas:
                print(json.dumps({"max_batch": max_batch, **flood_rss(proc, port, args.seconds)}), flush=True)
        finally:
            proc.terminate()  # SIGTERM: a Ray deployment is deleted and its Ray instance stopped
            proc.wait(120)


if __name__ == "__main__":
    main()
