"""`pi0 fast-tokenizer`: fit π0-FAST's action tokenizer on a LeRobot dataset's normalised action chunks (what
LeRobot's lerobot-train-tokenizer does), and say how well it compresses and reconstructs them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pi0.data.dataset import LeRobotDataset
from pi0.robot.fast import FastTokenizer
from pi0.robot.normalize import Normalizer
from pi0.train.data import dataset_stats
from pi0.train.fast import episode_chunks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="a LeRobot v3 dataset (directory or hub id in the cache)")
    p.add_argument("--horizon", type=int, required=True, help="actions per chunk (the policy's action horizon)")
    p.add_argument("--out", required=True, help="where to write tokenizer.json and processor_config.json")
    p.add_argument("--norm", default="QUANTILES", choices=["QUANTILES", "MEAN_STD"],
                   help="how actions are normalised before the DCT, from the dataset's stats (LeRobot's default: "
                   "QUANTILES); the policy must normalise the same way")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (LeRobot's default 1024)")
    p.add_argument("--scale", type=float, default=10.0, help="DCT coefficients x scale are rounded to integers")
    p.add_argument("--stride", type=int, default=1, help="a chunk starts every STRIDE frames of each episode")


def cmd_fast_tokenizer(args: argparse.Namespace) -> int:
    if args.horizon < 1 or args.stride < 1:
        raise ValueError("--horizon and --stride must be >= 1")
    ds = LeRobotDataset(args.dataset)
    actions = ds.column("action").astype(np.float64).reshape(len(ds), -1)
    normalizer = Normalizer(None, dataset_stats(ds, "action"), action_mode=args.norm)
    chunks = episode_chunks(normalizer.actions_in(actions).astype(np.float64),
                            ds.column("episode_index").reshape(-1), args.horizon, args.stride)
    fast = FastTokenizer.fit(chunks, scale=args.scale, vocab_size=args.vocab_size)
    fast.save(args.out)
    tokens = fast.encode(chunks)
    decoded = np.stack([fast.decode(t) for t in tokens])
    report = {"chunks": len(chunks), "horizon": args.horizon, "action_dim": chunks.shape[2], "norm": args.norm,
              "vocab_size": args.vocab_size, "scale": args.scale, "min_token": fast.min_token,
              "tokens_per_chunk": float(np.mean([len(t) for t in tokens])),
              "values_per_chunk": args.horizon * chunks.shape[2],
              "reconstruction_mean_abs": float(np.abs(decoded - chunks).mean()),
              "reconstruction_max_abs": float(np.abs(decoded - chunks).max())}
    (Path(args.out) / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.out}: FAST tokenizer fitted on {report['chunks']} chunks of {args.horizon} x {chunks.shape[2]} "
          f"({args.norm}-normalised): {report['tokens_per_chunk']:.1f} tokens a chunk for "
          f"{report['values_per_chunk']} values; reconstruction error mean {report['reconstruction_mean_abs']:.4f}, "
          f"max {report['reconstruction_max_abs']:.4f} (normalised units)")
    return 0
