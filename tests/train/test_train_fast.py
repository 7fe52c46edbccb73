"""`pi0 train --model pi0_fast`: a tiny π0-FAST learns a dataset's chunks as FAST tokens (its FAST tokenizer fitted on
the dataset), saves a checkpoint `pi0.Policy` serves as it is, and trains on exactly what the policy feeds it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("scipy")
pytest.importorskip("pyarrow")

import pi0  # noqa: E402
from pi0.cli.main import main  # noqa: E402
from pi0.model.fast_config import FastConfig  # noqa: E402
from pi0.train.trainer import Trainer  # noqa: E402
from tests.train.test_train import args, losses, write_dataset  # noqa: E402

HORIZON = 4


def robot_obs(item: dict, cameras: list[str]) -> dict:
    obs = {k: item[k].transpose(1, 2, 0) for k in cameras}  # HWC uint8, as robots send
    obs.update({"observation.state": item["observation.state"], "prompt": item["task"]})
    return obs


def quantisation_bound(policy: pi0.Policy) -> float:
    """decode(encode(chunk)) is within half a coefficient step of each coefficient: in L2 over the chunk (orthonormal
    DCT), 0.5 / scale x sqrt(H x D), in the model's (normalised) units."""
    fast = policy.pipeline.fast
    return 0.5 / fast.scale * np.sqrt(HORIZON * policy.action_dim) + 1e-5


def test_pi0_train_model_pi0_fast_learns_its_chunks_and_serves_them(tmp_path, capsys):
    ds = write_dataset(tmp_path / "robot", episodes=2, frames=6)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(ds), "--out", str(out), "--size", "tiny", "--model", "pi0_fast",
                 "--steps", "150", "--batch", "4", "--lr", "3e-3", "--action-horizon", str(HORIZON), "--fast-vocab",
                 "400", "--no-augment", "--dtype", "float32", "--quiet", "--log-every", "1"]) == 0
    assert "pi0 train: pi0_fast" in capsys.readouterr().err
    got = losses(out)
    assert np.mean(got[-10:]) < 0.02 * np.mean(got[:5]), (got[:5], got[-10:])
    meta = json.loads((out / "latest" / "config.json").read_text())
    assert meta["normalization_mapping"]["ACTION"] == "QUANTILES"
    policy = pi0.Policy(out / "latest", backend="engine", dtype="float32")  # the FAST tokenizer saved beside it
    assert isinstance(policy.config, FastConfig) and policy.fast
    assert policy.metadata["fast_tokenizer"].endswith("fast_tokenizer")
    t = Trainer(args(ds, tmp_path / "probe", model="pi0_fast", steps=1, fast_vocab=400, action_horizon=HORIZON))
    bound = quantisation_bound(policy)
    for index in range(len(t.ds)):
        item = t.ds[index]
        answer = policy.infer(robot_obs(item, t.ds.camera_keys))
        want = policy.pipeline.actions_in(item["action"])
        assert np.linalg.norm(answer["model_actions"] - want) <= bound, index
        assert answer["policy_timing"]["tokens"] <= policy.config.max_decoding_steps


def test_training_inputs_and_targets_are_the_policys(tmp_path):
    """The prompt the model trains on is the one pi0.Policy sends the saved checkpoint; the target ids decode back to
    the dataset's chunk through the policy's own reading of an answer."""
    ds = write_dataset(tmp_path / "robot", episodes=2, frames=6)
    t = Trainer(args(ds, tmp_path / "run", model="pi0_fast", steps=1, fast_vocab=400, action_horizon=HORIZON,
                     augment=False))
    policy = pi0.Policy(t.run(), backend="reference", dtype="float32")
    bound = quantisation_bound(policy)
    for index in (0, 5, 11):
        item = t.ds[index]
        want = policy.prepare(robot_obs(item, t.ds.camera_keys))
        got = t.data.sample(index, 0, 0)
        assert np.array_equal(got["tokens"], want.tokens[0].numpy()) and got["state"] is None
        for c in range(len(t.cameras)):
            assert torch.equal(got["images"][c], want.images[c][0])
        ids = got["action_tokens"][got["action_masks"]].tolist()
        assert ids[-1] == policy.pipeline.text.eos and len(ids) < got["action_tokens"].size
        chunk = policy.pipeline.chunk(ids)
        assert np.linalg.norm(chunk - policy.pipeline.actions_in(item["action"])) <= bound


def test_the_model_family_and_options_are_checked(tmp_path):
    ds = write_dataset(tmp_path / "robot", episodes=2, frames=6)
    ck = Trainer(args(ds, tmp_path / "pi0", steps=1)).run()
    with pytest.raises(ValueError, match="is a pi0 checkpoint"):
        Trainer(args(ds, tmp_path / "x", size=None, init=str(ck), model="pi0_fast"))
    with pytest.raises(ValueError, match="apply to π0-FAST; this run trains pi0"):
        Trainer(args(ds, tmp_path / "z", norm="MEAN_STD"))
    with pytest.raises(ValueError, match="leaves no merges"):
        Trainer(args(ds, tmp_path / "y", model="pi0_fast", fast_vocab=100, action_horizon=HORIZON))
