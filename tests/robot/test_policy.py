"""pi0.Policy: robot dict in, robot actions out, for each preset; `pi0 infer`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pi0
from pi0.errors import BadRequest
from pi0.robot.policy import Policy
from pi0.robot.presets import (
    ALOHA_JOINT_FLIP,
    _gripper_from_angular,
    _gripper_to_angular,
)
from tests.conftest import cli_env, write_policy_checkpoint


def libero_obs(seed=0, prompt="put the red cup in the bowl"):
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (128, 160, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": prompt,
    }


@pytest.fixture(scope="module")
def libero_ckpt(tmp_path_factory, tokenizer_path):
    return write_policy_checkpoint(tmp_path_factory.mktemp("libero"), "tiny", tokenizer_path)


def test_libero_pipeline_step_by_step(libero_ckpt):
    pol = Policy(libero_ckpt, preset="libero", backend="reference", dtype="float32", seed=3)
    obs = libero_obs()
    out = pol.infer(obs)
    assert out["actions"].shape == (50, 7) and out["actions"].dtype == np.float32
    assert out["policy_timing"]["infer_ms"] > 0
    # the same by hand: normalise, model, unnormalise
    stats = json.loads((libero_ckpt / "assets" / "robot" / "norm_stats.json").read_text())["norm_stats"]
    m = pi0.load_model(libero_ckpt)
    inputs = pol.prepare(obs)
    s = np.asarray(stats["state"]["mean"]), np.asarray(stats["state"]["std"])
    want_state = (obs["observation/state"] - s[0]) / (s[1] + 1e-6)
    assert np.allclose(inputs.state[0, :8].numpy(), want_state, atol=1e-5)
    assert (inputs.state[0, 8:] == 0).all()
    assert inputs.image_masks[2].tolist() == [False] and inputs.image_masks[0].tolist() == [True]
    noise = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(3))
    raw = m.sample_actions(inputs, noise=noise)[0, :, :7].numpy()
    a = stats["actions"]
    want = raw * (np.asarray(a["std"]) + 1e-6) + np.asarray(a["mean"])
    assert np.allclose(out["actions"], want, atol=1e-4)
    # fixed seed: the same answer twice; another prompt: another answer
    assert np.array_equal(pol.infer(obs)["actions"], out["actions"])
    assert not np.allclose(pol.infer(libero_obs(prompt="open the drawer"))["actions"], out["actions"])


def test_bad_observations_name_the_problem(libero_ckpt):
    pol = Policy(libero_ckpt, preset="libero", dtype="float32")
    obs = libero_obs()
    with pytest.raises(KeyError, match="observation/wrist_image"):
        pol.infer({k: v for k, v in obs.items() if k != "observation/wrist_image"})
    with pytest.raises(ValueError, match="NaN"):
        pol.infer({**obs, "observation/state": np.array([np.nan] * 8, np.float32)})
    with pytest.raises(ValueError, match="3 channels"):
        pol.infer({**obs, "observation/image": np.zeros((64, 64, 2), np.uint8)})
    with pytest.raises(ValueError, match="prompt must be a str"):
        pol.infer({**obs, "prompt": 5})
    with pytest.raises(ValueError, match="has 40 values; preset libero expects 8"):
        pol.infer({**obs, "observation/state": np.zeros(40, np.float32)})
    with pytest.raises(ValueError, match="unknown preset"):
        Policy(libero_ckpt, preset="nope")


def test_aloha_preset_flips_joints_and_maps_grippers(tmp_path, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path / "aloha", "tiny", tokenizer_path, robot_dim=14, action_dim=14, stats=False)
    pol = Policy(ck, preset="aloha", dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    state = rng.uniform(0.1, 0.9, 14).astype(np.float32)
    obs = {"state": state, "prompt": "fold the towel",
           "images": {"cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
                      "cam_low": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
                      "cam_left_wrist": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)}}
    inputs = pol.prepare(obs)
    want = ALOHA_JOINT_FLIP * state
    want[[6, 13]] = _gripper_to_angular(want[[6, 13]])
    assert np.allclose(inputs.state[0, :14].numpy(), want, atol=1e-6)
    assert [m.item() for m in inputs.image_masks] == [True, True, False]  # no right wrist camera
    with pytest.raises(ValueError, match="expects 14"):
        pol.infer({**obs, "state": state[:7]})
    out = pol.infer(obs)["actions"]
    raw = pol.model.sample_actions(inputs, noise=torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(0)))[0, :, :14].numpy()
    want_a = ALOHA_JOINT_FLIP * raw
    want_a[:, [6, 13]] = _gripper_from_angular(want_a[:, [6, 13]])
    assert np.allclose(out, want_a, atol=1e-5)


def test_droid_preset_concatenates_joints_and_gripper(tmp_path, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path / "droid", "tiny", tokenizer_path, stats=False)
    pol = Policy(ck, preset="droid", dtype="float32")
    rng = np.random.default_rng(1)
    obs = {"observation/exterior_image_1_left": rng.integers(0, 256, (180, 320, 3), dtype=np.uint8),
           "observation/wrist_image_left": rng.integers(0, 256, (180, 320, 3), dtype=np.uint8),
           "observation/joint_position": rng.normal(size=7), "observation/gripper_position": rng.uniform(size=1),
           "prompt": "push the button"}
    inputs = pol.prepare(obs)
    assert np.allclose(inputs.state[0, :8].numpy(),
                       np.concatenate([obs["observation/joint_position"], obs["observation/gripper_position"]]), atol=1e-6)
    assert pol.infer(obs)["actions"].shape == (50, 8)


def test_pi05_quantiles_and_state_in_prompt(tmp_path, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path / "pi05", "tiny-pi05", tokenizer_path, layout="lerobot")
    pol = Policy(ck, preset="libero", dtype="float32", seed=0)
    assert pol.pipeline.state_in_prompt and pol.config.pi05
    obs = libero_obs()
    inputs = pol.prepare(obs)
    stats = json.loads((ck / "assets" / "robot" / "norm_stats.json").read_text())["norm_stats"]["state"]
    q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    norm = (obs["observation/state"] - q01) / (q99 - q01 + 1e-6) * 2 - 1
    text = pol.pipeline.tokenizer.sp.decode(inputs.tokens[0][inputs.token_masks[0]].tolist())
    assert text.startswith("Task: put the red cup in the bowl, State: ")
    assert " ".join(map(str, np.digitize(norm, np.linspace(-1, 1, 257)[:-1]) - 1)) in text
    no_state = Policy(ck, preset="libero", dtype="float32", seed=0, state_in_prompt=False).prepare(obs)
    assert "State" not in pol.pipeline.tokenizer.sp.decode(no_state.tokens[0][no_state.token_masks[0]].tolist())
    assert pol.infer(obs)["actions"].shape == (50, 7)


def test_generic_preset_from_lerobot_features(tmp_path, tokenizer_path):
    ck = write_policy_checkpoint(tmp_path / "gen", "tiny", tokenizer_path, layout="lerobot", stats=False)
    meta = json.loads((ck / "config.json").read_text())
    meta["input_features"] = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 28, 28]} for c in ("top", "wrist", "side")}
    meta["input_features"]["observation.state"] = {"type": "STATE", "shape": [6]}
    meta["output_features"] = {"action": {"type": "ACTION", "shape": [6]}}
    (ck / "config.json").write_text(json.dumps(meta))
    pol = Policy(ck, dtype="float32")
    assert pol.pipeline.preset.name == "generic" and pol.action_dim == 6
    rng = np.random.default_rng(0)
    obs = {"observation.images.top": rng.uniform(size=(3, 28, 28)).astype(np.float32),
           "observation.state": rng.normal(size=6), "prompt": "stack cubes"}
    inputs = pol.prepare(obs)
    assert [m.item() for m in inputs.image_masks] == [True, False, False]
    assert pol.infer(obs)["actions"].shape == (50, 6)
    with pytest.raises(ValueError, match="observation.state has 40 values; preset generic expects 6"):
        pol.infer({**obs, "observation.state": np.zeros(40)})


def test_pi0_infer_cli(tmp_path, libero_ckpt):
    obs = libero_obs()
    np.savez(tmp_path / "obs.npz", **obs)
    r = subprocess.run([sys.executable, "-m", "pi0.cli.main", "infer", "--checkpoint", str(libero_ckpt), "--preset", "libero",
                        "--obs", str(tmp_path / "obs.npz"), "--seed", "3", "--dtype", "float32", "--backend", "reference",
                        "--out", str(tmp_path / "a.npy")], capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr
    want = Policy(libero_ckpt, preset="libero", backend="reference", dtype="float32", seed=3).infer(obs)["actions"]
    assert np.allclose(np.load(tmp_path / "a.npy"), want, atol=1e-6)
    js = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obs.items()}
    (tmp_path / "obs.json").write_text(json.dumps(js))
    r = subprocess.run([sys.executable, "-m", "pi0.cli.main", "infer", "--checkpoint", str(libero_ckpt), "--preset", "libero",
                        "--obs", str(tmp_path / "obs.json"), "--dtype", "float32"], capture_output=True, text=True,
                       timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert "actions [50, 7]" in r.stdout
    bad = {k: v for k, v in js.items() if k != "observation/state"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-m", "pi0.cli.main", "infer", "--checkpoint", str(libero_ckpt), "--preset", "libero",
                        "--obs", str(tmp_path / "bad.json"), "--dtype", "float32"], capture_output=True, text=True,
                       timeout=300, env=cli_env())
    assert r.returncode == 2 and "observation/state" in r.stderr and "Traceback" not in r.stderr


def test_lerobot_stats_files_beside_the_weights(tmp_path, tokenizer_path):
    from safetensors.numpy import save_file

    ck = write_policy_checkpoint(tmp_path / "lr", "tiny", tokenizer_path, layout="lerobot", stats=False)
    rng = np.random.default_rng(0)
    s_mean, s_std = rng.normal(size=8).astype(np.float32), rng.uniform(1, 2, 8).astype(np.float32)
    a_mean, a_std = rng.normal(size=7).astype(np.float32), rng.uniform(1, 2, 7).astype(np.float32)
    # LeRobot writes the unnormalizer (actions only) and the normalizer (state and actions) separately
    save_file({"action.mean": a_mean, "action.std": a_std},
              str(ck / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    save_file({"observation.state.mean": s_mean, "observation.state.std": s_std, "action.mean": a_mean, "action.std": a_std},
              str(ck / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    pol = Policy(ck, preset="libero", dtype="float32", seed=0)
    obs = libero_obs()
    state = pol.prepare(obs).state[0, :8].numpy()
    assert np.allclose(state, (obs["observation/state"] - s_mean) / (s_std + 1e-8), atol=1e-5)
    raw = pol.model.sample_actions(pol.prepare(obs), noise=torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(0)))
    assert np.allclose(pol.infer(obs)["actions"], raw[0, :, :7].numpy() * (a_std + 1e-8) + a_mean, atol=1e-4)


def test_lerobot_normalization_mapping_is_honoured(tmp_path, tokenizer_path):
    """A pi0.5 fine-tuned with MEAN_STD (LeRobot's --policy.normalization_mapping) is not quantile-normalised."""
    ck = write_policy_checkpoint(tmp_path / "p", "tiny-pi05", tokenizer_path, layout="lerobot")
    meta = json.loads((ck / "config.json").read_text())
    meta["normalization_mapping"] = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    (ck / "config.json").write_text(json.dumps(meta))
    pol = Policy(ck, preset="libero", dtype="float32", seed=0, state_in_prompt=False)
    stats = json.loads((ck / "assets" / "robot" / "norm_stats.json").read_text())["norm_stats"]["state"]
    obs = libero_obs()
    want = (obs["observation/state"] - np.asarray(stats["mean"])) / (np.asarray(stats["std"]) + 1e-6)
    assert np.allclose(pol.prepare(obs).state[0, :8].numpy(), want, atol=1e-5)


SHIPPED = Path(__file__).resolve().parents[2] / "pi0" / "assets" / "metaworld"


def metaworld_obs(**kw):
    rng = np.random.default_rng(0)
    return {"observation.images.image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "observation.state": rng.normal(size=4).astype(np.float32), "prompt": "open the drawer", **kw}


@pytest.mark.parametrize("preset", [None, "generic"])
def test_the_generic_preset_checks_every_input_against_the_checkpoint(preset):
    """The shipped Meta-World model (a pi0 train checkpoint) served with the generic preset: the state width, the
    cameras and the prompt are checked against its features before any work, and named in the error."""
    pol = Policy(SHIPPED, preset=preset, dtype="float32", seed=0)
    assert pol.metadata["preset"] == "generic" and pol.metadata["state_len"] == 4 and pol.action_dim == 4
    assert pol.metadata["image_hw"] == [64, 64]
    assert pol.infer(metaworld_obs())["actions"].shape == (10, 4)
    for width in (3, 14):
        with pytest.raises(BadRequest, match=f"observation.state has {width} values; preset generic expects 4"):
            pol.prepare(metaworld_obs(**{"observation.state": np.zeros(width, np.float32)}))
    with pytest.raises(BadRequest, match="observation.images.front: not a camera of this checkpoint"):
        pol.prepare(metaworld_obs(**{"observation.images.front": np.zeros((64, 64, 3), np.uint8)}))
    with pytest.raises(BadRequest, match="none of this checkpoint's cameras"):
        pol.prepare({k: v for k, v in metaworld_obs().items() if k != "observation.images.image"})
    with pytest.raises(BadRequest, match="prompt"):
        pol.prepare({k: v for k, v in metaworld_obs().items() if k != "prompt"})


def test_a_preset_for_another_robot_is_refused_at_load():
    """libero sends 8 state values and takes 7 actions; the shipped model's features and norm stats say 4 and 4."""
    with pytest.raises(ValueError, match="state widths disagree: preset libero 8, config.json input_features 4"):
        Policy(SHIPPED, preset="libero", dtype="float32")
    assert Policy(SHIPPED, preset="metaworld", dtype="float32").metadata["state_len"] == 4


def test_norm_stats_for_another_robot_are_refused_at_load(tmp_path, tokenizer_path):
    """A checkpoint whose stats cover 14 state values under the libero preset (8): the stats would normalise the
    wrong joints. Stats padded to the model's width (openpi's older assets) cover any robot."""
    ck = write_policy_checkpoint(tmp_path / "aloha", "tiny", tokenizer_path, robot_dim=14, action_dim=14)
    with pytest.raises(ValueError, match="state widths disagree: preset libero 8, norm stats 14"):
        Policy(ck, preset="libero", dtype="float32")
    padded = write_policy_checkpoint(tmp_path / "padded", "tiny", tokenizer_path, robot_dim=32, action_dim=32)
    assert Policy(padded, preset="libero", dtype="float32").metadata["state_len"] == 8
