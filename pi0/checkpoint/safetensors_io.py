"""The safetensors container: a checkpoint's headers read into a `CheckpointInfo`, its tensors read straight into
the wanted dtype (or handed over as row blocks), and tensors written one by one."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from pi0.checkpoint.info import (
    CheckpointFiles,
    CheckpointInfo,
    assumptions,
    check_against_config,
)
from pi0.checkpoint.layouts import detect_layout, to_canonical, to_file_key
from pi0.errors import CheckpointError
from pi0.model.backend import LoadHook
from pi0.model.fast_config import infer_model_config


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "download or copy it again"
        ) from e


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


_CHUNK_BYTES = 64 << 20  # staging buffer for dtype conversion


def _readinto(f, buf: torch.Tensor, path: Path, name: str) -> None:
    view = memoryview(buf.view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{path}: tensor {name} ends past the end of the file; the file is truncated")
        got += n


class RowBlocks:
    """A tensor of a checkpoint file, read on demand as consecutive blocks of whole rows in the file's dtype (at
    most _CHUNK_BYTES each, one buffer reused: a block is valid until the next is asked for). What a hook
    gets instead of the whole tensor for the names its optional `streams(name)` picks, so that a tensor it
    compresses (int8 at load) is never held uncompressed. Iterate once."""

    def __init__(self, f: Any, offset: int, shape: tuple[int, ...], dtype: torch.dtype, path: Path, name: str):
        self.f, self.offset, self.shape, self.dtype, self.path, self.name = f, offset, shape, dtype, path, name

    def __iter__(self) -> Iterator[torch.Tensor]:
        row = math.prod(self.shape[1:])
        rows = max(1, _CHUNK_BYTES // max(1, row * torch.empty((), dtype=self.dtype).element_size()))
        buf = torch.empty(min(rows, self.shape[0]) * row, dtype=self.dtype)
        self.f.seek(self.offset)
        for r in range(0, self.shape[0], rows):
            k = min(rows, self.shape[0] - r)
            block = buf[:k * row].view(k, *self.shape[1:])
            _readinto(self.f, block, self.path, self.name)
            yield block


def _read_shard(path: Path, items: list[tuple[str, str]], dtype: torch.dtype,
                hook: LoadHook | None = None) -> dict[str, Any]:
    """Read tensors with plain file reads (no mmap, so the file never counts towards the process's memory)
    straight into tensors of `dtype`: same-dtype tensors in one read, others through a 64 MiB staging buffer.
    hook(name, tensor), if given, is applied to each tensor as soon as it is read; the 2-D+ tensors its
    optional `streams(name)` picks reach it as `RowBlocks` in the file's dtype instead."""
    out: dict[str, Any] = {}
    streams = getattr(hook, "streams", None)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for c, fk in items:
            meta = header[fk]
            src = _ST_DTYPES.get(meta["dtype"])
            if src is None:
                raise CheckpointError(f"{path}: tensor {fk} has dtype {meta['dtype']}, which pi0 cannot read")
            begin, end = meta["data_offsets"]
            if end - begin != math.prod(meta["shape"]) * torch.empty((), dtype=src).element_size():
                raise CheckpointError(f"{path}: tensor {fk} spans {end - begin} bytes, its shape needs another size")
            if streams is not None and len(meta["shape"]) >= 2 and streams(c):
                out[c] = hook(c, RowBlocks(f, base + begin, tuple(meta["shape"]), src, path, fk))
                continue
            t = torch.empty(meta["shape"], dtype=dtype)
            f.seek(base + begin)
            if src == dtype:
                _readinto(f, t, path, fk)
            else:
                flat, size = t.view(-1), torch.empty((), dtype=src).element_size()
                step = max(1, _CHUNK_BYTES // size)
                stage = torch.empty(min(step, flat.numel()), dtype=src)
                for i in range(0, flat.numel(), step):
                    k = min(step, flat.numel() - i)
                    _readinto(f, stage[:k], path, fk)
                    flat[i:i + k].copy_(stage[:k])
            out[c] = t if hook is None else hook(c, t)
            del t
    return out


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The safetensors format written tensor by tensor (safetensors' own save_file first serialises the
    whole file in memory: twice the model's size at peak); written to a temporary name, then renamed."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    tmp.replace(path)


def locate(p: Path) -> CheckpointFiles | None:
    """None: safetensors files are found by `pi0.checkpoint.locate.resolve`'s own rules (a file, shards, an index)."""
    return None


def claims(files: CheckpointFiles) -> bool:
    return all(s.is_file() for s in files.shards)


def describe(info: CheckpointInfo) -> dict[str, Any]:
    return {}


def inspect(files: CheckpointFiles, meta: dict[str, Any]) -> CheckpointInfo:
    """Headers only: the layout, the config the shapes tell, the canonical tensor map."""
    where: dict[str, Path] = {}
    file_shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    for shard in files.shards:
        with _open(shard) as f:
            for k in f.keys():
                if k in where:
                    raise CheckpointError(f"tensor {k} is stored twice: in {where[k].name} and {shard.name}")
                sl = f.get_slice(k)
                where[k] = shard
                file_shapes[k] = tuple(sl.get_shape())
                dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + 1
    source = files.shards[0] if len(files.shards) == 1 else files.root
    layout = detect_layout(where, str(source))

    canonical: dict[str, tuple[Path, str]] = {}
    tied: tuple[Path, str] | None = None
    dropped, unexpected = [], []
    for k in where:
        try:
            c = to_canonical(k, layout)
        except KeyError:
            unexpected.append(k)
            continue
        if c is None:
            dropped.append(k)
        elif c.startswith("lm_head:"):
            tied = (where[k], k)
        else:
            canonical[c] = (where[k], k)
    if unexpected:
        raise CheckpointError(
            f"{source} ({layout} layout) has {len(unexpected)} unexpected tensors that are no part of pi0: "
            f"{sorted(unexpected)[:5]}"
        )
    if "vlm.embed_tokens.weight" not in canonical and tied is not None:
        canonical["vlm.embed_tokens.weight"] = tied  # openpi stores the word embedding only as lm_head
    elif tied is not None:
        dropped.append(tied[1])
    # LeRobot stores pi0's action-time MLP under openpi's pi0.5 name in some files.
    is_pi05 = any(c.startswith("expert.") and ".dense." in c for c in canonical)
    if not is_pi05:
        for part in ("weight", "bias"):
            for io in ("in", "out"):
                if f"time_mlp_{io}.{part}" in canonical:
                    canonical[f"action_time_mlp_{io}.{part}"] = canonical.pop(f"time_mlp_{io}.{part}")
    shapes = {c: file_shapes[fk] for c, (_, fk) in canonical.items()}
    try:
        config = infer_model_config(shapes, meta)
    except KeyError as e:
        name = e.args[0]
        raise CheckpointError(
            f"{source} ({layout} layout) is missing tensor {to_file_key(name, layout)}, needed to tell the model's sizes"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{source} ({layout} layout): {e}") from None
    n_params = sum(math.prod(s) for s in file_shapes.values())
    info = CheckpointInfo(files, layout, config, meta, len(where), n_params, dtypes, canonical, shapes, sorted(dropped),
                          assumptions(config, meta))
    check_against_config(info, source)
    return info


def read(info: CheckpointInfo, dtype: torch.dtype, progress=None,
         hook: LoadHook | None = None) -> Iterator[tuple[str, Any]]:
    """Canonical tensors read shard by shard, as (name, tensor) pairs (what `hook.first` picks, from every shard,
    first)."""
    first = getattr(hook, "first", None)
    for early in ((True, False) if first else (None,)):
        by_shard: dict[Path, list[tuple[str, str]]] = {}
        for c, (shard, fk) in info.canonical.items():
            if early is None or first(c) == early:
                by_shard.setdefault(shard, []).append((c, fk))
        for shard, items in by_shard.items():
            yield from _read_shard(shard, items, dtype, hook).items()
