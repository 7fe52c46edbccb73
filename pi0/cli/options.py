"""Command-line options shared by the commands (`pi0 demo | bench | serve | infer | inspect | convert | eval`): where
to run, in which dtype, which checkpoint. A leaf module: the commands import it, it imports no command."""

from __future__ import annotations

import argparse
import sys

import torch

from pi0.backends.factory import BACKENDS, backend_dtype, backend_spec, state_device


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="engine", choices=list(BACKENDS))
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 where the machine runs it natively, else "
                   "float32; ttnn: its device formats), bfloat16, float32, int8 (engine on a CPU: int8 weights and "
                   "activations) or fp8 (engine on a GPU with fp8 tensor cores: e4m3 weights and activations)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is a GPU, else cpu), cpu, cuda, cuda:1, "
                   "...; backend ttnn: a Tenstorrent card when one is present, else emulated on the host")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str]:
    """--device / --dtype resolved ("auto" included), with the choice and its reason printed in one line
    (stderr). Returns the device, the dtype and the reason."""
    spec = backend_spec(getattr(args, "backend", "engine"))
    device = state_device(spec, args.device)  # the host for a backend whose device is no torch device (TTNN)
    dtype, why = backend_dtype(spec, args.dtype, device)
    print(f"pi0 {getattr(args, 'cmd', 'bench')}: device {device}, {why}", file=sys.stderr, flush=True)
    return device, dtype, why


CHECKPOINT_HELP = ("checkpoint directory, .safetensors file, openpi Orbax checkpoint (directory, training step "
                   "or params/), gs://openpi-assets/... in openpi's download cache, or hub repo id in the "
                   "huggingface_hub cache (--download fetches it)")


HORIZON_HELP = "actions per chunk, overriding the checkpoint's config.json (openpi Orbax checkpoints record none: 50)"


DOWNLOAD_HELP = "fetch a hub repo id that is not in the huggingface_hub cache (pi0 downloads nothing otherwise)"
