"""The TTNN backend, run on the host through the real ttnn package's golden functions: the logic exact against the
reference with fp32 goldens, the device's formats close, calls checked against the real ops' signatures, bfloat8_b
packed by ttnn itself, the runtime chosen where a card would be opened. ttnn has wheels for Python 3.10 and 3.12
only: under another Python these skip, and `make test` runs them in .venv-ttnn."""

from __future__ import annotations

import pytest
import torch

import pi0
from pi0.model.rtc import RTC
from tests.conftest import make_noise, make_obs

ttnn = pytest.importorskip("ttnn", reason="ttnn ships wheels for Python 3.10 and 3.12 only (make test runs these "
                                          "in .venv-ttnn)")

from pi0.backends.ttnn import host, runtime  # noqa: E402
from pi0.backends.ttnn.model import Pi0TTNN  # noqa: E402

SIZES = ["tiny", "tiny-pi05"]


def pair(size: str, dtype: str, seed: int = 3) -> tuple[pi0.Pi0Config, object, Pi0TTNN]:
    cfg = pi0.size_config(size)
    return cfg, pi0.build_model(cfg, backend="reference", seed=seed), pi0.build_model(
        cfg, backend="ttnn", seed=seed, dtype=dtype, device="cpu")


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("size", SIZES)
def test_fp32_goldens_give_the_references_actions(size):
    """Masked cameras and ragged prompts in one batch: the logic (masks, positions, the shared attention, the cache,
    the Euler loop) is the reference's to float rounding."""
    cfg, ref, model = pair(size, "float32")
    obs = make_obs(cfg, 3, valid=[cfg.max_token_len, 9, 2], masked=[(1, 0), (0, 2), (2, 2)])
    noise = make_noise(cfg, 3)
    got, want = model.sample_actions(obs, noise=noise), ref.sample_actions(obs, noise=noise)
    assert model.tt.emulated and model.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()


@pytest.mark.parametrize("size", SIZES)
def test_device_formats_stay_close_to_the_reference(size):
    """bf16 activations and bfloat8_b MLP weights move the actions (the formats are applied) and keep PCC >= 0.99."""
    cfg, ref, model = pair(size, "bfloat16")
    exact = pi0.build_model(cfg, backend="ttnn", seed=3, dtype="float32", device="cpu")
    obs, noise = make_obs(cfg, 2, valid=[cfg.max_token_len, 5], masked=[(1, 1)]), make_noise(cfg, 2)
    got, want = model.sample_actions(obs, noise=noise), ref.sample_actions(obs, noise=noise)
    assert (got - exact.sample_actions(obs, noise=noise)).abs().max() > 1e-3
    assert pcc(got, want) >= 0.99


def test_bfloat8_b_weights_are_packed_by_ttnn():
    """An MLP weight holds what ttnn's own bfloat8_b packing keeps (not bf16's rounding); attention stays bf16."""
    cfg = pi0.size_config("tiny")
    state = pi0.build_model(cfg, backend="reference", seed=1).state_dict()
    w = state["vlm.layers.0.mlp.up_proj.weight"].t().to(torch.bfloat16).float().contiguous()  # read as bf16
    model = pi0.build_model(cfg, backend="ttnn", seed=1, dtype="bfloat16", device="cpu")
    held = model.w["vlm.layers.0.mlp.up_proj.weight"]
    packed = ttnn.to_torch(ttnn.from_torch(w, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT))
    assert held.dtype == ttnn.bfloat8_b and torch.equal(held.value.float(), packed.float())
    assert not torch.equal(held.value.float(), w)
    assert model.w["vlm.layers.0.self_attn.q_proj.weight"].dtype == ttnn.bfloat16


def test_a_call_the_device_would_refuse_is_refused():
    """Each call is checked against the real op's overloads, which are stricter than its golden function."""
    tt = runtime.open_runtime("cpu")
    x = tt.from_torch(torch.randn(2, 4, 32), dtype=tt.float32, layout=tt.TILE_LAYOUT)
    w = tt.from_torch(torch.ones(1, 32), dtype=tt.float32, layout=tt.TILE_LAYOUT)
    assert tt.rms_norm(x, weight=w, epsilon=1e-6).shape == (2, 4, 32)
    with pytest.raises(TypeError, match="ttnn.rms_norm would refuse"):
        tt.rms_norm(x, w)  # the golden takes the weight positionally; the op takes it by keyword only
    with pytest.raises(TypeError, match="no parameter 'bias_tensor'"):
        tt.linear(x, w, bias_tensor=w)
    with pytest.raises(TypeError, match="must be a sequence of tensors"):
        tt.concat([x, torch.zeros(2, 4, 32)], 1)


def test_results_take_the_format_the_device_would_store():
    """`dtype=` or a positional format (typecast) decides the result's format, else the first input's; bf16 rounds as
    ttnn.from_torch rounds."""
    tt = runtime.open_runtime("cpu")
    values = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x = tt.from_torch(values, dtype=tt.float32, layout=tt.TILE_LAYOUT)
    w = tt.from_torch(torch.eye(64), dtype=tt.bfloat16, layout=tt.TILE_LAYOUT)
    down = tt.typecast(x, tt.bfloat16)
    expected = ttnn.to_torch(ttnn.from_torch(values, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT))
    assert down.dtype == tt.bfloat16 and torch.equal(down.value, expected)
    assert tt.add(x, 1.0).dtype == tt.float32 and torch.equal(tt.add(x, 1.0).value, values + 1.0)
    assert tt.linear(down, w, dtype=tt.float32).dtype == tt.float32
    assert tt.linear(down, w).value.dtype == torch.bfloat16


def test_missing_suffix_keys_fail_with_both_lengths(monkeypatch):
    """The bug the first port stalled on: a mask without the suffix's columns is named, with both lengths."""
    cfg, _, model = pair("tiny", "float32")
    full = model.suffix_inputs

    def prefix_columns_only(prefix_mask):
        bias, rope = full(prefix_mask)
        b, _, ls, lk = bias.shape
        return model.tt.slice(bias, [0, 0, 0, 0], [b, 1, ls, lk - ls]), rope

    monkeypatch.setattr(model, "suffix_inputs", prefix_columns_only)
    obs = make_obs(cfg, 1, valid=[7])
    lp = cfg.num_cameras * cfg.num_image_tokens + cfg.max_token_len
    with pytest.raises(AssertionError, match=f"keys {lp + cfg.action_horizon + 1} != mask columns {lp}"):
        model.sample_actions(obs, noise=make_noise(cfg, 1))


@pytest.mark.parametrize("size", SIZES)
def test_rtc_guidance_runs_on_the_device_as_the_reference_computes_it(size):
    cfg, ref, model = pair(size, "float32")
    obs, noise = make_obs(cfg, 2, valid=[9, 4]), make_noise(cfg, 2)
    prev = torch.randn(2, cfg.action_horizon - 5, cfg.action_dim, generator=torch.Generator().manual_seed(4))
    rtc = RTC(prev, inference_delay=3, execution_horizon=12)
    got, want = model.sample_actions(obs, noise=noise, rtc=rtc), ref.sample_actions(obs, noise=noise, rtc=rtc)
    assert (got - want).abs().max() <= 1e-4
    assert (got - model.sample_actions(obs, noise=noise)).abs().max() > 1e-3  # the guidance did something
    with pytest.raises(ValueError, match="identity"):
        model.sample_actions(obs, noise=noise, rtc=RTC(prev, 3, 12, jacobian="exact"))


def test_op_counts_per_stage_follow_the_model():
    """Per call: each camera's SigLIP (6 linears a layer, the patches, the projector), the VLM (7 a layer), the
    expert (7 a layer + the suffix's 5) at each step."""
    cfg, _, model = pair("tiny", "float32")
    model.tt.counts.clear()
    stages: dict[str, float] = {}
    model.sample_actions(make_obs(cfg, 1, valid=[6]), noise=make_noise(cfg, 1), num_steps=4, stages=stages)
    linears = {stage: c["linear"] for stage, c in model.tt.counts.items()}
    v, g = cfg.vision, cfg.vlm
    assert linears == {"vision": cfg.num_cameras * (6 * v.depth + 2), "prefix": 7 * g.depth,
                       "denoise": 4 * (7 * cfg.expert.depth + 5)}
    assert set(stages) == {"vision", "prefix", "denoise"}


def test_the_runtime_is_chosen_where_the_card_would_be_opened(monkeypatch):
    monkeypatch.setattr(runtime, "card_present", lambda: False)
    assert isinstance(runtime.open_runtime("cpu"), host.HostExecutor)
    assert isinstance(runtime.open_runtime("auto"), host.HostExecutor)
    with pytest.raises(RuntimeError, match="no Tenstorrent card"):
        runtime.open_runtime("tt")
    with pytest.raises(ValueError, match="takes device auto or cpu"):
        runtime.open_runtime("cuda")
    opened = []
    monkeypatch.setattr(runtime, "card_present", lambda: True)
    monkeypatch.setattr(runtime.ttnn, "open_device", lambda device_id: opened.append(device_id) or "card 0")
    for device in ("cpu", "auto", "tt"):
        card = runtime.open_runtime(device)
        assert isinstance(card, runtime.DeviceRuntime) and not card.emulated
    assert opened == [0, 0, 0]
    monkeypatch.setenv("PI0_TTNN_EMULATE", "1")
    assert runtime.open_runtime("cpu").emulated and opened == [0, 0, 0]


def test_a_saved_checkpoint_loads_into_the_ttnn_model(tmp_path):
    cfg = pi0.size_config("tiny-pi05")
    ref = pi0.build_model(cfg, backend="reference", seed=2)
    pi0.save_model(ref, tmp_path / "ckpt")
    model = pi0.load_model(tmp_path / "ckpt", backend="ttnn", dtype="float32", device="cpu")
    obs, noise = make_obs(cfg, 1, valid=[11]), make_noise(cfg, 1)
    assert (model.sample_actions(obs, noise=noise) - ref.sample_actions(obs, noise=noise)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="backend 'ttnn' takes dtype float32"):
        pi0.build_model(cfg, backend="ttnn", dtype="int8", device="cpu")
