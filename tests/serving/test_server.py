"""`pi0 serve` speaks openpi's protocol: the real openpi-client talks to it. Bad input never kills the
server nor the connection; /healthz answers during a long request; the API key is enforced."""

import asyncio
import os
import statistics
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest

openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from pi0.robot.policy import Policy  # noqa: E402
from pi0.serving import msgpack_numpy  # noqa: E402
from pi0.serving.server import PolicyServer  # noqa: E402
from tests.conftest import cli_env, free_port, wait_healthy, write_policy_checkpoint  # noqa: E402
from tests.robot.test_policy import libero_obs  # noqa: E402


class Running:
    """A PolicyServer on an ephemeral loopback port, in a thread, stopped at the end."""

    def __init__(self, policy, wait_ready: bool = True, port: int = 0, **kw):
        self.server = PolicyServer(policy, "127.0.0.1", port, **kw)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.stop = self.loop.create_future()
            ev = asyncio.Event()

            async def main():
                task = asyncio.ensure_future(self.server.serve(ev, self.stop))
                await ev.wait()
                started.set()
                await task

            self.loop.run_until_complete(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.port = self.server.bound_port
        deadline = time.time() + 60
        while wait_ready and not self.server.ready:
            assert time.time() < deadline, "the server's warm-up call did not finish"
            time.sleep(0.05)

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set_result, None)
        self.thread.join(10)


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path_factory.mktemp("serve"), "tiny", tokenizer_path)
    return Policy(ck, preset="libero", dtype="float32", seed=1)


@pytest.fixture(scope="module")
def server(policy):
    s = Running(policy, max_message_bytes=2 << 20)
    yield s
    s.close()


def test_openpi_client_round_trips(server, policy):
    client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    assert client.get_server_metadata() == policy.metadata
    for seed in range(3):
        obs = libero_obs(seed)
        out = client.infer(obs)
        assert np.array_equal(out["actions"], policy.infer(obs)["actions"])
        assert out["policy_timing"]["infer_ms"] > 0 and out["server_timing"]["infer_ms"] > 0
        if seed:
            assert out["server_timing"]["prev_total_ms"] > 0


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_requests_are_prepared_below_the_models_priority(server):
    """Decoding and validation run in threads niced to PREPARE_NICE (or the process's own, if lower still), the model's
    forward at the process's priority: a flood of requests to decode never takes the cores from the forward."""
    from pi0.serving.service import PREPARE_NICE

    client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    client.infer(libero_obs(0))  # the preparing threads exist once a request has been decoded
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    nice = {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threading.enumerate()
            if t.name.startswith(("pi0-prepare", "pi0-infer"))}
    preparing = [n for name, n in nice.items() if name.startswith("pi0-prepare")]
    assert preparing and all(n == max(own, PREPARE_NICE) for n in preparing), nice
    assert nice["pi0-infer"] == own, nice


def test_two_clients_at_once_get_their_own_answers(server, policy):
    prompts = ["pick up the red cup", "open the drawer"]
    want = [policy.infer(libero_obs(i, p))["actions"] for i, p in enumerate(prompts)]
    got = [None, None]

    def worker(i):
        c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        for _ in range(3):
            got[i] = c.infer(libero_obs(i, prompts[i]))["actions"]
            assert np.abs(got[i] - want[i]).max() <= 1e-5  # alone or sharing a batch: the same answer

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(np.abs(g - w).max() <= 1e-5 for g, w in zip(got, want))
    assert not np.allclose(want[0], want[1])


def _arr(data: bytes, dtype: str, shape) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": list(shape)}


def _bad_requests():
    good = libero_obs(0)
    packed = {k: v for k, v in good.items()}

    def with_(key, value):
        return msgpack.packb({**{k: (msgpack_numpy._encode(v) if isinstance(v, np.ndarray) else v) for k, v in packed.items()},
                              key: value})

    return [
        ("malformed msgpack", b"\xc1\xff\x00garbage", "malformed msgpack"),
        ("not a map", msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        ("missing key", msgpack_numpy.packb({k: v for k, v in good.items() if k != "observation/state"}), "observation/state"),
        ("wrong dtype", with_("observation/image", _arr("ab".encode("utf-32-le") * 12, "<U1", (4, 2, 3))), "uint8 or float"),
        ("wrong shape", msgpack_numpy.packb({**good, "observation/image": np.zeros((10, 10, 2), np.uint8)}), "3 channels"),
        ("object dtype", with_("observation/state", _arr(b"\x00" * 64, "|O", (8,))), "object, void or complex"),
        ("void dtype", with_("observation/state", _arr(b"\x00" * 8, "|V8", (1,))), "object, void or complex"),
        ("byte length", with_("observation/state", _arr(b"\x00" * 30, "<f4", (8,))), "needs 32 bytes, got 30"),
        ("NaN state", msgpack_numpy.packb({**good, "observation/state": np.full(8, np.nan, np.float32)}), "NaN"),
        ("infinite state", msgpack_numpy.packb({**good, "observation/state": np.full(8, np.inf, np.float32)}), "infinite"),
        ("tiny image", msgpack_numpy.packb({**good, "observation/image": np.zeros((1, 1, 3), np.uint8)}), "at least 8 px"),
        ("elongated image", msgpack_numpy.packb({**good, "observation/image": np.zeros((1000, 9, 3), np.uint8)}),
         "aspect ratio"),
        ("text frame", "hello", "text frame"),
    ]


def test_every_bad_input_gets_a_text_frame_and_the_connection_lives(server, policy):
    good = libero_obs(0)
    want = policy.infer(good)["actions"]
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
        msgpack_numpy.unpackb(ws.recv())
        for name, payload, needle in _bad_requests():
            ws.send(payload)
            reply = ws.recv(timeout=60)
            assert isinstance(reply, str), name
            assert needle in reply, (name, reply)
            ws.send(msgpack_numpy.packb(good))
            ok = ws.recv(timeout=60)
            assert isinstance(ok, bytes), (name, ok)
            assert np.array_equal(msgpack_numpy.unpackb(ok)["actions"], want)
    # and through openpi's own client: the server's text becomes a RuntimeError, the next call works
    client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    with pytest.raises(RuntimeError, match="observation/wrist_image"):
        client.infer({k: v for k, v in good.items() if k != "observation/wrist_image"})
    assert np.array_equal(client.infer(good)["actions"], want)


class SlowPolicy:
    """The real policy behind a deliberately slow call, to hold the worker busy."""

    def __init__(self, policy, delay):
        self.policy, self.delay, self.metadata = policy, delay, policy.metadata

    def prepare_request(self, obs):
        return self.policy.prepare_request(obs)

    def run_prepared(self, rows):
        time.sleep(self.delay)
        return self.policy.run_prepared(rows)

    def warmup(self, batches=(1,)):
        time.sleep(self.delay)
        return self.policy.warmup()


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_server_warms_up_before_it_reports_ready(policy):
    """/healthz and new connections get 503 while the warm-up call runs, 200 and service after it."""
    s = Running(SlowPolicy(policy, 2.0), wait_ready=False)
    try:
        assert _healthz(s.port) == 503
        with pytest.raises(InvalidStatus) as e:
            openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        assert e.value.response.status_code == 503
        deadline = time.time() + 60
        while not s.server.ready:
            assert time.time() < deadline
            time.sleep(0.05)
        assert _healthz(s.port) == 200
    finally:
        s.close()


def test_warmup_pays_the_first_call_cost(tmp_path, tokenizer_path):
    """After Policy.warmup() the first robot request costs no more than the ones after it."""
    ck = write_policy_checkpoint(tmp_path / "ck", "tiny", tokenizer_path)
    pol = Policy(ck, preset="libero", dtype="float32", seed=0)
    pol.warmup()
    times = [pol.infer(libero_obs(i))["policy_timing"]["infer_ms"] for i in range(4)]
    assert times[0] <= 3 * statistics.median(times[1:]) + 20, times


@pytest.mark.serial  # timed: run alone (make test runs these after the parallel part)
def test_healthz_answers_during_a_long_request(policy):
    s = Running(SlowPolicy(policy, 3.0))
    try:
        result = {}

        def call():
            c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
            result["out"] = c.infer(libero_obs(0))

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.8)
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=5) as r:
            assert r.status == 200 and r.read().strip() == b"OK"
        assert time.perf_counter() - t0 < 1.0
        assert t.is_alive()  # the request is still being computed
        t.join(60)
        assert result["out"]["actions"].shape == (50, 7)
    finally:
        s.close()


def test_api_key_is_enforced(policy):
    s = Running(policy, api_key="s3cret")
    try:
        with pytest.raises(InvalidStatus) as e:
            openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port, api_key="wrong")
        c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port, api_key="s3cret")
        assert c.infer(libero_obs(0))["actions"].shape == (50, 7)
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        s.close()


def test_pi05_policy_over_the_wire(tmp_path, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path / "pi05", "tiny-pi05", tokenizer_path, layout="lerobot")
    pol = Policy(ck, preset="libero", dtype="float32", seed=2)
    s = Running(pol)
    try:
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        assert client.get_server_metadata()["model"] == "pi05"
        obs = libero_obs(4)
        assert np.array_equal(client.infer(obs)["actions"], pol.infer(obs)["actions"])
    finally:
        s.close()


def test_pi0_serve_command(tmp_path, tokenizer_path):
    """`pi0 serve` as a user starts it, reached by openpi's client; stopped with SIGINT/terminate."""
    import subprocess
    import sys

    ck = write_policy_checkpoint(tmp_path / "ck", "tiny", tokenizer_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pi0.cli.main", "serve", "--checkpoint", str(ck), "--preset", "libero",
                             "--port", str(port), "--seed", "0", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    try:
        wait_healthy(proc, port, 120)
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port)
        assert client.get_server_metadata()["preset"] == "libero"
        want = Policy(ck, preset="libero", dtype="float32", seed=0).infer(libero_obs(0))["actions"]
        # the server runs without compiled kernels (cli_env), this process with them: equal to fp32 rounding
        assert np.abs(client.infer(libero_obs(0))["actions"] - want).max() <= 1e-5
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_robot_loop_through_the_server_gets_a_continuous_rtc_stream(server):
    """openpi's client + pi0.ActionStream at 25 Hz against `pi0 serve`: chunks keep coming in the background,
    the leftover goes back as rtc, and the robot never waits after the first chunk."""
    from pi0.serving.stream import ActionStream

    client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    assert client.infer(libero_obs(0))["model_actions"].shape == (50, 32)
    stream = ActionStream(client, control_hz=25, refill_at=25)
    sent = []
    real_infer = client.infer

    def spy(obs):
        sent.append("rtc" in obs)
        return real_infer(obs)

    client.infer = spy
    try:
        for _ in range(90):
            assert stream.next_action(libero_obs(0)).shape == (7,)
            time.sleep(1 / 25)
    finally:
        stream.close()
    assert stream.chunks >= 3 and stream.starved == 0
    assert sent[0] is False and all(sent[1:])  # every request after the first carries the leftover


def test_a_lerobot_checkpoint_is_served_with_lerobots_keys():
    """`pi0 serve` on a LeRobot-saved checkpoint: the robot sends LeRobot's dict (observation.images.<cam>,
    observation.state, task) and gets exactly LeRobot's actions; the metadata lists the expected keys."""
    from tests.robot.test_lerobot_pipeline import ROOT, TOKENIZER, cases

    pol = Policy(ROOT / "pi05_default", dtype="float32", tokenizer=TOKENIZER, seed=0)
    s = Running(pol)
    try:
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        md = client.get_server_metadata()
        assert md["preset"] == "lerobot" and "observation.state" in md["expected_keys"]
        _, obs, _, _, _ = next(cases("pi05_default"))
        assert np.array_equal(client.infer(obs)["actions"], pol.infer(obs)["actions"])
    finally:
        s.close()


@pytest.mark.parametrize("flags,needle", [
    (["--max-inflight-mb", "32"], "--max-inflight-mb 32 cannot admit a single robot"),
    (["--max-message-mb", "0"], "--max-message-mb must be a positive number"),
    (["--max-batch", "0"], "--max-batch must be a positive integer"),
    (["--batch-wait-ms", "-5"], "--batch-wait-ms must be a number from 0"),
    (["--max-errors", "0"], "--max-errors must be a positive integer"),
    (["--rtc-horizon", "0"], "--rtc-horizon must be an integer >= 1"),
    (["--rtc-max-guidance", "nan"], "--rtc-max-guidance must be a finite number > 0"),
])
def test_impossible_settings_refuse_to_start(flags, needle, capsys):
    """Limits that admit no robot and RTC defaults that fail every RTC request stop `pi0 serve` before it loads
    anything (the checkpoint path does not even exist), with the reason."""
    from pi0.cli.main import main

    assert main(["serve", "--checkpoint", "/nonexistent", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
