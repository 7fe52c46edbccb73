"""Hardware-aware choices and their fallbacks, tested on any machine: dtype "auto" follows the bf16 probe
(forced both ways here), packing and compiled kernels fall back when their probe fails, fp16 is refused."""


import pytest
import torch

import pi0
from pi0 import hardware
from pi0.backends.engine import kernels, ops
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.factory import random_state_dict
from tests.conftest import make_noise, make_obs


@pytest.fixture
def forced_bf16(monkeypatch):
    """Set PI0_NATIVE_BF16 for one test, with the probe's cache cleared before and after."""
    def force(value: str) -> None:
        monkeypatch.setenv("PI0_NATIVE_BF16", value)
        hardware.probe_bf16.cache_clear()

    yield force
    monkeypatch.delenv("PI0_NATIVE_BF16", raising=False)
    hardware.probe_bf16.cache_clear()


def test_auto_dtype_follows_native_bf16(forced_bf16):
    forced_bf16("0")
    dtype, why = hardware.resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "float32" in why and "PI0_NATIVE_BF16=0" in why
    assert pi0.build_model(pi0.size_config("tiny"), backend="engine", dtype="auto").dtype == torch.float32
    forced_bf16("1")
    assert hardware.resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    assert pi0.build_model(pi0.size_config("tiny"), backend="engine", dtype="auto").dtype == torch.bfloat16


def test_explicit_bf16_without_native_bf16_runs_and_says_it_is_slow(forced_bf16):
    forced_bf16("0")
    dtype, why = hardware.resolve_dtype("bfloat16", "cpu")
    assert dtype == torch.bfloat16 and "slow" in why
    cfg = pi0.size_config("tiny")
    eng = Pi0Engine(cfg, random_state_dict(cfg, 2, torch.bfloat16), pack=False)  # plain tensors, as on AVX2
    ref = pi0.build_model(cfg, seed=2)
    obs, noise = make_obs(cfg, 1, (9,)), make_noise(cfg, 1)
    got, want = eng.sample_actions(obs, noise=noise), ref.sample_actions(obs, noise=noise)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.999


def test_the_real_probe_reads_flags_or_times_gemms(forced_bf16, monkeypatch):
    monkeypatch.delenv("PI0_NATIVE_BF16", raising=False)
    hardware.probe_bf16.cache_clear()
    native, why = hardware.native_bf16("cpu")
    assert isinstance(native, bool) and why
    # an AVX2-only CPU's flags: no bf16, whatever oneDNN says
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    hardware.probe_bf16.cache_clear()
    assert hardware.native_bf16("cpu") == (False, "CPU (%s) has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag)"
                                           % torch.backends.cpu.get_cpu_capability())
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    hardware.probe_bf16.cache_clear()
    assert hardware.native_bf16("cpu")[0] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # no flags to read (not Linux): timing decides
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: None)
    monkeypatch.setattr(hardware, "_gemm_rates", lambda: (300.0, 40.0))
    hardware.probe_bf16.cache_clear()
    assert hardware.native_bf16("cpu") == (False, "CPU (%s) bf16 GEMM 40 GFLOP/s vs fp32 300 GFLOP/s"
                                           % torch.backends.cpu.get_cpu_capability())
    monkeypatch.setattr(hardware, "_gemm_rates", lambda: (250.0, 1100.0))
    hardware.probe_bf16.cache_clear()
    assert hardware.native_bf16("cpu")[0] is True


def test_gemm_rates_measures_both(monkeypatch):
    f32, b16 = hardware._gemm_rates(m=16, k=64, n=64, repeats=2)
    assert f32 > 0 and b16 > 0


def test_probed_packing_gives_the_same_products():
    for dtype in (torch.float32, torch.bfloat16):
        works, why = ops.packing_works(dtype, "cpu")
        assert why
        x, w = torch.randn(5, 64).to(dtype), torch.randn(48, 64).to(dtype)
        packed = ops.pack(w, 5, works)
        assert packed.is_mkldnn == works
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(ops.linear(x, packed).float(), torch.nn.functional.linear(x, w).float(), rtol=tol, atol=tol)


def test_a_failing_compiler_means_eager_kernels(monkeypatch):
    """No C++ compiler (or a miscompiling one): the engine picks eager ops once, at load, and still answers."""
    def broken(name):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(kernels, "compiled", broken)
    kernels.fusion_works.cache_clear()
    try:
        cfg = pi0.size_config("tiny")
        eng = Pi0Engine(cfg, random_state_dict(cfg, 1, torch.float32))
        assert not eng.kernels["fused_kernels"] and "no working C++ compiler" in eng.kernels["why"]
        ref = pi0.build_model(cfg, seed=1)
        obs, noise = make_obs(cfg, 2, (4, 9)), make_noise(cfg, 2)
        assert (eng.sample_actions(obs, noise=noise) - ref.sample_actions(obs, noise=noise)).abs().max() <= 1e-4
    finally:
        kernels.fusion_works.cache_clear()


def test_env_switches_turn_fast_paths_off(monkeypatch):
    monkeypatch.setenv("PI0_PACK", "0")
    monkeypatch.setenv("PI0_COMPILE", "0")
    eng = pi0.build_model(pi0.size_config("tiny"), backend="engine")
    assert eng.kernels["packed_weights"] is False and eng.kernels["fused_kernels"] is False


@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_float16_is_refused_with_a_reason(backend):
    with pytest.raises(ValueError, match="float16 is not supported.*65504"):
        pi0.build_model(pi0.size_config("tiny"), backend=backend, dtype="float16")
    with pytest.raises(ValueError, match="float16 is not supported"):
        pi0.build_model(pi0.size_config("tiny"), backend=backend, dtype=torch.float16)


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        hardware.resolve_dtype("int4")


def test_devices():
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    assert hardware.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            hardware.resolve_device("cuda")


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "pi0", "pi05"])
def test_canonical_shapes_are_the_reference_parameters(name):
    from pi0.backends.reference.model import Pi0Reference
    from pi0.model.config import canonical_shapes

    cfg = pi0.size_config(name)
    with torch.device("meta"):
        model = Pi0Reference(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == canonical_shapes(cfg)
