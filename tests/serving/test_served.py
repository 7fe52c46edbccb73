"""The same service rules, checked against both servers: `pi0 serve` (websockets, in this process) and a Ray Serve
deployment (a local Ray instance, one replica per limit profile): the frame limit, the connection limit, the
in-flight budget, a vanished client's request dropped, internal errors answered with an id only, bad requests in a
row held back and then cut off, batched rows equal to each row alone, and /metrics observing every stage."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from pi0.serving import msgpack_numpy  # noqa: E402
from pi0.serving.metrics import STAGES  # noqa: E402
from tests.conftest import cli_env, free_port, write_policy_checkpoint  # noqa: E402
from tests.robot.test_policy import libero_obs  # noqa: E402
from tests.served import PROFILES, refusal, switchable  # noqa: E402
from tests.serving.test_server import Running  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray instance at a time, on one worker


@dataclasses.dataclass
class Served:
    kind: str
    ports: dict[str, int]
    paths: dict[str, str]

    def url(self, profile: str) -> str:
        return f"ws://127.0.0.1:{self.ports[profile]}{self.paths[profile]}/"

    def refusal(self, profile: str) -> str | None:
        return refusal(self.ports[profile], self.paths[profile] + "/")

    @contextlib.contextmanager
    def client(self):
        """openpi's client, unchanged (it knows no path: the budget profile is served at /), closed after."""
        c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=self.ports["budget"])
        try:
            yield c
        finally:
            c._ws.close()

    def metrics(self, profile: str) -> str:
        base = f"http://127.0.0.1:{self.ports[profile]}{self.paths[profile]}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
            return r.read().decode()


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [p for p in out if "raylet" in p or "gcs_server" in p or p.startswith("ray::")]


@pytest.fixture(scope="module", params=["single", "ray"])
def served(request, tmp_path_factory, tokenizer_path):
    ck = str(write_policy_checkpoint(tmp_path_factory.mktemp("served"), "tiny", tokenizer_path))
    if request.param == "single":
        policy = switchable(ck)
        servers = {name: Running(policy, **dataclasses.asdict(limits)) for name, limits in PROFILES.items()}
        yield Served("single", {n: s.port for n, s in servers.items()}, {n: "" for n in servers})
        for s in servers.values():
            s.close()
        return
    pytest.importorskip("ray.serve")
    deadline = time.time() + 60
    while _ray_processes():  # another test's Ray instance shutting down
        if time.time() > deadline:
            pytest.skip("another Ray instance is running")
        time.sleep(1)
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "ray_deploy.log"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "ray_deploy.py"), ck, str(port)],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=cli_env(),
                            start_new_session=True)  # Ray's processes in a group of their own: stopped at once
    try:
        line = proc.stdout.readline()  # once every replica has been reached through the proxy
        assert line, f"the Ray deployment did not come up (exit {proc.wait(60)}): {log.read_text()[-3000:]}"
        paths = json.loads(line)["paths"]
        yield Served("ray", {n: port for n in PROFILES}, paths)
    finally:
        # SIGKILL to the whole group: ray_deploy.py's orderly stop takes a minute on 2 cores, and what it tears down
        # (`pi0 serve --replicas` on SIGTERM) is tests/serving/test_ray_serve.py's to test
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 90
        while _ray_processes() and time.time() < deadline:
            time.sleep(0.5)


def _ask(url: str, payload, timeout: float = 60):
    with connect(url, max_size=None, compression=None, open_timeout=30) as ws:
        ws.recv()
        ws.send(payload)
        return ws.recv(timeout=timeout)


def _count(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus counter's samples whose labels include `labels` (every replica's)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_oversized_frames_close_the_connection(served):
    with connect(served.url("budget"), max_size=None, open_timeout=30) as ws:
        ws.recv()
        ws.send(b"\x00" * (2 << 20))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=60)
    assert e.value.rcvd.code == 1009  # message too big
    assert isinstance(_ask(served.url("budget"), msgpack_numpy.packb(libero_obs(0))), bytes)


def test_the_connection_limit_refuses_with_a_reason(served):
    first = connect(served.url("connections"), max_size=None, open_timeout=30)
    first.recv()
    other = connect(served.url("connections"), max_size=None, open_timeout=30)
    other.recv()  # the limit (2) is reached
    try:
        why = served.refusal("connections")
        assert why is not None and "connection limit" in why and "--max-connections" in why, why
        first.send(msgpack_numpy.packb(libero_obs(0)))
        assert isinstance(first.recv(timeout=60), bytes)  # the connected are served
    finally:
        first.close()
        other.close()
    time.sleep(1.0)
    assert served.refusal("connections") is None  # room again
    assert _count(served.metrics("connections"), "pi0_connections_refused_total", reason="limit") >= 1


def test_the_in_flight_budget_refuses_a_connection_that_does_not_fit(served):
    # each connection reserves 3 MiB of the 6.5: two fit, a third does not; the two are never refused a request
    first = connect(served.url("budget"), max_size=None, open_timeout=30)
    first.recv()
    second = connect(served.url("budget"), max_size=None, open_timeout=30)
    second.recv()
    try:
        why = served.refusal("budget")
        assert why is not None and "--max-inflight-mb" in why, why
        second.send(msgpack_numpy.packb({**libero_obs(0), "pad": np.zeros(600 << 10, np.uint8)}))
        first.send(msgpack_numpy.packb(libero_obs(0)))
        assert isinstance(first.recv(timeout=60), bytes) and isinstance(second.recv(timeout=60), bytes)
    finally:
        first.close()
        second.close()
    time.sleep(1.0)
    assert served.refusal("budget") is None


def test_a_vanished_clients_queued_request_is_dropped(served):
    before = _count(served.metrics("budget"), "pi0_requests_total", outcome="dropped")
    busy = threading.Thread(target=_ask, args=(served.url("budget"),
                                               msgpack_numpy.packb({**libero_obs(0), "test/delay_s": 1.5})))
    busy.start()
    time.sleep(0.5)  # the first request holds the model for 1.5 s
    ws = connect(served.url("budget"), max_size=None, open_timeout=30)
    ws.recv()
    ws.send(msgpack_numpy.packb(libero_obs(1)))  # queued behind it ...
    time.sleep(0.3)
    ws.close()  # ... and abandoned
    busy.join(60)
    deadline = time.time() + 20
    while _count(served.metrics("budget"), "pi0_requests_total", outcome="dropped") <= before:
        assert time.time() < deadline, "the abandoned request was not dropped"
        time.sleep(0.5)


def test_internal_errors_get_an_id_only(served):
    reply = _ask(served.url("budget"), msgpack_numpy.packb({**libero_obs(0), "test/fail": True}))
    assert isinstance(reply, str) and re.match(r"internal error [0-9a-f]{12} ", reply), reply
    assert "CUDA" not in reply and "Traceback" not in reply and ".py" not in reply
    assert isinstance(_ask(served.url("budget"), msgpack_numpy.packb(libero_obs(0))), bytes)


def test_bad_requests_in_a_row_are_held_back_then_cut_off(served):
    """Limit 4 in a row (the profiles'): the first 2 answered at once, the next ones after a back-off, the 4th
    closes the connection with a reason; a good request in between starts the count again."""
    bad = msgpack_numpy.packb({**libero_obs(0), "observation/state": np.zeros(3, np.float32)})
    good = msgpack_numpy.packb(libero_obs(0))
    with connect(served.url("budget"), max_size=None, open_timeout=30) as ws:
        ws.recv()
        took = []
        for i in range(3):
            t = time.perf_counter()
            ws.send(bad)
            assert ws.recv(timeout=30).startswith("bad request: observation/state has 3 values")
            took.append(time.perf_counter() - t)
        ws.send(good)  # read only after the 3rd error's back-off (50 ms), and it resets the count
        t = time.perf_counter()
        assert isinstance(ws.recv(timeout=30), bytes)
        for _ in range(3):
            ws.send(bad)
            assert ws.recv(timeout=30).startswith("bad request")
        ws.send(bad)
        assert ws.recv(timeout=30).startswith("bad request")  # the 4th in a row: answered, then closed
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
    assert e.value.rcvd.code == 1008 and "4 bad requests in a row" in e.value.rcvd.reason
    text = served.metrics("budget")
    assert _count(text, "pi0_connections_refused_total", reason="errors") >= 1
    assert _count(text, "pi0_held_back_seconds_total") >= 0.05


def test_batched_rows_equal_each_alone(served):
    """An explicit batch, and a dynamic batch of two robots (openpi's client) that wait together, give each row
    the answer it gets alone (the seeded policy's noise)."""
    alone = [msgpack_numpy.unpackb(_ask(served.url("budget"), msgpack_numpy.packb(libero_obs(i))))["actions"]
             for i in range(2)]
    reply = msgpack_numpy.unpackb(_ask(served.url("budget"),
                                       msgpack_numpy.packb({"batch": [libero_obs(i) for i in range(2)]})))
    assert reply["server_timing"]["batch_size"] == 2
    for i in range(2):
        assert np.abs(reply["batch"][i]["actions"] - alone[i]).max() <= 1e-5
    # two robots connected, then sending at once: the model waits up to the profile's batch_wait_ms for the second
    for _ in range(3):  # unless a loaded CPU delays one past it
        got: list = [None] * 2
        connected = threading.Barrier(2)

        def robot(i):
            try:
                with served.client() as c:
                    connected.wait(60)
                    got[i] = c.infer(libero_obs(i))
            except Exception as e:  # noqa: BLE001 - shown by the assertion below
                got[i] = e

        threads = [threading.Thread(target=robot, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(isinstance(g, dict) for g in got), got
        if [g["server_timing"]["batch_size"] for g in got] == [2, 2]:
            break
    assert [g["server_timing"]["batch_size"] for g in got] == [2, 2], [g["server_timing"] for g in got]
    for i in range(2):
        assert np.abs(got[i]["actions"] - alone[i]).max() <= 1e-5


def test_metrics_observe_every_stage_and_queue(served):
    """Each stage's histogram counts the requests answered since (the series exist at 0 from the start: a test
    that only looks for their names passes with every observation removed)."""
    before = served.metrics("budget")
    with served.client() as client:
        for i in range(2):
            client.infer(libero_obs(i))
    after = served.metrics("budget")
    for stage in STAGES:
        grew = _count(after, "pi0_stage_seconds_count", stage=stage) - _count(before, "pi0_stage_seconds_count",
                                                                                stage=stage)
        assert grew >= 2, (stage, grew)
    assert _count(after, "pi0_requests_total", outcome="ok") - _count(before, "pi0_requests_total", outcome="ok") >= 2
    assert _count(after, "pi0_batch_rows_count") > _count(before, "pi0_batch_rows_count")
