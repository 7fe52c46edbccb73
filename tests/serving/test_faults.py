"""Faults and load: bounded work per request, rows validated before the forward, errors that help and leak
nothing (both pipelines), /metrics, the in-flight budget, and a robot side (ActionStream) that survives a server
that errors, hangs, drops the connection or restarts."""

import logging
import threading
import time
import urllib.request

import numpy as np
import pytest

openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
from websockets.sync.client import connect  # noqa: E402

from pi0.errors import BadRequest  # noqa: E402
from pi0.robot.policy import Policy  # noqa: E402
from pi0.serving import msgpack_numpy  # noqa: E402
from pi0.serving.stream import ActionStream, StreamStarved  # noqa: E402
from tests.conftest import free_port, write_policy_checkpoint  # noqa: E402
from tests.robot.test_policy import libero_obs  # noqa: E402
from tests.serving.test_batching import Counting  # noqa: E402
from tests.serving.test_server import Running  # noqa: E402


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path_factory.mktemp("faults"), "tiny", tokenizer_path)
    return Policy(ck, preset="libero", dtype="float32", seed=3)


@pytest.fixture(scope="module")
def lerobot_policy():
    from tests.robot.test_lerobot_pipeline import ROOT, TOKENIZER

    return Policy(ROOT / "pi0_default", dtype="float32", tokenizer=TOKENIZER, seed=0)


def _ask(port: int, payload) -> bytes | str:
    with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
        ws.recv()
        ws.send(payload)
        return ws.recv(timeout=60)


class Faulty:
    """The real policy, whose forward can be made to fail or hang on demand."""

    def __init__(self, policy):
        self.policy, self.metadata = policy, policy.metadata
        self.fail, self.delay, self.forwards = False, 0.0, 0

    def prepare_request(self, obs):
        return self.policy.prepare_request(obs)

    def run_prepared(self, rows):
        self.forwards += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("a CUDA error, say")
        return self.policy.run_prepared(rows)

    def warmup(self, batches=(1,)):
        return self.policy.warmup()


# ---------------------------------------------------------------------------------------------
# The server


def test_batches_are_capped_and_bad_rows_never_cost_a_forward(policy):
    spy = Counting(policy)
    s = Running(spy, max_batch=4)
    try:
        reply = _ask(s.port, msgpack_numpy.packb({"batch": [libero_obs(i) for i in range(5)]}))
        assert isinstance(reply, str) and "at most 4" in reply and "--max-batch" in reply
        bad = {**libero_obs(1), "observation/state": np.zeros(3, np.float32)}
        before = len(spy.batches)
        reply = msgpack_numpy.unpackb(_ask(s.port, msgpack_numpy.packb({"batch": [libero_obs(0), bad, libero_obs(2)]})))
        assert spy.batches[before:] == [2]  # one forward, of the two good rows
        assert "8" in reply["batch"][1]["error"] and "bad request" in reply["batch"][1]["error"]
        assert reply["batch"][0]["actions"].shape == (50, 7) and reply["batch"][2]["actions"].shape == (50, 7)
    finally:
        s.close()


def test_internal_errors_get_an_id_and_the_traceback_stays_in_the_log(policy, caplog):
    faulty = Faulty(policy)
    s = Running(faulty)
    try:
        faulty.fail = True
        with caplog.at_level(logging.ERROR, logger="pi0.serve"):
            reply = _ask(s.port, msgpack_numpy.packb(libero_obs(0)))
        assert isinstance(reply, str) and reply.startswith("internal error ") and "Traceback" not in reply
        assert "CUDA" not in reply and ".py" not in reply  # nothing of the server's insides
        error_id = reply.split()[2]
        logged = [r for r in caplog.records if error_id in r.getMessage()]
        assert logged and logged[0].exc_info is not None
        forwards = faulty.forwards
        reply = msgpack_numpy.unpackb(_ask(s.port, msgpack_numpy.packb({"batch": [libero_obs(0), libero_obs(1)]})))
        assert faulty.forwards == forwards + 1  # a failed batch is not rerun row by row
        assert all(r["error"].startswith("internal error") for r in reply["batch"])
        faulty.fail = False
        assert isinstance(_ask(s.port, msgpack_numpy.packb(libero_obs(0))), bytes)
    finally:
        s.close()


LEROBOT_BAD = [
    ("state of 14", lambda o: {**o, "observation.state": np.zeros(14, np.float32)}, "observation.state has 14 values"),
    ("state of 3", lambda o: {**o, "observation.state": np.zeros(3, np.float32)}, "observation.state has 3 values"),
    ("1 x 1000 image", lambda o: {**o, "observation.images.base": np.zeros((1, 1000, 3), np.uint8)}, "1 x 1000 px"),
    ("1000 x 1 image", lambda o: {**o, "observation.images.base": np.zeros((1000, 1, 3), np.uint8)}, "1000 x 1 px"),
    ("no task", lambda o: {k: v for k, v in o.items() if k != "task"}, "task"),
    ("task not a str", lambda o: {**o, "task": 7}, "task must be a str"),
]


def test_the_lerobot_pipeline_names_bad_input_without_a_traceback(lerobot_policy):
    from tests.robot.test_lerobot_pipeline import cases

    _, good, _, _, _ = next(cases("pi0_default"))
    s = Running(lerobot_policy)
    try:
        for name, bad, needle in LEROBOT_BAD:
            reply = _ask(s.port, msgpack_numpy.packb(bad(good)))
            assert isinstance(reply, str) and reply.startswith("bad request: ") and needle in reply, (name, reply)
        assert isinstance(_ask(s.port, msgpack_numpy.packb(good)), bytes)
    finally:
        s.close()


def _mutations(good: dict, rng: np.random.Generator):
    """Random ways to get an observation wrong: drop, retype, reshape, poison a value."""
    keys = list(good)
    values = [None, 3, "text", b"bytes", [1, 2], {"a": 1}, np.float32(np.nan), np.zeros(0), np.zeros((2, 2)),
              np.full(8, np.inf, np.float32), np.zeros((1, 1, 3), np.uint8), np.zeros((500, 2, 3), np.uint8),
              np.zeros((64, 64, 4), np.uint8), np.full((64, 64, 3), 2.0, np.float32), np.array(["x"]),
              np.zeros(99, np.float32), np.zeros((3, 3), np.int64)]
    for _ in range(150):
        obs = dict(good)
        for _ in range(rng.integers(1, 3)):
            key = keys[rng.integers(len(keys))]
            if rng.random() < 0.3:
                obs.pop(key, None)
            else:
                obs[key] = values[rng.integers(len(values))]
        yield obs


@pytest.mark.parametrize("which", ["openpi", "lerobot"])
def test_fuzzed_observations_are_bad_requests_never_crashes(which, policy, lerobot_policy):
    """Both pipelines: every malformed observation raises BadRequest (named), never another exception."""
    from tests.robot.test_lerobot_pipeline import cases

    pol = policy if which == "openpi" else lerobot_policy
    good = libero_obs(0) if which == "openpi" else next(cases("pi0_default"))[1]
    rng = np.random.default_rng(0)
    failures = 0
    for obs in _mutations(good, rng):
        try:
            pol.prepare_request(obs)
        except BadRequest:
            failures += 1
    assert failures >= 100


def test_metrics_content_type_and_json_logs(policy):
    """/metrics is Prometheus text (what each stage observes: tests/serving/test_served.py, for both servers)."""
    s = Running(policy)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=10) as r:
            text = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain")
        for needle in ("pi0_connections", "pi0_inflight_bytes", "process_resident_memory_bytes", "pi0_gpu_memory_bytes"):
            assert needle in text, needle
    finally:
        s.close()
    from pi0.serving.logs import JsonFormatter

    record = logging.LogRecord("pi0.serve", logging.WARNING, __file__, 1, "bad request: %s", ("x",), None)
    import json

    assert json.loads(JsonFormatter().format(record))["message"] == "bad request: x"


# ---------------------------------------------------------------------------------------------
# The robot side


def _loop(stream: ActionStream, ticks: int, hz: float, obs=None) -> list[float]:
    """A control loop at hz; returns how long each next_action took."""
    took = []
    for i in range(ticks):
        t = time.perf_counter()
        stream.next_action(obs or libero_obs(0))
        took.append(time.perf_counter() - t)
        time.sleep(max(0.0, 1 / hz - took[-1]))
    return took


@pytest.mark.serial  # timed: run alone (make test runs these after the parallel part)
def test_the_stream_survives_a_failing_and_a_hanging_server(policy):
    faulty = Faulty(policy)
    s = Running(faulty)
    seen = []
    try:
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        stream = ActionStream(client, control_hz=50, refill_at=40, timeout_s=0.5, on_error=seen.append,
                              backoff_s=(0.05, 0.2))
        stream.next_action(libero_obs(0))  # the first chunk
        faulty.fail = True
        took = _loop(stream, 60, 50)
        assert stream.errors >= 1 and len(seen) == stream.errors  # each failure reported once
        assert max(took[1:]) < 1 / 50, max(took)  # never blocks the loop
        faulty.fail, faulty.delay = False, 2.0  # now it hangs
        took = _loop(stream, 60, 50)
        assert any(isinstance(e, TimeoutError) for e in seen) and max(took) < 1 / 50
        faulty.delay = 0.0
        chunks = stream.chunks
        _loop(stream, 150, 50)
        assert stream.chunks > chunks  # back to fresh chunks
        stream.close()
    finally:
        s.close()


@pytest.mark.serial  # timed: run alone (make test runs these after the parallel part)
def test_the_stream_reconnects_through_a_server_restart_and_keeps_50_hz(policy):
    port = free_port()
    s = Running(policy, port=port)
    stream = ActionStream.connect("127.0.0.1", port, control_hz=50, timeout_s=1.0, backoff_s=(0.05, 0.5))
    try:
        stream.next_action(libero_obs(0))
        late = []
        restarted = threading.Event()

        def restart():
            nonlocal s
            s.close()  # the server goes away mid-stream, requests in flight included
            time.sleep(0.5)
            s = Running(policy, port=port)
            restarted.set()

        t = threading.Thread(target=restart)
        t.start()
        took = _loop(stream, 250, 50)
        t.join(60)
        assert restarted.is_set()
        late = [x for x in took if x > 1 / 50]
        assert not late, f"{len(late)} ticks over 20 ms (worst {max(took) * 1000:.0f} ms)"
        assert stream.errors >= 1
        chunks = stream.chunks
        _loop(stream, 150, 50)
        assert stream.chunks > chunks  # chunks come from the restarted server
    finally:
        stream.close()
        s.close()


def test_a_dry_queue_can_raise_instead_of_holding():
    class Never:
        def infer(self, obs):
            time.sleep(10)

    class Once:
        def __init__(self):
            self.calls = 0

        def infer(self, obs):
            self.calls += 1
            if self.calls > 1:
                time.sleep(10)
            return {"actions": np.zeros((4, 2), np.float32)}

    with pytest.raises(StreamStarved, match="no first chunk within 0.3 s"):
        ActionStream(Never(), control_hz=50, timeout_s=0.3).next_action({})
    stream = ActionStream(Once(), control_hz=50, on_empty="raise", timeout_s=5)
    for _ in range(4):
        stream.next_action({})
    with pytest.raises(StreamStarved, match="next chunk has not arrived"):
        stream.next_action({})
    held = ActionStream(Once(), control_hz=50, timeout_s=5)
    for _ in range(6):
        assert held.next_action({}).shape == (2,)
    assert held.starved == 2
