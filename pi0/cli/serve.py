"""The policy commands: `pi0 serve` (openpi's websocket protocol, or Ray Serve replicas) and `pi0 infer` (one chunk
from a saved observation), with the options that make their `pi0.Policy`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from pi0.cli.options import (
    CHECKPOINT_HELP,
    DOWNLOAD_HELP,
    HORIZON_HELP,
    add_device_args,
    device_and_dtype,
)
from pi0.timing import Progress


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--action-horizon", type=int, default=None, help=HORIZON_HELP)
    from pi0.robot.presets import PRESETS

    p.add_argument("--preset", default=None, choices=[*PRESETS, "generic"], help="robot preset (default: the one the "
                   "checkpoint was trained with, else its own LeRobot processors, else generic from its features)")
    add_device_args(p)
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece model (default: the checkpoint "
                   "directory, then ~/.cache/openpi/big_vision/paligemma_tokenizer.model)")
    p.add_argument("--asset-id", default=None, help="which assets/<asset_id>/norm_stats.json to use")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="fixed noise seed (default: fresh noise per request)")
    p.add_argument("--default-prompt", default=None, help="prompt used when a request carries none")
    p.add_argument("--no-state-in-prompt", action="store_true", help="pi0.5: leave the state out of the prompt "
                   "(the pi05_libero choice)")
    p.add_argument("--fast-tokenizer", default=None, help="pi0_fast: the FAST tokenizer directory (default: the "
                   "checkpoint's fast_tokenizer/, then physical-intelligence/fast in the huggingface_hub cache)")
    p.add_argument("--norm", default=None, choices=["MEAN_STD", "QUANTILES"], help="pi0_fast: the normalisation the "
                   "checkpoint was trained with, where it records none (default QUANTILES; pi0_fast_libero: MEAN_STD)")
    p.add_argument("--decode-int8", action="store_true", help="pi0_fast on the engine: decoding steps with weight-only "
                   "int8 copies of the weights (half the bytes a token; the prefill keeps --dtype's)")


def rtc_defaults(args: argparse.Namespace):
    """`pi0 serve --rtc-*`, checked (RTCDefaults raises ValueError naming the option)."""
    from pi0.model.rtc import RTCDefaults

    d = RTCDefaults()
    return RTCDefaults(getattr(args, "rtc_horizon", d.execution_horizon), getattr(args, "rtc_schedule", d.schedule),
                       getattr(args, "rtc_max_guidance", d.max_guidance_weight))


def server_limits(args: argparse.Namespace):
    """`pi0 serve`'s limits, checked (Limits raises ValueError naming the option)."""
    from pi0.serving.limits import Limits

    mib = 1 << 20
    return Limits(max_message_bytes=int(args.max_message_mb * mib), max_batch=args.max_batch,
                  batch_wait_ms=args.batch_wait_ms, max_connections=args.max_connections,
                  max_inflight_bytes=None if args.max_inflight_mb is None else int(args.max_inflight_mb * mib),
                  max_errors=args.max_errors)


def policy_kwargs(args: argparse.Namespace) -> dict:
    """pi0.Policy's arguments from the command line (plain values: they also travel to Ray replicas)."""
    return dict(checkpoint=args.checkpoint, preset=args.preset, backend=args.backend, dtype=args.dtype,
                device=args.device, tokenizer=args.tokenizer, asset_id=args.asset_id, num_steps=args.steps,
                seed=args.seed, default_prompt=args.default_prompt, action_horizon=args.action_horizon,
                state_in_prompt=False if args.no_state_in_prompt else None, rtc_defaults=rtc_defaults(args),
                download=args.download, fast_tokenizer=args.fast_tokenizer, norm=args.norm,
                decode_int8=args.decode_int8)


def _policy(args: argparse.Namespace):
    from pi0.robot.policy import Policy

    device, dtype, _ = device_and_dtype(args)
    show = Progress()
    return Policy(**{**policy_kwargs(args), "dtype": dtype, "device": device},
                  progress=lambda f: show("  reading", f))


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file, else $PI0_API_KEY, else --api-key (which `ps` shows: a warning says so)."""
    import os

    if args.api_key_file:
        key = Path(args.api_key_file).expanduser().read_text().strip()
        if not key:
            raise ValueError(f"{args.api_key_file} is empty: put the API key in it")
        return key
    if os.environ.get("PI0_API_KEY"):
        return os.environ["PI0_API_KEY"]
    if args.api_key:
        print("pi0 serve: warning: --api-key is visible to every user in `ps`; prefer --api-key-file or PI0_API_KEY",
              file=sys.stderr)
    return args.api_key


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    from pi0.serving.logs import setup_logging
    from pi0.serving.server import PolicyServer

    setup_logging(args.log_format)
    key = api_key(args)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and key is None:
        print(f"pi0 serve: warning: listening on {args.host} without an API key: anyone who reaches this port "
              "can drive the policy (--api-key-file or PI0_API_KEY)", file=sys.stderr)
    limits = server_limits(args)  # checked before the model loads: limits that admit no robot are refused now
    rtc_defaults(args)
    record = getattr(args, "record", None)
    if args.replicas is not None:
        if record is not None:
            raise ValueError("--record writes one dataset from one process: serve without --replicas to record")
        from pi0.serving import ray_serve

        return ray_serve.run(args, key, policy_kwargs(args), limits)
    policy = _policy(args)
    print(f"policy: {policy.metadata}", file=sys.stderr, flush=True)
    recorder = None
    if record is not None:
        from pi0.data.recorder import ObservationRecorder

        recorder = ObservationRecorder(record, fps=args.record_fps, info={
            "side": "server", "frames": "one per answered request: its observation, the first action of the chunk "
            "returned (action) and the whole chunk (action.chunk); an episode per connection, or up to a request "
            "whose observation carries episode_done", "checkpoint": str(args.checkpoint)})
    server = PolicyServer(policy, args.host, args.port, api_key=key, recorder=recorder, **dataclasses.asdict(limits))
    try:
        server.run()
    except KeyboardInterrupt:
        print("pi0 serve: stopped", file=sys.stderr)
    return 0


def read_observation(path: str) -> dict:
    """An observation saved as .npz (keys as the robot sends them; 'a/b' may also be nested) or .json."""

    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            obs = {k: z[k] for k in z.files}
        for key in ("prompt", "task"):  # openpi's and LeRobot's name for the instruction
            if key in obs:
                obs[key] = str(obs[key])
        return obs
    if p.suffix == ".json":
        def arrays(x):
            if isinstance(x, dict):
                return {k: arrays(v) for k, v in x.items()}
            if isinstance(x, list):
                return np.asarray(x)
            return x

        return arrays(json.loads(p.read_text()))
    raise ValueError(f"{p}: an observation file must be .npz or .json")


def cmd_infer(args: argparse.Namespace) -> int:

    obs = read_observation(args.obs)
    policy = _policy(args)
    out = policy.infer(obs)
    a = out["actions"]
    print(f"actions [{a.shape[0]}, {a.shape[1]}] in {out['policy_timing']['infer_ms']:.0f} ms; first step: "
          + " ".join(f"{x:+.4f}" for x in a[0].tolist()))
    if args.out:
        if args.out.endswith(".json"):
            Path(args.out).write_text(json.dumps({"actions": a.tolist(), "policy_timing": out["policy_timing"]}))
        else:
            np.save(args.out, a)
        print(f"saved {args.out}")
    return 0
