"""Demonstrations: a simulator's scripted expert, with noise on what it executes, recorded as a LeRobot v3
dataset by worker processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import numpy as np

from pi0.sim import SimError
from pi0.sim.env import Env, simulator


def _expert_episode(env: str, task: str, seed: int, size: int, camera: str | None, wrist: bool, noise: float,
                    max_steps: int) -> dict[str, Any] | None:
    """One scripted-expert episode: the expert's own action is recorded at every state, a noisy version of it
    (Gaussian, sigma `noise`) is executed, so the demonstrations visit states off the expert's path and show
    how to recover. None if it does not succeed within max_steps."""
    sim = simulator(env)
    scene = _worker_env(env, task, size, camera, wrist)
    scene.reset(seed)
    rng = np.random.default_rng([seed, 7])
    frames: list[dict[str, Any]] = []
    for _ in range(max_steps):
        frame = sim.record_frame(scene.observation(), wrist)
        a = scene.expert_action()
        frame["action"] = a
        frames.append(frame)
        if scene.step(np.clip(a + noise * rng.standard_normal(a.shape), -1, 1)):
            return {k: np.stack([f[k] for f in frames]) for k in frames[0]}
    return None


_ENVS: dict[tuple, Env] = {}
def _worker_env(env: str, task: str, size: int, camera: str | None, wrist: bool) -> Env:
    """One environment per task and settings per process, reused across episodes."""
    key = (env, task, size, camera, wrist)
    if key not in _ENVS:
        _ENVS[key] = simulator(env).make(task, size, wrist, camera)
    return _ENVS[key]


def collect(tasks: list[str], episodes: int, out: str | os.PathLike, *, env: str = "metaworld", size: int = 64,
            camera: str | None = None, wrist: bool = False, noise: float = 0.3, max_steps: int = 300, seed: int = 0, workers: int | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """`episodes` successful expert demonstrations per task into a LeRobot v3 dataset at `out`, collected by
    `workers` processes (default: one per core; rendering is single-threaded). Failed episodes are dropped and
    counted. Returns a report."""
    from pi0.data.writer import LeRobotDatasetWriter

    sim = simulator(env)
    sim.check_tasks(tasks)
    writer = LeRobotDatasetWriter(out, fps=sim.FPS, features=sim.features(size, wrist), robot_type=sim.ROBOT)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    report: dict[str, Any] = {"tasks": {}, "size": size, "camera": camera or sim.CAMERA, "wrist": wrist, "noise": noise}
    # fresh processes (spawn): a forked child inherits this process's GL state, which EGL does not survive; one
    # worker runs in this process
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    with pool or contextlib.nullcontext():
        for task in tasks:
            kept, tried, next_seed = 0, 0, seed
            while kept < episodes:
                want = episodes - kept
                batch = list(range(next_seed, next_seed + want + max(1, want // 5)))  # a few spare for failures
                next_seed = batch[-1] + 1
                for ep in (pool.map if pool else map)(_expert_episode, *zip(*[(env, task, s, size, camera, wrist, noise, max_steps)
                                                           for s in batch])):
                    if kept == episodes:
                        break  # spares not needed
                    tried += 1
                    if ep is not None:
                        writer.add_episode(ep, sim.instruction(task))
                        kept += 1
                if tried > 10 * episodes + 20:
                    raise SimError(f"{task}: only {kept} of {tried} expert episodes succeeded (noise {noise})")
            report["tasks"][task] = {"kept": kept, "tried": tried}
            log(f"pi0 sim collect: {task}: {kept} successful of {tried} expert episodes")
    writer.finalize()
    report.update(episodes=len(writer.episodes), frames=writer.total_frames, seconds=time.perf_counter() - t0,
                  out=str(out))
    return report
