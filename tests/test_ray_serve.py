"""`pi0 serve --replicas 2` on Ray Serve (a local Ray instance, tiny weights): openpi's client is answered by
both replicas with the same actions as the policy alone, /healthz goes through Ray's proxy, and SIGTERM
leaves no Ray process behind. Slow (Ray starts in ~30 s on 2 cores)."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve")
openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")

from pi0.policy import Policy  # noqa: E402
from tests.conftest import free_port, wait_healthy, write_policy_checkpoint  # noqa: E402
from tests.test_policy import libero_obs  # noqa: E402


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [p for p in out if "raylet" in p or "gcs_server" in p or p.startswith("ray::")]


@pytest.mark.skipif(bool(_ray_processes()), reason="another Ray instance is running")
def test_two_ray_serve_replicas_answer_openpi_clients_and_stop_cleanly(tmp_path, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path / "ck", "tiny", tokenizer_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pi0.cli", "serve", "--checkpoint", str(ck), "--preset", "libero",
                             "--port", str(port), "--seed", "0", "--dtype", "float32", "--replicas", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, port, 240)
        want = Policy(ck, preset="libero", dtype="float32", seed=0).infer(libero_obs(0))["actions"]
        replicas = set()
        for _ in range(12):
            c = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port)
            assert c.get_server_metadata()["preset"] == "libero"
            r = c.infer(libero_obs(0))
            assert np.abs(r["actions"] - want).max() <= 1e-5
            replicas.add(r["server_timing"]["replica"])
            with pytest.raises(RuntimeError, match="observation/state"):
                c.infer({k: v for k, v in libero_obs(0).items() if k != "observation/state"})
            assert c.infer(libero_obs(0))["actions"].shape == (50, 7)  # the connection lives on
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
        # the single-process server's rules, per replica
        with pytest.raises(RuntimeError, match="bad request: observation/state has 3 values"):
            c.infer({**libero_obs(0), "observation/state": np.zeros(3, np.float32)})
        with pytest.raises(RuntimeError, match="at least 8 px"):
            c.infer({**libero_obs(0), "observation/image": np.zeros((1, 1000, 3), np.uint8)})
        from websockets.sync.client import connect

        from pi0.serving import msgpack_numpy

        with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            ws.recv()
            ws.send(msgpack_numpy.packb({"batch": [libero_obs(i) for i in range(9)]}))
            assert "at most 8" in ws.recv(timeout=60)
            bad = {**libero_obs(1), "observation/state": np.zeros(3, np.float32)}
            ws.send(msgpack_numpy.packb({"batch": [libero_obs(0), bad]}))
            reply = msgpack_numpy.unpackb(ws.recv(timeout=60))
            assert reply["server_timing"]["batch_size"] == 1 and "bad request" in reply["batch"][1]["error"]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        assert "pi0_requests_total" in text and 'replica="' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    time.sleep(2)
    assert not _ray_processes(), _ray_processes()
