"""The simulation commands: `pi0 sim collect`, `pi0 eval` and the closed-loop `pi0 demo` (any registered simulator)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pi0.cli.options import add_device_args
from pi0.sim.env import SIMULATORS, simulator

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "metaworld"  # the small pi0 trained on Meta-World
SHIPPED_NAME = str(SHIPPED.relative_to(SHIPPED.parents[2]))  # pi0/assets/metaworld, as reports and help name it


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _tasks(env: str, text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else list(simulator(env).DEFAULT_TASKS)


# ---------------------------------------------------------------------------------------------
# pi0 sim collect


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="metaworld", choices=list(SIMULATORS), help="the simulator")
    p.add_argument("--tasks", default=None, help="comma-separated Meta-World tasks (default: drawer-open-v3, "
                   "drawer-close-v3, button-press-topdown-v3, window-open-v3, window-close-v3)")
    p.add_argument("--episodes", type=int, default=50, help="successful demonstrations per task")
    p.add_argument("--out", required=True, help="a new directory for the LeRobot v3 dataset")
    p.add_argument("--image-size", type=int, default=64, help="camera frames, px (square)")
    p.add_argument("--camera", default=None, help="the fixed camera (metaworld: corner, the default, corner2, corner3, "
                   "corner4, topview)")
    p.add_argument("--wrist", action="store_true", help="also record the gripper camera")
    p.add_argument("--noise", type=float, default=0.3, help="std of the Gaussian noise added to the executed expert "
                   "actions (the clean ones are recorded): recovery states in the data")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="first episode seed")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")


def cmd_collect(args: argparse.Namespace) -> int:
    from pi0.hardware import provenance
    from pi0.sim.collect import collect

    r = collect(_tasks(args.env, args.tasks), args.episodes, args.out, env=args.env, size=args.image_size,
                camera=args.camera, wrist=args.wrist, noise=args.noise, max_steps=args.max_steps, seed=args.seed,
                workers=args.workers, log=_say)
    r["provenance"] = provenance()
    print(json.dumps(r, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# pi0 eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="metaworld", choices=list(SIMULATORS), help="the simulator")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="run this policy in this process (default: the small pi0 "
                     f"shipped in {SHIPPED_NAME})")
    src.add_argument("--server", default=None, help="HOST:PORT of `pi0 serve`: run as a robot would, through openpi's "
                     "websocket client and pi0.serving.stream.ActionStream (keys and image size from the server's metadata)")
    p.add_argument("--tasks", default=None, help="comma-separated Meta-World tasks (default: the five of the demo)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task")
    add_device_args(p)
    p.add_argument("--rtc", action="store_true", help="stream actions with real-time chunking on a simulated clock "
                   "(the clock advances by the measured inference latency while a chunk is computed)")
    p.add_argument("--stream", action="store_true", help="stream actions through ActionStream without RTC "
                   "(the default with --server)")
    p.add_argument("--control-hz", type=float, default=10.0, help="simulated control rate when streaming")
    p.add_argument("--replan", type=int, default=None, help="without streaming: actions executed per chunk "
                   "(default half a chunk)")
    p.add_argument("--max-steps", type=int, default=200, help="an episode fails if unsolved after this many steps")
    p.add_argument("--seed", type=int, default=None, help="first episode seed (default 10000: none seen in training)")
    p.add_argument("--wrist", action="store_true", default=None, help="send the gripper camera (default: what the "
                   "checkpoint was trained with)")
    p.add_argument("--video", default=None, help="write one episode per task to this mp4")
    p.add_argument("--plot", default=None, help="write the success table as a bar chart (png)")
    p.add_argument("--no-expert", dest="expert", action="store_false", help="skip the scripted expert's table")
    p.add_argument("--workers", type=int, default=1, help="processes running episodes side by side (rendering is "
                   "single-threaded: up to one per core), each with its own policy or client; never more than episodes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="write the report as JSON to this file, with how it was made (command, "
                   "seeds, versions, machine)")
    p.add_argument("--record", default=None, metavar="DIR", help="record every episode into a LeRobot v3 dataset "
                   "(appended where DIR holds one of the same features): the frames, the action executed, success")
    p.add_argument("--dagger", action="store_true", help="with --record: label every visited state with the "
                   "scripted expert's action (the dataset's `action`; the policy's is `action.policy`)")
    p.add_argument("--takeover", type=int, default=0, metavar="N", help="with --dagger: where the robot has not moved "
                   "for N steps the expert acts for N steps (recorded as `intervention`), then the policy again; with "
                   "--recover: the expert takes over for good where the robot has not moved for N steps")
    p.add_argument("--recover", action="store_true", help="with --record (HG-DAgger): the policy acts until a step "
                   "drawn from the episode's seed in [0, max-steps / 2), then the scripted expert to the end; only the "
                   "expert's frames are recorded: its own trajectories from the states the policy led to")


def _checkpoint_cameras(path: str) -> tuple[int, bool]:
    """(image size, whether it was trained with the gripper camera) from a checkpoint's config.json."""
    from pi0.checkpoint.load import inspect_checkpoint
    from pi0.model.features import features

    info = inspect_checkpoint(path)
    feats = features(info.meta)
    size = feats.camera_shapes[feats.cameras[0]][-1] if feats.camera_shapes else info.config.vision.image_size
    return int(size), any("wrist" in k for k in feats.cameras)


class KeyedClient:
    """openpi's client to a server whose policy names its inputs otherwise (the `generic` preset of a `pi0 train`
    checkpoint, a LeRobot checkpoint): the environment's keys (its simulator's preset's) renamed to the server's
    cameras and state key, as its metadata lists them."""

    def __init__(self, client: Any, rename: dict[str, str]):
        self.client, self.rename = client, rename

    def get_server_metadata(self) -> dict[str, Any]:
        return self.client.get_server_metadata()

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return self.client.infer({self.rename.get(k, k): v for k, v in obs.items()})


def server_keys(meta: dict[str, Any], env: str = "metaworld") -> tuple[dict[str, str], int, bool]:
    """(how the environment's keys are renamed for the server, the image size it expects, whether it takes the
    wrist camera) from a server's metadata. Raises ValueError where its robot is not the simulator's."""
    from pi0.robot.presets import PRESETS

    sim = simulator(env)
    robot = PRESETS[sim.PRESET]
    main, wrist_key = robot.cameras[0][0], next((k for k, _ in robot.cameras[1:] if k and "wrist" in k), None)
    size = int(meta.get("image_hw", [64])[-1])
    cameras, state_keys = list(meta.get("cameras") or []), list(meta.get("state_keys") or [])
    for what, n, ours in (("state", meta.get("state_len"), robot.state_len), ("action", meta.get("action_dim"),
                                                                               robot.action_dim)):
        if n is not None and n != ours:
            raise ValueError(f"the server's policy (preset {meta.get('preset')}) takes {n} {what} values; {sim.TITLE}'s "
                             f"robot has {ours}: serve a checkpoint trained on {sim.TITLE}")
    if meta.get("preset") == sim.PRESET:
        return {}, size, wrist_key in cameras
    if len(state_keys) != 1 or not cameras:
        raise ValueError(f"the server's policy (preset {meta.get('preset')}) lists cameras {cameras} and state keys "
                         f"{state_keys}: cannot tell where {sim.TITLE}'s camera and state go (serve it with --preset "
                         f"{sim.PRESET})")
    wrist = next((c for c in cameras if "wrist" in c), None)
    first = next((c for c in cameras if c != wrist), cameras[0])
    rename = {main: first, robot.state_keys[0]: state_keys[0]}
    if wrist is not None and wrist_key is not None:
        rename[wrist_key] = wrist
    return rename, size, wrist is not None


class RunnerSpec:
    """How to build the policy's runner, picklable so that evaluation worker processes build their own: in
    process (pi0.Policy with the `metaworld` preset) or a client of `pi0 serve` (its keys renamed as the server's
    metadata says); synchronous chunking, or streamed through ActionStream (RTC on or off) on a simulated clock
    charged `latency_s` per chunk."""

    def __init__(self, args: argparse.Namespace, wrist: bool, latency_s: float | None = None,
                 rename: dict[str, str] | None = None):
        self.env, self.checkpoint, self.server = args.env, args.checkpoint, args.server
        self.backend, self.dtype, self.device = args.backend, args.dtype, args.device
        self.stream = bool(args.rtc or args.stream or args.server)
        self.rtc, self.control_hz, self.replan = bool(args.rtc), args.control_hz, args.replan
        self.wrist, self.latency_s, self.rename = wrist, latency_s, rename or {}
        self.built = None  # the policy already made in this process (never pickled: each worker makes its own)

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "built": None}

    def policy(self):
        if self.built is not None:
            return self.built
        if self.server:
            from openpi_client import websocket_client_policy

            host, _, port = self.server.rpartition(":")
            client = websocket_client_policy.WebsocketClientPolicy(host or "127.0.0.1", int(port))
            return KeyedClient(client, self.rename) if self.rename else client
        from pi0.robot.policy import Policy

        return Policy(self.checkpoint, preset=simulator(self.env).PRESET, backend=self.backend, dtype=self.dtype,
                      device=self.device)

    def __call__(self):
        from pi0.sim.runners import ChunkRunner, StreamRunner

        policy = self.policy()
        if not self.stream:
            return ChunkRunner(policy.infer, self.replan)
        return StreamRunner(policy, self.control_hz, self.rtc, self.latency_s)


def measure_latency(policy, env: str, task: str, size: int, wrist: bool, repeats: int = 4) -> float:
    """The median seconds of a few real requests (after one warm-up): what a streamed run charges its clock."""
    scene = simulator(env).make(task, size, wrist)
    scene.reset(0)
    obs = scene.observation()
    scene.close()
    policy.infer(obs)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        policy.infer(obs)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from pi0.hardware import provenance
    from pi0.sim import evaluate as ev

    sim = simulator(args.env)
    record, dagger, takeover = getattr(args, "record", None), getattr(args, "dagger", False), getattr(args, "takeover", 0)
    recover = getattr(args, "recover", False)
    if (dagger or takeover or recover) and record is None:
        raise ValueError("--dagger, --recover and --takeover label what is recorded: give --record DIR")
    if takeover and not (dagger or recover):
        raise ValueError("--takeover lets the expert act: it needs --dagger or --recover")
    if dagger and recover:
        raise ValueError("--recover records the expert's own trajectories, --dagger labels the policy's: choose one")
    tasks = _tasks(args.env, args.tasks)
    seed = sim.EVAL_SEED if args.seed is None else args.seed
    if not args.server and not args.checkpoint:
        args.checkpoint = str(SHIPPED)
        _say(f"pi0 eval: the small pi0 shipped in {SHIPPED} (--checkpoint or --server for another policy)")
    meta: dict[str, Any] = {}
    rename: dict[str, str] = {}
    if args.server:
        from openpi_client import websocket_client_policy

        host, _, port = args.server.rpartition(":")
        probe = websocket_client_policy.WebsocketClientPolicy(host or "127.0.0.1", int(port))
        meta["server"] = probe.get_server_metadata()
        rename, size, wrist = server_keys(meta["server"], args.env)
        wrist = wrist if args.wrist is None else args.wrist
    else:
        size, wrist = _checkpoint_cameras(args.checkpoint)
        wrist = wrist if args.wrist is None else args.wrist
    spec = RunnerSpec(args, wrist, rename=rename)
    workers = max(1, min(args.workers, args.episodes * len(tasks)))
    if spec.stream or not args.server:
        policy = spec.policy()
        if not args.server:
            meta.update(backend=policy.backend, dtype=policy.dtype, device=str(policy.device), reason=policy.dtype_reason)
        if spec.stream:
            spec.latency_s = measure_latency(policy, args.env, tasks[0], size, wrist)
            meta.update(latency_ms=spec.latency_s * 1000, control_hz=args.control_hz, rtc=spec.rtc,
                        inference_delay_ticks=int(np.ceil(spec.latency_s * args.control_hz)))
        if workers <= 1:
            spec.built = policy  # the episodes run in this process: no second load
        del policy
    meta.update(image_size=size, wrist=wrist, workers=workers)
    t0 = time.perf_counter()
    report = ev.evaluate(spec, tasks, args.episodes, env=args.env, size=size, wrist=wrist, max_steps=args.max_steps,
                         seed=seed, video=args.video, workers=workers, record=record, dagger=dagger, takeover=takeover,
                         recover=recover)
    report.update(seconds=time.perf_counter() - t0, seed=seed, seeds=[seed, seed + args.episodes - 1],
                  max_steps=args.max_steps, source=args.server or _source(args.checkpoint), **meta)
    if args.expert:
        report["expert"] = ev.expert_success(tasks, args.episodes, env=args.env, seed=seed, max_steps=args.max_steps)
    report["provenance"] = provenance()
    if args.plot:
        plot_success(report, args.plot)
    if getattr(args, "out", None):
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict[str, Any]) -> None:
    expert = report.get("expert", {}).get("tasks", {})
    print(f"{'task':26s} {'success':>8s} {'95% interval':>14s} {'steps':>6s} {'expert':>7s}")
    for task, row in report["tasks"].items():
        lo, hi = row["ci95"]
        steps = f"{row['mean_steps_to_success']:.0f}" if row["mean_steps_to_success"] else "-"
        exp = f"{expert[task]['success'] * 100:.0f}%" if task in expert else "-"
        print(f"{task:26s} {row['success'] * 100:7.0f}% {lo * 100:6.0f}-{hi * 100:3.0f}% {steps:>6s} {exp:>7s}")
    lo, hi = report["ci95"]
    exp = f"{report['expert']['mean_success'] * 100:.0f}%" if "expert" in report else "-"
    print(f"{'mean':26s} {report['mean_success'] * 100:7.0f}% {lo * 100:6.0f}-{hi * 100:3.0f}% {'':>6s} {exp:>7s}")
    if "recorded" in report:
        r = report["recorded"]
        print(f"recorded  {r['episodes']} episodes into {r['root']} ({r['total_episodes']} there in all; "
              f"{r['expert_labels']} expert labels, {r['interventions']} steps taken over)")


def plot_success(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    x = np.arange(len(tasks))
    ours = [report["tasks"][t]["success"] * 100 for t in tasks]
    err = np.array([[o - report["tasks"][t]["ci95"][0] * 100, report["tasks"][t]["ci95"][1] * 100 - o]
                    for t, o in zip(tasks, ours)]).T
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(x - 0.2, ours, 0.4, yerr=err, capsize=3, label="pi0 (closed loop)")
    if "expert" in report:
        ax.bar(x + 0.2, [report["expert"]["tasks"][t]["success"] * 100 for t in tasks], 0.4, label="scripted expert")
    ax.set_xticks(x, [t.replace("-v3", "") for t in tasks], fontsize=8)
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Meta-World, {report['tasks'][tasks[0]]['episodes']} episodes per task", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _source(checkpoint: str) -> str:
    """The checkpoint as a report names it: the shipped model by its place in the package, not this install's path."""
    path = Path(checkpoint)
    if path.exists() and path.resolve() == SHIPPED:
        return SHIPPED_NAME
    return str(checkpoint)


def cmd_eval(args: argparse.Namespace) -> int:
    report = run_eval(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        _say(f"pi0 eval: {report['episodes']} episodes in {report['seconds']:.0f} s"
             + (f"; video {args.video}" if args.video else "") + (f"; plot {args.plot}" if args.plot else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# pi0 demo (closed loop)


def cmd_demo_closed_loop(args: argparse.Namespace) -> int | None:
    """The shipped small pi0 on the five Meta-World tasks, a few episodes each: the success table next to the
    scripted expert's, a video and a plot. Returns None when the simulator cannot run here (the reason
    printed), so that the caller can fall back to the timing demo."""
    from pi0.sim import SimError

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(
        env="metaworld", checkpoint=args.checkpoint or str(SHIPPED), server=None, tasks=args.tasks, episodes=args.episodes,
        backend=args.backend, device=args.device, dtype=args.dtype, rtc=False, stream=False, control_hz=10.0,
        replan=None, max_steps=200, seed=None, wrist=None, video=str(out / "metaworld.mp4"),
        plot=str(out / "metaworld_success.png"), expert=True, json=False, workers=os.cpu_count() or 1,
        out=str(out / "metaworld_report.json"))
    _say(f"pi0 demo: the small pi0 shipped in {ns.checkpoint} on Meta-World, {ns.episodes} episodes per task "
         "(pi0 demo --size pi0 for the full-size timing demo)")
    try:
        report = run_eval(ns)
    except SimError as e:
        _say(f"pi0 demo: the closed-loop demo cannot run here: {e}")
        return None
    print_table(report)
    print(f"video     {ns.video}\nframes    {Path(ns.video).with_suffix('.png')}\nplot      {ns.plot}\n"
          f"report    {ns.out}")
    return 0
