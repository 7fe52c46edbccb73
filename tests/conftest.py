import warnings

import pytest
import torch

import pi0

warnings.filterwarnings("ignore", message="SigLIP width .* records no head count")


def make_noise(cfg: pi0.Pi0Config, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session", params=["tiny", "tiny-pi05"])
def tiny_model(request):
    return pi0.build_model(pi0.preset(request.param), seed=3)
