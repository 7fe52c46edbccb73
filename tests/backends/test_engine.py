"""The engine against the reference (fp32 exactness, bf16 PCC gates), on LeRobot fixtures, and the
work it must skip."""

import dataclasses
import statistics

import pytest
import torch

import pi0
from pi0.backends.engine import ops
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.factory import random_state_dict
from tests.conftest import make_noise, make_obs
from tests.fixtures_lib import MODELS, ROOT, cases, scaled_err

# Every fast path and its fallback, whatever the CPU running the tests does: "probed" takes oneDNN packing and compiled
# kernels where they work here; the others force packing and/or compiling off.
KERNELS = {"probed": {}, "plain": {"pack": False, "fuse": False}, "unpacked": {"pack": False}, "eager": {"fuse": False}}


def make_engine(cfg: pi0.Pi0Config, seed: int, dtype=torch.float32, **kernels) -> Pi0Engine:
    """The engine over the same seeded weights as pi0.build_model(cfg, seed=seed), with kernel options."""
    return Pi0Engine(cfg, random_state_dict(cfg, seed, dtype), **kernels)


@pytest.fixture(scope="module", params=[(p, k) for p in ("tiny", "tiny-pi05") for k in KERNELS], ids=lambda p: "-".join(p))
def pair(request):
    name, kernels = request.param
    cfg = pi0.size_config(name)
    eng = make_engine(cfg, 11, **KERNELS[kernels])
    if kernels == "plain":
        assert not eng.kernels["packed_weights"] and not eng.kernels["fused_kernels"]
    return pi0.build_model(cfg, seed=11), eng


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


def bf16_gate(cfg: pi0.Pi0Config, eng, ref, ref16, seeds: int = 10) -> dict[str, list[float]]:
    """Per seed: PCC of the engine's actions vs the fp32 reference, their max-abs error over the reference
    actions' std, and the same error of the reference itself run in bf16 (the floor bf16 rounding sets)."""
    out = {"pcc": [], "rel_err": [], "ref16_rel_err": []}
    for seed in range(seeds):
        obs = make_obs(cfg, 2, (7, 12), ((1, 1),), seed=seed)
        noise = make_noise(cfg, 2, seed=seed)
        want = ref.sample_actions(obs, noise=noise)
        got = eng.sample_actions(obs, noise=noise).cpu()
        out["pcc"].append(_pcc(got, want))
        out["rel_err"].append(((got - want).abs().max() / want.std()).item())
        out["ref16_rel_err"].append(((ref16.sample_actions(obs, noise=noise) - want).abs().max() / want.std()).item())
    return out


def assert_bf16_gate(g: dict[str, list[float]]) -> None:
    """PCC (mean >= 0.999, min >= 0.995), max-abs error <= 5% of the actions' std, and no more error than
    bf16 rounding explains: mean <= 1.5x and max <= 2x the reference's own error in bf16. PCC alone passes
    a RoPE position off by one or a dropped norm at tiny sizes; the error bounds catch them."""
    m = statistics.mean
    assert m(g["pcc"]) >= 0.999 and min(g["pcc"]) >= 0.995, g["pcc"]
    assert max(g["rel_err"]) <= 0.05, g["rel_err"]
    assert m(g["rel_err"]) <= 1.5 * m(g["ref16_rel_err"]), (g["rel_err"], g["ref16_rel_err"])
    assert max(g["rel_err"]) <= 2 * max(g["ref16_rel_err"]), (g["rel_err"], g["ref16_rel_err"])


@pytest.fixture(scope="module", params=["tiny", "tiny-pi05"])
def gate_refs(request):
    cfg = pi0.size_config(request.param)
    return cfg, pi0.build_model(cfg, seed=5), pi0.build_model(cfg, seed=5, dtype="bfloat16")


@pytest.mark.parametrize("kernels", KERNELS)
def test_engine_bf16_gate(gate_refs, kernels):
    cfg, ref, ref16 = gate_refs
    assert_bf16_gate(bf16_gate(cfg, make_engine(cfg, 5, torch.bfloat16, **KERNELS[kernels]), ref, ref16))


@pytest.mark.parametrize("bug", ["rope_position_off_by_one", "dropped_norm"])
def test_bf16_gate_catches_a_wrong_engine(gate_refs, bug, monkeypatch):
    """A deliberately broken engine: the action tokens' RoPE positions one too far, or the first VLM
    layer's input RMSNorm skipped (x * w instead of rms(x) * w). Both keep PCC above 0.999 at tiny sizes."""
    cfg, ref, ref16 = gate_refs
    eng = make_engine(cfg, 5, torch.bfloat16)
    if bug == "rope_position_off_by_one":
        right = eng._rope
        monkeypatch.setattr(eng, "_rope", lambda positions: right(positions + 1))
    else:
        target, right = eng.w.vlm_layers[0].in_norm, ops.rms_norm
        monkeypatch.setattr(ops, "rms_norm", lambda x, w, eps: x.float() * w if w is target else right(x, w, eps))
    with pytest.raises(AssertionError):
        assert_bf16_gate(bf16_gate(cfg, eng, ref, ref16))


@pytest.mark.parametrize("name", MODELS)
def test_engine_reproduces_lerobot_fixtures(name):
    eng32 = pi0.load_model(ROOT / name, backend="engine")
    eng16 = pi0.load_model(ROOT / name, backend="engine", dtype="bfloat16")
    for case in cases(name):
        want = case.expected["actions"]
        got = eng32.sample_actions(case.obs, noise=case.noise, num_steps=case.num_steps)
        assert scaled_err(got, want) <= 1e-4, f"{name}/{case.name}"
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
    cfg = pi0.size_config("tiny-pi05")
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
    cfg = pi0.size_config("tiny")
    ref = pi0.build_model(cfg, seed=5)
    state = {k: v if k.startswith(("vision.", "projector.")) else v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    eng = Pi0Engine(cfg, dict(state), vision_dtype=torch.float32)
    assert eng.w.patch_w.dtype == torch.float32 and eng.w.embed.dtype == torch.bfloat16
    obs = make_obs(cfg, 2, (7, 12), ((1, 1),))
    noise = make_noise(cfg, 2)
    images = torch.cat([im[:1] for im in obs.images])
    want = ref.embed_image(images)
    bf16_vision = pi0.build_model(cfg, seed=5, backend="engine", dtype="bfloat16")
    err32 = (eng.embed_images(images).float() - want).abs().max()  # only the final rounding to bf16
    err16 = (bf16_vision.embed_images(images).float() - want).abs().max()
    assert err32 <= want.abs().max() * 2**-8 and err32 < err16 / 2
    assert _pcc(eng.sample_actions(obs, noise=noise), ref.sample_actions(obs, noise=noise)) >= 0.999
