"""`pi0 serve --replicas 2` on Ray Serve (a local Ray instance, tiny weights): openpi's clients are spread over both
replicas and answered with the policy's actions, /healthz and /metrics go through Ray's proxy, and SIGTERM leaves
no Ray process behind. Slow (Ray starts in ~30 s on 2 cores). The service's rules under Ray: tests/serving/test_served.py."""

import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve")
openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")

from pi0.robot.policy import Policy  # noqa: E402
from pi0.serving.ray_serve import REPORT_S  # noqa: E402
from tests.conftest import cli_env, free_port, wait_healthy, write_policy_checkpoint  # noqa: E402
from tests.robot.test_policy import libero_obs  # noqa: E402


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [p for p in out if "raylet" in p or "gcs_server" in p or p.startswith("ray::")]


@pytest.mark.xdist_group("ray")  # one Ray instance at a time (tests/serving/test_served.py starts one too)
def test_two_ray_serve_replicas_answer_openpi_clients_and_stop_cleanly(tmp_path, tokenizer_path):
    """Robots connecting at once are spread over the replicas (the fewest connections first), each answered as the
    policy alone answers; /metrics shows every replica's counts; SIGTERM leaves no Ray process."""
    deadline = time.time() + 60
    while _ray_processes():  # another test's Ray instance shutting down
        if time.time() > deadline:
            pytest.skip("another Ray instance is running")
        time.sleep(1)
    ck = write_policy_checkpoint(tmp_path / "ck", "tiny", tokenizer_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pi0.cli.main", "serve", "--checkpoint", str(ck), "--preset", "libero",
                             "--port", str(port), "--seed", "0", "--dtype", "float32", "--replicas", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    try:
        wait_healthy(proc, port, 240)
        want = Policy(ck, preset="libero", dtype="float32", seed=0).infer(libero_obs(0))["actions"]
        clients = [openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port) for _ in range(4)]
        replicas = []
        for c in clients:
            assert c.get_server_metadata()["preset"] == "libero"
            r = c.infer(libero_obs(0))
            assert np.abs(r["actions"] - want).max() <= 1e-5
            replicas.append(r["server_timing"]["replica"])
        assert sorted(replicas.count(r) for r in set(replicas)) == [2, 2], replicas
        with pytest.raises(RuntimeError, match="bad request: observation/state has 3 values"):
            clients[0].infer({**libero_obs(0), "observation/state": np.zeros(3, np.float32)})
        assert clients[0].infer(libero_obs(0))["actions"].shape == (50, 7)  # the connection lives on
        import urllib.request

        time.sleep(REPORT_S + 0.5)  # each replica reports its numbers to the board every REPORT_S
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        ok = {name: float(v) for name, v in re.findall(r'pi0_requests_total\{outcome="ok",replica="(\w+)"\} (\S+)', text)}
        assert set(ok) == set(replicas) and all(ok[r] >= replicas.count(r) for r in ok), (ok, replicas)
        for c in clients:
            c._ws.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    deadline = time.time() + 90  # Ray's workers notice their raylet is gone within seconds, more on a loaded CPU
    while _ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(), _ray_processes()
