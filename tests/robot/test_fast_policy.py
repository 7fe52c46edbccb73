"""π0-FAST through the system: openpi's FAST prompt, generated ids back to a chunk (or a named failure), pi0.Policy
and pi0 serve to openpi's client, the normalisation a checkpoint was trained with."""

import json
import shutil
import urllib.request

import numpy as np
import pytest
import torch

import pi0
from pi0.errors import NoActions
from pi0.model.fast_config import FastConfig
from pi0.robot.fast import FastDecodeError, FastTokenizer
from pi0.robot.policy import Policy
from tests.robot.test_policy import libero_obs

pytest.importorskip("tokenizers")
pytest.importorskip("scipy")

HORIZON, DIMS = 10, 7


def fast_config() -> FastConfig:
    tiny = pi0.size_config("tiny")
    return FastConfig(vision=tiny.vision, vlm=tiny.vlm, action_dim=DIMS, action_horizon=HORIZON, max_token_len=120,
                      max_decoding_steps=40)


def stats(rng, n):
    q01 = rng.uniform(-2, -1, n)
    return {"mean": rng.normal(0, 1, n).tolist(), "std": rng.uniform(0.5, 2, n).tolist(), "q01": q01.tolist(),
            "q99": (q01 + rng.uniform(1, 3, n)).tolist()}


def write_fast_checkpoint(d, tokenizer_path, seed=0, norm_mapping=None):
    """A tiny π0-FAST checkpoint as a user has it: weights, config.json, the PaliGemma tokenizer, a FAST tokenizer
    fitted on smooth chunks, openpi norm stats for a libero robot (state 8, actions 7)."""
    pi0.save_model(pi0.build_model(fast_config(), backend="reference", seed=seed), d)
    if norm_mapping:
        meta = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**meta, "normalization_mapping": norm_mapping}))
    shutil.copy(tokenizer_path, d / "paligemma_tokenizer.model")
    rng = np.random.default_rng(seed)
    chunks = np.cumsum(rng.normal(0, 0.1, (200, HORIZON, DIMS)), axis=1)
    FastTokenizer.fit(chunks, vocab_size=400).save(d / "fast_tokenizer")
    (d / "assets" / "robot").mkdir(parents=True)
    (d / "assets" / "robot" / "norm_stats.json").write_text(
        json.dumps({"norm_stats": {"state": stats(rng, 8), "actions": stats(rng, DIMS)}}))
    return d, chunks


@pytest.fixture(scope="module")
def fast_ckpt(tmp_path_factory, tokenizer_path):
    return write_fast_checkpoint(tmp_path_factory.mktemp("fast"), tokenizer_path)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
    """A tiny π0-FAST checkpoint taught (openpi's loss, the prompt's last position predicting "Action") to answer
    one observation with one chunk: (checkpoint, observation, the chunk in the model's space)."""
    d, chunks = write_fast_checkpoint(tmp_path_factory.mktemp("fast_trained"), tokenizer_path, seed=1)
    pol = Policy(d, preset="libero", backend="reference", dtype="float32")
    obs, target = libero_obs(4), chunks[3]
    inputs = pol.prepare(obs)
    post = torch.tensor([pol.pipeline.text.postfix(pol.pipeline.fast.encode(target)[0])])
    model = pol.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = model.compute_loss(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks, post,
                                  torch.ones_like(post, dtype=torch.bool), first_from_prefix=True).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 5e-3:
            break
    assert loss.item() < 5e-2, loss.item()
    pi0.save_model(model.eval(), d)
    want = pol.pipeline.fast.decode(pol.pipeline.fast.encode(target)[0], HORIZON, DIMS).astype(np.float32)
    return d, obs, want


def test_the_prompt_is_openpis_fast_prompt(fast_ckpt):
    pol = Policy(fast_ckpt, preset="libero", backend="reference", dtype="float32")
    obs = libero_obs(0, prompt="  Put_the RED cup in the bowl")
    inputs = pol.prepare(obs)
    st = json.loads((fast_ckpt / "assets" / "robot" / "norm_stats.json").read_text())["norm_stats"]["state"]
    q01, q99 = np.asarray(st["q01"]), np.asarray(st["q99"])  # quantiles: π0-FAST's default with no record
    s = (obs["observation/state"] - q01) / (q99 - q01 + 1e-6) * 2 - 1
    bins = np.digitize(s, np.linspace(-1, 1, 257)[:-1]) - 1
    sp = pol.pipeline.text.sp
    want = sp.encode(f"Task: put the red cup in the bowl, State: {' '.join(map(str, bins))};\n", add_bos=True)
    tokens, mask = inputs.tokens[0], inputs.token_masks[0]
    assert tokens[-len(want):].tolist() == want and mask[-len(want):].all()  # aligned right: the padding first
    assert not mask[: -len(want)].any() and (tokens[: -len(want)] == 0).all()
    # openpi's FAST camera slots: base, an empty slot (a black image the model sees), wrist
    assert [m.tolist() for m in inputs.image_masks] == [[True], [True], [True]]
    assert (inputs.images[1] == -1).all() and not (inputs.images[2] == -1).all() and inputs.state is None
    assert pol.metadata["model"] == "pi0_fast" and pol.metadata["normalization"] == "QUANTILES"


def test_generated_ids_decode_or_say_what_they_held(fast_ckpt):
    pipe = Policy(fast_ckpt, preset="libero", backend="reference", dtype="float32").pipeline
    chunk = np.cumsum(np.random.default_rng(5).normal(0, 0.1, (HORIZON, DIMS)), axis=0)
    tokens = pipe.fast.encode(chunk)[0]
    ids = pipe.text.postfix(tokens) + [17, 23]  # whatever follows EOS is not read
    got = pipe.chunk(ids)
    assert got.shape == (HORIZON, DIMS)
    assert np.array_equal(got, pipe.fast.decode(tokens, HORIZON, DIMS).astype(np.float32))
    assert np.abs(got - chunk).max() < 0.1  # within the quantisation (scale 10)
    assert pipe.text.fast_tokens(pipe.text.action_start + pipe.text.to_vocab(tokens)) == tokens  # ended by the limit
    with pytest.raises(FastDecodeError, match="no 'Action: '"):
        pipe.chunk(pipe.text.to_vocab(tokens))
    with pytest.raises(FastDecodeError, match="no action tokens"):
        pipe.chunk(pipe.text.action_start + [5, 6] + pipe.text.action_end)
    with pytest.raises(FastDecodeError, match="DCT coefficients") as e:
        pipe.chunk(pipe.text.postfix(tokens[:-1]))
    assert isinstance(e.value, NoActions)


@pytest.mark.parametrize("backend,dtype,int8", [("reference", "float32", False), ("engine", "float32", False),
                                                ("engine", "bfloat16", False), ("engine", "bfloat16", True),
                                                ("engine", "float32", True)])
def test_a_trained_checkpoint_answers_its_chunk_in_robot_units(trained, backend, dtype, int8):
    d, obs, want = trained
    pol = Policy(d, preset="libero", backend=backend, dtype=dtype, decode_int8=int8)
    assert (pol.model.decode_layers is not None) == int8 if backend == "engine" else not int8
    out = pol.infer(obs)
    assert np.array_equal(out["model_actions"], want)
    a = json.loads((d / "assets" / "robot" / "norm_stats.json").read_text())["norm_stats"]["actions"]
    q01, q99 = np.asarray(a["q01"]), np.asarray(a["q99"])
    assert np.allclose(out["actions"], (want + 1) / 2 * (q99 - q01 + 1e-6) + q01, atol=1e-5)
    assert out["policy_timing"]["tokens"] == len(pol.pipeline.text.postfix(pol.pipeline.fast.encode(want)[0]))
    assert set(out["policy_timing"]["stages_s"]) == {"prefill", "decode"}
    assert all(s > 0 for s in out["policy_timing"]["stages_s"].values())
    # a batch: each row as alone; a row whose ids hold no chunk is its NoActions, the other still answered
    rows = pol.run_prepared([pol.prepare_request(obs), pol.prepare_request(libero_obs(9, prompt="open the drawer"))])
    assert np.array_equal(rows[0]["model_actions"], want)
    with pytest.raises(pi0.errors.BadRequest, match="rtc"):
        pol.prepare_request({**obs, "rtc": {}})


def test_the_normalisation_travels_with_the_checkpoint(tmp_path, tokenizer_path):
    zscore = {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    d, _ = write_fast_checkpoint(tmp_path / "z", tokenizer_path, norm_mapping=zscore)
    assert Policy(d, preset="libero", backend="reference", dtype="float32").pipeline.norm == "MEAN_STD"
    with pytest.raises(ValueError, match="trained with MEAN_STD"):
        Policy(d, preset="libero", backend="reference", dtype="float32", norm="QUANTILES")
    # no record: the mode asked for, checked against the stats it needs
    d, _ = write_fast_checkpoint(tmp_path / "q", tokenizer_path)
    assert Policy(d, preset="libero", backend="reference", dtype="float32", norm="MEAN_STD").pipeline.norm == "MEAN_STD"
    f = d / "assets" / "robot" / "norm_stats.json"
    st = json.loads(f.read_text())
    del st["norm_stats"]["state"]["q01"]
    f.write_text(json.dumps(st))
    with pytest.raises(ValueError, match="QUANTILES normalisation needs the state's q01 and q99"):
        Policy(d, preset="libero", backend="reference", dtype="float32")
    with pytest.raises(FileNotFoundError, match="--fast-tokenizer"):
        shutil.rmtree(d / "fast_tokenizer")
        Policy(d, preset="libero", backend="reference", dtype="float32", norm="MEAN_STD")


@pytest.mark.auto_dtype  # the int8 engine's float dtype between its products is what auto picks
def test_an_int8_engine_decodes_with_one_row_int8_products(trained):
    from pi0.backends.engine.gemv import RowInt8

    d, obs, want = trained
    pol = Policy(d, preset="libero", backend="engine", dtype="int8", decode_int8=True)
    assert isinstance(pol.model.decode_head, RowInt8)  # its plain int8 head, no longer dequantised every token
    assert np.array_equal(pol.infer(obs)["model_actions"], want)


def test_pi0_serve_answers_openpis_client_and_counts_what_did_not_decode(trained, fast_ckpt):
    openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
    from tests.serving.test_server import Running

    d, obs, want = trained
    pol = Policy(d, preset="libero", dtype="float32")  # the engine, as pi0 serve runs it
    s = Running(pol)
    try:
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        assert client.get_server_metadata()["model"] == "pi0_fast"
        out = client.infer(obs)
        assert np.array_equal(out["model_actions"], want) and out["actions"].shape == (HORIZON, DIMS)
    finally:
        s.close()
    s = Running(Policy(fast_ckpt, preset="libero", dtype="float32"))  # random weights
    try:
        client = openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=s.port)
        with pytest.raises(Exception, match="no actions: the model's .* tokens hold no 'Action: '"):
            client.infer(libero_obs(1))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=10).read().decode()
        assert 'pi0_requests_total{outcome="no_actions"} 1.0' in metrics
    finally:
        s.close()
