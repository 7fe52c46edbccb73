"""Meta-World (MuJoCo) as a robot for pi0 (../shared/spec/metaworld.md): scripted-expert demonstrations
saved as a LeRobot v3 dataset, and closed-loop evaluation of a policy, in process or through `pi0 serve`.

The robot: a Sawyer arm; the state is the hand position and the gripper opening (4 values); an action is the
hand's displacement and the gripper command (4 values in [-1, 1]); one fixed camera (`corner` by default)
and optionally the gripper camera, rendered headless through EGL. The observation a policy gets is the
`metaworld` preset's: `observation/image`, `observation/wrist_image` (optional), `observation/state`, `prompt`.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


# ---------------------------------------------------------------------------------------------
# Demonstrations


def _expert_episode(task: str, seed: int, size: int, camera: str, wrist: bool, noise: float,
                    max_steps: int) -> dict[str, Any] | None:
    """One scripted-expert episode: the expert's own action is recorded at every state, a noisy version of it
    (Gaussian, sigma `noise`) is executed, so the demonstrations visit states off the expert's path and show
    how to recover. None if it does not succeed within max_steps."""
    env = _worker_env(task, size, camera, wrist)
    env.reset(seed)
    rng = np.random.default_rng([seed, 7])
    images, wrists, states, actions = [], [], [], []
    for _ in range(max_steps):
        images.append(env.render())
        if wrist:
            wrists.append(env.render(WRIST_CAMERA))
        states.append(env.state())
        a = env.expert_action()
        actions.append(a)
        if env.step(np.clip(a + noise * rng.standard_normal(4), -1, 1)):
            out = {"observation.images.image": np.stack(images), "observation.state": np.stack(states),
                   "action": np.stack(actions)}
            if wrist:
                out["observation.images.wrist_image"] = np.stack(wrists)
            return out
    return None


_ENVS: dict[tuple, MetaWorldEnv] = {}


def _worker_env(task: str, size: int, camera: str, wrist: bool) -> MetaWorldEnv:
    """One environment per task and settings per process, reused across episodes."""
    key = (task, size, camera, wrist)
    if key not in _ENVS:
        _ENVS[key] = MetaWorldEnv(task, size, camera, wrist)
    return _ENVS[key]


def features(size: int, wrist: bool) -> dict[str, dict[str, Any]]:
    cam = {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]}
    feats = {"observation.images.image": cam}
    if wrist:
        feats["observation.images.wrist_image"] = dict(cam)
    feats["observation.state"] = {"dtype": "float32", "shape": (4,), "names": ["hand_x", "hand_y", "hand_z", "gripper"]}
    feats["action"] = {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]}
    return feats


def collect(tasks: list[str], episodes: int, out: str | os.PathLike, *, size: int = 64, camera: str = CAMERA,
            wrist: bool = False, noise: float = 0.3, max_steps: int = 300, seed: int = 0, workers: int | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """`episodes` successful expert demonstrations per task into a LeRobot v3 dataset at `out`, collected by
    `workers` processes (default: one per core; rendering is single-threaded). Failed episodes are dropped and
    counted. Returns a report."""
    from pi0.dataset import LeRobotDatasetWriter

    check_tasks(tasks)
    writer = LeRobotDatasetWriter(out, fps=FPS, features=features(size, wrist), robot_type="sawyer")
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    report: dict[str, Any] = {"tasks": {}, "size": size, "camera": camera, "wrist": wrist, "noise": noise}
    # fresh processes (spawn): a forked child inherits this process's GL state, which EGL does not survive
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for task in tasks:
            kept, tried, next_seed = 0, 0, seed
            while kept < episodes:
                want = episodes - kept
                batch = list(range(next_seed, next_seed + want + max(1, want // 5)))  # a few spare for failures
                next_seed = batch[-1] + 1
                for ep in pool.map(_expert_episode, *zip(*[(task, s, size, camera, wrist, noise, max_steps)
                                                           for s in batch])):
                    if kept == episodes:
                        break  # spares not needed
                    tried += 1
                    if ep is not None:
                        writer.add_episode(ep, instruction(task))
                        kept += 1
                if tried > 10 * episodes + 20:
                    raise SimError(f"{task}: only {kept} of {tried} expert episodes succeeded (noise {noise})")
            report["tasks"][task] = {"kept": kept, "tried": tried}
            log(f"pi0 sim collect: {task}: {kept} successful of {tried} expert episodes")
    writer.finalize()
    report.update(episodes=len(writer.episodes), frames=writer.total_frames, seconds=time.perf_counter() - t0,
                  out=str(out))
    return report


# ---------------------------------------------------------------------------------------------
# Closed-loop evaluation


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    inference_s: list[float] = field(default_factory=list)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(results: list[EpisodeResult]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task]
        wins = [r for r in rows if r.success]
        lo, hi = wilson_interval(len(wins), len(rows))
        table[task] = {"success": len(wins) / len(rows), "episodes": len(rows), "ci95": [lo, hi],
                       "mean_steps_to_success": float(np.mean([r.steps for r in wins])) if wins else None}
    n = len(results)
    wins = sum(r.success for r in results)
    lo, hi = wilson_interval(wins, n)
    inference = [t for r in results for t in r.inference_s]
    return {"tasks": table, "mean_success": float(np.mean([v["success"] for v in table.values()])) if table else 0.0,
            "episodes": n, "ci95": [lo, hi],
            "inference_ms_median": float(np.median(inference) * 1000) if inference else None}


class ChunkRunner:
    """In process, synchronous chunking: a chunk from the current observation, its first `replan` actions
    executed (the simulation waits for the policy), then a new chunk."""

    def __init__(self, infer: Callable[[dict[str, Any]], dict[str, Any]], replan: int | None):
        self.infer, self.replan = infer, replan
        self.queue: list[np.ndarray] = []
        self.inference_s: list[float] = []

    def reset(self) -> None:
        self.queue = []

    def next_action(self, obs: dict[str, Any]) -> np.ndarray:
        if not self.queue:
            t = time.perf_counter()
            actions = np.asarray(self.infer(obs)["actions"])
            self.inference_s.append(time.perf_counter() - t)
            self.queue = list(actions[: self.replan or max(1, len(actions) // 2)])
        return self.queue.pop(0)


class StreamRunner:
    """As a robot runs: `pi0.stream.ActionStream` (real-time chunking on or off) on a simulated clock that
    advances 1 / control_hz per step and, while a chunk is computed, by its latency (`latency_s`, measured
    once before the episodes: the same for every request, so runs repeat)."""

    def __init__(self, client: Any, control_hz: float, rtc: bool, latency_s: float):
        self.client, self.control_hz, self.rtc, self.latency_s = client, control_hz, rtc, latency_s
        self.stream = None
        self.inference_s: list[float] = []

    def reset(self) -> None:
        from pi0.stream import ActionStream, SimulatedClock, SimulatedExecutor

        self.clock = SimulatedClock()
        self.stream = ActionStream(self.client, self.control_hz, rtc=self.rtc,
                                   executor=SimulatedExecutor(self.clock, self.latency_s), clock=self.clock,
                                   on_empty="wait")

    def next_action(self, obs: dict[str, Any]) -> np.ndarray:
        n = self.stream.chunks
        action = self.stream.next_action(obs)
        if self.stream.chunks != n:
            self.inference_s.append(self.latency_s)
        self.clock.t += 1.0 / self.control_hz
        return action


def run_episodes(runner: ChunkRunner | StreamRunner, episodes: list[tuple[str, int]], *, size: int = 64,
                 camera: str = CAMERA, wrist: bool = False, max_steps: int = 300, film: set[tuple[str, int]] = frozenset(),
                 video_size: int = 256, log: Callable[[str], None] | None = None
                 ) -> tuple[list[EpisodeResult], dict[tuple[str, int], list[np.ndarray]]]:
    """Closed-loop episodes (task, seed), each until success or max_steps; the ones in `film` are filmed at
    video_size px from the policy's camera. Returns the results and the films."""
    results: list[EpisodeResult] = []
    films: dict[tuple[str, int], list[np.ndarray]] = {}
    envs: dict[str, MetaWorldEnv] = {}
    import torch

    for task, seed in episodes:
        env = envs.get(task) or envs.setdefault(task, MetaWorldEnv(task, size, camera, wrist))
        env.reset(seed)
        torch.manual_seed(seed)  # the policy's noise (drawn in process) depends on the episode alone
        runner.reset()
        before = len(runner.inference_s)
        success, steps = False, 0
        frames = films.setdefault((task, seed), []) if (task, seed) in film else None
        while steps < max_steps and not success:
            obs = env.observation()
            if frames is not None:
                frames.append(_caption(env.render(size=video_size), env.prompt, steps, False))
            success = env.step(runner.next_action(obs))
            steps += 1
        if frames is not None:
            frames += [_caption(env.render(size=video_size), env.prompt, steps, success)] * (FPS // 2)
        results.append(EpisodeResult(task, seed, success, steps, runner.inference_s[before:]))
        if log:
            log(f"{task} seed {seed}: {'success' if success else 'failure'} after {steps} steps")
    for env in envs.values():
        env.close()
    return results, films


def evaluate(make_runner: Callable[[], ChunkRunner | StreamRunner], tasks: list[str], episodes: int, *,
             size: int = 64, camera: str = CAMERA, wrist: bool = False, max_steps: int = 300, seed: int = EVAL_SEED,
             video: str | os.PathLike | None = None, workers: int = 1,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Closed-loop success of a policy: `episodes` episodes per task (seeds seed, seed + 1, ...). make_runner:
    a picklable function that builds the policy's runner; with workers > 1 each of that many processes builds
    its own and takes every workers-th episode (rendering is single-threaded: one process per core). The
    answers do not depend on `workers`. video: the first episode of every task, to this mp4, and frames of each
    to a png beside it."""
    check_tasks(tasks)
    jobs = [(task, seed + k) for task in tasks for k in range(episodes)]
    film = {(task, seed) for task in tasks} if video is not None else set()
    kw = dict(size=size, camera=camera, wrist=wrist, max_steps=max_steps, film=film)
    if workers <= 1:
        results, films = run_episodes(make_runner(), jobs, log=log, **kw)
    else:
        shares = [jobs[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_episodes_worker, [make_runner] * workers, shares, [kw] * workers,
                                  [workers] * workers))
        results = sorted((r for part, _ in parts for r in part), key=lambda r: (tasks.index(r.task), r.seed))
        films = {k: v for _, f in parts for k, v in f.items()}
    if video is not None and films:
        ordered = [films[key] for key in sorted(films, key=lambda k: tasks.index(k[0]))]
        write_video([frame for film in ordered for frame in film], video, FPS)
        contact_sheet(ordered, Path(video).with_suffix(".png"))
    return summarize(results)


def _episodes_worker(make_runner: Callable[[], Any], jobs: list[tuple[str, int]], kw: dict[str, Any], workers: int):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return run_episodes(make_runner(), jobs, **kw)


def _caption(frame: np.ndarray, prompt: str, step: int, success: bool) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    text = f"{prompt}  step {step}" + ("  success" if success else "")
    draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(120, 255, 120) if success else (255, 255, 255))
    return np.asarray(img)


def write_video(frames: list[np.ndarray], path: str | os.PathLike, fps: int) -> Path:
    """H.264 mp4 (PyAV), MPEG-4 part 2 where this PyAV build has no H.264 encoder."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        try:
            stream = out.add_stream("libx264", fps, options={"crf": "23", "preset": "veryfast"})
        except Exception:  # noqa: BLE001 - no libx264 in this FFmpeg build
            stream = out.add_stream("mpeg4", fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def contact_sheet(films: list[list[np.ndarray]], out: str | os.PathLike, columns: int = 6, width: int = 160) -> Path:
    """A png with one row per filmed episode: `columns` frames evenly spaced over the episode."""
    from PIL import Image

    rows = []
    for frames in films:
        last = len(frames) - FPS // 2  # the held frames that end each film
        pick = np.linspace(0, max(0, last), columns).round().astype(int)
        rows.append(np.concatenate([frames[i] for i in pick], axis=1))
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = sheet.resize((width * columns, round(sheet.height * width * columns / sheet.width)))
    sheet.save(out)
    return Path(out)


def expert_success(tasks: list[str], episodes: int, *, seed: int = EVAL_SEED, max_steps: int = 300) -> dict[str, Any]:
    """The scripted expert's closed-loop success on the evaluation seeds (no rendering needed)."""
    results = []
    for task in check_tasks(tasks):
        env = MetaWorldEnv(task)
        for k in range(episodes):
            env.reset(seed + k)
            steps, success = 0, False
            while steps < max_steps and not success:
                success = env.step(env.expert_action())
                steps += 1
            results.append(EpisodeResult(task, seed + k, success, steps))
        env.close()
    return summarize(results)
