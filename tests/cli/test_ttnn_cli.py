"""The TTNN backend through the commands: `pi0 bench --backend ttnn` (op counts per stage, labelled as emulation) and
`pi0 serve --backend ttnn` answering a robot with the reference's actions. Needs ttnn (Python 3.10 / 3.12: `make
test` runs these in .venv-ttnn)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from websockets.sync.client import connect

import pi0
from pi0.serving import msgpack_numpy
from tests.conftest import cli_env, free_port, wait_healthy, write_policy_checkpoint

pytest.importorskip("ttnn", reason="ttnn ships wheels for Python 3.10 and 3.12 only (make test runs these in "
                                  ".venv-ttnn)")


def test_bench_counts_the_ops_of_each_stage_and_says_it_emulates(capsys):
    from pi0.cli.main import main

    assert main(["bench", "--backend", "ttnn", "--size", "tiny-pi05", "--dtype", "bfloat16", "--repeats", "1",
                 "--steps", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ops = rep["ttnn_ops"]
    assert ops["emulated"] and rep["kernels"]["emulated"] and "golden function" in rep["kernels"]["why"]
    cfg = pi0.size_config("tiny-pi05")
    assert ops["stages"]["denoise"]["linear"] == 3 * (9 * cfg.expert.depth + 5)  # adaRMS: 2 norms' dense a layer
    assert set(ops["stages"]) == set(ops["host_s"]) == {"vision", "prefix", "denoise"}
    assert main(["bench", "--backend", "ttnn", "--size", "tiny", "--repeats", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "EMULATED on the host" in out and "ttnn ops  denoise:" in out


def test_serve_with_the_ttnn_backend_answers_as_the_reference(tmp_path, tokenizer_path):
    from pi0.robot.policy import Policy

    ck = write_policy_checkpoint(tmp_path / "ck", "tiny", tokenizer_path)
    obs = {"observation/image": np.full((48, 64, 3), 7, np.uint8),
           "observation/wrist_image": np.full((32, 40, 3), 200, np.uint8),
           "observation/state": np.arange(8, dtype=np.float32), "prompt": "put the cup in the bowl"}
    want = Policy(ck, preset="libero", backend="reference", dtype="float32", seed=0).infer(obs)["actions"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pi0.cli.main", "serve", "--checkpoint", str(ck), "--preset",
                             "libero", "--port", str(port), "--seed", "0", "--backend", "ttnn", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    try:
        wait_healthy(proc, port, 120)
        with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, open_timeout=30) as ws:
            metadata = msgpack_numpy.unpackb(ws.recv())
            ws.send(msgpack_numpy.packb(obs))
            got = msgpack_numpy.unpackb(ws.recv())["actions"]
    finally:
        proc.terminate()
        proc.wait(30)
    assert metadata["preset"] == "libero"
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
