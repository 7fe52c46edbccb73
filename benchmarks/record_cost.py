"""What recording costs where robots run, with the recorder off and on side by side in one process:

- the robot's control loop (`ActionStream(..., record=DIR)`) at 10 Hz and 50 Hz: the time each tick spends in
  `next_action`, as a share of the tick period (two 224 x 224 cameras and an 8-value state, episodes of
  `--ticks` ticks, a tiny policy answering in its own thread, the recorder's writer encoding in the background);
- a server (`pi0 serve --record`): requests per second from `--clients` robots at once;
- a process killed in the middle of an episode: every episode before it reads back.

    .venv/bin/python benchmarks/record_cost.py [--ticks 100] [--episodes 3] [--clients 4] [--seconds 10]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pi0.data.dataset import LeRobotDataset  # noqa: E402
from pi0.robot.policy import Policy  # noqa: E402
from pi0.serving.stream import ActionStream  # noqa: E402
from tests.conftest import train_tokenizer, write_policy_checkpoint  # noqa: E402


def robot_obs(tick: int) -> dict:
    rng = np.random.default_rng(tick)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": "put the cup in the bowl"}


def control_loop(policy: Policy, hz: float, ticks: int, episodes: int, record: str | None) -> dict:
    """A real-time loop: each tick, the observation, next_action (timed), then sleep to the next tick."""
    obs = [robot_obs(t) for t in range(8)]  # made beforehand: the loop times pi0's part only
    stream = ActionStream(policy, hz, record=record, on_empty="hold")
    busy, period = [], 1.0 / hz
    start = time.perf_counter()
    n = 0
    for _ in range(episodes):
        for tick in range(ticks):
            t0 = time.perf_counter()
            stream.next_action(obs[tick % len(obs)])
            busy.append(time.perf_counter() - t0)
            n += 1
            time.sleep(max(0.0, start + n * period - time.perf_counter()))
        stream.end_episode()
    counts = stream.close()
    skip = 3  # the first ticks wait for the first chunk
    b = np.array(busy[skip:])
    return {"busy_ms_mean": float(b.mean() * 1000), "busy_ms_p99": float(np.quantile(b, 0.99) * 1000),
            "late_ticks": int(sum(1 for x in b if x > period)), "recorded": counts}


def server_rate(policy: Policy, clients: int, seconds: float, record: str | None) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from pi0.data.recorder import ObservationRecorder
    from tests.serving.test_server import Running

    recorder = ObservationRecorder(record, fps=10) if record else None
    running = Running(policy, recorder=recorder)
    done = []
    stop = time.perf_counter() + seconds

    def robot(i: int) -> None:
        client = WebsocketClientPolicy(host="127.0.0.1", port=running.port)
        k = 0
        while time.perf_counter() < stop:
            client.infer(robot_obs(i * 1000 + k % 8))
            k += 1
        done.append(k)

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    running.close()
    return {"requests_per_s": sum(done) / elapsed, "requests": sum(done)}


KILLED = """
import os, signal, sys, numpy as np
sys.path.insert(0, {root!r})
from pi0.data.recorder import Recorder
feats = {{"observation.images.top": {{"dtype": "video", "shape": (224, 224, 3), "names": None}},
          "observation.state": {{"dtype": "float32", "shape": (8,), "names": None}},
          "action": {{"dtype": "float32", "shape": (7,), "names": None}}}}
rec = Recorder({out!r}, fps=10, features=feats)
rng = np.random.default_rng(0)
for e in range(3):
    for i in range(50):
        rec.add({{"observation.images.top": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                 "observation.state": np.full(8, e, np.float32), "action": np.full(7, i, np.float32)}}, "task")
    rec.end_episode()
rec._queue.join()  # three episodes written; the fourth is in progress when the process dies
for i in range(20):
    rec.add({{"observation.images.top": np.zeros((224, 224, 3), np.uint8), "observation.state": np.zeros(8, np.float32),
             "action": np.zeros(7, np.float32)}}, "task")
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed(tmp: Path) -> dict:
    out = tmp / "killed"
    r = subprocess.run([sys.executable, "-c", KILLED.format(root=str(Path(__file__).resolve().parents[1]), out=str(out))],
                       capture_output=True, text=True)
    ds = LeRobotDataset(out)
    return {"returncode": r.returncode, "episodes_read": ds.num_episodes, "frames_read": len(ds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=100)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tok = train_tokenizer(tmp / "tok")
    policy = Policy(write_policy_checkpoint(tmp / "ck", "tiny", tok), preset="libero", dtype="float32", seed=0)
    policy.warmup()
    out: dict = {"machine": f"{os.cpu_count()} cores"}
    for hz in (10.0, 50.0):
        runs = {"off": [], "on": []}
        for k in range(2):  # off, on, off, on: side by side
            runs["off"].append(control_loop(policy, hz, a.ticks, a.episodes, None))
            runs["on"].append(control_loop(policy, hz, a.ticks, a.episodes, str(tmp / f"loop{hz:.0f}-{k}")))
        off = statistics.mean(r["busy_ms_mean"] for r in runs["off"])
        on = statistics.mean(r["busy_ms_mean"] for r in runs["on"])
        out[f"loop_{hz:.0f}hz"] = {"busy_ms_off": off, "busy_ms_on": on,
                                   "cost_of_tick_pct": (on - off) / (1000.0 / hz) * 100,
                                   "late_ticks_off": sum(r["late_ticks"] for r in runs["off"]),
                                   "late_ticks_on": sum(r["late_ticks"] for r in runs["on"]),
                                   "recorded": runs["on"][-1]["recorded"]}
    rates = {"off": [], "on": []}
    for k in range(2):
        rates["off"].append(server_rate(policy, a.clients, a.seconds, None)["requests_per_s"])
        rates["on"].append(server_rate(policy, a.clients, a.seconds, str(tmp / f"server-{k}"))["requests_per_s"])
    off, on = statistics.mean(rates["off"]), statistics.mean(rates["on"])
    out["server"] = {"requests_per_s_off": off, "requests_per_s_on": on, "cost_pct": (off - on) / off * 100}
    out["killed_mid_episode"] = killed(tmp)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
