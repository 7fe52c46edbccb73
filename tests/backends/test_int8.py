"""The int8 engine (dynamic W8A8): the accuracy gate at tiny size and the wrong scales it catches, every kernel
and fallback, loading (int8 made as each tensor is read), errors and the CLI."""

import dataclasses
import json
import re
import statistics

import pytest
import torch

import pi0
from pi0.backends.engine import int8, kernels, ops, weights
from pi0.backends.engine.model import Pi0Engine
from pi0.backends.engine.weights import int8_quantizer
from pi0.backends.factory import random_state_dict
from pi0.backends.reference.model import Pi0Reference
from pi0.hardware import compute_dtype, int8_isa, probe_bf16, resolve_dtype
from tests.cli.test_cli import run
from tests.conftest import make_noise, make_obs, write_policy_checkpoint
from tests.stress import outlier_channels

# What int8 covers, written out here independently of the engine's own patterns
LINEARS = re.compile(r"(vision\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|projector"
                     r"|(vlm|expert)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))\.weight")
EMBED = "vlm.embed_tokens.weight"


def spread_state(cfg: pi0.Pi0Config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights whose linear rows differ in scale by up to e^2, as trained rows do (random rows
    barely differ, so a per-tensor scale would look as good as per-channel ones)."""
    state = random_state_dict(cfg, seed, torch.float32)
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if LINEARS.fullmatch(k):
            state[k] = v * torch.empty(v.shape[0], 1).uniform_(-1, 1, generator=g).exp()
    return state


def reference(cfg: pi0.Pi0Config, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Pi0Reference:
    with torch.device("meta"):
        model = Pi0Reference(cfg).eval().requires_grad_(False)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def fake_int8(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-row symmetric int8 rounding, in fp32: round(w / s) * s with s = max|row| / qmax."""
    wf = w.float()
    s = wf.abs().amax(-1, keepdim=True) / qmax
    return (torch.round(wf / s).clamp(-qmax, qmax) * s).to(w.dtype)


def emulated_int8(cfg: pi0.Pi0Config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Pi0Reference:
    """The reference with W8A8 numerics emulated in `dtype`: every covered weight (and the embedding rows)
    rounded per row (to the weight range this CPU's int8 kernel takes: 8 bits, or 7 where 8 overflow), every
    covered layer's input rounded per token."""
    model = reference(cfg, state, dtype)
    qmax = int8.int8_kernel(dtype, "cpu")[1]
    for name, mod in model.named_modules():
        if LINEARS.fullmatch(name + ".weight") or name + ".weight" == EMBED:
            mod.weight = torch.nn.Parameter(fake_int8(mod.weight, qmax), requires_grad=False)
        if LINEARS.fullmatch(name + ".weight"):
            mod.register_forward_pre_hook(lambda m, args: (fake_int8(args[0]),))
    return model


def int8_engine(cfg: pi0.Pi0Config, state: dict[str, torch.Tensor], **quantizer) -> Pi0Engine:
    """The engine in int8 from fp32 weights as a loader reads them from an fp32 file: the norms first, the weights
    int8 covers quantised from their fp32 values, the rest in the int8 float dtype."""
    dt = compute_dtype(torch.int8)
    quantize = int8_quantizer(dt, **quantizer)
    return Pi0Engine(cfg, {k: quantize(k, state[k] if quantize.streams(k) else state[k].to(dt))
                           for k in sorted(state, key=lambda k: not quantize.first(k))})


def int8_gate(cfg, eng, ref, emu, seeds: int = 4) -> dict[str, list[float]]:
    """Per seed (two rows, one with a masked camera and padding): PCC vs the fp32 reference, the mean-abs
    error over the actions' std, and the same error of the emulated W8A8 reference (the floor int8 sets)."""
    out = {"pcc": [], "err": [], "emu_err": [], "emu_dist": []}
    for seed in range(seeds):
        obs, noise = make_obs(cfg, 2, (7, 12), ((1, 1),), seed=seed), make_noise(cfg, 2, seed=seed)
        want = ref.sample_actions(obs, noise=noise)
        got = eng.sample_actions(obs, noise=noise)
        out["pcc"].append(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1].item())
        out["err"].append(((got - want).abs().mean() / want.std()).item())
        emulated = emu.sample_actions(obs, noise=noise).float()
        out["emu_err"].append(((emulated - want).abs().mean() / want.std()).item())
        out["emu_dist"].append(((got - emulated).abs().mean() / want.std()).item())
    return out


def assert_int8_gate(g: dict[str, list[float]]) -> None:
    """The issue's PCC gate (mean >= 0.99, min >= 0.98), no more error than W8A8 rounding explains (mean <= 1.5x
    and max <= 2x the emulation's), and closer to the emulation than the emulation is to fp32 (mean <= 1.2x;
    measured: 0.77-0.87 in bf16, 0.26-0.48 in fp32; a per-tensor weight scale 1.46-2.2, flipped scales 30-55).
    PCC alone passes a per-tensor weight scale at tiny sizes."""
    m = statistics.mean
    assert m(g["pcc"]) >= 0.99 and min(g["pcc"]) >= 0.98, g["pcc"]
    assert m(g["err"]) <= 1.5 * m(g["emu_err"]), (g["err"], g["emu_err"])
    assert max(g["err"]) <= 2 * max(g["emu_err"]), (g["err"], g["emu_err"])
    assert m(g["emu_dist"]) <= 1.2 * m(g["emu_err"]), (g["emu_dist"], g["emu_err"])


@pytest.fixture(scope="module", params=["tiny", "tiny-pi05"])
def gate_case(request):
    cfg = pi0.size_config(request.param)
    state = spread_state(cfg, 3)
    return cfg, state, reference(cfg, state)


_emulations: dict = {}


def emulation(cfg, state, dtype):
    """emulated_int8, built once per (weights, dtype)."""
    key = (id(state), dtype, int8.int8_kernel(dtype, "cpu")[1])
    if key not in _emulations:
        _emulations[key] = emulated_int8(cfg, state, dtype)
    return _emulations[key]


@pytest.fixture
def fresh_probes():
    for probe in (int8.int8_kernel, kernels.fusion_works, probe_bf16):
        probe.cache_clear()
    yield
    for probe in (int8.int8_kernel, kernels.fusion_works, probe_bf16):
        probe.cache_clear()


def kernel_works(kernel: str, dtype: torch.dtype) -> bool:
    return kernel == "plain" or min(int8._probe_int8(kernel, dtype, q, 8, 64, 64)[0] for q in (127, 63)) < float("inf")


@pytest.mark.parametrize("native", ["1", "0"], ids=["bf16-between", "fp32-between"])
@pytest.mark.parametrize("kernel", int8.INT8_KERNELS)
def test_int8_gate(gate_case, kernel, native, monkeypatch, fresh_probes):
    """Every kernel, with bf16 and with fp32 between the int8 products (PI0_NATIVE_BF16 forces either on any CPU)."""
    cfg, state, ref = gate_case
    monkeypatch.setenv("PI0_NATIVE_BF16", native)
    dt = compute_dtype(torch.int8)
    if not kernel_works(kernel, dt):
        pytest.skip(f"the {kernel} int8 kernel does not run on this CPU")
    slow = None if kernel == "plain" else int8.slow_int8(kernel, dt, 127 if int8_isa()[1] else 63)
    if slow is not None:  # e.g. oneDNN's s8 product with bf16 out on a CPU without native bf16: minutes for the gate
        pytest.skip(f"the {kernel} int8 kernel is {slow:.0f}x slower than dequantised math with {dt} on this CPU, "
                    "which never chooses it: its numerics are gated where it runs at speed")
    monkeypatch.setenv("PI0_INT8_KERNEL", kernel)
    eng = int8_engine(cfg, state)
    assert eng.kernels["int8_kernel"] == kernel and eng.dtype == dt
    assert_int8_gate(int8_gate(cfg, eng, ref, emulation(cfg, state, dt)))


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_int8_gate_with_eager_ops(gate_case, monkeypatch):
    """No compiled kernels (no compiler, or a miscompiling one): eager quantisation and rescaling."""
    cfg, state, ref = gate_case
    monkeypatch.setenv("PI0_COMPILE", "0")
    eng = int8_engine(cfg, state)
    assert not eng.kernels["fused_kernels"]
    assert_int8_gate(int8_gate(cfg, eng, ref, emulation(cfg, state, eng.dtype)))


def _per_tensor(w: torch.Tensor, dtype: torch.dtype | None = None, qmax: int = 127, outlier_cols=None,
                compiled: bool = False) -> int8.Int8Weight:
    assert outlier_cols is None or outlier_cols.numel() == 0  # the plain checkpoint has none
    wf = w.float()
    s = wf.abs().max() / qmax
    return int8.Int8Weight(torch.round(wf / s).clamp(-qmax, qmax).to(torch.int8), s.expand(w.shape[0]).clone(),
                          dtype or w.dtype)


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
@pytest.mark.parametrize("bug", ["per_tensor_scale", "flipped_scales"])
def test_int8_gate_catches_a_wrong_scale(gate_case, bug, monkeypatch):
    """One scale for the whole weight instead of one per output channel, or the per-channel scales in the wrong
    order: the gate must fail."""
    cfg, state, ref = gate_case
    good = int8.quantize_weight
    if bug == "per_tensor_scale":
        monkeypatch.setattr(int8, "quantize_weight", _per_tensor)
    else:
        def flipped(w, dtype=None, qmax=127, outlier_cols=None, compiled=False):
            q = good(w, dtype, qmax, outlier_cols, compiled)
            return dataclasses.replace(q, scale=q.scale.flip(0))
        monkeypatch.setattr(int8, "quantize_weight", flipped)
    eng = int8_engine(cfg, state)
    with pytest.raises(AssertionError):
        assert_int8_gate(int8_gate(cfg, eng, ref, emulation(cfg, state, eng.dtype), seeds=3))


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
@pytest.mark.parametrize("size", ["tiny", "tiny-pi05"])
def test_producers_that_quantise_keep_the_numerics(size, monkeypatch):
    """The norms and gelus that quantise their output for the int8 product they feed (one compiled kernel each)
    are as accurate as separate norm / gelu and quantisation ops. Not bit for bit: the compiled norm's last bits
    move a few values across a rounding boundary, and ten denoising steps carry that on (tiny pi0: 0.005 of the
    actions' std apart, each 0.022 from the fp32 reference)."""
    cfg = pi0.size_config(size)
    state = spread_state(cfg, 5)
    eng = int8_engine(cfg, state)
    producers = {"rms_norm_quantize", "layer_norm_quantize", "rescale_gelu_quantize", "gated_gelu_quantize"}
    if not producers <= set(eng.kernels["int8_fused"]):
        pytest.skip(f"compiled kernels do not work here: {eng.kernels['why']}")
    used = set()
    quantizes_for = int8._quantizes_for
    monkeypatch.setattr(int8, "_quantizes_for", lambda w, name: quantizes_for(w, name) and not used.add(name))
    obs, noise = make_obs(cfg, 2, (7, 12), ((1, 1),)), make_noise(cfg, 2)
    fused = eng.sample_actions(obs, noise=noise)
    assert used == producers, used  # every one of them ran
    monkeypatch.setattr(int8, "_quantizes_for", lambda w, name: False)
    apart = eng.sample_actions(obs, noise=noise)
    want = reference(cfg, state).sample_actions(obs, noise=noise)
    scale = want.std()
    step = ((fused - apart).abs().mean() / scale).item()
    err_fused, err_apart = (((a - want).abs().mean() / scale).item() for a in (fused, apart))
    assert err_fused <= 1.1 * err_apart and step < 0.5 * err_apart, (err_fused, err_apart, step)


def test_quantize_weight_is_per_output_channel_and_stacks():
    w = torch.randn(300, 40) * torch.linspace(0.01, 10, 300)[:, None]
    q = int8.quantize_weight(w, torch.float32)
    assert q.q.dtype == torch.int8 and q.scale.shape == (300,)
    assert torch.allclose(q.scale, w.abs().amax(1) / 127)
    assert ((q.q.float() * q.scale[:, None] - w).abs() <= q.scale[:, None] / 2 + 1e-6).all()
    a, b = int8.quantize_weight(w[:100], torch.float32), int8.quantize_weight(w[100:], torch.float32)
    both = weights.cat_rows([a, b])
    assert torch.equal(both.q, q.q) and torch.equal(both.scale, q.scale)
    with pytest.raises(TypeError):
        weights.cat_rows([a, w[100:]])


def test_int8_linear_matches_the_dequantised_product():
    """Per-token activation scales: a token 1000x larger than the others leaves the others' precision alone."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(5, 96)
    x[2] *= 1000
    q = int8.quantize_weight(w, torch.float32, int8.int8_kernel(torch.float32, "cpu")[1])
    for kernel in int8.INT8_KERNELS:
        if not kernel_works(kernel, torch.float32):
            continue
        got = ops.linear(x, int8.pack_int8(q, 5, kernel), torch.ones(64))
        want = torch.nn.functional.linear(x, w) + 1
        rel = ((got - want).norm(dim=1) / want.norm(dim=1))
        assert (rel < 0.04).all(), (kernel, rel)  # ~1% with 8-bit weights, ~2% with 7-bit ones (AVX2)


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_loaded_int8_equals_built_int8(tmp_path):
    """load_model quantises each tensor as it is read: the same weights as build_model's, bit for bit."""
    cfg = pi0.size_config("tiny-pi05")
    pi0.save_model(pi0.build_model(cfg, seed=2), tmp_path / "ck", layout="lerobot")
    loaded = pi0.load_model(tmp_path / "ck", backend="engine", dtype="int8")
    built = pi0.build_model(cfg, seed=2, backend="engine", dtype="int8")
    assert loaded.kernels["int8_tensors"] == built.kernels["int8_tensors"] == (2 * 6 + 1) + 2 * 7 + 2 * 7 + 1
    obs, noise = make_obs(cfg, 2, (4, 9), ((0, 1),)), make_noise(cfg, 2)
    assert torch.equal(loaded.sample_actions(obs, noise=noise), built.sample_actions(obs, noise=noise))


def test_int8_load_streams_big_weights_in_row_blocks(tmp_path, monkeypatch):
    """The loader hands the weights int8 covers to the quantiser as row blocks in the file's dtype (never a whole
    float tensor): the same Int8Weights, bit for bit, as quantising each whole tensor, however the rows are split
    (here 1-3 rows a block), outlier columns included; every other tensor arrives whole, in the requested dtype."""
    from pi0.checkpoint.load import inspect_checkpoint, load_state_dict

    cfg = pi0.size_config("tiny")
    make = outlier_channels(cfg)
    state = {k: make(k, v).to(torch.bfloat16) for k, v in random_state_dict(cfg, 4, torch.float32).items()}
    pi0.save_model(reference(cfg, state, torch.bfloat16), tmp_path / "ck", layout="openpi")
    whole = int8_quantizer(torch.float32)
    want = {k: whole(k, state[k]) for k in sorted(state, key=lambda k: not whole.first(k))}
    streamed, blocks = [], []
    quantize_blocks = int8.quantize_blocks

    def counted(rows, *args):
        streamed.append(rows)
        return quantize_blocks((blocks.append(b) or b for b in rows), *args)
    monkeypatch.setattr(int8, "quantize_blocks", counted)
    monkeypatch.setattr(pi0.checkpoint.safetensors_io, "_CHUNK_BYTES", 3 * 2 * cfg.vision.width)  # 1-3 rows of bf16 a block
    got = load_state_dict(inspect_checkpoint(tmp_path / "ck"), torch.float32, hook=int8_quantizer(torch.float32))
    assert len(streamed) == sum(isinstance(w, int8.Int8Weight) for w in want.values())
    assert len(blocks) > 10 * len(streamed) and all(b.dtype == torch.bfloat16 and len(b) <= 3 for b in blocks)
    for k, w in want.items():
        if isinstance(w, int8.Int8Weight):
            g = got[k]
            assert torch.equal(g.q, w.q) and torch.equal(g.scale, w.scale), k
            assert (g.outlier_cols is None) == (w.outlier_cols is None), k
            if w.outlier_cols is not None:
                assert torch.equal(g.outlier_cols, w.outlier_cols) and torch.equal(g.outlier_w, w.outlier_w), k
        else:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], w.float()), k
    assert sum(w.outlier_cols is not None for w in got.values() if isinstance(w, int8.Int8Weight)) > 0


def test_compiled_weight_quantisation_matches_eager_ops():
    """Weights are quantised at load by a compiled kernel where its probe passes: the same scales and levels
    (at most one level apart where a value sits on a rounding boundary) as eager ops, from bf16 and fp32."""
    for dt in (torch.bfloat16, torch.float32):
        if not kernels.fusion_works(dt, "cpu", "quantize_weight")[0]:
            continue
        w = (torch.randn(257, 129) * torch.linspace(0.01, 10, 257)[:, None]).to(dt)
        for qmax in (127, 63):
            a, b = int8.quantize_weight(w, torch.float32, qmax), int8.quantize_weight(w, torch.float32, qmax, compiled=True)
            assert torch.equal(a.scale, b.scale), (dt, qmax)
            assert (a.q.int() - b.q.int()).abs().max() <= 1 and (a.q != b.q).float().mean() < 1e-3, (dt, qmax)


@pytest.fixture(scope="module", params=["tiny", "tiny-pi05"])
def outlier_case(request):
    """A checkpoint with Gemma-like activation outliers (4 channels of every norm-fed product's input 100x the rest,
    the float model unchanged) next to the plain one it was made from."""
    cfg = pi0.size_config(request.param)
    plain = spread_state(cfg, 3)
    make = outlier_channels(cfg, channels=4, factor=100.0)
    state = {k: make(k, v) for k, v in plain.items()}
    return cfg, plain, state, reference(cfg, plain), reference(cfg, state)


def test_the_outlier_checkpoint_is_the_same_float_model(outlier_case):
    cfg, plain, state, ref_plain, ref = outlier_case
    assert sum(not torch.equal(plain[k], state[k]) for k in plain) > 4 * cfg.vlm.depth  # norms and the weights they feed
    obs, noise = make_obs(cfg, 2, (7, 12), ((1, 1),)), make_noise(cfg, 2)
    want = ref_plain.sample_actions(obs, noise=noise)
    assert ((ref.sample_actions(obs, noise=noise) - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_int8_keeps_outlier_channels_in_float(outlier_case):
    """Per-token activation scales alone lose the other channels' precision to the 100x ones (tiny pi0: PCC
    0.90-0.93, 14x the plain checkpoint's error); the channels found from the norms' gains, computed in float,
    give the plain checkpoint's accuracy back. The plain checkpoint has no such channels: its numerics are
    unchanged."""
    cfg, plain, state, ref_plain, ref = outlier_case
    dt = compute_dtype(torch.int8)
    m = statistics.mean
    eng_plain = int8_engine(cfg, plain)
    assert eng_plain.kernels["int8_outlier_columns"] == 0
    base = int8_gate(cfg, eng_plain, ref_plain, emulation(cfg, plain, dt), seeds=3)
    per_token = int8_gate(cfg, int8_engine(cfg, state, outlier_gain=None), ref, emulation(cfg, state, dt), seeds=3)
    assert m(per_token["err"]) > 5 * m(base["err"]), (per_token["err"], base["err"])
    eng = int8_engine(cfg, state)
    norm_fed = 3 * (cfg.vision.depth + cfg.vlm.depth) + cfg.vision.depth + 1 + 2 * cfg.vlm.depth  # q, k, v, fc1, proj, gate|up
    if not cfg.pi05:
        norm_fed += 5 * cfg.expert.depth
    assert eng.kernels["int8_outlier_columns"] == 4 * norm_fed
    fixed = int8_gate(cfg, eng, ref, emulation(cfg, state, dt), seeds=3)
    assert m(fixed["pcc"]) >= 0.99 and min(fixed["pcc"]) >= 0.98, fixed["pcc"]
    assert m(fixed["err"]) <= 1.2 * m(base["err"]), (fixed["err"], base["err"])


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_loaders_read_the_norms_first_for_int8(tmp_path):
    """Every checkpoint layout, loaded as int8, finds the same outlier channels and gives the same actions as the
    same weights quantised norms first (the loaders read the norms before the products they feed)."""
    import warnings

    from tests.checkpoint.test_orbax import (
        TINY_2HEADS as cfg,  # SigLIP's head count readable from Orbax's shapes
    )
    from tests.orbax_writer import jax_tree, write_orbax

    make = outlier_channels(cfg)
    state = {k: make(k, v) for k, v in random_state_dict(cfg, 1, torch.float32).items()}
    write_orbax(tmp_path / "orbax" / "params", jax_tree(state, cfg), dtype_of=lambda n: "float32")
    for layout in ("openpi", "lerobot"):
        pi0.save_model(reference(cfg, state), tmp_path / layout, layout=layout)
    built = int8_engine(cfg, state)  # the file's fp32 weights, each read into the int8 float dtype, then quantised
    obs, noise = make_obs(cfg, 2, (4, 9), ((0, 1),)), make_noise(cfg, 2)
    want = built.sample_actions(obs, noise=noise)
    for layout in ("openpi", "lerobot", "orbax"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Orbax: the token length and horizon assumed out loud
            info = pi0.inspect_checkpoint(tmp_path / layout, action_horizon=cfg.action_horizon)
            info.config = cfg
            loaded = pi0.backends.factory.load_from_info(info, backend="engine", dtype="int8")
        assert loaded.kernels["int8_outlier_columns"] == built.kernels["int8_outlier_columns"] > 0, layout
        assert torch.equal(loaded.sample_actions(obs, noise=noise), want), layout


def test_int8_quantizer_refuses_a_norm_read_too_late():
    cfg = pi0.size_config("tiny")
    state = random_state_dict(cfg, 0, torch.float32)
    quantize = int8_quantizer(torch.float32)
    quantize("vlm.layers.0.mlp.up_proj.weight", state["vlm.layers.0.mlp.up_proj.weight"])
    with pytest.raises(RuntimeError, match="read after a linear weight"):
        quantize("vlm.layers.0.post_attention_layernorm.weight", state["vlm.layers.0.post_attention_layernorm.weight"])


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_int8_errors(monkeypatch, fresh_probes):
    with pytest.raises(ValueError, match="int8 is an engine dtype"):
        pi0.build_model(pi0.size_config("tiny"), dtype="int8")
    with pytest.raises(ValueError, match="int8 runs on CPUs"):
        resolve_dtype("int8", "meta")  # any device but a CPU (cuda is refused earlier where there is none)
    monkeypatch.setenv("PI0_INT8_STAGES", "prefix,lm_head")
    with pytest.raises(ValueError, match="unknown int8 stages"):
        pi0.build_model(pi0.size_config("tiny"), backend="engine", dtype="int8")
    monkeypatch.setenv("PI0_INT8_STAGES", "prefix,expert,embedding")  # SigLIP kept in the float dtype
    assert pi0.build_model(pi0.size_config("tiny"), backend="engine", dtype="int8").kernels["int8_tensors"] == 2 * 7 + 2 * 7 + 1
    monkeypatch.setenv("PI0_INT8_KERNEL", "fp4")
    int8.int8_kernel.cache_clear()  # decided once per process: the build above (fp32 between where bf16 is not native) cached it
    with pytest.raises(ValueError, match="PI0_INT8_KERNEL='fp4'"):
        int8.int8_kernel(torch.float32, "cpu")


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_bench_and_demo_run_int8(tmp_path):
    r = run("bench", "--size", "tiny", "--json", "--repeats", "2", "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["dtype"] == "int8" and rep["kernels"]["int8_kernel"] in int8.INT8_KERNELS
    assert "int8 weights and activations" in rep["dtype_reason"] and rep["efficiency"] > 0
    r = run("demo", "--size", "tiny", "--dtype", "int8", "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert "dtype int8 -> int8 weights and activations" in r.stderr


@pytest.mark.auto_dtype  # int8's float dtype between the products is what auto picks
def test_policy_int8(tmp_path, tokenizer_path):
    """A robot's observation through Policy(dtype="int8"): the actions of the float policy, to int8 precision."""
    import numpy as np

    from tests.robot.test_policy import libero_obs

    ck = write_policy_checkpoint(tmp_path, "tiny", tokenizer_path)
    want = pi0.Policy(ck, preset="libero", dtype="float32", seed=3).infer(libero_obs())["actions"]
    pol = pi0.Policy(ck, preset="libero", dtype="int8", seed=3)
    got = pol.infer(libero_obs())["actions"]
    assert pol.dtype == "int8" and pol.model.kernels["int8_tensors"] > 0 and got.shape == want.shape == (50, 7)
    assert np.corrcoef(got.flatten(), want.flatten())[0, 1] > 0.99


def test_int8_kernel_choice_follows_the_instruction_set(monkeypatch, fresh_probes):
    """The weight range comes from the instruction set (8-bit with an int8 dot product, 7-bit without), the
    kernel from a fixed order checked for exact products: the same machine chooses the same on every run."""
    from pi0 import hardware

    real = hardware._cpu_flags()
    for flags, cap, want in [({"avx2"}, None, ("AVX2", False)), ({"avx2", "avx_vnni"}, None, ("AVX-VNNI", True)),
                             ({"avx2", "avx512_vnni"}, None, ("AVX-512 VNNI", True)),
                             ({"avx2", "avx512_vnni", "amx_int8"}, None, ("AMX", True)),
                             ({"avx2", "avx512_vnni", "amx_int8"}, "AVX2", ("AVX2", False)),
                             ({"avx2", "avx512_vnni", "amx_int8"}, "AVX512_CORE_VNNI", ("AVX-512 VNNI", True))]:
        monkeypatch.setattr(hardware, "_cpu_flags", lambda flags=flags: flags)
        if cap:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        else:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        assert hardware.int8_isa() == want, (flags, cap)
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2"})
    int8.int8_kernel.cache_clear()
    kernel, qmax, why = int8.int8_kernel(torch.float32, "cpu")
    assert qmax == 63 and "7-bit" in why
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: real)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    choices = set()
    for _ in range(3):
        int8.int8_kernel.cache_clear()
        choices.add(int8.int8_kernel(torch.float32, "cpu")[:2])
    assert len(choices) == 1, choices
    kernel, qmax = choices.pop()
    assert kernel_works(kernel, torch.float32) and qmax == (127 if hardware.int8_isa()[1] else 63)
