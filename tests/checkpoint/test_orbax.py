"""openpi's Orbax checkpoints read without JAX: released and training layouts, bf16 / fp32 / mixed leaves,
one or several chunks, the same actions as the same weights in openpi's safetensors layout, `pi0 convert`,
`pi0 inspect`, gs:// names, norm stats under nested asset ids, and one clear error per kind of bad input."""

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import pi0
from pi0.errors import CheckpointError
from tests.conftest import cli_env, make_noise, make_obs, write_policy_checkpoint
from tests.orbax_writer import jax_tree, write_orbax

pytest.importorskip("tensorstore")

TINY_2HEADS = pi0.Pi0Config(  # a SigLIP head count (2) that no width rule would guess; VLM width != heads x head_dim
    vision=pi0.SiglipConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=14, image_size=28),
    vlm=pi0.GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16, vocab_size=500),
    expert=pi0.GemmaConfig(width=32, depth=2, mlp_dim=96, num_heads=8, num_kv_heads=1, head_dim=16),
)


def bf16_rounded(cfg: pi0.Pi0Config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights already rounded to bf16 (as openpi releases them), held in fp32."""
    return {k: v.to(torch.bfloat16).float() for k, v in pi0.build_model(cfg, seed=seed).state_dict().items()}


def reference_of(cfg: pi0.Pi0Config, state: dict[str, torch.Tensor]):
    model = pi0.build_model(cfg, seed=0)
    model.load_state_dict(state)
    return model


def load_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pi0.load_model(path, **kw)


@pytest.mark.parametrize("cfg", [TINY_2HEADS, pi0.size_config("tiny-pi05")], ids=["pi0", "pi05"])
@pytest.mark.parametrize("training,chunks", [(False, 1), (True, 3)], ids=["released", "training-3chunks"])
def test_orbax_loads_the_same_model_as_safetensors(tmp_path, cfg, training, chunks):
    state = bf16_rounded(cfg, 7)
    # training saves mix dtypes: trainable leaves fp32, frozen ones bf16
    dtype_of = (lambda n: "float32" if "llm" in n else "bfloat16") if training else (lambda n: "bfloat16")
    root = tmp_path / ("step_1000" if training else "release")
    write_orbax(root / "params", jax_tree(state, cfg), training=training, dtype_of=dtype_of, chunks=chunks)
    info = pi0.inspect_checkpoint(root, action_horizon=cfg.action_horizon)
    assert info.layout == "openpi_orbax" and info.config == cfg  # SigLIP's 2 heads read off the shapes
    assert info.num_file_tensors == (51 if cfg.pi05 else 50)
    want = reference_of(cfg, state)
    obs, noise = make_obs(cfg, 2, (5, 9), ((1, 0),)), make_noise(cfg, 2)
    expected = want.sample_actions(obs, noise=noise)
    for backend in ("reference", "engine"):
        got = load_quiet(root, backend=backend).sample_actions(obs, noise=noise)
        assert (got - expected).abs().max() <= (0 if backend == "reference" else 1e-4)
    # the same weights saved as openpi-converted safetensors give the same actions, bit for bit, at each dtype
    pi0.save_model(want, tmp_path / "st", layout="openpi")
    for dtype in ("float32", "bfloat16"):
        a = load_quiet(root, backend="engine", dtype=dtype).sample_actions(obs, noise=noise)
        b = load_quiet(tmp_path / "st", backend="engine", dtype=dtype).sample_actions(obs, noise=noise)
        assert torch.equal(a, b), dtype
    # params/ itself is accepted too
    assert pi0.inspect_checkpoint(root / "params", action_horizon=50).layout == "openpi_orbax"


def test_horizon_and_token_length_are_assumed_out_loud(tmp_path):
    cfg = pi0.size_config("tiny")
    write_orbax(tmp_path / "ck" / "params", jax_tree(bf16_rounded(cfg, 1), cfg))
    with pytest.warns(UserWarning, match="action_horizon 50 assumed"):
        info = pi0.inspect_checkpoint(tmp_path / "ck")
    assert info.config.action_horizon == 50 and info.config.max_token_len == 48
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = pi0.load_model(tmp_path / "ck", backend="engine", action_horizon=10)
    assert not any("action_horizon" in str(x.message) for x in w)
    obs = make_obs(model.config, 1, (6,))
    assert model.sample_actions(obs).shape == (1, 10, 32)
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"action_horizon": 15, "max_token_len": 48}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pi0.inspect_checkpoint(tmp_path / "ck").config.action_horizon == 15


def test_loading_imports_no_jax(tmp_path):
    cfg = pi0.size_config("tiny")
    write_orbax(tmp_path / "ck" / "params", jax_tree(bf16_rounded(cfg, 1), cfg))
    code = ("import sys, warnings; warnings.simplefilter('ignore'); import pi0; "
            f"m = pi0.load_model({str(tmp_path / 'ck')!r}, backend='engine'); "
            "bad = [n for n in ('jax', 'flax', 'orbax', 'orbax.checkpoint') if n in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _cli(*args, **env):

    return subprocess.run([sys.executable, "-m", "pi0.cli.main", *args], capture_output=True, text=True, timeout=300,
                          env=cli_env(**env))


def test_convert_orbax_to_openpi_and_inspect(tmp_path, tokenizer_path):
    cfg = TINY_2HEADS
    state = bf16_rounded(cfg, 4)
    src = tmp_path / "pi0_libero"
    write_orbax(src / "params", jax_tree(state, cfg), chunks=2)
    stats = {"norm_stats": {"state": {"mean": [0.1] * 8, "std": [1.0] * 8, "q01": None, "q99": None},
                            "actions": {"mean": [0.0] * 7, "std": [2.0] * 7, "q01": None, "q99": None}}}
    (src / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    (src / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text(json.dumps(stats))

    r = _cli("inspect", str(src), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["layout"] == "openpi_orbax" and rep["dtypes"] == {"bfloat16": 50}
    assert rep["chunking"]["arrays"] == 50 and rep["chunking"]["several_chunks"] > 0
    assert rep["assets"] == {"physical-intelligence/libero": {"state": 8, "actions": 7}}
    assert "action_horizon 50 assumed" in r.stderr
    r = _cli("inspect", str(src))
    assert "openpi_orbax layout" in r.stdout and "physical-intelligence/libero" in r.stdout

    r = _cli("convert", str(src), str(tmp_path / "out"), "--action-horizon", "10")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(next(iter(keys))).dtype == torch.bfloat16  # the source's dtype by default
    # openpi's converter's names and count: the VLM embedding only as the lm_head, plus the expert's lm_head
    from pi0.checkpoint.layouts import file_tensors

    assert keys == set(file_tensors(state, cfg, "openpi"))
    assert "paligemma_with_expert.paligemma.lm_head.weight" in keys and len(keys) == 89
    assert (out / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").exists()
    assert json.loads((out / "config.json").read_text())["action_horizon"] == 10
    back = pi0.inspect_checkpoint(out)
    assert back.layout == "openpi" and back.config == pi0.Pi0Config(**{**back.config.__dict__, "action_horizon": 10})
    obs, noise = make_obs(cfg, 1, (7,)), torch.randn(1, 10, 32)
    a = load_quiet(src, action_horizon=10).sample_actions(obs, noise=noise)
    b = pi0.load_model(out).sample_actions(obs, noise=noise)
    assert torch.equal(a, b)
    assert _cli("convert", str(src), str(out)).returncode == 2  # never over an existing checkpoint


def test_policy_over_an_orbax_checkpoint_with_a_nested_asset_id(tmp_path, tokenizer_path):
    st = write_policy_checkpoint(tmp_path / "st", "tiny", tokenizer_path)  # openpi safetensors + assets/robot
    src = tmp_path / "orbax"
    model = pi0.load_model(st)
    write_orbax(src / "params", jax_tree(model.state_dict(), model.config), dtype_of=lambda n: "float32")
    (src / "assets" / "org" / "robot").mkdir(parents=True)
    shutil.copy(st / "assets" / "robot" / "norm_stats.json", src / "assets" / "org" / "robot" / "norm_stats.json")
    from tests.robot.test_policy import libero_obs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pol = pi0.Policy(src, preset="libero", dtype="float32", seed=0, tokenizer=tokenizer_path)
    want = pi0.Policy(st, preset="libero", dtype="float32", seed=0).infer(libero_obs(0))["actions"]
    assert np.array_equal(pol.infer(libero_obs(0))["actions"], want)
    assert pol.metadata["norm_stats"].endswith("org/robot/norm_stats.json")
    openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
    from tests.serving.test_server import Running

    s = Running(pol)  # served over openpi's protocol, no JAX anywhere
    try:
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        assert np.array_equal(client.infer(libero_obs(0))["actions"], want)
    finally:
        s.close()
    shutil.copytree(src / "assets" / "org", src / "assets" / "other")
    with pytest.raises(ValueError, match="other/robot.*org/robot|org/robot.*other/robot"):
        pi0.Policy(src, preset="libero", tokenizer=tokenizer_path)
    pol = pi0.Policy(src, preset="libero", dtype="float32", tokenizer=tokenizer_path, asset_id="org/robot")
    assert pol.metadata["norm_stats"].endswith("org/robot/norm_stats.json")


def test_gs_names_resolve_to_openpis_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"gsutil -m cp -r gs://openpi-assets/checkpoints/pi05_droid "):
        pi0.inspect_checkpoint("gs://openpi-assets/checkpoints/pi05_droid")
    cfg = pi0.size_config("tiny-pi05")
    write_orbax(tmp_path / "openpi-assets" / "checkpoints" / "pi05_droid" / "params", jax_tree(bf16_rounded(cfg, 2), cfg))
    info = pi0.inspect_checkpoint("gs://openpi-assets/checkpoints/pi05_droid", action_horizon=15)
    assert info.layout == "openpi_orbax" and info.config.pi05 and info.config.action_horizon == 15


def test_bad_orbax_checkpoints_get_one_clear_error_each(tmp_path):
    cfg = pi0.size_config("tiny")
    leaves = jax_tree(bf16_rounded(cfg, 1), cfg)

    def fresh(name, tree=leaves):
        d = tmp_path / name
        write_orbax(d / "params", tree)
        return d

    d = fresh("no_metadata")
    (d / "params" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match="no _METADATA file"):
        pi0.inspect_checkpoint(d)

    d = fresh("corrupt")
    for f in (d / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated database files
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pi0.load_model(d, action_horizon=50)

    bad = dict(leaves)
    bad["PaliGemma/llm/layers/mlp/linear"] = bad["PaliGemma/llm/layers/mlp/linear"][:, :-1]
    with pytest.raises(CheckpointError, match="PaliGemma.llm.layers.mlp.linear"):
        pi0.inspect_checkpoint(fresh("wrong_shape", bad), action_horizon=50)

    fast = {k: v for k, v in leaves.items()  # no expert ("_1" under llm/) and no action heads
            if not (k.startswith("PaliGemma/llm/") and "_1" in k) and not k.startswith(("action_", "state_proj"))}
    assert pi0.inspect_checkpoint(fresh("fast", fast)).config.kind == "pi0_fast"  # PaliGemma alone: pi0-FAST

    lora = {**leaves, "PaliGemma/llm/layers/attn/q_einsum/lora_a": torch.zeros(2, 8, 64, 16)}
    with pytest.raises(CheckpointError, match="LoRA fine-tune"):
        pi0.inspect_checkpoint(fresh("lora", lora))

    alien = {**leaves, "PaliGemma/llm/extra/kernel": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="no part of pi0"):
        pi0.inspect_checkpoint(fresh("alien", alien))
