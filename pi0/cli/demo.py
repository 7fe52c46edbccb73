"""`pi0 demo`: the shipped model in closed loop where a simulator runs, else a timed action chunk (with its plot) or
the real-time chunking demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import pi0
from pi0.cli.options import device_and_dtype
from pi0.timing import Progress


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
        from pi0.cli.sim import cmd_demo_closed_loop

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
        cfg = pi0.size_config(args.size)
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
    from pi0.cli import demo_rtc

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
    from pi0.model.config import canonical_shapes

    return [torch.Size(s) for s in canonical_shapes(cfg).values()]
