"""What a checkpoint is, read from its headers (`CheckpointInfo`), the contract of a container reader, and the
checks every reader's answer passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from pi0.errors import CheckpointError
from pi0.model.backend import LoadHook
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig, model_shapes


@dataclass
class CheckpointFiles:
    root: Path  # directory holding config.json / assets
    shards: list[Path]
    config_json: Path | None


@dataclass
class CheckpointInfo:
    files: CheckpointFiles
    layout: str
    config: Pi0Config | FastConfig
    meta: dict[str, Any]
    num_file_tensors: int
    num_file_params: int
    file_dtypes: dict[str, int]
    canonical: dict[str, tuple[Path, str]]  # canonical name -> (shard, file key)
    shapes: dict[str, tuple[int, ...]]  # canonical name -> shape
    dropped: list[str] = field(default_factory=list)  # file keys never read (unused lm_heads, ...)
    assumed: list[str] = field(default_factory=list)  # what no file said (printed as warnings)
    handle: Any = None  # what the container's reader keeps to read the tensors (Orbax: the params tree, recipes)


class Reader(Protocol):
    """A checkpoint container (a module: safetensors, Orbax; registered in `pi0.checkpoint.containers`): the files of
    a path that is one of its checkpoints (None: not one), whether it holds `files`, its headers read into a
    CheckpointInfo (no tensor data), its canonical tensors read in `dtype` as (name, tensor) pairs (`hook` applied to
    each as soon as it is read), and what `pi0 inspect` reports of it beyond the common fields."""

    def locate(self, path: Path) -> CheckpointFiles | None: ...

    def claims(self, files: CheckpointFiles) -> bool: ...

    def inspect(self, files: CheckpointFiles, meta: dict[str, Any]) -> CheckpointInfo: ...

    def read(self, info: CheckpointInfo, dtype: torch.dtype, progress: Callable[[float], None] | None = None,
             hook: LoadHook | None = None) -> Iterator[tuple[str, Any]]: ...

    def describe(self, info: CheckpointInfo) -> dict[str, Any]: ...


def assumptions(config: Pi0Config | FastConfig, meta: dict[str, Any]) -> list[str]:
    """What infer_config took from openpi's defaults because no config.json said it."""
    out = []
    if not any(meta.get(k) for k in ("action_horizon", "chunk_size")) and not (meta.get("pi0") or {}).get("action_horizon"):
        out.append(f"action_horizon {config.action_horizon} assumed (openpi's default; no config.json records it): "
                   "pass action_horizon= / --action-horizon for fine-tunes with another (DROID, LIBERO: 10 or 15)")
    if not any(meta.get(k) for k in ("max_token_len", "tokenizer_max_length")) and not (meta.get("pi0") or {}).get("max_token_len"):
        out.append(f"max_token_len {config.max_token_len} assumed (openpi's default for {config.kind})")
    return out


def check_against_config(info: CheckpointInfo, source) -> None:
    from pi0.checkpoint.layouts import to_file_key

    want = model_shapes(info.config)
    layout = info.layout
    missing = [k for k in want if k not in info.shapes]
    if missing:
        names = [to_file_key(k, layout) for k in missing]
        raise CheckpointError(
            f"{source} ({layout} layout) is missing {len(missing)} tensors, first: {names[:5]}"
        )
    extra = [info.canonical[k][1] for k in info.shapes if k not in want]
    if extra:
        raise CheckpointError(
            f"{source} ({layout} layout) has {len(extra)} unexpected tensors for a "
            f"{info.config.kind} model: {sorted(extra)[:5]}"
        )
    bad = [(info.canonical[k][1], want[k], info.shapes[k]) for k in want if want[k] != info.shapes[k]]
    if bad:
        name, exp, got = bad[0]
        raise CheckpointError(
            f"{source} ({layout} layout): {len(bad)} tensors have the wrong shape; first: {name} "
            f"expected {list(exp)}, found {list(got)}"
        )
