"""Every command the README shows runs, as a user runs it, at tiny size where the README's is full size: the
install lines (pip resolves each extra), the Python snippets, `pi0 serve` reached by openpi's client, fine-tuning
then serving the result, both `pi0 eval`s, `make demo`, and each command of the numbers table. A README command
this file does not know fails the first test: add its runner below."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("metaworld") is None:  # not imported here: pi0.sim picks MuJoCo's GL backend first
    pytest.skip("Meta-World is not installed", allow_module_level=True)
openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")

from tests.conftest import cli_env, free_port, wait_healthy, write_policy_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PI0 = [sys.executable, "-m", "pi0.cli.main"]
# the README's commands at tiny size: one episode of one task for the evaluations, two steps of training
TINY_EVAL = ["--episodes", "1", "--tasks", "drawer-close-v3", "--no-expert"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    """Every shell command the README shows: the lines of its bash blocks and the command column of its tables."""
    out = [line.split("#")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    for row in re.findall(r"^\|.*\|$", README, flags=re.M):
        cells = [c.strip() for c in row.strip("|").split("|")]
        out += [c.strip("`") for c in cells[-1:] if c.startswith("`") and c.endswith("`")]
    return [c for c in out if c]


# pattern of a README command -> how the test runs it (None: run by the test's own setup, or is this suite)
KNOWN = {
    r"make demo": "demo",
    r"make test": None,  # what CI runs: this suite (.ci/run)
    r"pip install -e (\.|'\.\[\w+\]')": "pip",
    r"pi0 serve --checkpoint CKPT --preset libero": "serve",
    r"pi0 train --dataset path/or/hub_repo --init CKPT --out runs/mine --lora 16 --steps 3000": "train",
    r"pi0 serve --checkpoint runs/mine/latest": "serve_trained",
    r"pi0 eval --env metaworld --checkpoint runs/mine/latest --episodes 20": "eval_checkpoint",
    r"pi0 eval --env metaworld --server 127\.0\.0\.1:8000 --rtc --control-hz 10": "eval_server",
    r"pi0 bench .*": "table",
    r"pi0 eval --env metaworld --episodes 20": "table",
    r"python benchmarks/serve_load\.py .*": "table",
    r"python benchmarks/serve_soak\.py .*": "table",
    r"python benchmarks/record_cost\.py.*": "table",
}


def runner(command: str) -> str | None:
    for pattern, name in KNOWN.items():
        if re.fullmatch(pattern, command):
            return name
    raise AssertionError(f"the README shows `{command}`, which tests/test_readme.py does not run: add it to KNOWN")


def test_every_readme_command_has_a_runner():
    found = {runner(c) for c in commands()}
    assert {"demo", "pip", "serve", "train", "serve_trained", "eval_checkpoint", "eval_server"} <= found, found
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_install_lines_resolve():
    for command in commands():
        if runner(command) == "pip":
            target = command.split("-e ", 1)[1].strip("'")
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "-q",
                                "-e", target], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (command, r.stderr[-2000:])


def _serve(*args: str, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([*PI0, *args, "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=cli_env(PI0_NATIVE_BF16="0"))
    try:
        wait_healthy(proc, port, 120)
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    return proc, port


def _run(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=cli_env(PI0_NATIVE_BF16="0"))
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


def _replace(text: str, **words: str) -> str:
    for old, new in words.items():
        text = text.replace(old, new)
    return text


def test_the_readme_runs(tmp_path, tokenizer_path, monkeypatch):
    """In the README's order: the Python snippet, serve + client, fine-tune, serve the result, evaluate it in
    process and through the server (with RTC), ActionStream on that client, then make demo."""
    from tests.robot.test_policy import libero_obs
    from tests.train.test_train import write_dataset

    ckpt = write_policy_checkpoint(tmp_path / "ckpt", "tiny", str(tokenizer_path))
    rng = np.random.default_rng(0)
    img, wrist = (rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2))
    state = rng.normal(size=8).astype(np.float32)
    policy_snippet, client_snippet = blocks("python")
    space = {"img": img, "wrist": wrist, "state": state}
    monkeypatch.setenv("PI0_NATIVE_BF16", "0")  # the README's commands in fp32 (both sides of `auto`: the marked tests)
    exec(_replace(policy_snippet, **{"path/to/checkpoint": str(ckpt)}), space)
    assert space["out"]["actions"].shape == (50, 7)

    cmds = commands()
    serve = next(c for c in cmds if runner(c) == "serve").split()[1:]
    proc, port = _serve(*_replace(" ".join(serve), CKPT=str(ckpt)).split(), log=tmp_path / "serve.log")
    try:
        space = {"observation": libero_obs(0)}
        exec(_replace(client_snippet, **{"port=8000": f"port={port}"}), space)
        assert space["actions"].shape == (50, 7)
    finally:
        proc.terminate()
        proc.wait(30)

    # fine-tune on demonstrations shaped as the Meta-World robot's (4 state values, 4 actions, one camera)
    data = write_dataset(tmp_path / "demos", episodes=4, frames=12, action_dim=4, state_dim=4, size=32,
                         cameras=("observation.images.image",))
    train = next(c for c in cmds if runner(c) == "train").split()[1:]
    mine = tmp_path / "runs" / "mine"
    _run(*PI0, *_replace(" ".join(train), **{"path/or/hub_repo": str(data), "CKPT": str(ckpt),
                                               "runs/mine": str(mine), "--steps 3000": "--steps 2"}).split(),
         "--action-horizon", "5", "--quiet")
    served = next(c for c in cmds if runner(c) == "serve_trained").split()[1:]
    proc, port = _serve(*_replace(" ".join(served), **{"runs/mine": str(mine)}).split(), log=tmp_path / "mine.log")
    try:
        meta = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port).get_server_metadata()
        assert meta["preset"] == "generic" and meta["state_len"] == 4 and meta["action_dim"] == 4
        ev = next(c for c in cmds if runner(c) == "eval_checkpoint").split()[1:]
        args = _replace(" ".join(ev), **{"runs/mine": str(mine), "--episodes 20": ""}).split()
        report = json.loads(_run(*PI0, *args, *TINY_EVAL, "--json").stdout)
        assert report["episodes"] == 1
        ev = next(c for c in cmds if runner(c) == "eval_server").split()[1:]
        args = _replace(" ".join(ev), **{"127.0.0.1:8000": f"127.0.0.1:{port}"}).split()
        report = json.loads(_run(*PI0, *args, *TINY_EVAL, "--json").stdout)
        assert report["episodes"] == 1 and report["rtc"] and report["server"]["preset"] == "generic"
        from pi0.serving.stream import (
            ActionStream,  # the README's inline example, on the served model
        )

        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=port)
        stream = eval(re.search(r"`(pi0\.ActionStream\(client, control_hz=50\))`", README).group(1),
                      {"pi0": __import__("pi0"), "client": client})
        assert isinstance(stream, ActionStream)
        obs = {"observation.images.image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
               "observation.state": np.zeros(4, np.float32), "prompt": "open the drawer"}
        assert stream.next_action(obs).shape == (4,)
        stream.close()
    finally:
        proc.terminate()
        proc.wait(30)

    demo = _run("make", "-C", str(ROOT), "demo", f"ARGS=--episodes 1 --tasks drawer-close-v3 --out-dir {tmp_path / 'demo'}", timeout=900)
    assert "mean" in demo.stdout and (tmp_path / "demo" / "metaworld.mp4").is_file()
    assert json.loads((tmp_path / "demo" / "metaworld_report.json").read_text())["provenance"]["command"]


def _without(words: list[str], *options: str) -> list[str]:
    """words less each of options and the values that follow it (up to the next option)."""
    out, skipping = [], False
    for w in words:
        if w.startswith("--"):
            skipping = w in options
        if not skipping:
            out.append(w)
    return out


def _table() -> list[list[str]]:
    return [c.split() for c in commands() if runner(c) == "table"]


def test_the_numbers_tables_commands_run():
    """Each command of the README's numbers table, at tiny size: `pi0 bench` on the tiny model, the
    shipped model's evaluation on one episode, the load benchmark for a second (its robots: 1 and 2), the soak's
    short form (tests/serving/test_soak.py runs it and checks its bounds), the recorder's cost on a few ticks."""
    table = _table()
    assert table, "the README's numbers table shows no command"
    for words in table:
        if words[:2] == ["pi0", "bench"]:
            out = _run(*PI0, "bench", *_without(words[2:], "--size", "--repeats"), "--size", "tiny", "--json",
                       "--repeats", "1").stdout
            assert json.loads(out)["latency_s"] > 0
        elif words[:2] == ["pi0", "eval"]:
            out = _run(*PI0, *_without(words[1:], "--episodes"), *TINY_EVAL, "--json").stdout
            assert json.loads(out)["episodes"] == 1
        elif "serve_load.py" in words[1]:
            out = _run(sys.executable, *_without(words[1:], "--seconds", "--robots"), "--seconds", "1", "--robots",
                       "1", "2", cwd=ROOT).stdout
            assert len(out.splitlines()) >= 3
        elif "record_cost.py" in words[1]:
            out = _run(sys.executable, *_without(words[1:], "--ticks", "--episodes", "--seconds", "--clients"),
                       "--ticks", "12", "--episodes", "1", "--seconds", "1", "--clients", "1", cwd=ROOT).stdout
            report = json.loads(out)
            assert report["killed_mid_episode"]["episodes_read"] == 3 and "cost_of_tick_pct" in report["loop_50hz"]
        else:
            assert "serve_soak.py" in words[1], words
