"""Both backends on a CUDA GPU against the CPU reference. Skipped, with the reason, where torch sees no GPU
(benchmarks/gpu_check.sh runs these and the full-size benchmarks on a GPU machine)."""

import pytest
import torch

import pi0
from tests.backends.test_engine import assert_bf16_gate, bf16_gate
from tests.conftest import make_noise, make_obs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05"])
@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_fp32_on_cuda_matches_the_cpu_reference(name, backend):
    cfg = pi0.size_config(name)
    cpu = pi0.build_model(cfg, seed=4)
    gpu = pi0.build_model(cfg, seed=4, backend=backend, device="cuda")
    obs, noise = make_obs(cfg, 3, (3, 11, 6), ((2, 1), (0, 2))), make_noise(cfg, 3)
    for steps in (10, 3):
        got = gpu.sample_actions(obs, noise=noise, num_steps=steps).cpu()
        assert (got - cpu.sample_actions(obs, noise=noise, num_steps=steps)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05"])
def test_bf16_gate_on_cuda(name):
    cfg = pi0.size_config(name)
    ref, ref16 = pi0.build_model(cfg, seed=5), pi0.build_model(cfg, seed=5, dtype="bfloat16")
    assert_bf16_gate(bf16_gate(cfg, pi0.build_model(cfg, seed=5, backend="engine", dtype="bfloat16", device="cuda"),
                               ref, ref16))
