"""`pi0 inspect` and `pi0 demo` as a user runs them."""

import json
import subprocess
import sys

import pytest

import pi0


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pi0.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("preset_name,layout,tensors", [
    ("tiny", "openpi", 89), ("tiny", "lerobot", 90), ("tiny", "lerobot_legacy", 90),
    ("tiny-pi05", "openpi", 92), ("tiny-pi05", "lerobot", 93),
])
def test_inspect_json_for_every_layout(tmp_path, preset_name, layout, tensors):
    cfg = pi0.preset(preset_name)
    pi0.build_model(cfg, seed=0).save_pretrained(tmp_path, layout=layout)
    r = run("inspect", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["layout"] == layout
    assert rep["model"] == cfg.kind
    assert rep["num_tensors"] == tensors
    assert rep["num_used_tensors"] == (91 if cfg.pi05 else 88)
    assert pi0.Pi0Config.from_dict(rep["config"]) == cfg
    unused = {"openpi": 1, "lerobot": 2, "lerobot_legacy": 2}[layout]
    assert len(rep["dropped"]) == unused and all("lm_head" in d or "embed_tokens" in d for d in rep["dropped"])
    assert rep["num_params"] > rep["num_used_params"]
    r = run("inspect", str(tmp_path))
    assert r.returncode == 0 and f"{layout} layout" in r.stdout


def test_demo_tiny_prints_stages_and_saves_a_plot(tmp_path):
    out = tmp_path / "actions.png"
    r = run("demo", "--size", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for word in ("vision", "prefix", "denoise", "actions", "[50, 32]"):
        assert word in r.stdout
    assert "weights 100%" in r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_with_a_checkpoint(tmp_path):
    pi0.build_model(pi0.preset("tiny-pi05"), seed=1).save_pretrained(tmp_path / "ck")
    r = run("demo", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "a.png"), "--steps", "3")
    assert r.returncode == 0, r.stderr
    assert "pi05" in r.stdout


def test_bad_path_is_one_clear_line(tmp_path):
    r = run("inspect", str(tmp_path))
    assert r.returncode == 2
    assert "holds no pi0 checkpoint" in r.stderr and "Traceback" not in r.stderr
