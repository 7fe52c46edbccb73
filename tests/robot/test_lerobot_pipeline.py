"""LeRobot checkpoints run their own processors, exactly: raw observation dict -> actions in robot units
equal LeRobot 0.6.1's preprocessor -> predict_action_chunk(noise) -> postprocessor (golden fixtures made by
tools/make_pipeline_fixtures.py from LeRobot-saved checkpoints), on both backends."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import pi0
from tests.conftest import cli_env
from tests.fixtures_lib import scaled_err

ROOT = Path(__file__).parents[1] / "fixtures" / "pipeline"
TOKENIZER = ROOT / "tokenizer.model"
CHECKPOINTS = sorted(d.name for d in ROOT.iterdir() if d.is_dir())


def cases(name: str):
    for f in sorted((ROOT / name).glob("case_*.safetensors")):
        with safe_open(str(f), "np") as h:
            t = {k: h.get_tensor(k) for k in h.keys()}
            task = h.metadata()["task"]
        obs = {k: v for k, v in t.items() if k.startswith("observation.")}
        obs["task"] = task
        yield f.stem[len("case_"):], obs, t["noise"], t["actions"], t["tokens"]


@pytest.fixture(scope="module", params=[(c, b) for c in CHECKPOINTS for b in ("reference", "engine")],
                ids=lambda p: "-".join(p))
def policy(request):
    name, backend = request.param
    return name, pi0.Policy(ROOT / name, backend=backend, dtype="float32", tokenizer=TOKENIZER)


def test_actions_equal_lerobots_pipeline(policy):
    name, pol = policy
    found = list(cases(name))
    assert len(found) == 7
    for case, obs, noise, want, tokens in found:
        inputs = pol.prepare(obs)
        assert np.array_equal(inputs.tokens[0].numpy(), tokens), case  # LeRobot's tokens, padding included
        got = pol.infer(obs, noise=noise)["actions"]
        assert got.shape == want.shape, case
        assert scaled_err(got, want) <= 1e-5, (case, np.abs(got - want).max())


def test_metadata_names_lerobots_keys_and_steps(policy):
    name, pol = policy
    md = pol.metadata
    assert md["preset"] == "lerobot"
    assert md["expected_keys"] == ["observation.images.base", "observation.images.wrist", "observation.images.side",
                                   "observation.state", "task"]
    assert md["pipeline"]["preprocessor"][-1] == ("normalizer_processor" if md["model"] == "pi0" else "device_processor")
    assert md["pipeline"]["postprocessor"][0] == "unnormalizer_processor"


def test_prompt_is_accepted_for_task():
    pol = pi0.Policy(ROOT / "pi0_default", dtype="float32", tokenizer=TOKENIZER)
    _, obs, noise, want, _ = next(cases("pi0_default"))
    obs["prompt"] = obs.pop("task")
    assert scaled_err(pol.infer(obs, noise=noise)["actions"], want) <= 1e-5


def test_bad_pipelines_and_observations_are_named(tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ROOT / "pi0_default", d)
    pol = pi0.Policy(d, dtype="float32", tokenizer=TOKENIZER)
    _, obs, _, _, _ = next(cases("pi0_default"))
    with pytest.raises(KeyError, match="observation.state"):
        pol.infer({k: v for k, v in obs.items() if k != "observation.state"})
    with pytest.raises(KeyError, match="none of this checkpoint's cameras"):
        pol.infer({k: v for k, v in obs.items() if not k.startswith("observation.images")})
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        pol.infer({**obs, "observation.images.base": np.full((3, 28, 28), 2.0, np.float32)})
    from pi0.errors import BadRequest

    with pytest.raises(BadRequest, match="observation.images.front: not a camera of this checkpoint"):
        pol.prepare({**obs, "observation.images.front": obs["observation.images.base"]})
    for width in (7, 9):  # its config.json input_features say 8
        with pytest.raises(BadRequest, match=f"observation.state has {width} values; this checkpoint expects 8"):
            pol.prepare({**obs, "observation.state": np.zeros(width, np.float32)})
    with pytest.raises(BadRequest, match="observation.state holds NaN"):
        pol.prepare({**obs, "observation.state": np.full(8, np.nan, np.float32)})
    spec = json.loads((d / "policy_preprocessor.json").read_text())
    spec["steps"].insert(2, {"registry_name": "my_custom_augmenter", "config": {}})
    (d / "policy_preprocessor.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="'my_custom_augmenter' is not a step of LeRobot 0.6.1"):
        pi0.Policy(d, dtype="float32", tokenizer=TOKENIZER)


def test_inspect_shows_the_pipeline():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pi0.cli.main", "inspect", str(ROOT / "pi05_default"), "--json"],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    rep = json.loads(r.stdout)
    assert rep["pipeline"]["convention"] == "lerobot"
    assert "pi05_prepare_state_tokenizer_processor_step" in rep["pipeline"]["preprocessor"]
    assert rep["pipeline"]["normalization"]["preprocessor"] == {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}


def test_pi0_infer_takes_a_lerobot_observation_file(tmp_path):
    import subprocess
    import sys

    _, obs, _, _, _ = next(cases("pi05_default"))
    np.savez(tmp_path / "obs.npz", **obs)
    r = subprocess.run([sys.executable, "-m", "pi0.cli.main", "infer", "--checkpoint", str(ROOT / "pi05_default"),
                        "--obs", str(tmp_path / "obs.npz"), "--tokenizer", str(TOKENIZER), "--dtype", "float32",
                        "--seed", "0", "--out", str(tmp_path / "a.npy")], capture_output=True, text=True, timeout=120,
                       env=cli_env())
    assert r.returncode == 0, r.stderr
    want = pi0.Policy(ROOT / "pi05_default", dtype="float32", tokenizer=TOKENIZER, seed=0).infer(obs)["actions"]
    assert np.allclose(np.load(tmp_path / "a.npy"), want, atol=1e-5)  # eager ops there, compiled kernels here
