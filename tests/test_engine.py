"""The engine against the reference (fp32 exactness, bf16 PCC gates), on LeRobot fixtures, and the
work it must skip."""

import dataclasses
import statistics

import pytest
import torch

import pi0
from tests.conftest import make_noise, make_obs
from tests.fixtures_lib import MODELS, ROOT, cases


@pytest.fixture(scope="module", params=["tiny", "tiny-pi05"])
def pair(request):
    cfg = pi0.preset(request.param)
    return pi0.build_model(cfg, seed=11), pi0.build_model(cfg, seed=11, backend="engine")


@pytest.mark.parametrize("batch,valid,masked", [(1, (12,), ()), (2, (5, 9), ((1, 0),)), (3, (3, 11, 6), ((2, 1), (0, 2)))])
def test_engine_fp32_matches_reference(pair, batch, valid, masked):
    ref, eng = pair
    obs = make_obs(ref.config, batch, valid, masked)
    noise = make_noise(ref.config, batch)
    for steps in (10, 3):
        err = (eng.sample_actions(obs, noise=noise, num_steps=steps) - ref.sample_actions(obs, noise=noise, num_steps=steps)).abs().max()
        assert err <= 1e-4, err


def _pcc(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-pi05"])
def test_engine_bf16_pcc_gate(preset_name):
    cfg = pi0.preset(preset_name)
    ref = pi0.build_model(cfg, seed=5)
    eng = pi0.build_model(cfg, seed=5, backend="engine", dtype="bfloat16")
    pccs = []
    for seed in range(10):
        obs = make_obs(cfg, 2, (7, 12), ((1, 1),), seed=seed)
        noise = make_noise(cfg, 2, seed=seed)
        pccs.append(_pcc(eng.sample_actions(obs, noise=noise), ref.sample_actions(obs, noise=noise)))
    assert statistics.mean(pccs) >= 0.999 and min(pccs) >= 0.995, pccs


@pytest.mark.parametrize("name", MODELS)
def test_engine_reproduces_lerobot_fixtures(name):
    eng32 = pi0.load_model(ROOT / name, backend="engine")
    eng16 = pi0.load_model(ROOT / name, backend="engine", dtype="bfloat16")
    for case in cases(name):
        want = case.expected["actions"]
        got = eng32.sample_actions(case.obs, noise=case.noise, num_steps=case.num_steps)
        assert (got - want).abs().max() <= 1e-4, f"{name}/{case.name}"
        got16 = eng16.sample_actions(case.obs, noise=case.noise, num_steps=case.num_steps)
        assert _pcc(got16, want) >= 0.995, f"{name}/{case.name}"


def test_masked_cameras_and_padding_are_skipped(pair):
    ref, eng = pair
    cfg = ref.config
    obs = make_obs(cfg, 2, (4, 9), ((1, 0), (2, 0), (2, 1)))
    seen = []
    orig = eng.embed_images

    def spy(images):
        seen.append(images.shape[0])
        return orig(images)

    eng.embed_images = spy
    try:
        prefix, n_valid, key_mask = eng.embed_prefix(obs)
    finally:
        del eng.embed_images
    assert seen == [3]  # 6 (row, camera) pairs, 3 masked: only 3 images encoded
    n_img = cfg.num_image_tokens
    assert n_valid.tolist() == [n_img + 4, 2 * n_img + 9]
    assert prefix.shape[1] == 2 * n_img + 9  # packed: no padding tokens beyond the longest row
    assert key_mask is not None and key_mask.sum(1).tolist() == n_valid.tolist()
    one = make_obs(cfg, 1, (5,), ((0, 0),))
    prefix, n_valid, key_mask = eng.embed_prefix(one)
    assert key_mask is None and prefix.shape[1] == 2 * n_img + 5
    noise = make_noise(cfg, 2)
    assert (eng.sample_actions(obs, noise=noise) - ref.sample_actions(obs, noise=noise)).abs().max() <= 1e-4


def test_pi05_engine_needs_no_state():
    cfg = pi0.preset("tiny-pi05")
    eng = pi0.build_model(cfg, seed=1, backend="engine")
    obs = make_obs(cfg, 1, (6,))
    noise = make_noise(cfg, 1)
    assert torch.equal(eng.sample_actions(dataclasses.replace(obs, state=None), noise=noise), eng.sample_actions(obs, noise=noise))


def test_other_image_sizes_match_the_reference(pair):
    ref, eng = pair
    cfg = ref.config
    obs = pi0.sample_observation(cfg, batch_size=2, image_size=2 * cfg.vision.image_size)
    obs.image_masks[0][1] = False
    noise = make_noise(cfg, 2)
    assert (eng.sample_actions(obs, noise=noise) - ref.sample_actions(obs, noise=noise)).abs().max() <= 1e-4


def test_all_cameras_masked_still_answers(pair):
    ref, eng = pair
    obs = make_obs(ref.config, 1, (6,), ((0, 0), (1, 0), (2, 0)))
    noise = make_noise(ref.config, 1)
    assert (eng.sample_actions(obs, noise=noise) - ref.sample_actions(obs, noise=noise)).abs().max() <= 1e-4


def test_engine_rejects_bad_inputs_like_the_reference(pair):
    _, eng = pair
    obs = pi0.sample_observation(eng.config)
    with pytest.raises(ValueError, match="noise must be"):
        eng.sample_actions(obs, noise=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="state must be"):
        eng.sample_actions(dataclasses.replace(obs, state=torch.zeros(1, 3)))


def test_vision_tower_can_stay_fp32():
    cfg = pi0.preset("tiny")
    ref = pi0.build_model(cfg, seed=5)
    from pi0.engine.model import Pi0Engine

    state = {k: v if k.startswith(("vision.", "projector.")) else v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    eng = Pi0Engine(cfg, dict(state), vision_dtype=torch.float32)
    assert eng.patch_w.dtype == torch.float32 and eng.embed.dtype == torch.bfloat16
    obs = make_obs(cfg, 2, (7, 12), ((1, 1),))
    noise = make_noise(cfg, 2)
    images = torch.cat([im[:1] for im in obs.images])
    want = ref.embed_image(images)
    bf16_vision = pi0.build_model(cfg, seed=5, backend="engine", dtype="bfloat16")
    err32 = (eng.embed_images(images).float() - want).abs().max()  # only the final rounding to bf16
    err16 = (bf16_vision.embed_images(images).float() - want).abs().max()
    assert err32 <= want.abs().max() * 2**-8 and err32 < err16 / 2
    assert _pcc(eng.sample_actions(obs, noise=noise), ref.sample_actions(obs, noise=noise)) >= 0.999
