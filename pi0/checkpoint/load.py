"""Reading a checkpoint: `inspect_checkpoint` (headers: layout, config, tensor map) and `load_state_dict`
(canonical tensors), through the container readers of `READERS`."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable

import torch

from pi0.checkpoint.containers import reader_for
from pi0.checkpoint.info import CheckpointInfo
from pi0.checkpoint.layouts import PI0_CONFIG
from pi0.checkpoint.locate import resolve
from pi0.errors import CheckpointError
from pi0.model.backend import LoadHook
from pi0.model.config import read_config_json


def inspect_checkpoint(path_or_repo_id: str | os.PathLike, *, action_horizon: int | None = None,
                       download: bool = False) -> CheckpointInfo:
    """Read headers only (no tensor data): layout, config, tensor map. Raises CheckpointError.
    action_horizon: override the horizon (openpi's DROID / LIBERO fine-tunes use 10 or 15), which no
    weight shape tells and only a config.json records. download: fetch a hub id missing from the cache."""
    files = resolve(path_or_repo_id, download)
    meta = read_config_json(files.config_json) if files.config_json else {}
    if (files.root / PI0_CONFIG).is_file():  # what a LeRobot-layout config.json cannot hold (LeRobot parses it strictly)
        meta = {**meta, **read_config_json(files.root / PI0_CONFIG)}
    info = reader_for(files).inspect(files, meta)
    if action_horizon is not None:
        if action_horizon < 1:
            raise CheckpointError(f"action_horizon must be >= 1, got {action_horizon}")
        info.config = dataclasses.replace(info.config, action_horizon=int(action_horizon))
        info.assumed = [a for a in info.assumed if not a.startswith("action_horizon")]
    for note in info.assumed:
        warnings.warn(f"{info.files.root}: {note}", stacklevel=2)
    return info


def load_state_dict(info: CheckpointInfo, dtype: torch.dtype, device: str | torch.device = "cpu",
                    progress: Callable[[float], None] | None = None,
                    hook: LoadHook | None = None) -> dict[str, Any]:
    """Canonical tensors read straight into `dtype` (no fp32 detour for a bf16 file, one copy per tensor), each
    moved to `device` as it is read; the unused lm_heads are never read. progress: called with the fraction read
    so far (Orbax checkpoints). hook(name, tensor): applied to each tensor on the CPU as soon as it is read (the
    caller's compression at load: only one uncompressed tensor at a time); the tensors its optional
    `first(name)` picks are read before all others."""
    if hook is not None and torch.device(device).type != "cpu":
        raise ValueError("load_state_dict: a hook runs on CPU tensors only")
    on_cpu = torch.device(device).type == "cpu"
    return {c: t if on_cpu else t.to(device)
            for c, t in reader_for(info.files).read(info, dtype, progress, hook)}
