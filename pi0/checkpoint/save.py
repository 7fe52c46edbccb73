"""Writing checkpoints: `save_checkpoint` (canonical tensors in a layout, with its config.json) and
`convert_checkpoint` (any readable checkpoint into a layout, its side files alongside)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from pi0.checkpoint.info import CheckpointInfo
from pi0.checkpoint.layouts import LAYOUTS, file_tensors, write_config_files
from pi0.checkpoint.load import inspect_checkpoint, load_state_dict
from pi0.checkpoint.safetensors_io import write_safetensors
from pi0.errors import CheckpointError
from pi0.model.config import Pi0Config


def save_checkpoint(state_dict: dict[str, torch.Tensor], config: Pi0Config, directory: str | os.PathLike,
                    layout: str = "openpi", max_shard_bytes: int | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write `directory/model.safetensors` (or shards + index) and config.json in `layout`.
    extra_config: fields kept in config.json beside ours (a LeRobot checkpoint's features, say)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = file_tensors(state_dict, config, layout)
    write_config_files(d, config, layout, dict(extra_config or {}))
    if max_shard_bytes is None:
        write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
        return d
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(d / name, shard, {"format": "pt"})
        weight_map.update({k: name for k in shard})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return d


_FLOAT_NAMES = {"F32": torch.float32, "float32": torch.float32, "BF16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "F16": torch.float16, "float16": torch.float16}


# what a checkpoint directory carries beside the weights, kept by `convert_checkpoint`
SIDE_FILES = ("assets", "*.model", "*normalizer*.safetensors", "stats.safetensors", "policy_*processor*.json")


def stored_dtype(info: CheckpointInfo) -> torch.dtype:
    """The checkpoint's float dtype when all its tensors share one (bf16 or fp32), else fp32."""
    found = {_FLOAT_NAMES.get(k) for k in info.file_dtypes}
    return found.pop() if len(found) == 1 and None not in found and torch.float16 not in found else torch.float32


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, layout: str = "openpi",
                       dtype: torch.dtype | None = None, action_horizon: int | None = None,
                       progress: Callable[[float], None] | None = None, download: bool = False) -> Path:
    """Any readable checkpoint -> `layout` (openpi / lerobot / lerobot_legacy) in `dtype` (default: the
    source's), with config.json (the source's fields kept), assets/, the tokenizer and LeRobot's stats and
    processor files copied alongside. For openpi_orbax -> openpi the tensors are those openpi's
    convert_jax_model_to_pytorch.py writes (o_proj in the form right for every width)."""
    import shutil

    if layout not in LAYOUTS:
        raise CheckpointError(f"cannot write layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    info = inspect_checkpoint(src, action_horizon=action_horizon, download=download)
    out = Path(dst).expanduser()
    if out.exists() and out.resolve() == info.files.root.resolve():
        raise CheckpointError(f"{out} is the source checkpoint's own directory: convert into another one")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: convert into a new or empty directory")
    state = load_state_dict(info, dtype or stored_dtype(info), "cpu", progress)
    extra = {k: v for k, v in info.meta.items() if k != "pi0"}
    save_checkpoint(state, info.config, out, layout, extra_config=extra)
    del state
    for pattern in SIDE_FILES:
        for f in info.files.root.glob(pattern):
            if f.is_dir():
                shutil.copytree(f, out / f.name, dirs_exist_ok=True)
            elif f.is_file():
                shutil.copy2(f, out / f.name)
    return out
