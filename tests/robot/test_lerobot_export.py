"""`pi0 convert --layout lerobot` of a pi0-trained checkpoint: LeRobot 0.6.1 loads the result with its own processors
(normalisation included) and answers with pi0's actions. The golden numbers are LeRobot's, made by
tools/make_export_fixtures.py in the oracle venv from the checkpoint in tests/fixtures/export/<kind>/trained."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import pi0
from pi0.checkpoint.layouts import PI0_CONFIG

FIXTURES = Path(__file__).parents[1] / "fixtures" / "export"
LEROBOT_CONFIG = Path(__file__).parents[1] / "fixtures" / "pipeline" / "pi0_default" / "config.json"  # LeRobot wrote it


def _observation(case):
    obs = {k: case[k].numpy() for k in ("observation.images.top", "observation.images.wrist", "observation.state")}
    return {**obs, "prompt": "pick up the red cup"}


def _without_tokenizer_path(pipeline: dict) -> dict:
    for step in pipeline["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            step["config"]["tokenizer_name"] = "<the checkpoint's tokenizer folder>"
    return pipeline


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_a_pi0_trained_checkpoint_converted_for_lerobot_gives_lerobots_actions(kind, tmp_path, capsys):
    from pi0.cli.main import main

    trained = FIXTURES / kind / "trained"
    assert main(["convert", str(trained), str(tmp_path / "lr"), "--layout", "lerobot"]) == 0
    assert "LeRobot's processor pipeline: policy_preprocessor.json" in capsys.readouterr().out
    out = tmp_path / "lr"
    # config.json holds LeRobot's fields and nothing else (LeRobot parses it strictly); pi0's go beside it
    fields = json.loads((out / "config.json").read_text())
    assert set(fields) == set(json.loads(LEROBOT_CONFIG.read_text())) | {"type"}
    assert pi0.inspect_checkpoint(out).config == pi0.inspect_checkpoint(trained).config
    assert "pi0" in json.loads((out / PI0_CONFIG).read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # LeRobot's expert lm_head, or it loads nothing
        assert f.get_slice("model.paligemma_with_expert.gemma_expert.lm_head.weight").get_shape()[0] == 257_152
    # the pipeline files are the ones LeRobot ran
    with safe_open(str(FIXTURES / kind / "case.safetensors"), "pt") as f:
        ran = f.metadata()
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        assert _without_tokenizer_path(json.loads((out / name).read_text())) == \
            _without_tokenizer_path(json.loads(ran[name])), name
    case = load_file(str(FIXTURES / kind / "case.safetensors"))
    want = case["lerobot_actions"].numpy()
    scale = np.abs(want).max()
    # pi0 runs the converted checkpoint's LeRobot pipeline, and the trained one in its own conventions
    converted = pi0.Policy(out, dtype="float32")
    assert converted.metadata["preset"] == "lerobot"
    assert np.abs(converted.infer(_observation(case), noise=case["noise"].numpy())["actions"] - want).max() <= 2e-6 * scale
    trained_policy = pi0.Policy(trained, dtype="float32")
    inputs = trained_policy.prepare(_observation(case))
    assert inputs.tokens[0].tolist() == case["lerobot_tokens"].tolist()  # LeRobot's tokenizer step, same ids
    got = trained_policy.infer(_observation(case), noise=case["noise"].numpy())["actions"]
    assert np.abs(got - want).max() <= 2e-6 * scale  # only the normalisers' eps differ (1e-6 vs 1e-8)


def test_a_checkpoint_without_features_converts_without_a_pipeline(tmp_path, capsys):
    from pi0.cli.main import main

    pi0.save_model(pi0.build_model(pi0.size_config("tiny"), seed=0), tmp_path / "ck")
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "lr"), "--layout", "lerobot"]) == 0
    assert "no LeRobot processor pipeline" in capsys.readouterr().err
    assert not (tmp_path / "lr" / "policy_preprocessor.json").exists()
