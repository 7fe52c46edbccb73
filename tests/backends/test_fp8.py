"""fp8 in the engine, by emulation on the CPU: the accuracy gate at tiny size (against the fp32 reference and a
reference with e4m3 rounding applied independently), the wrong scales it catches, the weight format's algebra, and
dtype fp8 refused, with the reason, where there are no fp8 tensor cores."""

import dataclasses
import statistics

import pytest
import torch

import pi0
from pi0.backends.engine import fp8
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.engine.weights import cat_rows, scale_rows
from tests.backends.test_int8 import LINEARS, reference, spread_state
from tests.conftest import make_noise, make_obs


def fake_fp8(w: torch.Tensor) -> torch.Tensor:
    """Per-row e4m3 rounding written out: s = max|row| / 448, w / s rounded to e4m3, times s (fp32)."""
    wf = w.float()
    s = wf.abs().amax(-1, keepdim=True) / 448.0
    return (wf / s).to(torch.float8_e4m3fn).float() * s


def emulated_fp8(cfg: pi0.Pi0Config, state: dict[str, torch.Tensor]):
    """The fp32 reference with every covered weight rounded per output row and its input per token."""
    model = reference(cfg, state)
    for name, mod in model.named_modules():
        if LINEARS.fullmatch(name + ".weight"):
            mod.weight = torch.nn.Parameter(fake_fp8(mod.weight), requires_grad=False)
            mod.register_forward_pre_hook(lambda m, args: (fake_fp8(args[0]),))
    return model


def fp8_engine(cfg: pi0.Pi0Config, state: dict[str, torch.Tensor], dtype=torch.float32) -> Pi0Engine:
    quantize = fp8.Fp8Quantizer(dtype)
    return Pi0Engine(cfg, {k: quantize(k, v.to(dtype)) for k, v in state.items()}, pack=False, fuse=False)


def fp8_gate(cfg, eng, ref, emu, seeds: int = 4) -> dict[str, list[float]]:
    """Per seed (two rows, one with a masked camera and padding): PCC vs fp32, the mean-abs error over the actions'
    std, the emulation's own error, and the engine's distance to the emulation."""
    out = {"pcc": [], "err": [], "emu_err": [], "emu_dist": []}
    for seed in range(seeds):
        obs, noise = make_obs(cfg, 2, (7, 12), ((1, 1),), seed=seed), make_noise(cfg, 2, seed=seed)
        want = ref.sample_actions(obs, noise=noise)
        got = eng.sample_actions(obs, noise=noise)
        emulated = emu.sample_actions(obs, noise=noise)
        out["pcc"].append(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1].item())
        out["err"].append(((got - want).abs().mean() / want.std()).item())
        out["emu_err"].append(((emulated - want).abs().mean() / want.std()).item())
        out["emu_dist"].append(((got - emulated).abs().mean() / want.std()).item())
    return out


def assert_fp8_gate(g: dict[str, list[float]]) -> None:
    """PCC (mean >= 0.99, min >= 0.98), no more error than e4m3 rounding explains (mean <= 1.5x, max <= 2x the
    emulation's), and the engine nearer the emulation than the emulation is to fp32 (mean <= 0.5x: fp32 between the
    products, so only the order of the sums differs)."""
    m = statistics.mean
    assert m(g["pcc"]) >= 0.99 and min(g["pcc"]) >= 0.98, g["pcc"]
    assert m(g["err"]) <= 1.5 * m(g["emu_err"]), (g["err"], g["emu_err"])
    assert max(g["err"]) <= 2 * max(g["emu_err"]), (g["err"], g["emu_err"])
    assert m(g["emu_dist"]) <= 0.5 * m(g["emu_err"]), (g["emu_dist"], g["emu_err"])


@pytest.fixture(scope="module", params=["tiny", "tiny-pi05"])
def gate_case(request):
    cfg = pi0.size_config(request.param)
    state = spread_state(cfg, 3)
    return cfg, state, reference(cfg, state), emulated_fp8(cfg, state)


def test_fp8_gate(gate_case):
    cfg, state, ref, emu = gate_case
    eng = fp8_engine(cfg, state)
    assert eng.kernels["fp8_kernel"] == "emulated" and eng.kernels["fp8_tensors"] > 0
    assert_fp8_gate(fp8_gate(cfg, eng, ref, emu))


def test_fp8_gate_with_bf16_between_the_products(gate_case):
    """What a GPU runs: bf16 activations between the fp8 products (the gate's PCC and error bounds only)."""
    cfg, state, ref, emu = gate_case
    g = fp8_gate(cfg, fp8_engine(cfg, state, torch.bfloat16), ref, emu)
    assert statistics.mean(g["pcc"]) >= 0.99 and min(g["pcc"]) >= 0.98, g["pcc"]
    assert statistics.mean(g["err"]) <= 2 * statistics.mean(g["emu_err"]), (g["err"], g["emu_err"])


@pytest.mark.parametrize("bug", ["per_tensor_scale", "flipped_scales"])
def test_fp8_gate_catches_a_wrong_scale(gate_case, bug, monkeypatch):
    cfg, state, ref, emu = gate_case
    good = fp8.quantize_weight

    def wrong(w, dtype):
        q = good(w, dtype)
        if bug == "flipped_scales":
            return dataclasses.replace(q, scale=q.scale.flip(0))
        s = w.float().abs().max() / 448.0  # one scale for the whole weight
        return fp8.Fp8Weight((w.float() / s).to(torch.float8_e4m3fn), s.expand(w.shape[0]).clone(), dtype)
    monkeypatch.setattr(fp8, "quantize_weight", wrong)
    with pytest.raises(AssertionError):
        assert_fp8_gate(fp8_gate(cfg, fp8_engine(cfg, state), ref, emu, seeds=3))


def test_the_fp8_weight_format():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * torch.linspace(0.1, 10, 24)[:, None]
    x = torch.randn(5, 40, generator=g)
    q = fp8.quantize_weight(w, torch.float32)
    assert q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (24,)
    assert torch.allclose(q.q.float() * q.scale[:, None], fake_fp8(w))  # one scale per output row
    want = fake_fp8(x) @ fake_fp8(w).T
    assert torch.allclose(fp8.fp8_linear(x, q), want, rtol=1e-5, atol=1e-5)
    parts = cat_rows([fp8.quantize_weight(w[:10], torch.float32), fp8.quantize_weight(w[10:], torch.float32)])
    assert torch.equal(parts.q.float(), q.q.float()) and torch.equal(parts.scale, q.scale)  # stacking = quantising the stack
    assert torch.allclose(fp8.fp8_linear(x, scale_rows(q, 0.125)), want * 0.125, rtol=1e-5, atol=1e-5)
    assert torch.equal(q.embedding(torch.tensor([3, 0])), (q.q.float() * q.scale[:, None])[[3, 0]])


def test_dtype_fp8_is_refused_without_fp8_tensor_cores():
    cfg = pi0.size_config("tiny")
    with pytest.raises(ValueError, match=r"fp8 tensor cores \(compute capability 8.9\+.*cpu has none"):
        pi0.build_model(cfg, backend="engine", dtype="fp8", device="cpu")
    from pi0.backends.reference import spec

    with pytest.raises(ValueError, match="fp8 is an engine dtype"):  # where a GPU has them, the reference still refuses
        spec.load_hook(torch.float8_e4m3fn, torch.device("cpu"))
