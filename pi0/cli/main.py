"""The command line: `pi0 inspect | demo | bench | serve | convert | sim | eval | train | infer`, each command from
its module."""

from __future__ import annotations

import argparse
import sys

from pi0.checkpoint.layouts import LAYOUTS
from pi0.cli import sim
from pi0.cli.checkpoints import cmd_convert, cmd_inspect
from pi0.cli.demo import cmd_demo
from pi0.cli.options import (
    CHECKPOINT_HELP,
    DOWNLOAD_HELP,
    HORIZON_HELP,
    add_device_args,
)
from pi0.cli.serve import add_policy_args, cmd_infer, cmd_serve
from pi0.errors import CheckpointError
from pi0.model.config import SIZES
from pi0.model.rtc import EXECUTION_HORIZON, MAX_GUIDANCE_WEIGHT, SCHEDULE, SCHEDULES
from pi0.sim import SimError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pi0", description="pi0 and pi0.5 robot policies: run, serve, fine-tune, "
                                 "evaluate in simulation, convert and inspect checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("inspect", help="report a checkpoint's layout, model kind, sizes and tensors")
    p.add_argument("path", help=CHECKPOINT_HELP)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--action-horizon", type=int, default=None, help=HORIZON_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="the shipped small pi0 solving Meta-World tasks in closed loop; with --size or "
                       "--checkpoint, the whole model's timing on a sample observation")
    p.add_argument("--size", default=None, choices=SIZES,
                   help="the timing demo: this architecture with seeded random weights")
    p.add_argument("--episodes", type=int, default=3, help="closed-loop demo: episodes per task")
    p.add_argument("--out-dir", default="pi0_demo", help="closed-loop demo: where the video, plot and report go")
    p.add_argument("--tasks", default=None, help="closed-loop demo: comma-separated Meta-World tasks (default: the "
                   "five the shipped model was trained on)")
    p.add_argument("--checkpoint", help="real weights instead of random ones: " + CHECKPOINT_HELP)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--action-horizon", type=int, default=None, help=HORIZON_HELP)
    add_device_args(p)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's, 10)")
    p.add_argument("--tokens", type=int, default=12, help="valid prompt tokens in the sample observation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pi0_demo_actions.png", help="where to save the plot")
    p.add_argument("--rtc", action="store_true", help="simulate a robot loop fed by the (slow) policy and plot "
                   "consecutive chunks stitched with and without real-time chunking")
    p.set_defaults(func=cmd_demo)

    from pi0.cli import bench

    p = sub.add_parser("bench", help="latency, stage times, FLOP efficiency and peak memory of one configuration")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)

    p = sub.add_parser("serve", help="serve a policy over openpi's websocket protocol")
    add_policy_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="refuse clients without 'Authorization: Api-Key <key>' "
                   "(visible in `ps`: prefer --api-key-file or the PI0_API_KEY environment variable)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest request frame accepted (a larger one "
                   "closes its connection, code 1009, before it is buffered)")
    p.add_argument("--max-inflight-mb", type=float, default=None, help="memory the server may hold for its clients "
                   "in all: every connection reserves 3 x max-message-mb when it opens (a frame queued, one in flight "
                   "raw and decoded), and one that does not fit is refused (default: 3 x max-message-mb x "
                   "max-connections)")
    p.add_argument("--max-errors", type=int, default=20, help="bad requests in a row before a connection is closed "
                   "(code 1008); after the first 2 its next message is read only after a back-off from 50 ms to 2 s")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one JSON object per log line, "
                   "for log shippers")
    p.add_argument("--max-batch", type=int, default=8, help="requests answered by one forward at most (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to share "
                   "its forward")
    p.add_argument("--max-connections", type=int, default=256, help="connections beyond this are refused (HTTP 503)")
    p.add_argument("--replicas", type=int, default=None, help="serve from N Ray Serve replicas (pip install "
                   "'pi0[ray]'), each loading the model once")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start Ray locally)")
    p.add_argument("--rtc-horizon", type=int, default=EXECUTION_HORIZON, help="real-time chunking: execution horizon "
                   "for requests whose 'rtc' leaves it out")
    p.add_argument("--rtc-schedule", default=SCHEDULE, choices=SCHEDULES,
                   help="real-time chunking: prefix weight schedule for requests that leave it out")
    p.add_argument("--rtc-max-guidance", type=float, default=MAX_GUIDANCE_WEIGHT, help="real-time chunking: guidance "
                   "cap for requests that leave it out")
    p.add_argument("--record", default=None, metavar="DIR", help="record every answered request (its observation and "
                   "the chunk returned) into a LeRobot v3 dataset, an episode per connection or up to a request whose "
                   "observation has episode_done: true (and episode_success); docs/recording.md")
    p.add_argument("--record-fps", type=int, default=10, help="the recorded dataset's frame rate (the server "
                   "sees requests, not control ticks)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="write a checkpoint in another layout (e.g. openpi Orbax -> safetensors)")
    p.add_argument("src", help=CHECKPOINT_HELP)
    p.add_argument("dst", help="a new (or empty) directory")
    p.add_argument("--layout", default="openpi", choices=list(LAYOUTS),
                   help="openpi: what openpi's convert_jax_model_to_pytorch.py writes (default)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the source's)")
    p.add_argument("--action-horizon", type=int, default=None, help=HORIZON_HELP)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sim", help="simulated robots: scripted-expert demonstrations as a LeRobot dataset")
    simsub = p.add_subparsers(dest="sim_cmd", required=True)
    c = simsub.add_parser("collect", help="scripted-expert demonstrations (pip install 'pi0[sim]')")
    sim.add_collect_arguments(c)
    c.set_defaults(func=sim.cmd_collect)

    p = sub.add_parser("eval", help="closed-loop success of a policy in simulation (pip install 'pi0[sim]')")
    sim.add_eval_arguments(p)
    p.set_defaults(func=sim.cmd_eval)

    p = sub.add_parser("train", help="fine-tune (full or LoRA) or train from scratch on a LeRobot v3 dataset "
                       "(pip install 'pi0[train]')")
    from pi0.train import command as train

    train.add_arguments(p)
    p.set_defaults(func=train.main)

    p = sub.add_parser("fast-tokenizer", help="fit pi0-FAST's action tokenizer on a LeRobot dataset's action chunks "
                       "(pip install 'pi0[fast,train]')")
    from pi0.cli import fast

    fast.add_arguments(p)
    p.set_defaults(func=fast.cmd_fast_tokenizer)

    p = sub.add_parser("infer", help="one action chunk from a saved observation (.npz or .json)")
    add_policy_args(p)
    p.add_argument("--obs", required=True)
    p.add_argument("--out", default=None, help="save the actions (.npy or .json)")
    p.set_defaults(func=cmd_infer)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError, SimError) as e:
        print(f"pi0 {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"pi0 {args.cmd}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
