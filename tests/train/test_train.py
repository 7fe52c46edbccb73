"""`pi0 train`: a tiny model learns, its inputs are the policy's inputs, LoRA merges exactly, a resumed run
continues bit for bit, data-parallel runs (DDP, FSDP over gloo) follow one process, bad datasets are named,
and what it saves serves."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("av")

import pi0  # noqa: E402
from pi0.data.dataset import DatasetError
from pi0.data.writer import LeRobotDatasetWriter  # noqa: E402
from pi0.train.args import TrainArgs  # noqa: E402
from pi0.train.lora import add_lora, merge_lora  # noqa: E402
from pi0.train.schedule import learning_rate  # noqa: E402
from pi0.train.trainer import Trainer  # noqa: E402
from tests.conftest import cli_env  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "datasets" / "videos"
TASKS = ["open the drawer", "close the drawer"]


def write_dataset(root: Path, episodes: int = 6, frames: int = 8, action_dim: int = 3, state_dim: int = 4,
                  size: int = 28, cameras=("observation.images.top", "observation.images.wrist"), seed: int = 0) -> Path:
    """A small dataset whose actions follow the task and the state (something a tiny model can learn)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(state_dim, action_dim)).astype(np.float32)
    feats = {k: {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]} for k in cameras}
    feats["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    feats["action"] = {"dtype": "float32", "shape": (action_dim,), "names": None}
    w = LeRobotDatasetWriter(root, fps=10, features=feats)
    for e in range(episodes):
        task = e % len(TASKS)
        state = np.cumsum(rng.normal(size=(frames, state_dim)), 0).astype(np.float32) * 0.1
        action = np.tanh(state @ mix * (1 if task == 0 else -1) + task).astype(np.float32)
        ep = {"observation.state": state, "action": action}
        for c, k in enumerate(cameras):
            ep[k] = np.full((frames, size, size, 3), 60 + 120 * task + 20 * c, dtype=np.uint8)
        w.add_episode(ep, TASKS[task])
    return w.finalize()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "robot")


def args(dataset, out, **kw) -> TrainArgs:
    base = dict(dataset=dataset if isinstance(dataset, list) else str(dataset), out=str(out), size="tiny", steps=6, batch=4, lr=1e-3, action_horizon=4,
                log_every=1, progress=False, dtype="float32")
    return TrainArgs(**{**base, **kw})


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_learning_rate_schedule():
    lr = [learning_rate(s, 1.0, 10, 100, 0.1) for s in range(101)]
    assert lr[0] == pytest.approx(1 / 11) and lr[10] == pytest.approx(1.0) and lr[100] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(lr[:10], lr[1:11])) and all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_a_tiny_model_lowers_its_loss(tmp_path, dataset):
    t = Trainer(args(dataset, tmp_path / "run", steps=150, batch=8, lr=3e-3, log_every=1, save_every=150))
    t.run()
    got = losses(tmp_path / "run")
    assert len(got) == 150
    first, last = np.mean(got[:15]), np.mean(got[-15:])
    assert last < 0.5 * first, (first, last)


def test_training_inputs_are_the_policys_inputs(tmp_path, dataset):
    """What the model trained on equals what pi0.Policy feeds it for the same frame from the saved checkpoint."""
    for size in ("tiny", "tiny-pi05"):
        t = Trainer(args(dataset, tmp_path / size, size=size, steps=1, augment=False))
        ckpt = t.run()
        policy = pi0.Policy(ckpt, backend="reference", dtype="float32")
        assert policy.metadata["preset"] == "generic" and policy.metadata["cameras"] == t.cameras
        for index in (0, 9, 17):
            item = t.ds[index]
            robot = {k: item[k].transpose(1, 2, 0) for k in t.ds.camera_keys}  # HWC uint8, as robots send
            robot.update({"observation.state": item["observation.state"], "prompt": item["task"]})
            want = policy.prepare(robot)
            got = t.data.sample(index, 0, 0)
            for c in range(len(t.cameras)):
                assert torch.equal(got["images"][c], want.images[c][0])
            assert np.array_equal(got["tokens"], want.tokens[0].numpy())
            assert np.array_equal(got["state"], want.state[0].numpy())
            a = policy.postprocess(got["actions"])  # back to robot units: the dataset's chunk
            assert np.allclose(a, item["action"], atol=1e-5)


def write_aloha_dataset(root: Path, episodes: int = 3, frames: int = 6, size: int = 28) -> Path:
    """Aloha's shapes and units: 14 joint values (grippers at 6 and 13 in the puppet's joint range), one camera."""
    rng = np.random.default_rng(3)
    cam = {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]}
    feats = {"observation.images.cam_high": cam,
             "observation.state": {"dtype": "float32", "shape": (14,), "names": None},
             "action": {"dtype": "float32", "shape": (14,), "names": None}}
    w = LeRobotDatasetWriter(root, fps=50, features=feats)
    for e in range(episodes):
        joints = rng.uniform(-1, 1, size=(frames, 14)).astype(np.float32)
        joints[:, [6, 13]] = rng.uniform(0.1, 1.3, size=(frames, 2))  # the puppet grippers' joint range
        w.add_episode({"observation.images.cam_high": np.full((frames, size, size, 3), 40 * e, dtype=np.uint8),
                       "observation.state": joints, "action": np.roll(joints, -1, axis=0)}, TASKS[e % 2])
    return w.finalize()


def test_a_preset_that_maps_joints_trains_and_serves_in_the_robots_units(tmp_path):
    """One step with the aloha preset: training applies aloha's joint flips and gripper maps to the state and (the
    inverse) to the targets, records the preset, and serving the result applies exactly the maps training did, so
    the robot gets its own units back."""
    from pi0.robot.presets import PRESETS

    ds = write_aloha_dataset(tmp_path / "aloha")
    t = Trainer(args(ds, tmp_path / "run", preset="aloha", steps=1, augment=False))
    assert t.cameras == ["observation.images.cam_high", None, None]  # one dataset camera, aloha's three slots
    ckpt = t.run()
    assert json.loads((ckpt / "config.json").read_text())["robot_preset"] == "aloha"
    policy = pi0.Policy(ckpt, backend="reference", dtype="float32")  # the preset from config.json
    assert policy.metadata["preset"] == "aloha"
    aloha = PRESETS["aloha"]
    # the norm stats describe the data in the model's units (after the maps), as openpi computes them
    assert np.allclose(t.action_stats.mean, aloha.actions_in(t.ds.column("action").astype(np.float32)).mean(0), atol=1e-5)
    assert np.allclose(t.state_stats.mean, aloha.state_in(t.ds.column("observation.state").astype(np.float32)).mean(0),
                       atol=1e-5)
    for index in (0, 7):
        item = t.ds[index]
        # the targets are in the model's units: the robot's chunk through aloha's inverse map, normalised
        got = t.data.sample(index, 0, 0)
        raw = item["action"]
        want = t.pipeline.normalizer.actions_in(aloha.actions_in(raw.copy()))
        assert np.allclose(got["actions"][:, :14], want, atol=1e-6)
        assert not np.allclose(got["actions"][:, :14], t.pipeline.normalizer.actions_in(raw), atol=1e-3)  # maps applied
        # serving inverts exactly that map: the robot gets its chunk back in its own units
        assert np.allclose(policy.postprocess(got["actions"]), raw, atol=1e-4)
        # and the served state is the trained state: the same flips and gripper angles, the same stats
        obs = {"images": {"cam_high": item["observation.images.cam_high"]}, "state": item["observation.state"],
               "prompt": item["task"]}
        served = policy.prepare(obs)
        assert np.array_equal(got["state"], served.state[0].numpy())
        assert torch.equal(got["images"][0], served.images[0][0])


def test_lora_merge_equals_base_plus_adapters(tmp_path):
    model = pi0.build_model(pi0.size_config("tiny"), seed=1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = add_lora(model, rank=4, alpha=8, targets="all")
    assert "expert.layers.0.self_attn.q_proj" in names and "vlm.layers.1.mlp.down_proj" in names
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    merged = merge_lora(model.state_dict(), model)
    assert set(merged) == set(base)
    for name in names:
        m = model.get_submodule(name)
        want = base[name + ".weight"] + 2.0 * m.lora_b.detach() @ m.lora_a.detach()
        assert torch.allclose(merged[name + ".weight"], want, atol=1e-6)
    plain = pi0.build_model(pi0.size_config("tiny"), seed=1)
    plain.load_state_dict(merged)
    obs = pi0.sample_observation(plain.config, batch_size=2)
    noise = torch.randn(2, plain.config.action_horizon, plain.config.action_dim, generator=g)
    with torch.no_grad():
        assert (plain.sample_actions(obs, noise=noise) - model.sample_actions(obs, noise=noise)).abs().max() <= 1e-5


def test_lora_training_saves_merged_weights(tmp_path, dataset):
    t = Trainer(args(dataset, tmp_path / "lora", lora=4, steps=3))
    assert t.trainable == sum(p.numel() for n, p in t.model.named_parameters() if "lora_" in n)
    ckpt = t.run()
    saved = pi0.load_model(ckpt)  # a plain checkpoint: the adapters are merged
    ref = merge_lora(t.model.state_dict(), t.model)
    assert all(torch.equal(saved.state_dict()[k], ref[k]) for k in ref)
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    assert any("lora_a" in k for k in state["params"])  # the adapters, kept for resuming


@pytest.mark.parametrize("extra", [{}, {"lora": 4, "ema": 0.9}], ids=["full", "lora_ema"])
def test_resume_continues_bit_for_bit_and_ctrl_c_keeps_the_last_checkpoint(tmp_path, dataset, extra):
    whole = Trainer(args(dataset, tmp_path / "whole", steps=8, save_every=4, **extra))
    whole.run()

    def interrupt(step, _):
        if step == 6:
            raise KeyboardInterrupt

    cut = Trainer(args(dataset, tmp_path / "cut", steps=8, save_every=4, **extra))
    cut.run(callback=interrupt)
    latest = (tmp_path / "cut" / "latest").resolve()
    assert latest.name == "step-000004" and not list((tmp_path / "cut").glob(".step-*"))
    pi0.load_model(latest)  # intact
    again = Trainer(args(dataset, tmp_path / "cut", steps=8, save_every=4, **extra))
    again.resume(latest)
    again.run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    a = pi0.load_model(tmp_path / "whole" / "latest").state_dict()
    b = pi0.load_model(tmp_path / "cut" / "latest").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(nproc: int, *argv: str) -> subprocess.CompletedProcess:
    env = cli_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "pi0.train", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# Two processes sum their gradients in another order than one: fp32 follows one process to its rounding (1e-5). In
# bf16 autocast (what dtype auto trains in where bf16 is native) each process's products run on half the batch, and
# where the CPU computes bf16 natively their roundings differ from one process's; AdamW's first steps (about lr times
# the gradient's sign) carry that on. So two bf16 processes must stay as close to one as bf16 stays to fp32 itself
# (2-core AMD EPYC Zen 4, native bf16: 0.9 % and 2.5 % apart at steps 2 and 3, where one process in bf16 is 1.6 % and
# 4.3 % from fp32; without native bf16 they are 2.5e-4 apart), and never further than 1 % where that is closer.
FOLLOWS = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.mark.parametrize("mode,dtype", [("ddp", "float32"), ("fsdp", "float32"), ("ddp", "bfloat16")])
def test_two_processes_follow_one(tmp_path, dataset, mode, dtype):
    """torchrun with 2 processes on gloo (DDP, or FSDP sharding) follows one process with the same global batch, in
    fp32 and in bf16 autocast; the FSDP run resumes too (its state gathered from the shards)."""
    Trainer(args(dataset, tmp_path / "one", steps=3, dtype=dtype)).run()
    argv = ["--dataset", str(dataset), "--size", "tiny", "--steps", "3", "--batch", "4", "--lr", "1e-3",
            "--action-horizon", "4", "--log-every", "1", "--quiet", "--out", str(tmp_path / "two"), "--dtype", dtype]
    two = _torchrun(2, *argv, *(["--fsdp"] if mode == "fsdp" else []))
    assert two.returncode == 0, two.stderr[-3000:]
    one = np.array(losses(tmp_path / "one"))
    allowed = FOLLOWS[dtype] * np.abs(one)
    if dtype == "bfloat16":  # bf16's own distance from fp32, step by step
        Trainer(args(dataset, tmp_path / "fp32", steps=3, dtype="float32")).run()
        allowed = np.maximum(allowed, np.abs(one - np.array(losses(tmp_path / "fp32"))))
    assert (np.abs(np.array(losses(tmp_path / "two")) - one) <= allowed).all(), (losses(tmp_path / "two"), one, allowed)
    if mode == "fsdp":
        resumed = _torchrun(2, "--resume", str(tmp_path / "two"), "--steps", "4", "--quiet")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert len(losses(tmp_path / "two")) == 4 and (tmp_path / "two" / "step-000004").is_dir()


def test_resume_refuses_options_that_change_the_run(tmp_path, dataset, capsys):
    """`pi0 train --resume DIR` continues the run as it was started: another --lr (say) is an error naming it, while
    --steps extends the run."""
    from pi0.cli.main import main

    Trainer(args(dataset, tmp_path / "run", steps=2)).run()
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.5", "--batch", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (the run has 0.001)" in err and "--batch" not in err.split("differ from it")[1], err
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "3", "--quiet"]) == 0
    assert len(losses(tmp_path / "run")) == 3


def test_bad_datasets_are_named(tmp_path, dataset):
    with pytest.raises(DatasetError, match="no camera 'observation.images.side'"):
        Trainer(args(dataset, tmp_path / "a", cameras=["observation.images.side"]))
    wide = write_dataset(tmp_path / "wide", episodes=1, action_dim=33)
    with pytest.raises(DatasetError, match="'action' has 33 dims, the model takes at most 32"):
        Trainer(args(wide, tmp_path / "b"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    blank = write_dataset(tmp_path / "blank", episodes=2)
    pq.write_table(pa.table({"task_index": pa.array([0, 1], pa.int64()), "task": ["open the drawer", " "]}),
                   str(blank / "meta" / "tasks.parquet"))
    with pytest.raises(DatasetError, match="task 1 is empty"):
        Trainer(args(blank, tmp_path / "c"))
    cut = write_dataset(tmp_path / "cut", episodes=3)
    mp4 = cut / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size * 2 // 3])
    with pytest.raises(DatasetError, match=r"observation.images.wrist/chunk-000/file-000.mp4: episode \d"):
        Trainer(args(cut, tmp_path / "d", steps=20, batch=8)).run()


def test_lerobot_written_dataset_trains_converts_and_serves(tmp_path):
    """A dataset LeRobot 0.6.1 wrote, through pi0 train (the CLI), pi0 convert, and pi0 serve + openpi's client."""
    from openpi_client import websocket_client_policy

    from tests.conftest import free_port, wait_healthy

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pi0.cli.main", "train", "--dataset", str(FIXTURE), "--size", "tiny-pi05",
                        "--out", str(out), "--steps", "2", "--batch", "2", "--action-horizon", "5", "--quiet",
                        "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved" in r.stderr and (out / "loss.png").is_file()
    conv = subprocess.run([sys.executable, "-m", "pi0.cli.main", "convert", str(out / "latest"), str(tmp_path / "lr"),
                           "--layout", "lerobot"], capture_output=True, text=True, timeout=300, env=cli_env())
    assert conv.returncode == 0, conv.stderr
    assert pi0.inspect_checkpoint(tmp_path / "lr").layout == "lerobot"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pi0.cli.main", "serve", "--checkpoint", str(out / "latest"), "--port",
                             str(port), "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cli_env())
    try:
        wait_healthy(proc, port, 120)
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
        rng = np.random.default_rng(0)
        obs = {"observation.images.front": rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
               "observation.images.wrist": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
               "observation.state": rng.normal(size=6).astype(np.float32), "prompt": "open the drawer"}
        reply = client.infer(obs)
        assert reply["actions"].shape == (5, 6) and np.isfinite(reply["actions"]).all()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bf16_autocast_and_frozen_towers(tmp_path, dataset):
    """--dtype bfloat16 trains under bf16 autocast with fp32 master weights (slow but right on a CPU without
    native bf16); --freeze vlm leaves SigLIP, the projector and the VLM untouched."""
    t = Trainer(args(dataset, tmp_path / "bf16", steps=2, dtype="bfloat16", freeze="vlm"))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    after = t.model.state_dict()
    assert np.isfinite(losses(tmp_path / "bf16")).all()
    for k in before:
        frozen = k.startswith(("vision.", "projector.", "vlm."))
        assert torch.equal(before[k], after[k]) == frozen, k


def test_dataset_by_repo_id_from_lerobots_or_the_hub_cache(tmp_path, monkeypatch):
    """A repo id: LeRobot's own cache ($HF_LEROBOT_HOME/<repo_id>), then the huggingface_hub cache (the v3.0 tag
    LeRobot downloads, or main)."""
    import shutil

    from pi0.data.dataset import LeRobotDataset

    shutil.copytree(FIXTURE, tmp_path / "lerobot" / "someone" / "robot_data")
    monkeypatch.setenv("HF_LEROBOT_HOME", str(tmp_path / "lerobot"))
    assert len(LeRobotDataset("someone/robot_data")) == 24
    repo = tmp_path / "hf" / "hub" / "datasets--someone--hub_data"
    shutil.copytree(FIXTURE, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "v3.0").write_text("0123abcd")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read per call
    assert LeRobotDataset("someone/hub_data").root == repo / "snapshots" / "0123abcd"
    with pytest.raises(DatasetError, match="huggingface-cli download --repo-type dataset someone/other"):
        LeRobotDataset("someone/other")


def test_fine_tuning_a_lerobot_checkpoint_with_its_camera_slots(tmp_path):
    """--init a LeRobot-saved checkpoint: its cameras are matched by name (an error names the missing one),
    --cameras maps the dataset's onto its slots (none: an empty slot), and the result serves with the dataset's
    keys."""
    from tests.robot.test_lerobot_pipeline import ROOT, TOKENIZER

    init = dict(init=str(ROOT / "pi0_default"), size=None, tokenizer=str(TOKENIZER), steps=2, batch=2, lora=4,
                action_horizon=None)
    with pytest.raises(DatasetError, match="no camera 'observation.images.base'"):
        Trainer(args(FIXTURE, tmp_path / "a", **init))
    t = Trainer(args(FIXTURE, tmp_path / "b", cameras=["observation.images.front", "observation.images.wrist", "none"],
                     **init))
    assert t.cameras == ["observation.images.front", "observation.images.wrist", None]
    policy = pi0.Policy(t.run(), dtype="float32")
    assert policy.metadata["preset"] == "generic" and policy.action_dim == 6
    obs = {"observation.images.front": np.zeros((24, 32, 3), np.uint8),
           "observation.images.wrist": np.zeros((32, 32, 3), np.uint8),
           "observation.state": np.zeros(6, np.float32), "prompt": "open the drawer"}
    assert policy.infer(obs)["actions"].shape == (t.config.action_horizon, 6)


def test_datasets_mix_with_weights(tmp_path, dataset):
    """pi0 train --dataset A --dataset B --weights 1,3: samples come from each in proportion to its weight, the norm
    stats are those of all their frames, the tasks of both tokenised, and datasets of another robot refused."""
    from pi0.data.dataset import LeRobotDataset
    from pi0.train.command import add_arguments, args_from_namespace
    import argparse

    other = write_dataset(tmp_path / "other", episodes=3, seed=5)
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = args_from_namespace(p.parse_args(["--dataset", str(dataset), "--dataset", str(other), "--weights", "1,3",
                                          "--out", str(tmp_path / "run")]))
    assert a.datasets == [str(dataset), str(other)] and a.weights == [1.0, 3.0]
    t = Trainer(args([str(dataset), str(other)], tmp_path / "run", weights=[1.0, 3.0], steps=2))
    n_first = len(LeRobotDataset(dataset))
    draws = [t.ds.draw(0, p) for p in range(4000)]
    share = np.mean([d >= n_first for d in draws])
    assert abs(share - 0.75) < 0.03, share  # the second dataset, weight 3 of 4
    both = np.concatenate([LeRobotDataset(dataset).column("action"), LeRobotDataset(other).column("action")])
    assert np.allclose(t.action_stats.mean, both.mean(0), atol=1e-6)
    ckpt = t.run()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["pi0_train"]["dataset"] == [str(dataset), str(other)]
    pi0.Policy(ckpt, backend="reference", dtype="float32")  # serves
    wrong = write_dataset(tmp_path / "wrong", episodes=2, action_dim=5)
    with pytest.raises(DatasetError, match="differ"):
        Trainer(args([str(dataset), str(wrong)], tmp_path / "run2"))
    # a recording of the same robot carries more features (the recorder's flags, DAgger's action.policy): it mixes
    from pi0.data.recorder import Recorder

    ds0 = LeRobotDataset(dataset)
    feats = {k: {**v, "shape": tuple(v["shape"])} for k, v in ds0.features.items()
             if k in (*ds0.camera_keys, "observation.state", "action")}
    feats = {k: ({**v, "dtype": "video"} if k in ds0.camera_keys else v) for k, v in feats.items()}
    rec = Recorder(tmp_path / "recorded", fps=ds0.fps, features={**feats, "action.policy": feats["action"]})
    for i in range(4):
        item = ds0[i]
        frame = {k: item[k].transpose(1, 2, 0) for k in ds0.camera_keys}
        frame.update({"observation.state": item["observation.state"], "action": item["action"],
                      "action.policy": item["action"]})
        rec.add(frame, item["task"], intervention=i == 1)
    rec.close(success=True)
    mixed = Trainer(args([str(dataset), str(tmp_path / "recorded")], tmp_path / "run3", steps=1))
    assert len(mixed.ds) == len(ds0) + 4 and "action.policy" not in mixed.ds.features


def test_fine_tuning_keeps_the_checkpoints_stats_when_asked(tmp_path, dataset):
    """--norm-stats checkpoint: fine-tuning on more data of the same robot normalises with the --init checkpoint's
    stats (and saves them), not the new data's; without --init, or with stats of another width, a clear error."""
    from pi0.robot.assets import load_norm_stats

    first = Trainer(args(dataset, tmp_path / "first", steps=1)).run()
    shifted = write_dataset(tmp_path / "shifted", episodes=3, seed=7)  # the same robot, other states and actions
    keep = dict(init=str(first), size=None, action_horizon=None, steps=1)
    t = Trainer(args([str(dataset), str(shifted)], tmp_path / "kept", norm_stats="checkpoint", **keep))
    saved, _ = load_norm_stats(first, None, "MEAN_STD", "MEAN_STD")
    for ours, theirs in ((t.action_stats, saved.actions), (t.state_stats, saved.state)):
        assert np.array_equal(ours.mean, theirs.mean) and np.array_equal(ours.std, theirs.std)
    assert t.pipeline.stats_source.endswith("(the --init checkpoint's stats)")
    again, _ = load_norm_stats(t.run(), None, "MEAN_STD", "MEAN_STD")
    assert np.array_equal(again.actions.mean, saved.actions.mean)
    fresh = Trainer(args([str(dataset), str(shifted)], tmp_path / "fresh", **keep))  # the default: the data's own
    assert not np.allclose(fresh.action_stats.mean, saved.actions.mean)
    with pytest.raises(ValueError, match="give --init"):
        Trainer(args(dataset, tmp_path / "none", norm_stats="checkpoint"))
    wider = write_dataset(tmp_path / "wider", episodes=2, state_dim=5)
    with pytest.raises(DatasetError, match="stats for 4 values of state, the dataset's state has 5"):
        Trainer(args(wider, tmp_path / "wide", norm_stats="checkpoint", **keep))
    with pytest.raises(ValueError, match="--norm-stats 'mine'"):
        Trainer(args(dataset, tmp_path / "bad", norm_stats="mine", **keep))
