"""The engine's static-shape calls: buckets planned on the host equal the dynamic call at every bucket edge, with
masked cameras, ragged prompts and batches 1/3/8; the runner keeps one set of buffers a bucket; the compiled
denoising step has no graph break and does not recompile across calls and buckets."""

import dataclasses

import pytest
import torch

import pi0
from pi0.backends.engine.buckets import Bucket, BucketRules, plan_call
from pi0.backends.engine.graphs import GraphRunner, buckets_for
from tests.backends.test_engine import make_engine
from tests.conftest import make_noise, make_obs

RULES = BucketRules(prefix_step=8)


@pytest.fixture(scope="module", params=["tiny", "tiny-pi05"])
def engines(request):
    """The dynamic engine and one whose calls run as buckets, over the same weights (plain ops: the buckets'
    numbers, not the kernels', are what is tested)."""
    cfg = pi0.size_config(request.param)
    dynamic = make_engine(cfg, 5, pack=False, fuse=False)
    static = make_engine(cfg, 5, pack=False, fuse=False)
    static.use_buckets(RULES)
    return dynamic, static


def tokens_a_row(cfg: pi0.Pi0Config, cameras: int) -> int:
    return cameras * (cfg.vision.image_size // cfg.vision.patch_size) ** 2


@pytest.mark.parametrize("batch,valid,masked", [
    (1, (12,), ()),                               # one row
    (3, (3, 11, 6), ((2, 1), (0, 2))),            # ragged prompts, masked cameras, batch bucket 4
    (8, (1, 2, 3, 4, 5, 6, 7, 16), ((1, 7),)),    # a full batch bucket
])
def test_a_bucketed_call_equals_the_dynamic_one(engines, batch, valid, masked):
    dynamic, static = engines
    cfg = dynamic.config
    obs, noise = make_obs(cfg, batch, valid, masked), make_noise(cfg, batch)
    for steps in (10, 3):
        want = dynamic.sample_actions(obs, noise=noise, num_steps=steps)
        got = static.sample_actions(obs, noise=noise, num_steps=steps)
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4


def test_every_edge_of_a_prefix_bucket(engines):
    """Prompts whose prefix is one short of a bucket's length, exactly it, and one past it (the next bucket)."""
    dynamic, static = engines
    cfg = dynamic.config
    images = tokens_a_row(cfg, cfg.num_cameras)
    edge = RULES.prefix(images + 4)  # a bucket length the prompts can reach
    for n in (edge - images - 1, edge - images, edge - images + 1):
        if not 1 <= n <= cfg.max_token_len:
            continue
        obs, noise = make_obs(cfg, 1, (n,)), make_noise(cfg, 1)
        plan = plan_call(cfg, obs, 10, RULES)
        assert plan.bucket.prefix == RULES.prefix(images + n) and int(plan.n_valid[0]) == images + n
        err = (static.sample_actions(obs, noise=noise) - dynamic.sample_actions(obs, noise=noise)).abs().max()
        assert err <= 1e-4, (n, err)


def test_plans_pack_as_the_dynamic_prefix_and_need_no_device_read():
    cfg = pi0.size_config("tiny")
    obs = make_obs(cfg, 3, (3, 11, 6), ((2, 1), (0, 2)))
    plan = plan_call(cfg, obs, 10, RULES)
    per_image = tokens_a_row(cfg, 1)
    assert plan.bucket == Bucket(batch=4, cameras=cfg.num_cameras, prefix=RULES.prefix(cfg.num_cameras * per_image + 11),
                                 steps=10, image_size=cfg.vision.image_size)
    assert plan.pairs == [(c, i) for c in range(cfg.num_cameras) for i in range(3) if (c, i) not in ((2, 1), (0, 2))]
    for i, n_tokens in enumerate((3, 11, 6)):
        cams = sum(bool(m[i]) for m in obs.image_masks)
        n = cams * per_image + n_tokens
        assert int(plan.n_valid[i]) == n and plan.key_mask[i, :n].all() and not plan.key_mask[i, n:].any()
        assert plan.is_image[i, :cams * per_image].all() and not plan.is_image[i, cams * per_image:].any()
        assert torch.equal(plan.ids[i, cams * per_image:n], obs.tokens[i, :n_tokens])
    assert torch.equal(plan.key_mask[3], plan.key_mask[0]) and torch.equal(plan.ids[3], plan.ids[0])  # padding row


def test_the_runner_reuses_one_set_of_buffers_a_bucket():
    cfg = pi0.size_config("tiny")
    eng = make_engine(cfg, 5, pack=False, fuse=False)
    runner = eng.use_buckets(RULES)
    assert not runner.capture  # CUDA graphs on CUDA only; the CPU calls the same work directly
    a, b = make_obs(cfg, 1, (12,)), make_obs(cfg, 1, (11,), seed=1)  # one bucket (12 and 11 tokens round alike)
    assert plan_call(cfg, a, 10, RULES).bucket == plan_call(cfg, b, 10, RULES).bucket
    eng.sample_actions(a, noise=make_noise(cfg, 1))
    (entry,) = runner.entries.values()
    ptrs = [t.data_ptr() for t in entry.buffers.tensors()]
    out_b = eng.sample_actions(b, noise=make_noise(cfg, 1, seed=1))
    (now,) = runner.entries.values()
    assert now is entry and [t.data_ptr() for t in now.buffers.tensors()] == ptrs
    out_b2 = eng.sample_actions(b, noise=make_noise(cfg, 1, seed=1))
    assert torch.equal(out_b, out_b2)  # the answer is a copy: the next call does not overwrite it
    eng.sample_actions(make_obs(cfg, 2, (12, 4)), noise=make_noise(cfg, 2))
    assert len(runner.entries) == 2 and runner.replays == 4
    warm = runner.warmup(buckets_for(cfg, RULES, cfg.vision.image_size, cfg.num_cameras, cfg.max_token_len, (1, 2, 3), 10))
    assert all(b.batch in (1, 2, 4) for b in warm) and set(runner.entries) >= set(warm)
    with pytest.raises(ValueError, match="CUDA graphs capture on CUDA devices"):
        GraphRunner(eng, capture=True)


def test_real_time_chunking_keeps_the_dynamic_path(engines):
    dynamic, static = engines
    cfg = dynamic.config
    obs, noise = make_obs(cfg, 1, (12,)), make_noise(cfg, 1)
    rtc = pi0.RTC(prev_actions=torch.zeros(cfg.action_horizon, cfg.action_dim), inference_delay=2)
    calls = static.runner.replays
    got = static.sample_actions(obs, noise=noise, rtc=rtc)
    assert static.runner.replays == calls
    assert (got - dynamic.sample_actions(obs, noise=noise, rtc=rtc)).abs().max() <= 1e-4


def test_the_compiled_denoising_step_is_one_graph_without_recompiles():
    """torch.compile(fullgraph=True) of the Euler step: a graph break would raise; after a batch-1 bucket and a
    larger one, further calls and buckets compile nothing new, and the actions equal the eager step's."""
    from torch._dynamo.utils import counters

    cfg = dataclasses.replace(pi0.size_config("tiny"), action_horizon=4)
    eager = make_engine(cfg, 5, pack=False, fuse=False)
    eng = make_engine(cfg, 5, pack=False, fuse=False)
    eng.use_buckets(RULES, compile=True)
    torch._dynamo.reset()
    counters.clear()
    calls = [make_obs(cfg, 1, (12,)), make_obs(cfg, 2, (12, 3)), make_obs(cfg, 1, (2,)), make_obs(cfg, 3, (5, 7, 1)),
             make_obs(cfg, 1, (12,))]
    for i, obs in enumerate(calls):
        noise = make_noise(cfg, obs.batch_size, seed=i)
        got = eng.sample_actions(obs, noise=noise, num_steps=3)
        assert (got - eager.sample_actions(obs, noise=noise, num_steps=3)).abs().max() <= 1e-4
        if i == 1:
            compiled = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled <= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_policy_warms_the_buckets_its_robot_will_use(tmp_path, tokenizer_path):
    """Policy.warmup prepares every bucket of the robot's cameras, each prompt length and the batch sizes asked
    for; a robot's call then lands in one of them (nothing is prepared while it waits), with the dynamic
    call's actions."""
    import numpy as np

    from tests.conftest import write_policy_checkpoint
    from tests.robot.test_policy import libero_obs

    ck = write_policy_checkpoint(tmp_path, "tiny", tokenizer_path)
    want = pi0.Policy(ck, preset="libero", dtype="float32", seed=3).infer(libero_obs())["actions"]
    pol = pi0.Policy(ck, preset="libero", dtype="float32", seed=3)
    runner = pol.model.use_buckets()
    pol.warmup(batches=(1, 2))
    warmed = dict(runner.entries)
    assert {b.batch for b in warmed} == {1, 2} and {b.cameras for b in warmed} == {2}  # libero: two cameras
    got = pol.infer(libero_obs())["actions"]
    assert runner.entries == warmed and all(runner.entries[b] is e for b, e in warmed.items()) and runner.replays == 1
    assert np.abs(got - want).max() <= 1e-4
