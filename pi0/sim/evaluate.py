"""Closed-loop evaluation on any registered simulator: episodes by (task, seed), success rates with Wilson
intervals, worker processes, films; and the scripted expert's own success for comparison."""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pi0.sim.env import Env, simulator
from pi0.sim.runners import ChunkRunner, StreamRunner
from pi0.sim.video import caption, contact_sheet, write_video


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    inference_s: list[float] = field(default_factory=list)
    frames: list[dict[str, Any]] | None = None  # what was recorded (`record`): dataset features per step
    interventions: int = 0  # steps the expert took over


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


def run_episodes(runner: ChunkRunner | StreamRunner, episodes: list[tuple[str, int]], *, env: str = "metaworld",
                 size: int = 64, wrist: bool = False, max_steps: int = 300, film: set[tuple[str, int]] = frozenset(),
                 video_size: int = 256, record: bool = False, dagger: bool = False, takeover: int = 0,
                 recover: bool = False, log: Callable[[str], None] | None = None
                 ) -> tuple[list[EpisodeResult], dict[tuple[str, int], list[np.ndarray]]]:
    """Closed-loop episodes (task, seed), each until success or max_steps; the ones in `film` are filmed at
    video_size px from the policy's camera. record: keep every step as a dataset frame (the simulator's features,
    `action` the action executed). dagger: label every visited state with the scripted expert's action (`action`;
    the policy's own is `action.policy`); takeover > 0: where the robot has not moved for `takeover` steps, the expert
    acts for as many (marked `intervention`), then the policy again. recover (HG-DAgger): the policy acts until a step
    drawn from the episode's seed in [0, max_steps / 2) (or, with takeover, until it stalls), then the expert to the
    end; only the expert's frames are recorded (`intervention`, `action` the expert's executed action), so that every
    action chunk a frame trains on is one the expert carried out from a state the policy led to. Per-state labels
    (`dagger`) are the expert's answer at each of the policy's states, which the policy never followed: a chunk of
    them is no trajectory (docs/recording.md measures what that does). Returns the results and the films."""
    if recover and dagger:
        raise ValueError("recover records the expert's own trajectories; dagger labels the policy's: choose one")
    results: list[EpisodeResult] = []
    films: dict[tuple[str, int], list[np.ndarray]] = {}
    sim = simulator(env)
    envs: dict[str, Env] = {}
    import torch

    for task, seed in episodes:
        scene = envs.get(task) or envs.setdefault(task, sim.make(task, size, wrist))
        scene.reset(seed)
        torch.manual_seed(seed)  # the policy's noise (drawn in process) depends on the episode alone
        runner.reset()
        before = len(runner.inference_s)
        success, steps, expert_steps, interventions, handed = False, 0, 0, 0, False
        switch = int(np.random.default_rng([seed, 17]).integers(0, max(1, max_steps // 2))) if recover else None
        frames = films.setdefault((task, seed), []) if (task, seed) in film else None
        recorded: list[dict[str, Any]] | None = [] if record or dagger or recover else None
        states: list[np.ndarray] = []
        while steps < max_steps and not success:
            obs = scene.observation()
            if frames is not None:
                frames.append(caption(scene.render(size=video_size), scene.prompt, steps, False))
            label = scene.expert_action() if dagger else None
            if takeover:
                states.append(scene.state())
            stalled = bool(takeover) and len(states) > takeover and \
                np.abs(states[-1] - states[-1 - takeover]).max() < STALLED
            if recover:
                handed = handed or steps >= switch or stalled  # the expert has the robot to the end
            elif stalled and not expert_steps:
                expert_steps = takeover  # the policy stalls: the expert takes over for a while
            if handed or expert_steps:
                action, chosen = label if label is not None else scene.expert_action(), None
                interventions += 1
                if expert_steps:
                    expert_steps -= 1
                    if not expert_steps:
                        runner.reset()  # the policy resumes from where the expert left the robot
            else:
                chosen = action = runner.next_action(obs)
            if recorded is not None and (handed or not recover):
                step = {**sim.record_frame(obs, wrist), "action": label if dagger else action,
                        "intervention": chosen is None, "chunk_index": max(0, len(runner.inference_s) - before - 1),
                        "latency_s": runner.inference_s[-1] if len(runner.inference_s) > before else 0.0}
                if dagger:
                    step["action.policy"] = action  # what was executed: the expert's where it acted
                recorded.append(step)
            success = scene.step(action)
            steps += 1
        if frames is not None:
            frames += [caption(scene.render(size=video_size), scene.prompt, steps, success)] * (sim.FPS // 2)
        results.append(EpisodeResult(task, seed, success, steps, runner.inference_s[before:], recorded, interventions))
        if log:
            log(f"{task} seed {seed}: {'success' if success else 'failure'} after {steps} steps")
    for scene in envs.values():
        scene.close()
    return results, films


STALLED = 1e-3  # the largest state change over `takeover` steps that counts as not moving


def record_episodes(results: list[EpisodeResult], root: str | os.PathLike, *, env: str, size: int, wrist: bool,
                    dagger: bool, info: dict[str, Any], recover: bool = False) -> dict[str, Any]:
    """The recorded episodes into a LeRobot v3 dataset at `root` (appended where one of the same features is)."""
    from pi0.data.recorder import Recorder

    sim = simulator(env)
    features = sim.features(size, wrist)
    if dagger:
        features["action.policy"] = dict(features["action"])
    rec = Recorder(root, fps=sim.FPS, features=features, robot_type=sim.ROBOT, max_queue=len(results) + 1,
                   info={"env": env, "mode": "dagger" if dagger else "recover" if recover else "policy", **info})
    for r in results:
        if not r.frames:  # recover: the policy succeeded before the expert took over
            continue
        for f in r.frames:
            rec.add({k: v for k, v in f.items() if k not in ("intervention", "chunk_index", "latency_s")},
                    sim.instruction(r.task), intervention=f["intervention"], chunk_index=f["chunk_index"],
                    latency_s=f["latency_s"])
        rec.end_episode(r.success)
    out = rec.close()
    out["expert_labels"] = sum(len(r.frames or []) for r in results) if dagger or recover else 0
    out["interventions"] = sum(r.interventions for r in results)
    return out


def evaluate(make_runner: Callable[[], ChunkRunner | StreamRunner], tasks: list[str], episodes: int, *,
             env: str = "metaworld", size: int = 64, wrist: bool = False, max_steps: int = 300, seed: int | None = None,
             video: str | os.PathLike | None = None, workers: int = 1, record: str | os.PathLike | None = None,
             dagger: bool = False, takeover: int = 0, recover: bool = False,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Closed-loop success of a policy: `episodes` episodes per task (seeds seed, seed + 1, ...). make_runner:
    a picklable function that builds the policy's runner; with workers > 1 each of that many processes builds
    its own and takes every workers-th episode (rendering is single-threaded: one process per core). The
    answers do not depend on `workers`. seed: default the simulator's EVAL_SEED. video: the first episode of every
    task, to this mp4, and frames of each to a png beside it. record: every episode into a LeRobot v3 dataset there
    (`dagger`, `takeover`, `recover`: see `run_episodes`), in episode order whatever `workers`."""
    sim = simulator(env)
    sim.check_tasks(tasks)
    seed = sim.EVAL_SEED if seed is None else seed
    jobs = [(task, seed + k) for task in tasks for k in range(episodes)]
    film = {(task, seed) for task in tasks} if video is not None else set()
    kw = dict(env=env, size=size, wrist=wrist, max_steps=max_steps, film=film, record=record is not None,
              dagger=dagger, takeover=takeover, recover=recover)
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
        write_video([frame for film in ordered for frame in film], video, sim.FPS)
        contact_sheet(ordered, Path(video).with_suffix(".png"), held=sim.FPS // 2)
    report = summarize(results)
    if record is not None:
        report["recorded"] = record_episodes(results, record, env=env, size=size, wrist=wrist, dagger=dagger,
                                             info={"seeds": [seed, seed + episodes - 1], "tasks": tasks},
                                             recover=recover)
    return report


def _episodes_worker(make_runner: Callable[[], Any], jobs: list[tuple[str, int]], kw: dict[str, Any], workers: int):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return run_episodes(make_runner(), jobs, **kw)


def expert_success(tasks: list[str], episodes: int, *, env: str = "metaworld", seed: int | None = None,
                   max_steps: int = 300) -> dict[str, Any]:
    """The scripted expert's closed-loop success on the evaluation seeds (no rendering needed)."""
    sim = simulator(env)
    seed = sim.EVAL_SEED if seed is None else seed
    results = []
    for task in sim.check_tasks(tasks):
        scene = sim.make(task, 64, False)
        for k in range(episodes):
            scene.reset(seed + k)
            steps, success = 0, False
            while steps < max_steps and not success:
                success = scene.step(scene.expert_action())
                steps += 1
            results.append(EpisodeResult(task, seed + k, success, steps))
        scene.close()
    return summarize(results)
