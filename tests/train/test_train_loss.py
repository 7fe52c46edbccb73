"""The training loss and its gradients reproduce LeRobot 0.6.1 (tests/fixtures/<model>/train/, made by
tools/make_train_fixtures.py): loss <= 1e-5 of its scale, every parameter's gradient <= 1e-4 relative, with
and without gradient checkpointing."""

import pytest
import torch
from safetensors import safe_open

import pi0
from pi0.checkpoint.layouts import to_canonical
from pi0.model.functional import sample_time
from tests.fixtures_lib import MODELS, ROOT, scaled_err


def load_case(name: str):
    with safe_open(str(ROOT / name / "train" / "loss.safetensors"), "pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
        action_dim = int(h.metadata()["action_dim"])
    n = sum(1 for k in t if k.startswith("image_mask_"))
    obs = pi0.Observation([t[f"image_{i}"] for i in range(n)], [t[f"image_mask_{i}"] for i in range(n)],
                          t["tokens"], t["token_masks"], t["state"])
    return obs, t, action_dim


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
@pytest.mark.parametrize("name", MODELS)
def test_loss_and_gradients_reproduce_lerobot(name, checkpointing):
    obs, t, action_dim = load_case(name)
    model = pi0.load_model(ROOT / name).train().requires_grad_(True).gradient_checkpointing_(checkpointing)
    loss = model.compute_loss(obs, t["actions"], noise=t["noise"], time=t["time"])
    assert loss.shape == t["loss"].shape and loss.dtype == torch.float32
    err = scaled_err(loss.detach(), t["loss"])
    assert err <= 1e-5, f"{name}: loss differs from LeRobot by {err:.2e} of its scale"

    loss[:, :, :action_dim].mean().backward()  # LeRobot's PI0Policy.forward reduction
    params = dict(model.named_parameters())
    want = {to_canonical(k[len("grad."):], "lerobot"): g for k, g in t.items() if k.startswith("grad.")}
    assert None not in want
    got = {k for k, p in params.items() if p.grad is not None}
    assert got == set(want), f"gradients only here: {sorted(got - set(want))}, only in LeRobot: {sorted(set(want) - got)}"
    # a floor for gradients that are zero in exact arithmetic (SigLIP's k_proj bias shifts every logit of a
    # query alike, which softmax ignores): 1e-4 of the largest gradient anywhere
    floor = 1e-4 * max(g.abs().max().item() for g in want.values())
    for k, g in want.items():
        err = (params[k].grad - g).abs().max().item()
        ref = max(g.abs().max().item(), floor)
        assert err <= 1e-4 * ref, f"{name}: grad of {k} differs by {err:.2e} (|grad| max {g.abs().max():.2e})"


def test_loss_draws_noise_and_time_and_checks_shapes():
    model = pi0.build_model(pi0.size_config("tiny"), seed=0)
    cfg = model.config
    obs = pi0.sample_observation(cfg, batch_size=3)
    actions = torch.randn(3, cfg.action_horizon, cfg.action_dim)
    torch.manual_seed(0)
    a = model.compute_loss(obs, actions)
    torch.manual_seed(0)
    b = model.compute_loss(obs, actions)
    assert a.shape == (3, cfg.action_horizon, cfg.action_dim) and torch.equal(a, b)
    with pytest.raises(ValueError, match="actions must be"):
        model.compute_loss(obs, actions[:, :, :7])
    with pytest.raises(ValueError, match="time must be"):
        model.compute_loss(obs, actions, time=torch.rand(2))


def test_time_distribution():
    """t = Beta(1.5, 1) * 0.999 + 0.001: mean 0.001 + 0.999 * 0.6, inside (0.001, 1)."""
    import numpy as np

    t = sample_time(200_000, np.random.default_rng(0))
    assert t.dtype == torch.float32 and t.min() > 0.001 and t.max() < 1.0
    assert abs(t.mean().item() - (0.001 + 0.999 * 0.6)) < 3e-3
    assert torch.equal(sample_time(5, np.random.default_rng(7)), sample_time(5, np.random.default_rng(7)))
