"""The places where new things plug in are code: a backend, a checkpoint layout and a simulator are each added here
by their own files plus one registry entry (as docs/architecture.md says), and everything else takes them as it
takes the built-in ones."""

import sys
import textwrap

import numpy as np
import pytest
import torch

import pi0
from pi0.backends import factory
from pi0.checkpoint import layouts
from pi0.sim import env as sim_env


def test_a_backend_is_its_package_and_a_registry_line(tmp_path, monkeypatch):
    """A third backend (the reference run in float64, its weights placed by itself): a package with spec.py and one
    BACKENDS entry; build_model, load_model and pi0.Policy then run it by name."""
    pkg = tmp_path / "fp64_backend"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "spec.py").write_text(textwrap.dedent('''
        """A float64 reference: loaded in fp32 on the CPU, placed in float64 by the backend."""
        import torch
        from pi0.backends.reference.spec import build as build_reference

        def state_device(device):
            return torch.device("cpu")

        def load_hook(dtype, device):
            return None

        def build(config, state, device):
            model = build_reference(config, state, torch.device("cpu")).double()
            sample = model.sample_actions

            def sample_actions(obs, **kw):
                obs = obs.to("cpu", torch.float64)
                kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                return sample(obs, **kw).float()

            model.sample_actions = sample_actions
            return model
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(factory.BACKENDS, "fp64", "fp64_backend.spec")
    cfg = pi0.size_config("tiny")
    obs = pi0.sample_observation(cfg, batch_size=2, num_valid_tokens=7, seed=1)
    noise = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(2))
    ours = pi0.build_model(cfg, backend="fp64", seed=3).sample_actions(obs, noise=noise)
    ref = pi0.build_model(cfg, backend="reference", seed=3).sample_actions(obs, noise=noise)
    assert ours.dtype == torch.float32 and (ours - ref).abs().max() < 1e-4
    model = pi0.build_model(cfg, backend="fp64")
    assert isinstance(model, pi0.model.backend.Backend) and model.dtype == torch.float64  # built by its own spec
    with pytest.raises(ValueError, match="unknown backend 'fp128': choose one of reference, engine, ttnn, fp64"):
        pi0.build_model(cfg, backend="fp128")


def test_a_checkpoint_layout_is_one_table_entry(tmp_path, monkeypatch):
    """A new key layout (everything under one prefix, as some exporters write it): one Layout in LAYOUTS, and
    save, detection, inspection and loading take it."""
    openpi = layouts.LAYOUTS["openpi"]
    mine = layouts.Layout("prefixed", [("policy." + s, d) for s, d in openpi.rules], "policy.",
                          lambda k: k.startswith("policy.paligemma_with_expert."), True,
                          lambda cfg, embed: {"policy." + k: v for k, v in openpi.unused_tensors(cfg, embed).items()},
                          openpi.config_files)
    monkeypatch.setattr(layouts, "LAYOUTS", {"prefixed": mine, **layouts.LAYOUTS})
    cfg = pi0.size_config("tiny")
    model = pi0.build_model(cfg, seed=4)
    pi0.save_model(model, tmp_path / "ck", layout="prefixed")
    pi0.save_model(model, tmp_path / "openpi", layout="openpi")
    info = pi0.inspect_checkpoint(tmp_path / "ck")
    assert info.layout == "prefixed"  # the tensors of openpi's layout, the unused lm_heads too, under the prefix
    assert info.num_file_tensors == pi0.inspect_checkpoint(tmp_path / "openpi").num_file_tensors
    back = pi0.load_model(tmp_path / "ck")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


class _PointEnv:
    """A point robot that must reach a goal: the `metaworld` preset's keys (image, 4 state values, 4 actions)."""

    def __init__(self, task: str, size: int, wrist: bool):
        self.task, self.size, self.wrist, self.prompt = task, size, wrist, "reach the goal"

    def reset(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.pos, self.goal = rng.uniform(-1, 1, 3).astype(np.float32), rng.uniform(-1, 1, 3).astype(np.float32)

    def render(self, camera=None, size=None) -> np.ndarray:
        n = size or self.size
        img = np.zeros((n, n, 3), np.uint8)
        for p, c in ((self.pos, 0), (self.goal, 1)):
            i, j = ((p[:2] + 1) / 2 * (n - 1)).astype(int)
            img[i, j, c] = 255
        return img

    def state(self) -> np.ndarray:
        return np.append(self.pos, 0.0).astype(np.float32)

    def observation(self) -> dict:
        return {"observation/image": self.render(), "observation/state": self.state(), "prompt": self.prompt}

    def expert_action(self) -> np.ndarray:
        return np.append(np.clip((self.goal - self.pos) * 4, -1, 1), 0.0).astype(np.float32)

    def step(self, action) -> bool:
        self.pos = self.pos + 0.25 * np.clip(np.asarray(action, np.float32)[:3], -1, 1)
        return bool(np.linalg.norm(self.pos - self.goal) < 0.1)

    def close(self) -> None:
        pass


def test_a_simulator_is_one_module_and_a_registry_line(tmp_path, monkeypatch):
    """A second simulator: one module that meets `Simulator`, one SIMULATORS entry; evaluation (with a pi0 policy
    and with its expert), worker processes' episode lists, videos and demonstrations need nothing else."""
    mod = type(sys)("point_sim")
    mod.NAME, mod.TITLE, mod.PRESET, mod.ROBOT, mod.FPS, mod.EVAL_SEED = "point", "Point", "metaworld", "point", 10, 500
    mod.DEFAULT_TASKS, mod.CAMERA, mod.WRIST_CAMERA = ("reach",), "top", "top"
    mod.make = lambda task, size, wrist, camera=None: _PointEnv(task, size, wrist)
    mod.check_tasks = lambda tasks: tasks
    mod.instruction = lambda task: "reach the goal"
    cam = {"dtype": "video", "shape": (32, 32, 3), "names": ["height", "width", "channels"]}
    mod.features = lambda size, wrist: {"observation.images.image": {**cam, "shape": (size, size, 3)},
                                        "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
                                        "action": {"dtype": "float32", "shape": (4,), "names": None}}
    mod.record_frame = lambda obs, wrist: {"observation.images.image": obs["observation/image"],
                                           "observation.state": obs["observation/state"]}
    monkeypatch.setitem(sys.modules, "point_sim", mod)
    monkeypatch.setitem(sim_env.SIMULATORS, "point", "point_sim")
    from pi0.sim.collect import collect
    from pi0.sim.evaluate import evaluate, expert_success
    from pi0.sim.runners import ChunkRunner

    assert expert_success(["reach"], 3, env="point", max_steps=40)["tasks"]["reach"]["success"] == 1.0

    def expert_chunks(obs):  # a policy that knows where the goal is drawn: the green pixel
        img, pos = obs["observation/image"], obs["observation/state"][:3]
        i, j = np.argwhere(img[..., 1] == 255)[0]
        goal = np.array([i, j]) / (img.shape[0] - 1) * 2 - 1
        step = np.clip((goal - pos[:2]) * 4, -1, 1)
        return {"actions": np.tile(np.append(np.append(step, 0), 0), (2, 1))}

    report = evaluate(lambda: ChunkRunner(expert_chunks, 1), ["reach"], 2, env="point", size=32, max_steps=40,
                      video=tmp_path / "point.mp4")
    assert report["episodes"] == 2 and (tmp_path / "point.mp4").stat().st_size > 0
    from pi0.data.dataset import LeRobotDataset

    r = collect(["reach"], 2, tmp_path / "demos", env="point", size=32, noise=0.0, max_steps=40, workers=1,
                log=lambda _: None)
    ds = LeRobotDataset(tmp_path / "demos")
    assert r["episodes"] == 2 and ds.info["robot_type"] == "point" and ds.tasks == ["reach the goal"]
