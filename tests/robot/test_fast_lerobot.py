"""A LeRobot π0-FAST checkpoint through its own pipeline, against LeRobot 0.6.1's whole pipeline
(tools/make_fast_pipeline_fixtures.py): raw observations in, LeRobot's prompt ids, generated ids and robot actions out,
for both backends; its training targets and loss; and what LeRobot answers with zeros is an error here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("scipy")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import pi0  # noqa: E402
from pi0.errors import BadRequest, NoActions  # noqa: E402
from pi0.robot.fast import FastDecodeError  # noqa: E402
from pi0.robot.lerobot_fast import LeRobotFastPipeline  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pi0_fast_pipeline"
TOKENIZER, FAST = FIXTURE / "tokenizer.model", FIXTURE / "fast_tokenizer"


def policy(ckpt: str, backend: str) -> pi0.Policy:
    return pi0.Policy(FIXTURE / ckpt, backend=backend, dtype="float32", tokenizer=TOKENIZER, fast_tokenizer=FAST)


def cases(ckpt: str) -> list[tuple[str, dict, dict]]:
    """(name, the raw observation, LeRobot's tensors) per case the fixture holds for a checkpoint."""
    out = []
    for f in sorted((FIXTURE / ckpt).glob("case_*.safetensors")):
        t = load_file(str(f))
        obs = {k: v.numpy() for k, v in t.items() if k.startswith("observation.")}
        obs["task"] = safe_open(str(f), "pt").metadata()["task"]
        out.append((f.stem[len("case_"):], obs, t))
    return out


@pytest.fixture(scope="module", params=["reference", "engine"])
def backend(request) -> str:
    return request.param


@pytest.mark.parametrize("ckpt", ["ckpt", "ckpt_short"])
def test_a_lerobot_checkpoint_answers_as_lerobot(ckpt, backend):
    pol = policy(ckpt, backend)
    assert isinstance(pol.pipeline, LeRobotFastPipeline) and pol.fast
    bar = pol.pipeline.end_ids[0]
    found = cases(ckpt)
    assert found, "the fixture holds no cases"
    for name, obs, lerobot in found:
        inputs = pol.prepare(obs)
        # LeRobot's prompt ids and mask, then the BOS its decoding appends after the padding
        assert torch.equal(inputs.tokens[0, :-1], lerobot["tokens"]), name
        assert torch.equal(inputs.token_masks[0, :-1], lerobot["token_masks"].bool()), name
        assert inputs.tokens[0, -1] == pol.pipeline.sp.bos_id() and inputs.token_masks[0, -1]
        ids = pol.model.generate(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks,
                                 end_ids=pol.pipeline.end_ids)[0].tolist()
        theirs = lerobot["generated"].tolist()
        stop = theirs.index(bar) + 1
        assert ids[:stop] == theirs[:stop], name
        assert bool(lerobot["decoded"])
        out = pol.infer(obs)
        assert out["actions"].shape == tuple(lerobot["actions"].shape), name
        np.testing.assert_allclose(out["actions"], lerobot["actions"].numpy(), atol=1e-5, err_msg=name)


def test_an_answer_with_more_coefficients_than_the_chunk_is_cut_as_lerobot_cuts_it():
    """The untaught case's answer holds EOS ids mid-way (LeRobot decodes on to "|"): more coefficients than 5 x 4."""
    pol = policy("ckpt", "reference")
    t = dict((name, lerobot) for name, _, lerobot in cases("ckpt"))["untaught"]
    ids = t["generated"].tolist()
    assert pol.pipeline.sp.eos_id() in ids[: ids.index(pol.pipeline.end_ids[0])]
    with pytest.raises(FastDecodeError):  # strictly, no chunk
        pol.pipeline.fast.decode(pol.pipeline.fast_tokens(ids), 5, 4)
    chunk = pol.pipeline.chunk(ids)
    np.testing.assert_allclose(pol.pipeline.actions_out(chunk), t["actions"].numpy(), atol=1e-5)


def test_what_lerobot_answers_zeros_for_is_an_error():
    pipe = policy("ckpt", "reference").pipeline
    start, bar = pipe.action_start, pipe.end_ids[0]
    with pytest.raises(FastDecodeError, match="does not start with 'Action:'"):
        pipe.chunk([5, 6, 7, bar])
    with pytest.raises(FastDecodeError, match="negative"):  # ids among PaliGemma's last 128: no FAST token
        pipe.chunk(start + [pipe.vocab_size - 3, bar])
    assert issubclass(FastDecodeError, NoActions)


def test_training_targets_and_loss_are_lerobots():
    pol = policy("ckpt", "reference")
    pipe, train = pol.pipeline, load_file(str(FIXTURE / "train.safetensors"))
    taught = [obs for name, obs, _ in cases("ckpt") if name.startswith("taught")]
    assert len(taught) == len(train["raw_actions"]) == 2
    for i, obs in enumerate(taught):
        tokens, mask = pipe.action_tokens(pipe.actions_in(train["raw_actions"][i].numpy()))
        assert np.array_equal(tokens, train["action_tokens"][i].numpy()) and np.array_equal(mask, train["action_masks"][i])
        inputs = pol.prepare(obs)
        assert torch.equal(inputs.tokens[0, :-1], train["tokens"][i])  # training: the prompt without the second BOS
        with torch.no_grad():
            ce = pol.model.compute_loss(inputs.images, inputs.image_masks, inputs.tokens[:, :-1],
                                        inputs.token_masks[:, :-1], torch.from_numpy(tokens)[None],
                                        torch.from_numpy(mask)[None])
        loss = ce.sum() / mask[1:].sum()
        assert abs(float(loss) - float(train["losses"][i])) <= 1e-5


def test_bad_requests_and_options_are_refused_with_the_reason():
    pol = policy("ckpt", "reference")
    _, obs, _ = cases("ckpt")[0]
    with pytest.raises(BadRequest, match="shorten the prompt"):
        pol.infer({**obs, "task": "pick up the red cup " * 20})
    with pytest.raises(BadRequest, match="rtc"):
        pol.infer({**obs, "rtc": {"prev_actions": np.zeros((5, 4)), "inference_delay": 1}})
    with pytest.raises(ValueError, match="processors carry its normalisation"):
        pi0.Policy(FIXTURE / "ckpt", backend="reference", dtype="float32", tokenizer=TOKENIZER, fast_tokenizer=FAST,
                   norm="QUANTILES")
