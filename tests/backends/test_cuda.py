"""Both backends on a CUDA GPU against the CPU reference, the buckets' graphs against the direct call, fp8. Skipped,
with the reason, where torch sees no GPU (benchmarks/gpu_check.sh runs these and the full-size benchmarks on a GPU
machine)."""

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


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05"])
def test_replayed_graphs_match_the_dynamic_call_on_cuda(name):
    """The buckets' CUDA graphs (the engine's default on a GPU) against the same engine called as the calls come:
    fp32 within 1e-4 at batch 1 and 3 with masked cameras and ragged prompts; a replay reuses the bucket's buffers
    and allocates nothing but the answer's copy."""
    cfg = pi0.size_config(name)
    eng = pi0.build_model(cfg, seed=4, backend="engine", device="cuda")
    assert eng.runner is not None and eng.runner.capture
    direct = pi0.build_model(cfg, seed=4, backend="engine", device="cuda")
    direct.runner = None
    for batch, valid, masked in ((1, (12,), ()), (3, (3, 11, 6), ((2, 1), (0, 2)))):
        obs, noise = make_obs(cfg, batch, valid, masked), make_noise(cfg, batch)
        want = direct.sample_actions(obs, noise=noise)
        got = eng.sample_actions(obs, noise=noise)
        assert (got - want).abs().max() <= 1e-4
        entry = next(e for b, e in eng.runner.entries.items() if b.batch == eng.runner.rules.batch(batch))
        assert entry.graph is not None, entry.why
        ptrs = [t.data_ptr() for t in entry.buffers.tensors()]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        again = eng.sample_actions(obs, noise=noise)
        torch.cuda.synchronize()
        assert torch.equal(again, got) and [t.data_ptr() for t in entry.buffers.tensors()] == ptrs
        assert torch.cuda.memory_allocated() - before <= again.numel() * 4 + 512


def test_fp8_on_cuda_passes_the_gate_or_is_refused_with_the_reason():
    from pi0.hardware import FP8_CAPABILITY

    cfg = pi0.size_config("tiny")
    if torch.cuda.get_device_capability() < FP8_CAPABILITY:
        with pytest.raises(ValueError, match="fp8 tensor cores"):
            pi0.build_model(cfg, seed=5, backend="engine", dtype="fp8", device="cuda")
        return
    ref = pi0.build_model(cfg, seed=5)
    eng = pi0.build_model(cfg, seed=5, backend="engine", dtype="fp8", device="cuda")
    pccs = []
    for seed in range(4):
        obs, noise = make_obs(cfg, 2, (7, 12), ((1, 1),), seed=seed), make_noise(cfg, 2, seed=seed)
        want, got = ref.sample_actions(obs, noise=noise), eng.sample_actions(obs, noise=noise).float().cpu()
        pccs.append(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1].item())
    assert sum(pccs) / len(pccs) >= 0.99 and min(pccs) >= 0.98, pccs
