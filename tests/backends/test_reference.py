"""The fp32 reference: cached == uncached, masked cameras and padding change nothing, batching."""

import dataclasses

import pytest
import torch

import pi0
from pi0.model.functional import interpolate_position_embedding
from tests.conftest import make_noise, make_obs


def test_cached_equals_uncached(tiny_model):
    m = tiny_model
    obs = make_obs(m.config, 2, (5, 9), ((1, 0),))
    x_t = make_noise(m.config, 2)
    prefix, pm, par = m.embed_prefix(obs)
    kv, _ = m.fill_kv_cache(prefix, pm, par)
    for t in (1.0, 0.55, 0.1):
        tt = torch.full((2,), t)
        with torch.no_grad():
            cached = m.denoise_step(obs.state, pm, par, kv, x_t, tt)
            uncached = m.forward_uncached(obs, x_t, tt)
        assert (cached - uncached).abs().max() <= 1e-5


def test_masked_camera_content_and_presence_do_not_matter(tiny_model):
    m = tiny_model
    cfg = m.config
    obs = make_obs(cfg, 1, (7,), ((1, 0),))
    noise = make_noise(cfg, 1)
    ref = m.sample_actions(obs, noise=noise)
    # other pixels behind the mask
    other = dataclasses.replace(obs, images=[obs.images[0], torch.rand_like(obs.images[1]) * 2 - 1, obs.images[2]])
    assert (m.sample_actions(other, noise=noise) - ref).abs().max() <= 1e-5
    # the masked camera dropped altogether
    dropped = dataclasses.replace(obs, images=[obs.images[0], obs.images[2]],
                                  image_masks=[obs.image_masks[0], obs.image_masks[2]])
    assert (m.sample_actions(dropped, noise=noise) - ref).abs().max() <= 1e-5
    # and it does matter when it is not masked (the test can fail)
    unmasked = dataclasses.replace(other, image_masks=[torch.ones(1, dtype=torch.bool)] * 3)
    assert (m.sample_actions(unmasked, noise=noise) - ref).abs().max() > 1e-3


def test_extra_padding_tokens_do_not_matter(tiny_model):
    m = tiny_model
    cfg = m.config
    obs = make_obs(cfg, 2, (4, 10))
    noise = make_noise(cfg, 2)
    ref = m.sample_actions(obs, noise=noise)
    extra = 17
    tokens = torch.cat([obs.tokens, torch.randint(0, cfg.vlm.vocab_size, (2, extra))], dim=1)  # junk ids behind the mask
    masks = torch.cat([obs.token_masks, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    padded = dataclasses.replace(obs, tokens=tokens, token_masks=masks)
    assert (m.sample_actions(padded, noise=noise) - ref).abs().max() <= 1e-5


def test_batch_rows_with_different_valid_lengths_match_single_rows(tiny_model):
    m = tiny_model
    cfg = m.config
    obs = make_obs(cfg, 3, (3, 11, 6), ((2, 1),))
    noise = make_noise(cfg, 3)
    batched = m.sample_actions(obs, noise=noise)
    for b in range(3):
        row = pi0.Observation([im[b : b + 1] for im in obs.images], [mk[b : b + 1] for mk in obs.image_masks],
                              obs.tokens[b : b + 1], obs.token_masks[b : b + 1], obs.state[b : b + 1])
        assert (m.sample_actions(row, noise=noise[b : b + 1]) - batched[b : b + 1]).abs().max() <= 1e-5


def test_prompt_and_state_change_the_actions(tiny_model):
    m = tiny_model
    cfg = m.config
    obs = make_obs(cfg, 1, (8,))
    noise = make_noise(cfg, 1)
    ref = m.sample_actions(obs, noise=noise)
    tokens = obs.tokens.clone()
    tokens[0, 3] = (tokens[0, 3] + 1) % cfg.vlm.vocab_size
    assert (m.sample_actions(dataclasses.replace(obs, tokens=tokens), noise=noise) - ref).abs().max() > 1e-4
    if not cfg.pi05:  # pi0.5 takes the state through the prompt, not a state token
        state = obs.state + 0.5
        assert (m.sample_actions(dataclasses.replace(obs, state=state), noise=noise) - ref).abs().max() > 1e-4


def test_steps_and_seeded_noise(tiny_model):
    m = tiny_model
    obs = make_obs(m.config, 1, (6,))
    noise = make_noise(m.config, 1)
    a10 = m.sample_actions(obs, noise=noise)
    a3 = m.sample_actions(obs, noise=noise, num_steps=3)
    assert a10.shape == a3.shape == (1, m.config.action_horizon, m.config.action_dim)
    assert (a10 - a3).abs().max() > 1e-4
    # one Euler step is x = noise - v(noise, t=1)
    a1 = m.sample_actions(obs, noise=noise, num_steps=1)
    with torch.no_grad():
        v = m.forward_uncached(obs, noise, torch.ones(1))
    assert (a1 - (noise - v)).abs().max() <= 1e-5


def test_other_image_sizes_interpolate_the_position_embedding(tiny_model):
    m = tiny_model
    cfg = m.config
    pos = m.vision.position_embedding.weight
    grid = cfg.vision.image_size // cfg.vision.patch_size
    assert torch.equal(interpolate_position_embedding(pos, grid), pos)
    big = interpolate_position_embedding(pos, 2 * grid)
    assert big.shape == (4 * grid * grid, cfg.vision.width)
    obs = pi0.sample_observation(cfg, batch_size=1, image_size=2 * cfg.vision.image_size)
    out = m.sample_actions(obs, noise=make_noise(cfg, 1))
    assert torch.isfinite(out).all()
    # a constant embedding stays constant under bicubic resampling
    const = torch.ones_like(pos) * 0.25
    assert torch.allclose(interpolate_position_embedding(const, 2 * grid + 1), torch.full_like(big[:1], 0.25).expand((2 * grid + 1) ** 2, -1))


def test_pi05_needs_no_state(tiny_model):
    m = tiny_model
    obs = make_obs(m.config, 1, (6,))
    noise = make_noise(m.config, 1)
    if m.config.pi05:
        assert torch.equal(m.sample_actions(dataclasses.replace(obs, state=None), noise=noise),
                           m.sample_actions(obs, noise=noise))
    else:
        with pytest.raises(ValueError, match="pi0 needs a state"):
            m.sample_actions(dataclasses.replace(obs, state=None), noise=noise)


def test_integer_masks_are_taken_as_bool(tiny_model):
    m = tiny_model
    obs = make_obs(m.config, 2, (4, 9), ((1, 0),))
    noise = make_noise(m.config, 2)
    ints = pi0.Observation(obs.images, [mk.long() for mk in obs.image_masks], obs.tokens.int(),
                           obs.token_masks.long(), obs.state.double())
    assert (m.sample_actions(ints, noise=noise) - m.sample_actions(obs, noise=noise)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="0/1"):
        pi0.Observation(obs.images, obs.image_masks, obs.tokens, obs.token_masks.long() * 2, obs.state)


def test_bad_inputs_are_named(tiny_model):
    m = tiny_model
    cfg = m.config
    obs = pi0.sample_observation(cfg, batch_size=1)
    with pytest.raises(ValueError, match="noise must be"):
        m.sample_actions(obs, noise=torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="state must be"):
        m.sample_actions(dataclasses.replace(obs, state=torch.zeros(1, 5)))
    with pytest.raises(ValueError, match="token ids"):
        m.sample_actions(dataclasses.replace(obs, tokens=obs.tokens + cfg.vlm.vocab_size))
    with pytest.raises(ValueError, match="image_masks"):
        m.sample_actions(dataclasses.replace(obs, image_masks=obs.image_masks[:2]))
    with pytest.raises(ValueError, match=r"images\[0\]"):
        m.sample_actions(dataclasses.replace(obs, images=[obs.images[0][:, :2]] + obs.images[1:]))
    with pytest.raises(ValueError, match="num_steps"):
        m.sample_actions(obs, num_steps=0)
