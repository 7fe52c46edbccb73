"""π0-FAST's reference against LeRobot 0.6.1's `pi0_fast` (tools/make_fast_fixtures.py): the same greedy tokens,
and the logits behind them, at tiny widths with a ragged prompt, a masked camera and a row that stops early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pi0.backends.reference.fast import Pi0FastReference
from pi0.checkpoint.layouts import to_canonical
from pi0.model.fast_config import fast_canonical_shapes, infer_fast_config, is_fast

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pi0_fast_a"


def lerobot_model():
    """LeRobot's weights in the canonical layout, the fixture's config.json, and the reference built over them."""
    meta = json.loads((FIXTURE / "config.json").read_text())
    state = {to_canonical(k, "openpi"): v for k, v in load_file(FIXTURE / "model.safetensors").items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert is_fast(shapes)
    config = infer_fast_config(shapes, {"vision_num_heads": meta["widths"]["vision_heads"], **meta})
    assert fast_canonical_shapes(config) == shapes  # every tensor known, none missing
    model = Pi0FastReference(config).eval()
    model.load_state_dict(state, strict=True)
    return meta, model


@pytest.fixture(scope="module")
def lerobot():
    return lerobot_model()


@pytest.fixture(scope="module", params=["reference", "engine"])
def decoder(request, lerobot):
    """The fixture's config and a model of each backend over LeRobot's weights (fp32)."""
    meta, model = lerobot
    if request.param == "reference":
        return meta, model
    from pi0.backends.engine.fast import Pi0FastEngine

    return meta, Pi0FastEngine(model.config, {k: v.detach().clone() for k, v in model.state_dict().items()})


def case_inputs(case: str, meta: dict) -> tuple[dict, list, list, torch.Tensor, torch.Tensor]:
    """A fixture case and the decoder's inputs as LeRobot builds them: the cameras, their masks, and the right-padded
    prompt with BOS appended after the padding (its last position valid)."""
    t = load_file(FIXTURE / f"{case}.safetensors")
    b = t["tokens"].shape[0]
    tokens = torch.cat([t["tokens"], torch.full((b, 1), meta["bos_token_id"])], dim=1)
    masks = torch.cat([t["token_masks"], torch.ones(b, 1, dtype=torch.bool)], dim=1)
    return t, [t["image_0"], t["image_1"]], [t["image_mask_0"], t["image_mask_1"]], tokens, masks


@pytest.mark.parametrize("case", ["ragged_masked", "one_row"])
def test_greedy_tokens_are_lerobots(decoder, case):
    meta, model = decoder
    t, images, image_masks, tokens, masks = case_inputs(case, meta)
    got = model.generate(images, image_masks, tokens, masks, end_ids=[meta["end_of_action_token_id"]],
                         max_steps=meta["max_decoding_steps"])
    assert torch.equal(got, t["generated"]), (got, t["generated"])
    if case == "ragged_masked":
        end = meta["end_of_action_token_id"]
        assert (got[0] == end).nonzero()[0, 0] == 5 and not (got[1] == end).any()  # row 0 stops early, row 1 runs on


def test_the_batch_stops_when_every_row_has_ended(decoder):
    """With row 1's 6th token as a second end id both rows end at step 5: LeRobot's rule gives its tokens up to there
    (greedy decoding does not depend on the stop) and zeros after."""
    meta, model = decoder
    t, images, image_masks, tokens, masks = case_inputs("ragged_masked", meta)
    ends = [meta["end_of_action_token_id"], int(t["generated"][1, 5])]
    assert not torch.isin(t["generated"][1, :5], torch.tensor(ends)).any()
    got = model.generate(images, image_masks, tokens, masks,
                         end_ids=ends, max_steps=24)
    want = t["generated"].clone()
    want[:, 6:] = 0
    assert torch.equal(got, want)


def test_every_steps_logits_match(lerobot):
    meta, model = lerobot
    t, images, image_masks, tokens, masks = case_inputs("ragged_masked", meta)
    logits = []
    original = model.logits
    model.logits = lambda x: logits.append(original(x)) or logits[-1]
    try:
        model.generate(images, image_masks, tokens, masks, end_ids=[meta["end_of_action_token_id"]], max_steps=24)
    finally:
        del model.logits
    got = torch.stack(logits)
    assert got.shape == t["logits"].shape
    assert (got - t["logits"]).abs().max() <= 1e-4 * t["logits"].abs().max()


def test_a_last_position_of_padding_is_refused(decoder):
    meta, model = decoder
    t = load_file(FIXTURE / "ragged_masked.safetensors")
    with pytest.raises(ValueError, match="last token must be valid"):
        model.generate([t["image_0"], t["image_1"]], [t["image_mask_0"], t["image_mask_1"]], t["tokens"],
                       t["token_masks"], end_ids=[1], max_steps=2)


@pytest.mark.parametrize("backend", ["reference", "engine"])
@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_a_checkpoint_in_either_layout_loads_and_decodes_as_lerobot(tmp_path, layout, backend, capsys):
    """LeRobot's weights written as a checkpoint in openpi's converted layout (lm_head only, as openpi stores the
    embedding) or LeRobot's (`model.` keys, both tensors): pi0.load_model finds π0-FAST by its shapes."""
    import pi0
    from safetensors.torch import save_file

    from pi0.cli.main import main

    meta = json.loads((FIXTURE / "config.json").read_text())
    weights = load_file(FIXTURE / "model.safetensors")
    embed = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    if layout == "openpi":
        weights["paligemma_with_expert.paligemma.lm_head.weight"] = weights.pop(embed)
    else:
        weights = {"model." + k: v for k, v in weights.items()}
        weights["model.paligemma_with_expert.paligemma.lm_head.weight"] = weights["model." + embed].clone()
    d = tmp_path / "ck"
    d.mkdir()
    save_file(weights, str(d / "model.safetensors"))
    fields = {"type": "pi0_fast", "chunk_size": 10, "max_action_dim": 32, "max_decoding_steps": 24,
              "tokenizer_max_length": 200,
              "vision_num_heads": 4}
    (d / "config.json").write_text(json.dumps(fields))
    model = pi0.load_model(d, backend=backend, dtype=torch.float32)
    assert model.config.kind == "pi0_fast" and model.checkpoint_info.layout == layout
    assert (model.config.action_horizon, model.config.max_decoding_steps) == (10, 24)
    t, images, image_masks, tokens, masks = case_inputs("ragged_masked", meta)
    got = model.generate(images, image_masks, tokens, masks,
                         end_ids=[meta["end_of_action_token_id"]])
    assert torch.equal(got, t["generated"])
    assert main(["inspect", str(d)]) == 0
    assert "pi0_fast checkpoint" in capsys.readouterr().out
    # serving needs the text and FAST tokenizers beside it: one clear line, no traceback
    assert main(["serve", "--checkpoint", str(d), "--backend", backend, "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "Traceback" not in err


def test_the_training_loss_is_lerobots(lerobot):
    """Next-token cross-entropy of padded action tokens after a ragged prompt and a masked camera (LeRobot's forward:
    the mean over valid targets); gradients reach the vision tower and the embedding."""
    meta, model = lerobot
    t = load_file(FIXTURE / "ragged_masked.safetensors")
    model.requires_grad_(True)
    try:
        per_token = model.compute_loss([t["image_0"], t["image_1"]], [t["image_mask_0"], t["image_mask_1"]],
                                       t["tokens"], t["token_masks"], t["action_tokens"], t["action_masks"])
        valid = t["action_masks"][:, 1:]
        assert per_token.shape == valid.shape and torch.all(per_token[~valid] == 0)
        loss = per_token.sum() / valid.sum()
        assert abs(loss.item() - t["loss"].item()) <= 1e-5 * t["loss"].item(), (loss.item(), t["loss"].item())
        loss.backward()
        assert model.vision.patch_embedding.weight.grad.abs().sum() > 0
        assert model.vlm.embed_tokens.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_an_openpi_orbax_checkpoint_loads_and_decodes_as_lerobot(tmp_path):
    """The fixture's weights as openpi's JAX tree of a π0-FAST model (PaliGemma's leaves alone, fp32) in Orbax."""
    pytest.importorskip("tensorstore")
    import dataclasses

    import pi0
    from pi0.model.config import Pi0Config, canonical_shapes
    from tests.orbax_writer import jax_tree, write_orbax

    meta, model = lerobot_model()
    cfg = model.config
    pi0_cfg = Pi0Config(vision=cfg.vision, vlm=cfg.vlm, expert=dataclasses.replace(cfg.vlm, vocab_size=0))
    state = {k: v for k, v in model.state_dict().items()}
    state |= {k: torch.zeros(shape) for k, shape in canonical_shapes(pi0_cfg).items() if k not in state}
    leaves = {k: v for k, v in jax_tree(state, pi0_cfg).items()
              if not (k.startswith("PaliGemma/llm/") and "_1" in k) and not k.startswith(("action_", "state_proj"))}
    write_orbax(tmp_path / "ck" / "params", leaves, dtype_of=lambda name: "float32")
    loaded = pi0.load_model(tmp_path / "ck", backend="reference", action_horizon=10)
    assert loaded.config.kind == "pi0_fast" and loaded.checkpoint_info.layout == "openpi_orbax"
    t, images, image_masks, tokens, masks = case_inputs("ragged_masked", meta)
    got = loaded.generate(images, image_masks, tokens, masks,
                          end_ids=[meta["end_of_action_token_id"]], max_steps=24)
    assert torch.equal(got, t["generated"])


def test_build_model_makes_a_seeded_random_pi0_fast():
    import dataclasses

    import pi0
    from pi0.model.fast_config import FastConfig

    tiny = pi0.size_config("tiny")
    cfg = FastConfig(vision=tiny.vision, vlm=tiny.vlm, max_decoding_steps=5)
    a, b = (pi0.build_model(cfg, backend="reference", seed=1) for _ in range(2))
    assert isinstance(a, Pi0FastReference) and len(a.state_dict()) == len(fast_canonical_shapes(cfg))
    obs = pi0.sample_observation(dataclasses.replace(tiny, num_cameras=2), batch_size=2, num_valid_tokens=6)
    obs.tokens[:, -1], obs.token_masks[:, -1] = 2, True  # a valid last position
    got = a.generate(obs.images, obs.image_masks, obs.tokens, obs.token_masks, end_ids=[1])
    assert got.shape == (2, 5) and torch.equal(got, b.generate(obs.images, obs.image_masks, obs.tokens,
                                                               obs.token_masks, end_ids=[1]))
