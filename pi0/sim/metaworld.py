"""Meta-World (MuJoCo) as a simulator for pi0 (../shared/spec/metaworld.md): its tasks, an environment with its
scripted expert, and what its demonstrations hold (`pi0.sim.env.Simulator`).

The robot: a Sawyer arm; the state is the hand position and the gripper opening (4 values); an action is the
hand's displacement and the gripper command (4 values in [-1, 1]); one fixed camera (`corner` by default)
and optionally the gripper camera, rendered headless through EGL. The observation a policy gets is the
`metaworld` preset's: `observation/image`, `observation/wrist_image` (optional), `observation/state`, `prompt`.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import numpy as np

from pi0.sim import SimError

# the tasks whose goal a small policy can see at 64 px, with an instruction each (Meta-World ships none)
INSTRUCTIONS = {
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
    "reach-v3": "reach the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "button-press-v3": "press the button",
}
DEFAULT_TASKS = ("drawer-open-v3", "drawer-close-v3", "button-press-topdown-v3", "window-open-v3", "window-close-v3")
NAME, TITLE, PRESET, ROBOT = "metaworld", "Meta-World", "metaworld", "sawyer"
CAMERA, WRIST_CAMERA = "corner", "gripperPOV"
FPS = 20  # the dataset's frame rate (Meta-World's control step is 12.5 ms of simulated time; nothing depends on it)
EVAL_SEED = 10_000  # evaluation episodes start here; collection starts at 0: no episode is seen in both


# headless rendering (EGL) unless the user chose otherwise; read by MuJoCo and PyOpenGL when first imported
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def _import_metaworld():
    import warnings

    # the scripted experts warn about their own gains at every step
    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
    try:
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:
        raise SimError(f"Meta-World is not installed ({e}): pip install 'pi0[sim]'") from e
    except Exception as e:  # noqa: BLE001 - MuJoCo checks MUJOCO_GL at import
        raise SimError(gl_help(e)) from e
    return mujoco, ALL_V3_ENVIRONMENTS, ENV_POLICY_MAP


def gl_help(error: BaseException) -> str:
    gl = os.environ.get("MUJOCO_GL")
    return (f"MuJoCo cannot render with MUJOCO_GL={gl} ({type(error).__name__}: {error}). Headless rendering needs "
            "EGL (Debian/Ubuntu: apt install libegl1 libgl1-mesa-dri; MUJOCO_GL=egl, the default here) or OSMesa "
            "(apt install libosmesa6; MUJOCO_GL=osmesa)")


def check_tasks(tasks: list[str]) -> list[str]:
    _, envs, _ = _import_metaworld()
    unknown = [t for t in tasks if t not in envs]
    if unknown:
        raise ValueError(f"unknown Meta-World task(s) {unknown}: e.g. {', '.join(DEFAULT_TASKS)} "
                         f"({len(envs)} in all, metaworld.env_dict.ALL_V3_ENVIRONMENTS)")
    return tasks


def instruction(task: str) -> str:
    return INSTRUCTIONS.get(task, task.rsplit("-v", 1)[0].replace("-", " "))


class MetaWorldEnv:
    """One task with a randomised object (and goal) per episode, rendering at `size` px without shadows or
    reflections (a rendered step costs a fraction of the defaults' on a CPU), frames the right way up."""

    def __init__(self, task: str, size: int = 64, camera: str = CAMERA, wrist: bool = False):
        mujoco, envs, policies = _import_metaworld()
        self.mujoco, self.task, self.size, self.camera, self.wrist = mujoco, task, size, camera, wrist
        try:
            env = envs[task](render_mode="rgb_array", width=size, height=size, camera_name=camera)
        except Exception as e:  # noqa: BLE001 - PyOpenGL fails here when the GL library is missing
            raise SimError(gl_help(e)) from e
        env._partially_observable = False  # the 39-D observation with the goal (the expert needs it)
        env._freeze_rand_vec = False  # a new object / goal position every reset
        env.seeded_rand_vec = True  # ... drawn from env.seed()'s generator (Meta-World's default is numpy's global one)
        if "sawyer_observation_space" in vars(env):
            del env.sawyer_observation_space  # recomputed for the goal-observable observation
        env._set_task_called = True
        env.model.vis.quality.shadowsize = 0
        env.model.vis.global_.offwidth = env.model.vis.global_.offheight = max(size, 256)
        self.env = env
        self.expert = policies[task]()
        self.prompt = instruction(task)
        self._renderers: dict[tuple[str, int], Any] = {}
        self.obs: np.ndarray | None = None

    def _renderer(self, camera: str, size: int):
        key = (camera, size)
        if key not in self._renderers:
            try:
                r = self.mujoco.Renderer(self.env.model, size, size)
            except Exception as e:  # noqa: BLE001 - MuJoCo raises several types when no GL context can be made
                raise SimError(gl_help(e)) from e
            for flag in ("mjRND_SHADOW", "mjRND_REFLECTION"):
                r.scene.flags[getattr(self.mujoco.mjtRndFlag, flag)] = 0
            if not self._renderers:
                # after the first renderer: MuJoCo registers EGL's teardown when it makes its first context, and
                # exit handlers run last-registered first, so the contexts are freed while EGL still runs
                atexit.register(self.close)
            self._renderers[key] = r
        return self._renderers[key]

    def render(self, camera: str | None = None, size: int | None = None) -> np.ndarray:
        """uint8 [size, size, 3], the right way up (MuJoCo's offscreen frames come out upside down)."""
        r = self._renderer(camera or self.camera, size or self.size)
        r.update_scene(self.env.data, camera=camera or self.camera)
        return np.ascontiguousarray(np.flipud(r.render()))

    def reset(self, seed: int) -> None:
        self.env.seed(seed)
        self.obs, _ = self.env.reset()

    def state(self) -> np.ndarray:
        """The hand position (xyz) and the gripper opening."""
        return np.asarray(self.obs[:4], dtype=np.float32)

    def observation(self) -> dict[str, Any]:
        """What a robot sends pi0 (the `metaworld` preset's keys)."""
        out = {"observation/image": self.render(), "observation/state": self.state(), "prompt": self.prompt}
        if self.wrist:
            out["observation/wrist_image"] = self.render(WRIST_CAMERA)
        return out

    def expert_action(self) -> np.ndarray:
        return np.clip(self.expert.get_action(self.obs), -1.0, 1.0).astype(np.float32)

    def step(self, action: np.ndarray) -> bool:
        """Apply one action (clipped to [-1, 1]); True once the task is solved."""
        self.obs, _, _, _, info = self.env.step(np.clip(np.asarray(action, dtype=np.float32)[:4], -1.0, 1.0))
        return bool(info["success"])

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        self.env.close()


def make(task: str, size: int, wrist: bool, camera: str | None = None) -> MetaWorldEnv:
    return MetaWorldEnv(task, size, camera or CAMERA, wrist)


def features(size: int, wrist: bool) -> dict[str, dict[str, Any]]:
    cam = {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]}
    feats = {"observation.images.image": cam}
    if wrist:
        feats["observation.images.wrist_image"] = dict(cam)
    feats["observation.state"] = {"dtype": "float32", "shape": (4,), "names": ["hand_x", "hand_y", "hand_z", "gripper"]}
    feats["action"] = {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]}
    return feats


def record_frame(obs: dict[str, Any], wrist: bool) -> dict[str, Any]:
    """A robot observation (the `metaworld` preset's keys) as the dataset's features."""
    out = {"observation.images.image": obs["observation/image"], "observation.state": obs["observation/state"]}
    if wrist:
        out["observation.images.wrist_image"] = obs["observation/wrist_image"]
    return out
