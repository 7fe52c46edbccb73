"""The checkpoint commands: `pi0 inspect` (what a checkpoint holds and how pi0 will run it) and `pi0 convert`."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import pi0
from pi0.backends.ttnn.weights import device_format, format_table
from pi0.checkpoint.info import CheckpointInfo
from pi0.model.fast_config import FastConfig
from pi0.hardware import resolve_dtype
from pi0.model.features import features
from pi0.timing import Progress


def _sizes(cfg: pi0.Pi0Config | FastConfig) -> str:
    v, l = cfg.vision, cfg.vlm
    lines = [
        f"  vision  SigLIP width {v.width}, depth {v.depth}, heads {v.num_heads} x {v.head_dim}, mlp {v.mlp_dim}, "
        f"patch {v.patch_size}, image {v.image_size} px ({v.num_patches} tokens)",
        f"  vlm     Gemma width {l.width}, depth {l.depth}, heads {l.num_heads}/{l.num_kv_heads} x {l.head_dim}, "
        f"mlp {l.mlp_dim}, vocab {l.vocab_size}",
    ]
    if isinstance(cfg, FastConfig):
        return "\n".join([*lines, f"  actions FAST tokens through the tied head: {cfg.action_horizon} x "
                           f"{cfg.action_dim}, prompt {cfg.max_token_len} tokens, at most {cfg.max_decoding_steps} "
                           "decoded"])
    e = cfg.expert
    return "\n".join([
        *lines,
        f"  expert  Gemma width {e.width}, depth {e.depth}, heads {e.num_heads}/{e.num_kv_heads} x {e.head_dim}, "
        f"mlp {e.mlp_dim}" + (", adaRMS" if cfg.pi05 else ""),
        f"  heads   action_dim {cfg.action_dim}, state_dim {cfg.state_dim}, horizon {cfg.action_horizon}, "
        f"tokens {cfg.max_token_len}, steps {cfg.num_steps}",
    ])


def _asset_widths(path) -> dict:
    """Each openpi asset id's norm stats: the width of its state and action vectors."""
    from pi0.robot.assets import read_norm_stats

    return {k: st.width for k, st in read_norm_stats(path).items()}


def inspect_report(info: CheckpointInfo) -> dict:
    from pi0.checkpoint.containers import reader_for
    from pi0.robot.assets import find_asset_stats
    from pi0.robot.lerobot import describe as describe_pipeline

    used = sum(torch.Size(s).numel() for s in info.shapes.values())
    extra = reader_for(info.files).describe(info)
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
        "ttnn_formats": {name: device_format(name, False)[0] for name in info.shapes},
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
    total = max(1, rep["num_used_params"])
    rows = sorted(format_table(info.shapes).items(), key=lambda kv: -kv[1]["params"])
    for i, (rule, n) in enumerate(rows):
        print(f"  {'ttnn' if i == 0 else '':8}{rule}: {n['tensors']} tensors, {n['params'] / total:.0%} of the "
              "params" + (" (the TTNN backend's device formats)" if i == 0 else ""))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pi0.checkpoint.load import inspect_checkpoint
    from pi0.checkpoint.save import convert_checkpoint

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
        from pi0.robot.lerobot import is_lerobot_pipeline
        from pi0.robot.lerobot_export import write_pipelines

        source = inspect_checkpoint(args.src, action_horizon=args.action_horizon)
        if is_lerobot_pipeline(source.files.root):
            print("  LeRobot's processor pipeline: the source's own, copied")
        elif features(source.meta).cameras:
            print(f"  LeRobot's processor pipeline: {', '.join(write_pipelines(source, out))}")
        else:
            print("  no LeRobot processor pipeline: the source's config.json describes no cameras (input_features), "
                  "so LeRobot could load the weights but not run them on a robot's observations", file=sys.stderr)
    return 0
