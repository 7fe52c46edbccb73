"""Checkpoint layouts: real key names and counts, round trips, sharding, the hub cache, and the errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import pi0
from pi0.checkpoint.layouts import file_tensors
from pi0.errors import CheckpointError
from pi0.model.config import canonical_shapes
from tests.conftest import make_noise


def _same(a, b):  # the same weights give the same actions (up to memory-alignment rounding)
    return (a - b).abs().max() <= 1e-5


LAYOUTS = {"tiny": ["openpi", "lerobot", "lerobot_legacy"], "tiny-pi05": ["openpi", "lerobot", "lerobot_legacy"]}


@pytest.mark.parametrize("kind,layout,count", [
    ("pi0", "openpi", 777), ("pi0", "lerobot", 778), ("pi0", "lerobot_legacy", 778),
    ("pi05", "openpi", 812), ("pi05", "lerobot", 813), ("pi05", "lerobot_legacy", 813),
])
def test_full_size_layouts_have_the_real_counts(kind, layout, count):
    cfg = pi0.size_config(kind)
    sd = {k: torch.empty(s, device="meta") for k, s in canonical_shapes(cfg).items()}
    names = file_tensors(sd, cfg, layout)
    assert len(names) == count
    if layout == "lerobot" and kind == "pi0":  # the names LeRobot 0.6.1 itself writes
        spec = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "spec", "pi0_keys_lerobot_0.6.1.txt")
        if os.path.exists(spec):
            with open(spec) as f:
                real = {ln.split("\t")[0]: json.loads(ln.split("\t")[1]) for ln in f if ln.startswith("model.")}
            assert {k: list(v.shape) for k, v in names.items()} == real


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-pi05"])
def test_every_layout_round_trips(tmp_path, preset_name):
    cfg = pi0.size_config(preset_name)
    model = pi0.build_model(cfg, seed=7)
    obs = pi0.sample_observation(cfg, batch_size=2, num_valid_tokens=9)
    noise = make_noise(cfg, 2)
    ref = model.sample_actions(obs, noise=noise)
    full = canonical_shapes(cfg)
    for layout in LAYOUTS[preset_name]:
        d = tmp_path / layout
        pi0.save_model(model, d, layout=layout)
        info = pi0.inspect_checkpoint(d)
        assert info.layout == layout
        assert info.config == cfg
        assert info.num_file_tensors == len(file_tensors(model.state_dict(), cfg, layout))
        assert len(info.canonical) == len(full)
        loaded = pi0.load_model(d)
        assert _same(loaded.sample_actions(obs, noise=noise), ref)


def test_config_is_inferred_from_shapes_not_config_json(tmp_path):
    cfg = pi0.Pi0Config(
        vision=pi0.SiglipConfig(width=24, depth=1, num_heads=4, mlp_dim=40, patch_size=7, image_size=21),
        vlm=pi0.GemmaConfig(width=40, depth=3, mlp_dim=72, num_heads=4, num_kv_heads=1, head_dim=12, vocab_size=77),
        expert=pi0.GemmaConfig(width=20, depth=3, mlp_dim=36, num_heads=4, num_kv_heads=1, head_dim=12),
        action_dim=12, state_dim=10, action_horizon=7, num_steps=4,
    )
    model = pi0.build_model(cfg, seed=1)
    pi0.save_model(model, tmp_path, layout="lerobot")
    meta = json.loads((tmp_path / "config.json").read_text())
    assert "pi0" not in meta  # LeRobot's own fields only: pi0's exact config is beside it, and goes
    (tmp_path / "pi0_config.json").unlink()
    meta.update(paligemma_variant="gemma_2b", some_training_field={"lr": 1e-4}, type="pi0")
    (tmp_path / "config.json").write_text(json.dumps(meta))
    info = pi0.inspect_checkpoint(tmp_path)
    assert info.config == cfg
    obs = pi0.sample_observation(cfg, batch_size=1)
    noise = make_noise(cfg, 1)
    assert _same(pi0.load_model(tmp_path).sample_actions(obs, noise=noise), model.sample_actions(obs, noise=noise))


def test_sharded_and_single_file_and_dtypes(tmp_path):
    cfg = pi0.size_config("tiny")
    model = pi0.build_model(cfg, seed=2)
    obs = pi0.sample_observation(cfg)
    noise = make_noise(cfg, 1)
    ref = model.sample_actions(obs, noise=noise)
    from pi0.checkpoint.save import save_checkpoint

    save_checkpoint(model.state_dict(), cfg, tmp_path / "sharded", layout="lerobot", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _same(pi0.load_model(tmp_path / "sharded").sample_actions(obs, noise=noise), ref)
    pi0.save_model(model, tmp_path / "single")
    assert _same(pi0.load_model(tmp_path / "single" / "model.safetensors").sample_actions(obs, noise=noise), ref)
    # a bf16 file loads as bf16 without an fp32 detour, and as fp32 when asked
    bf = {k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "single" / "model.safetensors").items()}
    (tmp_path / "bf16").mkdir()
    save_file(bf, tmp_path / "bf16" / "model.safetensors")
    m16 = pi0.load_model(tmp_path / "bf16", dtype="bfloat16")
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    m32 = pi0.load_model(tmp_path / "bf16")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    assert (m32.sample_actions(obs, noise=noise) - ref).abs().max() < 0.5  # bf16-rounded weights, same model


def test_lerobot_pi0_time_mlp_names_are_accepted(tmp_path):
    cfg = pi0.size_config("tiny")
    model = pi0.build_model(cfg, seed=4)
    pi0.save_model(model, tmp_path, layout="lerobot")
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    for part in ("in", "out"):
        for p in ("weight", "bias"):
            sd[f"model.time_mlp_{part}.{p}"] = sd.pop(f"model.action_time_mlp_{part}.{p}")
    save_file(sd, f)
    info = pi0.inspect_checkpoint(tmp_path)
    assert not info.config.pi05
    obs = pi0.sample_observation(cfg)
    noise = make_noise(cfg, 1)
    assert _same(pi0.load_model(tmp_path).sample_actions(obs, noise=noise), model.sample_actions(obs, noise=noise))


@pytest.fixture()
def tiny_ckpt(tmp_path):
    cfg = pi0.size_config("tiny")
    pi0.save_model(pi0.build_model(cfg, seed=5), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit(path, fn):
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_tensors_are_counted_and_named(tiny_ckpt):
    gone = ["paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias",
            "paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj.weight"]
    _edit(tiny_ckpt, lambda sd: [sd.pop(k) for k in gone])
    with pytest.raises(CheckpointError, match="missing 2 tensors") as e:
        pi0.load_model(tiny_ckpt)
    assert gone[0] in str(e.value) and "model.safetensors" in str(e.value)


def test_missing_size_probe_is_named(tiny_ckpt):
    k = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.k_proj.weight"
    _edit(tiny_ckpt, lambda sd: sd.pop(k))
    with pytest.raises(CheckpointError, match="missing tensor " + k.replace(".", r"\.")):
        pi0.inspect_checkpoint(tiny_ckpt)


def test_unexpected_tensors_are_named(tiny_ckpt):
    _edit(tiny_ckpt, lambda sd: sd.update({"paligemma_with_expert.paligemma.model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="1 unexpected tensors.*extra_head"):
        pi0.load_model(tiny_ckpt)
    _edit(tiny_ckpt, lambda sd: (sd.pop("paligemma_with_expert.paligemma.model.extra_head.weight"),
                                 sd.update({"paligemma_with_expert.paligemma.model.language_model.layers.5.mlp.up_proj.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointError, match="layers"):
        pi0.load_model(tiny_ckpt)


def test_shape_mismatch_names_tensor_and_shapes(tiny_ckpt):
    k = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj.weight"
    _edit(tiny_ckpt, lambda sd: sd.update({k: torch.zeros(32, 100)}))
    with pytest.raises(CheckpointError, match=rf"{k.replace('.', '[.]')} expected \[32, 128\], found \[32, 100\]"):
        pi0.load_model(tiny_ckpt)


def test_truncated_and_corrupt_files_name_the_path(tiny_ckpt):
    f = tiny_ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        pi0.load_model(tiny_ckpt)
    assert str(f) in str(e.value)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=str(f)):
        pi0.load_model(tiny_ckpt)


def test_directories_without_a_pi0_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no pi0 checkpoint"):
        pi0.load_model(tmp_path / "empty")
    (tmp_path / "orbax" / "params").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no _METADATA file"):
        pi0.load_model(tmp_path / "orbax")
    (tmp_path / "other").mkdir()
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no pi0 tensors"):
        pi0.load_model(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not exist"):
        pi0.load_model(tmp_path / "nowhere")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pi0.cli.main", *args], capture_output=True, text=True, env=env, timeout=120)


def test_hub_repo_id_from_the_huggingface_cache(tmp_path, tiny_ckpt):
    snap = tmp_path / "hf" / "hub" / "models--someone--pi0-tiny" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in tiny_ckpt.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = _cli("inspect", "someone/pi0-tiny", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layout"] == "openpi"
    r = _cli("inspect", "someone/not-cached", env=env)
    assert r.returncode == 2  # nothing is downloaded unless asked
    assert "someone/not-cached" in r.stderr and "--download" in r.stderr and "huggingface-cli download" in r.stderr
    r = _cli("inspect", "someone/not-cached", "--download", env=env)  # asked, but the hub is out of reach
    assert r.returncode == 2 and "could not be downloaded" in r.stderr and "Traceback" not in r.stderr
