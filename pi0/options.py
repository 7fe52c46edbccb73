"""Command-line options shared by the commands (`pi0 demo | bench | serve | infer | train | eval`): where to run
and in which dtype. A leaf module: the commands import it, it imports no command."""

from __future__ import annotations

import argparse
import sys

import torch

from pi0.hardware import resolve_device, resolve_dtype
from pi0.models import BACKENDS


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="engine", choices=BACKENDS)
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 where the machine runs it natively, else "
                   "float32), bfloat16, float32, or int8 (engine on a CPU: int8 weights and activations)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is a GPU, else cpu), cpu, cuda, cuda:1, ...")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str]:
    """--device / --dtype resolved ("auto" included), with the choice and its reason printed in one line
    (stderr). Returns the device, the dtype and the reason."""
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)
    print(f"pi0 {getattr(args, 'cmd', 'bench')}: device {device}, {why}", file=sys.stderr, flush=True)
    return device, dtype, why
