"""Many robots: Policy.infer_batch equals each observation alone; pi0 serve batches requests from all
connections (and explicit batch requests), keeps fixed-seed answers reproducible, and holds under a flooding
client, a vanished client, idle connections and a connection limit."""

import threading
import time
from argparse import Namespace

import numpy as np
import pytest

openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import pi0  # noqa: E402
from pi0.serving import msgpack_numpy  # noqa: E402
from tests.robot.test_lerobot_pipeline import ROOT, TOKENIZER, cases  # noqa: E402
from tests.robot.test_policy import libero_obs  # noqa: E402
from tests.serving.test_server import Running  # noqa: E402


@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_infer_batch_rows_equal_each_alone(backend):
    """Rows with different prompts (lengths), a camera left out, their own noise and their own rtc."""
    pol = pi0.Policy(ROOT / "pi0_default", backend=backend, dtype="float32", tokenizer=TOKENIZER)
    rows = [obs for _, obs, _, _, _ in cases("pi0_default")][:5]
    noise = [np.random.default_rng(i).standard_normal((50, 32)).astype(np.float32) for i in range(5)]
    alone = [pol.infer(o, noise=n) for o, n in zip(rows, noise)]
    rows[1] = {**rows[1], "rtc": {"prev_actions": alone[0]["model_actions"][10:35, :7], "inference_delay": 3}}
    rows[3] = {**rows[3], "rtc": {"prev_actions": alone[2]["model_actions"][5:20], "inference_delay": 0,
                                  "schedule": "exp", "execution_horizon": 8}}
    alone[1] = pol.infer(rows[1], noise=noise[1])
    alone[3] = pol.infer(rows[3], noise=noise[3])
    batched = pol.infer_batch(rows, noise=noise)
    assert [b["policy_timing"]["batch_size"] for b in batched] == [5] * 5
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert np.abs(a["actions"] - b["actions"]).max() <= 1e-5, i
        assert np.abs(a["model_actions"] - b["model_actions"]).max() <= 1e-5, i


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tokenizer_path):
    from tests.conftest import write_policy_checkpoint

    ck = write_policy_checkpoint(tmp_path_factory.mktemp("batch"), "tiny", tokenizer_path)
    return pi0.Policy(ck, preset="libero", dtype="float32", seed=7)


class Counting:
    """The real policy, counting the rows it computes and optionally slow."""

    def __init__(self, policy, delay=0.0):
        self.policy, self.delay, self.metadata, self.rows, self.batches = policy, delay, policy.metadata, 0, []

    def prepare_request(self, obs):
        return self.policy.prepare_request(obs)

    def run_prepared(self, rows):
        time.sleep(self.delay)
        self.rows += len(rows)
        self.batches.append(len(rows))
        return self.policy.run_prepared(rows)

    def warmup(self, batches=(1,)):
        return self.policy.warmup()


def test_concurrent_clients_share_forwards_and_get_their_own_answers(seeded):
    spy = Counting(seeded, delay=0.05)  # a slow model lets requests gather
    s = Running(spy, max_batch=8, batch_wait_ms=20)
    try:
        want = [seeded.infer(libero_obs(i, f"task {i}"))["actions"] for i in range(8)]
        got, sizes = [None] * 8, []

        def robot(i):
            c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
            for _ in range(3):
                r = c.infer(libero_obs(i, f"task {i}"))
                got[i] = r["actions"]
                sizes.append(r["server_timing"]["batch_size"])
                assert r["server_timing"]["queue_ms"] >= 0

        threads = [threading.Thread(target=robot, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for g, w in zip(got, want):
            assert np.abs(g - w).max() <= 1e-5
        assert max(sizes) > 1 and max(spy.batches) <= 8
    finally:
        s.close()


def test_explicit_batch_requests_and_seeded_reproducibility(seeded):
    """{"batch": [...]} gets {"batch": [...]}; a bad row gets an error entry and spoils no other row; with a
    fixed seed the same observation gets the same actions alone, in an explicit batch and in a dynamic one."""
    s = Running(seeded)
    try:
        alone = seeded.infer(libero_obs(3))["actions"]
        with connect(f"ws://127.0.0.1:{s.port}", max_size=None) as ws:
            ws.recv()  # metadata
            bad = {k: v for k, v in libero_obs(4).items() if k != "observation/state"}
            ws.send(msgpack_numpy.packb({"batch": [libero_obs(3), bad, libero_obs(3, "other")]}))
            reply = msgpack_numpy.unpackb(ws.recv())
        rows = reply["batch"]
        assert reply["server_timing"]["batch_size"] == 2 and len(rows) == 3  # the bad row never reaches the model
        assert np.abs(rows[0]["actions"] - alone).max() <= 1e-5
        assert "observation/state" in rows[1]["error"]
        assert rows[2]["actions"].shape == (50, 7)
        c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        assert np.abs(c.infer(libero_obs(3))["actions"] - alone).max() <= 1e-5
    finally:
        s.close()


def _rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


@pytest.mark.serial  # timed: run alone (make test runs these after the parallel part)
def test_a_flooding_client_costs_neither_memory_nor_other_robots_latency(seeded):
    s = Running(seeded, max_message_bytes=1 << 20)
    try:
        c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        c.infer(libero_obs(0))
        base = _rss_mb()
        stop = threading.Event()

        def flood():  # sends ~0.4 MB requests as fast as it can and never reads a reply
            msg = msgpack_numpy.packb(libero_obs(1))
            try:
                with connect(f"ws://127.0.0.1:{s.port}", max_size=None, open_timeout=10) as ws:
                    ws.socket.settimeout(0.5)
                    for _ in range(600):
                        if stop.is_set():
                            break
                        ws.send(msg)
            except Exception:  # noqa: BLE001 - the flood ends when its socket blocks or closes
                pass

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        time.sleep(2.0)
        t0 = time.perf_counter()
        assert c.infer(libero_obs(2))["actions"].shape == (50, 7)
        latency = time.perf_counter() - t0
        grown = _rss_mb() - base
        stop.set()
        t.join(10)
        assert latency < 2.0, latency
        assert grown < 60, f"server memory grew by {grown:.0f} MB under a flooding client"
    finally:
        s.close()


def test_idle_connections_and_the_connection_limit(seeded):
    s = Running(seeded, max_connections=20)
    try:
        idle = [connect(f"ws://127.0.0.1:{s.port}", max_size=None) for _ in range(19)]
        c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)  # the 20th
        assert c.infer(libero_obs(0))["actions"].shape == (50, 7)
        with pytest.raises(InvalidStatus) as e:
            connect(f"ws://127.0.0.1:{s.port}")
        assert e.value.response.status_code == 503 and b"connection limit" in e.value.response.body
        for ws in idle:
            ws.close()
        time.sleep(0.5)
        connect(f"ws://127.0.0.1:{s.port}").close()  # room again
    finally:
        s.close()


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from pi0.cli.serve import api_key

    (tmp_path / "key").write_text("s3cret\n")
    assert api_key(Namespace(api_key_file=str(tmp_path / "key"), api_key=None)) == "s3cret"
    monkeypatch.setenv("PI0_API_KEY", "from-env")
    assert api_key(Namespace(api_key_file=None, api_key=None)) == "from-env"
    monkeypatch.delenv("PI0_API_KEY")
    assert api_key(Namespace(api_key_file=None, api_key="visible")) == "visible"
    assert "visible to every user in `ps`" in capsys.readouterr().err
