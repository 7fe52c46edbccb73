"""`pi0 inspect | demo | bench | serve | infer | convert` — the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import pi0
from pi0.checkpoint import CheckpointError, CheckpointInfo
from pi0.config import features
from pi0.hardware import resolve_dtype
from pi0.options import add_device_args, device_and_dtype
from pi0.sim import SimError
from pi0.timing import Progress


def _sizes(cfg: pi0.Pi0Config) -> str:
    v, l, e = cfg.vision, cfg.vlm, cfg.expert
    return "\n".join([
        f"  vision  SigLIP width {v.width}, depth {v.depth}, heads {v.num_heads} x {v.head_dim}, mlp {v.mlp_dim}, "
        f"patch {v.patch_size}, image {v.image_size} px ({v.num_patches} tokens)",
        f"  vlm     Gemma width {l.width}, depth {l.depth}, heads {l.num_heads}/{l.num_kv_heads} x {l.head_dim}, "
        f"mlp {l.mlp_dim}, vocab {l.vocab_size}",
        f"  expert  Gemma width {e.width}, depth {e.depth}, heads {e.num_heads}/{e.num_kv_heads} x {e.head_dim}, "
        f"mlp {e.mlp_dim}" + (", adaRMS" if cfg.pi05 else ""),
        f"  heads   action_dim {cfg.action_dim}, state_dim {cfg.state_dim}, horizon {cfg.action_horizon}, "
        f"tokens {cfg.max_token_len}, steps {cfg.num_steps}",
    ])


def _asset_widths(path) -> dict:
    """Each openpi asset id's norm stats: the width of its state and action vectors."""
    from pi0.processing import read_norm_stats

    return {k: st.width for k, st in read_norm_stats(path).items()}


def inspect_report(info: CheckpointInfo) -> dict:
    from pi0.checkpoint import find_asset_stats
    from pi0.lerobot_pipeline import describe as describe_pipeline

    used = sum(torch.Size(s).numel() for s in info.shapes.values())
    extra = {}
    if info.orbax is not None:
        leaves = info.orbax[0].leaves.values()
        extra["chunking"] = {"arrays": len(leaves), "several_chunks": sum(x.num_chunks > 1 for x in leaves),
                             "max_chunks": max(x.num_chunks for x in leaves),
                             "training_layout": info.orbax[0].training_layout}
    return {
        "path": str(info.files.root),
        "files": [str(p) for p in info.files.shards],
        "layout": info.layout,
        "model": info.config.kind,
        "num_tensors": info.num_file_tensors,
        "num_used_tensors": len(info.canonical),
        "num_params": info.num_file_params,
        "num_used_params": used,
        "dtypes": info.file_dtypes,
        "dropped": info.dropped,
        **extra,
        "assets": {k: _asset_widths(p) for k, p in find_asset_stats(info.files.root).items()},
        "pipeline": describe_pipeline(info.files.root),
        "assumed": info.assumed,
        "config": info.config.to_dict(),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = pi0.inspect_checkpoint(args.path, action_horizon=args.action_horizon, download=args.download)
    rep = inspect_report(info)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{rep['path']}: {rep['model']} checkpoint, {rep['layout']} layout, {len(rep['files'])} file(s)")
    print(f"  tensors {rep['num_tensors']} ({rep['num_used_tensors']} used), params {rep['num_params']:,} "
          f"({rep['num_used_params']:,} used), dtypes {rep['dtypes']}")
    if "chunking" in rep:
        c = rep["chunking"]
        print(f"  orbax   {c['arrays']} arrays, {c['several_chunks']} stored in several chunks (at most {c['max_chunks']})"
              + (", training layout (leaves end in 'value')" if c["training_layout"] else ""))
    print(_sizes(info.config))
    pipe = rep["pipeline"]
    if pipe["convention"] == "lerobot":
        print(f"  pipeline LeRobot's own: {' -> '.join(pipe['preprocessor'])} | model | {' -> '.join(pipe['postprocessor'])}")
        print(f"           normalisation {pipe['normalization']}")
    else:
        print(f"  pipeline {pipe['steps']}")
    for asset, widths in rep["assets"].items():
        print(f"  assets  {asset}: norm stats " + ", ".join(f"{k} {n}" for k, n in widths.items()))
    if rep["dropped"]:
        print(f"  dropped (never used by the policy): {', '.join(rep['dropped'])}")
    return 0


def save_action_plot(actions: torch.Tensor, path: Path, title: str) -> None:
    """The chunk as a heat map (step x action dimension) beside the first dimensions' curves: one figure of two
    axes (a panel per dimension took seconds to lay out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = actions.float().cpu().numpy()  # [H, D]
    h, d = a.shape
    fig, (heat, lines) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    im = heat.imshow(a.T, aspect="auto", cmap="coolwarm", interpolation="nearest")
    heat.set_xlabel("step in the action chunk", fontsize=8)
    heat.set_ylabel("action dimension", fontsize=8)
    fig.colorbar(im, ax=heat, fraction=0.04)
    for i in range(min(8, d)):
        lines.plot(range(h), a[:, i], lw=1.2, label=f"dim {i}")
    lines.set_xlabel("step in the action chunk", fontsize=8)
    lines.legend(fontsize=6, ncol=2)
    for ax in (heat, lines):
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.size is None and args.checkpoint is None and not args.rtc:
        from pi0.sim.commands import cmd_demo_closed_loop

        done = cmd_demo_closed_loop(args)
        if done is not None:
            return done
        # never a full-size model (13 GB in fp32) by surprise: the tiny one shows the whole path in seconds
        print("pi0 demo: running the timing demo at tiny size instead (pi0 demo --size pi0: the full-size model, "
              "random weights)", file=sys.stderr, flush=True)
        args.size = "tiny"
    args.size = args.size or "pi0"
    torch.manual_seed(args.seed)
    device, dtype, _ = device_and_dtype(args)
    dtype_name = str(dtype).replace("torch.", "")
    t0 = time.perf_counter()
    if args.checkpoint:
        print(f"loading {args.checkpoint} ...", file=sys.stderr, flush=True)
        show = Progress()
        model = pi0.load_model(args.checkpoint, backend=args.backend, dtype=dtype, device=device,
                               action_horizon=args.action_horizon, progress=lambda f: show("  reading", f),
                               download=args.download)
        source = str(args.checkpoint)
    else:
        cfg = pi0.preset(args.size)
        n = sum(v.numel() for v in _param_shapes(cfg))
        print(f"building {args.size} ({n / 1e6:,.1f} M params, seeded random weights, {dtype_name}) ...",
              file=sys.stderr, flush=True)
        show = Progress()
        model = pi0.build_model(cfg, backend=args.backend, seed=args.seed, dtype=dtype, device=device,
                                progress=lambda f: show("  weights", f))
        source = f"{args.size}, random weights (seed {args.seed})"
    load_s = time.perf_counter() - t0
    cfg = model.config
    obs = pi0.sample_observation(cfg, batch_size=1, num_valid_tokens=min(args.tokens, cfg.max_token_len), seed=args.seed)
    if args.rtc:
        return _demo_rtc(model, obs, args, source)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(args.seed))
    print(f"sampling {args.steps or cfg.num_steps} Euler steps on {len(obs.images)} cameras, "
          f"{int(obs.token_masks.sum())} prompt tokens ...", file=sys.stderr, flush=True)
    first = None
    if model.backend == "engine":  # the first call compiles the fused kernels once: time the second
        t1 = time.perf_counter()
        model.sample_actions(obs, noise=noise, num_steps=args.steps)
        first = time.perf_counter() - t1
    stages: dict[str, float] = {}
    t1 = time.perf_counter()
    actions = model.sample_actions(obs, noise=noise, num_steps=args.steps, stages=stages)[0]
    total = time.perf_counter() - t1
    print(f"model     {cfg.kind} ({source}), backend {model.backend}, {dtype_name} on {device}")
    print(f"load      {load_s:8.2f} s")
    if first is not None:
        print(f"1st call  {first:8.2f} s (one-time kernel compilation included)")
    for k in ("vision", "prefix", "denoise"):
        print(f"{k:9s} {stages.get(k, 0.0):8.2f} s")
    print(f"total     {total:8.2f} s per call")
    print(f"actions   [{actions.shape[0]}, {actions.shape[1]}]  min {actions.min():.3f}  max {actions.max():.3f}  "
          f"mean {actions.mean():.3f}  std {actions.std():.3f}")
    print("first step, dims 0-7: " + " ".join(f"{x:+.3f}" for x in actions[0, :8].tolist()))
    out = Path(args.out)
    save_action_plot(actions, out, f"{cfg.kind} action chunk ({source})")
    print(f"plot      {out}")
    return 0


def _demo_rtc(model, obs, args: argparse.Namespace, source: str) -> int:
    from pi0 import demo_rtc

    out = Path(args.out)
    model.sample_actions(obs)  # one-time kernel compilation stays out of the measured latency
    print("running a simulated robot loop with and without real-time chunking ...", file=sys.stderr, flush=True)
    r = demo_rtc.run(model, obs, out, seed=args.seed)
    print(f"model     {model.config.kind} ({source}), backend {model.backend}")
    print(f"policy    {r['latency_s'] * 1000:.0f} ms per chunk; simulated robot at {r['control_hz']:.1f} Hz "
          f"(8 ticks per inference), next chunk requested at {r['refill_at']} actions left")
    for key, name in (("plain", "without RTC"), ("rtc", "with RTC   ")):
        print(f"{name}  at chunk switches: gap to the old chunk's plan {r[key + '_gap_to_old_plan']:.3f}, "
              f"jump {r[key + '_boundary_jump']:.3f} (steps inside chunks {r[key + '_step_inside_chunks']:.3f}); "
              f"starved ticks {r[key + '_starved_ticks']}")
    print(f"plot      {out}")
    return 0


def _param_shapes(cfg: pi0.Pi0Config):
    from pi0.config import canonical_shapes

    return [torch.Size(s) for s in canonical_shapes(cfg).values()]


CHECKPOINT_HELP = ("checkpoint directory, .safetensors file, openpi Orbax checkpoint (directory, training step "
                   "or params/), gs://openpi-assets/... in openpi's download cache, or hub repo id in the "
                   "huggingface_hub cache (--download fetches it)")
HORIZON_HELP = "actions per chunk, overriding the checkpoint's config.json (openpi Orbax checkpoints record none: 50)"
DOWNLOAD_HELP = "fetch a hub repo id that is not in the huggingface_hub cache (pi0 downloads nothing otherwise)"


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--action-horizon", type=int, default=None, help=HORIZON_HELP)
    p.add_argument("--preset", default=None, help="robot preset: libero, aloha, droid or generic "
                   "(default: generic, from the checkpoint's LeRobot features)")
    add_device_args(p)
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece model (default: the checkpoint "
                   "directory, then ~/.cache/openpi/big_vision/paligemma_tokenizer.model)")
    p.add_argument("--asset-id", default=None, help="which assets/<asset_id>/norm_stats.json to use")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="fixed noise seed (default: fresh noise per request)")
    p.add_argument("--default-prompt", default=None, help="prompt used when a request carries none")
    p.add_argument("--no-state-in-prompt", action="store_true", help="pi0.5: leave the state out of the prompt "
                   "(the pi05_libero choice)")


def rtc_defaults(args: argparse.Namespace):
    """`pi0 serve --rtc-*`, checked (RTCDefaults raises ValueError naming the option)."""
    from pi0.policy import RTCDefaults

    d = RTCDefaults()
    return RTCDefaults(getattr(args, "rtc_horizon", d.execution_horizon), getattr(args, "rtc_schedule", d.schedule),
                       getattr(args, "rtc_max_guidance", d.max_guidance_weight))


def server_limits(args: argparse.Namespace):
    """`pi0 serve`'s limits, checked (Limits raises ValueError naming the option)."""
    from pi0.serving.service import Limits

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
                download=args.download)


def _policy(args: argparse.Namespace):
    from pi0.policy import Policy

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

    from pi0.serving.server import PolicyServer

    from pi0.serving.logs import setup_logging

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
    if args.replicas is not None:
        from pi0.serving import ray_serve

        return ray_serve.run(args, key, policy_kwargs(args), limits)
    policy = _policy(args)
    print(f"policy: {policy.metadata}", file=sys.stderr, flush=True)
    server = PolicyServer(policy, args.host, args.port, api_key=key, **dataclasses.asdict(limits))
    try:
        server.run()
    except KeyboardInterrupt:
        print("pi0 serve: stopped", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pi0.checkpoint import convert_checkpoint, inspect_checkpoint

    dtype = None if args.dtype is None else resolve_dtype(args.dtype, "cpu")[0]
    if dtype == torch.int8:
        raise ValueError("pi0 convert writes bfloat16 or float32: int8 weights are made when a model is loaded "
                         "with --dtype int8 (from any checkpoint), not stored")
    show = Progress()
    t0 = time.perf_counter()
    out = convert_checkpoint(args.src, args.dst, layout=args.layout, dtype=dtype, action_horizon=args.action_horizon,
                             progress=lambda f: show("  reading", f), download=args.download)
    info = inspect_checkpoint(out)
    print(f"{out}: {info.config.kind} checkpoint, {info.layout} layout, {info.num_file_tensors} tensors, "
          f"dtypes {info.file_dtypes}, in {time.perf_counter() - t0:.1f} s")
    if args.layout == "lerobot":
        from pi0.lerobot_export import write_pipelines
        from pi0.lerobot_pipeline import is_lerobot_pipeline

        source = inspect_checkpoint(args.src, action_horizon=args.action_horizon)
        if is_lerobot_pipeline(source.files.root):
            print("  LeRobot's processor pipeline: the source's own, copied")
        elif features(source.meta).cameras:
            print(f"  LeRobot's processor pipeline: {', '.join(write_pipelines(source, out))}")
        else:
            print("  no LeRobot processor pipeline: the source's config.json describes no cameras (input_features), "
                  "so LeRobot could load the weights but not run them on a robot's observations", file=sys.stderr)
    return 0


def read_observation(path: str) -> dict:
    """An observation saved as .npz (keys as the robot sends them; 'a/b' may also be nested) or .json."""
    import numpy as np

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
    import numpy as np

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
    p.add_argument("--size", default=None, choices=["pi0", "pi05", "tiny", "tiny-pi05"],
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

    from pi0 import bench

    p = sub.add_parser("bench", help="latency, stage times, FLOP efficiency and peak memory of one configuration")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)

    p = sub.add_parser("serve", help="serve a policy over openpi's websocket protocol")
    _add_policy_args(p)
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
    p.add_argument("--rtc-horizon", type=int, default=10, help="real-time chunking: execution horizon for requests "
                   "whose 'rtc' leaves it out")
    p.add_argument("--rtc-schedule", default="linear", choices=["linear", "exp", "ones", "zeros"],
                   help="real-time chunking: prefix weight schedule for requests that leave it out")
    p.add_argument("--rtc-max-guidance", type=float, default=10.0, help="real-time chunking: guidance cap for "
                   "requests that leave it out")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="write a checkpoint in another layout (e.g. openpi Orbax -> safetensors)")
    p.add_argument("src", help=CHECKPOINT_HELP)
    p.add_argument("dst", help="a new (or empty) directory")
    p.add_argument("--layout", default="openpi", choices=["openpi", "lerobot", "lerobot_legacy"],
                   help="openpi: what openpi's convert_jax_model_to_pytorch.py writes (default)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the source's)")
    p.add_argument("--action-horizon", type=int, default=None, help=HORIZON_HELP)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.set_defaults(func=cmd_convert)

    from pi0.sim import commands as sim

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
    from pi0 import train

    train.add_arguments(p)
    p.set_defaults(func=train.main)

    p = sub.add_parser("infer", help="one action chunk from a saved observation (.npz or .json)")
    _add_policy_args(p)
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
