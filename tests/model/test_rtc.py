"""Real-time chunking: LeRobot 0.6.1's numbers on both backends (golden fixtures), the weights and guidance
schedule of the spec, bad inputs, the policy and wire fields, and the robot-side ActionStream on a
simulated clock."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import pi0
from pi0.model.rtc import RTC, guidance_weight, prefix_weights
from pi0.serving.stream import ActionStream, SimulatedClock, SimulatedExecutor
from tests.conftest import make_noise, make_obs
from tests.fixtures_lib import MODELS, ROOT, scaled_err


def rtc_cases(model: str):
    for f in sorted((ROOT / model / "rtc").glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            t = {k: h.get_tensor(k) for k in h.keys()}
            meta = h.metadata()
        obs = pi0.Observation([t[f"image_{i}"] for i in range(3)], [t[f"image_mask_{i}"] for i in range(3)],
                              t["tokens"], t["token_masks"], t["state"])
        rtc = RTC(t["prev_actions"], int(meta["inference_delay"]), int(meta["execution_horizon"]), meta["schedule"],
                  float(meta["max_guidance_weight"]))
        yield f.stem, obs, t["noise"], int(meta["num_steps"]), rtc, t["actions"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_rtc_reproduces_lerobot(model, backend):
    m = pi0.load_model(ROOT / model, backend=backend)
    cases = list(rtc_cases(model))
    assert len(cases) == 6
    for name, obs, noise, steps, rtc, want in cases:
        got = m.sample_actions(obs, noise=noise, num_steps=steps, rtc=rtc)
        assert scaled_err(got, want) <= 1e-5, (name, (got - want).abs().max())
        plain = m.sample_actions(obs, noise=noise, num_steps=steps)
        assert (plain - want).abs().max() > 1e-3, name  # the guidance changed the answer


@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_no_guidance_is_plain_sampling_bit_for_bit(tiny_model, backend):
    cfg = tiny_model.config
    m = tiny_model if backend == "reference" else pi0.build_model(cfg, seed=3, backend="engine")
    obs, noise = make_obs(cfg, 2, (5, 9)), make_noise(cfg, 2)
    plain = m.sample_actions(obs, noise=noise)
    assert torch.equal(m.sample_actions(obs, noise=noise, rtc=None), plain)
    zeros = RTC(torch.randn(2, 20, 7), inference_delay=0, schedule="zeros")  # every weight 0
    assert torch.equal(m.sample_actions(obs, noise=noise, rtc=zeros), plain)


def test_prefix_weights_follow_the_spec():
    lin = prefix_weights(2, 6, 10, "linear")
    assert torch.allclose(lin, torch.tensor([1, 1, .8, .6, .4, .2, 0, 0, 0, 0]))
    assert torch.allclose(prefix_weights(0, 4, 10, "linear"), torch.tensor([.8, .6, .4, .2, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(prefix_weights(5, 3, 10, "linear"), torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(prefix_weights(0, 6, 10, "zeros"), torch.zeros(10))
    assert torch.equal(prefix_weights(3, 6, 10, "zeros"), torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(prefix_weights(3, 6, 10, "ones"), torch.tensor([1.0] * 6 + [0] * 4))
    exp = prefix_weights(2, 6, 10, "exp")
    r = lin[2:6]
    assert torch.allclose(exp[2:6], r * torch.expm1(r) / (math.e - 1)) and torch.equal(exp[:2], torch.ones(2))


def test_guidance_weight_schedule():
    want10 = [10, 9.111, 4.25, 2.762, 2.167, 2, 2.167, 2.762, 4.25, 9.111]
    got = [float(guidance_weight(1.0 + k * -0.1, 10.0)) for k in range(10)]
    assert np.allclose(got, want10, atol=1e-3)
    assert np.allclose([float(guidance_weight(1.0 + k * (-1 / 3), 10.0)) for k in range(3)], [10, 2.5, 2.5], atol=1e-5)
    assert all(float(guidance_weight(1.0 + k * -0.1, 1.5)) == 1.5 for k in range(10))


@pytest.mark.parametrize("bad,match", [
    (dict(prev_actions=torch.zeros(2, 5, 7)), r"must be \[1, T_prev"),
    (dict(prev_actions=torch.zeros(1, 51, 7)), "1 to 50"),
    (dict(prev_actions=torch.zeros(1, 5, 33)), "1 to 32"),
    (dict(prev_actions=torch.full((1, 5, 7), float("nan"))), "NaN"),
    (dict(inference_delay=-1), "inference_delay"),
    (dict(execution_horizon=0), "execution_horizon"),
    (dict(schedule="cosine"), "schedule"),
    (dict(max_guidance_weight=0.0), "max_guidance_weight"),
    (dict(jacobian="numeric"), "jacobian"),
])
def test_bad_rtc_inputs_are_named(tiny_model, bad, match):
    cfg = tiny_model.config
    kw = dict(prev_actions=torch.zeros(1, 5, 7), inference_delay=2) | bad
    with pytest.raises(ValueError, match=match):
        tiny_model.sample_actions(make_obs(cfg, 1, (5,)), rtc=RTC(**kw))


def test_exact_jacobian_on_the_reference():
    """The paper's VJP (one backward pass per step): a different number from LeRobot's, still guided."""
    cfg = pi0.size_config("tiny")
    ref = pi0.build_model(cfg, seed=2)
    obs, noise = make_obs(cfg, 1, (8,)), make_noise(cfg, 1)
    prev = ref.sample_actions(obs, noise=make_noise(cfg, 1, seed=9))[:, 5:25, :7]
    plain = ref.sample_actions(obs, noise=noise)
    ident = ref.sample_actions(obs, noise=noise, rtc=RTC(prev, 3, 10))
    exact = ref.sample_actions(obs, noise=noise, rtc=RTC(prev, 3, 10, jacobian="exact"))
    assert not torch.equal(exact, ident)
    for guided in (ident, exact):  # both pull the first d actions toward the previous chunk
        assert (guided[:, :3, :7] - prev[:, :3]).abs().mean() < 0.5 * (plain[:, :3, :7] - prev[:, :3]).abs().mean()
    eng = pi0.build_model(cfg, seed=2, backend="engine")
    with pytest.raises(ValueError, match="reference backend only"):
        eng.sample_actions(obs, noise=noise, rtc=RTC(prev, 3, 10, jacobian="exact"))


# ---------------------------------------------------------------------------------------------
# Policy, wire, robot side


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer_path):
    from tests.conftest import write_policy_checkpoint

    ck = write_policy_checkpoint(tmp_path_factory.mktemp("rtc"), "tiny", tokenizer_path)
    return pi0.Policy(ck, preset="libero", dtype="float32", seed=0)


def test_policy_replies_carry_model_actions_and_take_rtc(policy):
    from tests.robot.test_policy import libero_obs

    obs = libero_obs(1)
    out = policy.infer(obs)
    assert out["model_actions"].shape == (50, 32) and out["model_actions"].dtype == np.float32
    assert np.allclose(policy.postprocess(out["model_actions"]), out["actions"])
    prev = out["model_actions"][20:45, :7]
    guided = policy.infer({**obs, "rtc": {"prev_actions": prev, "inference_delay": 4}})
    m = policy.model
    inputs = policy.prepare(obs)
    noise = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(0))
    want = m.sample_actions(inputs, noise=noise, rtc=RTC(torch.from_numpy(prev)[None], 4, 10, "linear", 10.0))
    assert np.array_equal(guided["model_actions"], want[0].numpy())
    noise_out = policy.infer(obs, noise=noise[0].numpy())
    assert np.array_equal(noise_out["model_actions"], out["model_actions"])  # the seed's noise, given explicitly


@pytest.mark.parametrize("rtc,match", [
    ({"inference_delay": 2}, "needs 'prev_actions'"),
    ({"prev_actions": np.zeros((5, 7), np.float32)}, "needs 'inference_delay'"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2.5}, "must be an integer"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": -1}, "inference_delay must be an int >= 0"),
    ({"prev_actions": np.zeros((60, 7), np.float32), "inference_delay": 2}, "1 to 50"),
    ({"prev_actions": np.zeros((5,), np.float32), "inference_delay": 2}, r"\[T_prev, D_prev\]"),
    ({"prev_actions": np.full((5, 7), np.nan, np.float32), "inference_delay": 2}, "NaN"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2, "speed": 3}, "unknown fields"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2, "max_guidance_weight": "abc"},
     "max_guidance_weight must be a number"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2, "max_guidance_weight": -1.0},
     "max_guidance_weight must be a finite number > 0"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2, "schedule": 5}, "schedule must be a string"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2, "schedule": "cubic"}, "schedule must be one of"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": 2, "execution_horizon": 0}, "execution_horizon"),
    ({"prev_actions": np.zeros((5, 7), np.float32), "inference_delay": "2"}, "inference_delay must be an integer"),
    ({"prev_actions": np.array([["a"]]), "inference_delay": 2}, "numeric array"),
    ("yes", "must be a map"),
])
def test_bad_rtc_requests_are_named(policy, rtc, match):
    """Every field of the wrong type or value is a bad request (an exception of another type would reach the client
    as an internal error)."""
    from pi0.errors import BadRequest
    from tests.robot.test_policy import libero_obs

    with pytest.raises(BadRequest, match=match):
        policy.infer({**libero_obs(0), "rtc": rtc})


def run_robot(policy, rtc: bool, latency: float, hz: float = 50.0, ticks: int = 200, **kw):
    """A robot loop at `hz` on a simulated clock. Returns the executed actions, and for each chunk switch
    the distance between the new chunk's first executed action and what the old chunk had planned for
    that tick, and the stream."""
    from tests.robot.test_policy import libero_obs

    clock = SimulatedClock()
    stream = ActionStream(policy, hz, rtc=rtc, executor=SimulatedExecutor(clock, latency), clock=clock, **kw)
    actions, gaps = [], []
    for _ in range(ticks):
        chunks = stream.chunks
        planned = stream.queue[0][0] if stream.queue else None
        actions.append(stream.next_action(libero_obs(0)))
        if stream.chunks != chunks and planned is not None:
            gaps.append(float(np.linalg.norm(actions[-1] - planned)))
        clock.t += 1.0 / hz
    return np.stack(actions), gaps, stream


@pytest.fixture(scope="module")
def noisy_policy(tmp_path_factory, tokenizer_path):
    """Fresh noise per request, as a robot gets it: chunks differ, so boundaries can jump."""
    from tests.conftest import write_policy_checkpoint

    ck = write_policy_checkpoint(tmp_path_factory.mktemp("rtc_noisy"), "tiny", tokenizer_path, seed=5)
    torch.manual_seed(0)
    return pi0.Policy(ck, preset="libero", dtype="float32")


def test_the_stream_never_starves_and_rtc_smooths_the_boundaries(noisy_policy):
    """With RTC a new chunk takes over where the old one was heading; without, it starts wherever its own
    noise leads (fresh noise per request, as from a server)."""
    latency = 0.2  # 10 ticks at 50 Hz; the queue refills at 25 actions left
    gap = {}
    for rtc in (False, True):
        _, gaps, stream = run_robot(noisy_policy, rtc, latency, refill_at=25, execution_horizon=25)
        assert stream.starved == 0 and len(gaps) >= 5
        if rtc:
            assert stream.last_delay == 10
        gap[rtc] = np.mean(gaps)
    assert gap[True] < 0.5 * gap[False], gap


def test_a_slow_policy_starves_the_stream_and_it_says_so(noisy_policy):
    _, _, stream = run_robot(noisy_policy, True, latency=1.0, refill_at=10, ticks=120)
    assert stream.starved > 0


def test_stream_module_needs_no_torch():
    import subprocess
    import sys

    code = "import sys; import pi0.serving.stream; assert 'torch' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.stdout.strip() == "ok", r.stderr
