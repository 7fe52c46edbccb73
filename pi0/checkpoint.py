"""Find, read and write pi0 / pi0.5 checkpoints.

Every known key layout is mapped onto one canonical layout (the parameter names of
`pi0.reference.model.Pi0Reference`):

    vision.{patch_embedding,position_embedding,layers.N.*,post_layernorm}  projector.*
    vlm.{embed_tokens,layers.N.*,norm}  expert.{layers.N.*,norm}
    action_in_proj  action_out_proj  state_proj  action_time_mlp_{in,out}  (pi0.5: time_mlp_{in,out})

Layouts (../shared/spec/checkpoints.md): `openpi` (openpi-converted PyTorch, 777 / 812 tensors, the
VLM embedding stored only as `paligemma.lm_head`), `lerobot` (`model.` prefix, 778 / 813), and
`lerobot_legacy` (`lerobot/pi0`, Feb 2025, the older transformers names), read and written; and
`openpi_orbax` (openpi's JAX checkpoints as released and as training writes them, `pi0.orbax`), read.
The lm_heads are never read.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from pi0.config import Pi0Config, canonical_shapes, infer_config, read_config_json
from pi0.orbax import OrbaxError, find_params_dir

Transform = Callable[[str, torch.Tensor], Any]  # (canonical name, tensor) -> what the state dict keeps


class Chain:
    """Transforms applied one after the other; the tensors any of them wants `first` are read first."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def first(self, name: str) -> bool:
        return any(getattr(t, "first", lambda _: False)(name) for t in self.transforms)

    def __call__(self, name: str, t: torch.Tensor) -> Any:
        for fn in self.transforms:
            t = fn(name, t)
        return t

LAYOUTS = ("openpi", "lerobot", "lerobot_legacy")
HEADS = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out",
         "time_mlp_in", "time_mlp_out")

_PG = "paligemma_with_expert."
# (file prefix, canonical prefix); canonical None: a tensor inference never reads (dropped).
# The VLM's lm_head is the tied word embedding: read as vlm.embed_tokens when that is absent.
_RULES: dict[str, list[tuple[str, str | None]]] = {
    "openpi": [
        (_PG + "paligemma.model.vision_tower.vision_model.embeddings.", "vision."),
        (_PG + "paligemma.model.vision_tower.vision_model.encoder.layers.", "vision.layers."),
        (_PG + "paligemma.model.vision_tower.vision_model.post_layernorm.", "vision.post_layernorm."),
        (_PG + "paligemma.model.multi_modal_projector.linear.", "projector."),
        (_PG + "paligemma.model.language_model.", "vlm."),
        (_PG + "paligemma.lm_head.", "lm_head:vlm.embed_tokens."),
        (_PG + "gemma_expert.model.embed_tokens.", None),
        (_PG + "gemma_expert.model.", "expert."),
        (_PG + "gemma_expert.lm_head.", None),
    ],
    "lerobot_legacy": [
        ("model." + _PG + "paligemma.vision_tower.vision_model.embeddings.", "vision."),
        ("model." + _PG + "paligemma.vision_tower.vision_model.encoder.layers.", "vision.layers."),
        ("model." + _PG + "paligemma.vision_tower.vision_model.post_layernorm.", "vision.post_layernorm."),
        ("model." + _PG + "paligemma.multi_modal_projector.linear.", "projector."),
        ("model." + _PG + "paligemma.language_model.model.", "vlm."),
        ("model." + _PG + "paligemma.language_model.lm_head.", "lm_head:vlm.embed_tokens."),
        ("model." + _PG + "gemma_expert.model.embed_tokens.", None),
        ("model." + _PG + "gemma_expert.model.", "expert."),
        ("model." + _PG + "gemma_expert.lm_head.", None),
    ],
}
_RULES["lerobot"] = [("model." + a, b) for a, b in _RULES["openpi"]]
_HEAD_PREFIX = {"openpi": "", "lerobot": "model.", "lerobot_legacy": "model."}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, keys and shapes."""


def detect_layout(keys: Iterable[str], source: str = "checkpoint") -> str:
    keys = list(keys)
    if any(k.startswith("model." + _PG + "paligemma.language_model.model.") or
           k.startswith("model." + _PG + "paligemma.vision_tower.") for k in keys):
        return "lerobot_legacy"
    if any(k.startswith("model." + _PG) for k in keys):
        return "lerobot"
    if any(k.startswith(_PG) for k in keys):
        return "openpi"
    raise CheckpointError(
        f"{source} holds no pi0 tensors: expected names under 'paligemma_with_expert.' (openpi) or "
        f"'model.paligemma_with_expert.' (LeRobot); found {len(keys)} tensors such as {sorted(keys)[:3]}"
    )


def to_canonical(key: str, layout: str) -> str | None:
    """File key -> canonical key; None for a known unused tensor; raises KeyError for an unknown one."""
    for src, dst in _RULES[layout]:
        if key.startswith(src):
            return None if dst is None else dst + key[len(src):]
    head = key[len(_HEAD_PREFIX[layout]):] if key.startswith(_HEAD_PREFIX[layout]) else None
    if head is not None and head.split(".")[0] in HEADS:
        return head
    raise KeyError(key)


def to_file_key(canonical: str, layout: str) -> str:
    """Canonical key -> the name it has in `layout` (embed_tokens -> its own name, not lm_head)."""
    rules = [(s, d) for s, d in _RULES[layout] if d is not None and not d.startswith("lm_head:") and canonical.startswith(d)]
    if not rules:
        return _HEAD_PREFIX[layout] + canonical
    src, dst = max(rules, key=lambda r: len(r[1]))  # the most specific rule
    return src + canonical[len(dst):]


# ---------------------------------------------------------------------------------------------
# Locating files


@dataclass
class CheckpointFiles:
    root: Path  # directory holding config.json / assets
    shards: list[Path]
    config_json: Path | None


def _is_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


GCS_PREFIX = "gs://"


def openpi_cache_dir() -> Path:
    """Where openpi keeps what it downloads: $OPENPI_DATA_HOME, else ~/.cache/openpi."""
    return Path(os.environ.get("OPENPI_DATA_HOME") or "~/.cache/openpi").expanduser()


def resolve_gcs(url: str) -> Path:
    """gs://bucket/path as openpi's download cache holds it (`<cache>/bucket/path`); an error that says how
    to fetch it when it is not there."""
    local = openpi_cache_dir() / url[len(GCS_PREFIX):].strip("/")
    if not local.exists():
        raise CheckpointError(
            f"{url} is not in openpi's download cache ({local}). Fetch it there with "
            f"`gsutil -m cp -r {url.rstrip('/')} {local.parent}/` (or set OPENPI_DATA_HOME to where it is)")
    return local


def resolve(path_or_repo_id: str | os.PathLike, download: bool = False) -> CheckpointFiles:
    """A local directory or .safetensors file, an openpi Orbax checkpoint (its directory, a training step or
    `params/`), a gs:// name in openpi's download cache, or a hub repo id found in the huggingface_hub cache (or,
    with download, fetched into it: nothing is downloaded otherwise)."""
    if str(path_or_repo_id).startswith(GCS_PREFIX):
        path_or_repo_id = resolve_gcs(str(path_or_repo_id))
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir() and (params := find_params_dir(p)) is not None:
        root = params.parent if params.name == "params" else params
        cfg = root / "config.json"
        return CheckpointFiles(root, [params], cfg if cfg.exists() else None)
    if not p.exists() and _is_repo_id(str(path_or_repo_id)):
        p = _from_hub_cache(str(path_or_repo_id), download)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: give a checkpoint directory, a .safetensors file or a hub repo id")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p} is not a .safetensors file; pi0 reads safetensors checkpoints only")
        cfg = p.parent / "config.json"
        return CheckpointFiles(p.parent, [p], cfg if cfg.exists() else None)
    cfg = p / "config.json"
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        shards = [p / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {p}: {missing}")
    elif (p / "model.safetensors").exists():
        shards = [p / "model.safetensors"]
    else:
        shards = sorted(p.glob("*.safetensors"))
    if not shards:
        found = sorted(x.name for x in p.iterdir())[:8]
        raise CheckpointError(
            f"{p} holds no pi0 checkpoint: expected model.safetensors, model.safetensors.index.json, "
            f"*.safetensors or an openpi Orbax params/ directory (with _METADATA), found {found}"
        )
    return CheckpointFiles(p, shards, cfg if cfg.exists() else None)


def _from_hub_cache(repo_id: str, download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"'{repo_id}' looks like a hub id but huggingface_hub is not installed") from e
    patterns = ["*.json", "*.safetensors", "assets/**"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_err:  # noqa: BLE001 - any miss: download only if asked, then explain
        err = cached_err
    if not download:
        raise CheckpointError(
            f"hub repo '{repo_id}' is not in the huggingface_hub cache ({HF_HUB_CACHE}) and pi0 downloads nothing "
            f"unless asked: pass --download (download=True in Python) to fetch it into that cache, or fetch it "
            f"yourself with `huggingface-cli download {repo_id} --include '*.json' '*.safetensors' 'assets/*'`.")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        err = e
    raise CheckpointError(
        f"hub repo '{repo_id}' could not be downloaded ({type(err).__name__}: {err}). On a machine without network "
        f"access, fetch it elsewhere with `huggingface-cli download {repo_id} --include '*.json' '*.safetensors' "
        "'assets/*'` and copy the cache, or pass a local directory holding model.safetensors."
    )


def find_asset_stats(root: Path) -> dict[str, Path]:
    """openpi's norm stats under `root/assets`: asset id (which may be a nested path such as
    `physical-intelligence/libero`) -> its norm_stats.json."""
    assets = root / "assets"
    if not assets.is_dir():
        return {}
    return {f.parent.relative_to(assets).as_posix(): f for f in sorted(assets.rglob("norm_stats.json"))}


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class CheckpointInfo:
    files: CheckpointFiles
    layout: str
    config: Pi0Config
    meta: dict[str, Any]
    num_file_tensors: int
    num_file_params: int
    file_dtypes: dict[str, int]
    canonical: dict[str, tuple[Path, str]]  # canonical name -> (shard, file key)
    shapes: dict[str, tuple[int, ...]]  # canonical name -> shape
    dropped: list[str] = field(default_factory=list)  # file keys never read (unused lm_heads, ...)
    assumed: list[str] = field(default_factory=list)  # what no file said (printed as warnings)
    orbax: Any = None  # (OrbaxParams, recipes) for the openpi_orbax layout


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "download or copy it again"
        ) from e


def inspect_checkpoint(path_or_repo_id: str | os.PathLike, *, action_horizon: int | None = None,
                       download: bool = False) -> CheckpointInfo:
    """Read headers only (no tensor data): layout, config, tensor map. Raises CheckpointError.
    action_horizon: override the horizon (openpi's DROID / LIBERO fine-tunes use 10 or 15), which no
    weight shape tells and only a config.json records. download: fetch a hub id missing from the cache."""
    files = resolve(path_or_repo_id, download)
    meta = read_config_json(files.config_json) if files.config_json else {}
    if (files.root / PI0_CONFIG).is_file():  # what a LeRobot-layout config.json cannot hold (LeRobot parses it strictly)
        meta = {**meta, **read_config_json(files.root / PI0_CONFIG)}
    info = _inspect_orbax(files, meta) if _is_orbax(files) else _inspect_safetensors(files, meta)
    if action_horizon is not None:
        if action_horizon < 1:
            raise CheckpointError(f"action_horizon must be >= 1, got {action_horizon}")
        info.config = dataclasses.replace(info.config, action_horizon=int(action_horizon))
        info.assumed = [a for a in info.assumed if not a.startswith("action_horizon")]
    for note in info.assumed:
        warnings.warn(f"{info.files.root}: {note}", stacklevel=2)
    return info


def _is_orbax(files: CheckpointFiles) -> bool:
    return len(files.shards) == 1 and files.shards[0].is_dir()


def _assumptions(config: Pi0Config, meta: dict[str, Any]) -> list[str]:
    """What infer_config took from openpi's defaults because no config.json said it."""
    out = []
    if not any(meta.get(k) for k in ("action_horizon", "chunk_size")) and not (meta.get("pi0") or {}).get("action_horizon"):
        out.append(f"action_horizon {config.action_horizon} assumed (openpi's default; no config.json records it): "
                   "pass action_horizon= / --action-horizon for fine-tunes with another (DROID, LIBERO: 10 or 15)")
    if not any(meta.get(k) for k in ("max_token_len", "tokenizer_max_length")) and not (meta.get("pi0") or {}).get("max_token_len"):
        out.append(f"max_token_len {config.max_token_len} assumed (openpi's default for {config.kind})")
    return out


def _inspect_orbax(files: CheckpointFiles, meta: dict[str, Any]) -> CheckpointInfo:
    from pi0 import orbax

    params_dir = files.shards[0]
    try:
        params = orbax.OrbaxParams(params_dir)
        rec = orbax.recipes(params.leaves, str(params_dir))
        shapes = orbax.shapes(params.leaves, rec)
        # the JAX shapes tell the head counts the converted safetensors cannot
        ours = {**orbax.head_counts(params.leaves), **(meta.get("pi0") or {})}
        config = infer_config(shapes, {**meta, "pi0": ours})
    except OrbaxError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{params_dir} (openpi_orbax layout): {e}") from None
    dtypes: dict[str, int] = {}
    for leaf in params.leaves.values():
        dtypes[leaf.dtype] = dtypes.get(leaf.dtype, 0) + 1
    info = CheckpointInfo(
        files, "openpi_orbax", config, meta, len(params.leaves), sum(math.prod(x.shape) for x in params.leaves.values()),
        dtypes, {c: (params_dir, params.leaves[leaf].key) for c, (leaf, _) in rec.items()}, shapes,
        assumed=_assumptions(config, meta), orbax=(params, rec))
    _check_against_config(info, params_dir)
    return info


def _inspect_safetensors(files: CheckpointFiles, meta: dict[str, Any]) -> CheckpointInfo:
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
        config = infer_config(shapes, meta)
    except KeyError as e:
        name = e.args[0]
        raise CheckpointError(
            f"{source} ({layout} layout) is missing tensor {to_file_key(name, layout)}, needed to tell the model's sizes"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{source} ({layout} layout): {e}") from None
    n_params = sum(math.prod(s) for s in file_shapes.values())
    info = CheckpointInfo(files, layout, config, meta, len(where), n_params, dtypes, canonical, shapes, sorted(dropped),
                          _assumptions(config, meta))
    _check_against_config(info, source)
    return info


def _check_against_config(info: CheckpointInfo, source) -> None:
    want = canonical_shapes(info.config)
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
    most _CHUNK_BYTES each, one buffer reused: a block is valid until the next is asked for). What a transform
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
                transform: Transform | None = None) -> dict[str, Any]:
    """Read tensors with plain file reads (no mmap, so the file never counts towards the process's memory)
    straight into tensors of `dtype`: same-dtype tensors in one read, others through a 64 MiB staging buffer.
    transform(name, tensor), if given, is applied to each tensor as soon as it is read; the 2-D+ tensors its
    optional `streams(name)` picks reach it as `RowBlocks` in the file's dtype instead."""
    out: dict[str, Any] = {}
    streams = getattr(transform, "streams", None)
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
                out[c] = transform(c, RowBlocks(f, base + begin, tuple(meta["shape"]), src, path, fk))
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
            out[c] = t if transform is None else transform(c, t)
            del t
    return out


def _mallopt(param: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def weights_allocation() -> Iterator[None]:
    """glibc's allocator tuned for building a model, then for running it. glibc raises its mmap threshold (up
    to 32 MiB) each time a large block is freed; while weights are made, freed transients (an Orbax leaf, a
    staging buffer, a weight before packing) would then put later weights on the heap, in holes that are never
    returned (+0.6 GiB resident at full size, measured): so inside, a fixed 1 MiB threshold keeps every large
    tensor in its own mapping. After: a 32 MiB threshold and 64 MiB trim threshold (where glibc's own
    adjustment ends), so per-call activations are reused from the heap, not page-faulted in afresh from a new
    mapping at every call (the 1 MiB threshold left on: bf16 W1 4.2 s -> 5.5 s, measured)."""
    _mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _mallopt(_M_TRIM_THRESHOLD, 64 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def load_state_dict(info: CheckpointInfo, dtype: torch.dtype, device: str | torch.device = "cpu",
                    progress: Callable[[float], None] | None = None,
                    transform: Transform | None = None) -> dict[str, Any]:
    """Canonical tensors read from the shards straight into `dtype` (no fp32 detour for a bf16 file, one
    copy per tensor), then moved to `device`; the unused lm_heads are never read. progress: called with
    the fraction read so far (Orbax checkpoints). transform(name, tensor): applied to each tensor on the
    CPU as soon as it is read (the caller's compression at load: only one uncompressed tensor at a time); the
    tensors its optional `first(name)` picks are read before all others."""
    if transform is not None and torch.device(device).type != "cpu":
        raise ValueError("load_state_dict: a transform runs on CPU tensors only")
    if info.orbax is not None:
        from pi0 import orbax

        try:
            state = orbax.load(*info.orbax, dtype, progress, transform)
        except OrbaxError as e:
            raise CheckpointError(str(e)) from None
        return state if torch.device(device).type == "cpu" else {k: v.to(device) for k, v in state.items()}
    first = getattr(transform, "first", None)
    out: dict[str, torch.Tensor] = {}
    for early in ((True, False) if first else (None,)):  # what transform.first picks, from every shard, first
        by_shard: dict[Path, list[tuple[str, str]]] = {}
        for c, (shard, fk) in info.canonical.items():
            if early is None or first(c) == early:
                by_shard.setdefault(shard, []).append((c, fk))
        for shard, items in by_shard.items():
            for c, t in _read_shard(shard, items, dtype, transform).items():
                out[c] = t if torch.device(device).type == "cpu" else t.to(device)
    return out


# ---------------------------------------------------------------------------------------------
# Writing


PI0_CONFIG = "pi0_config.json"
PALIGEMMA_VOCAB = 257_152  # beside a LeRobot-layout config.json: pi0's exact config and its other fields


def lerobot_config(config: Pi0Config, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json as LeRobot 0.6.1 writes it for PI0Config / PI05Config (they share their fields, and LeRobot
    refuses any other): the sizes from `config`, the robot's features and normalisation from `meta` (a source
    checkpoint's config.json) where it has them."""
    default_norm = "QUANTILES" if config.pi05 else "MEAN_STD"
    norm = meta.get("normalization_mapping") if isinstance(meta.get("normalization_mapping"), dict) else {}
    return {
        "type": config.kind, "n_obs_steps": 1,
        "input_features": meta.get("input_features") or {}, "output_features": meta.get("output_features") or {},
        "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None, "private": None,
        "tags": None, "license": None, "pretrained_path": None, "pretrained_revision": None,
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m", "dtype": "float32",
        "chunk_size": config.action_horizon, "n_action_steps": config.action_horizon,
        "max_state_dim": config.state_dim, "max_action_dim": config.action_dim, "num_inference_steps": config.num_steps,
        "time_sampling_beta_alpha": 1.5, "time_sampling_beta_beta": 1.0, "time_sampling_scale": 0.999,
        "time_sampling_offset": 0.001, "min_period": config.min_period, "max_period": config.max_period,
        "use_relative_actions": False, "relative_exclude_joints": ["gripper"], "action_feature_names": None,
        "rtc_config": None, "image_resolution": [config.vision.image_size] * 2, "empty_cameras": 0,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": default_norm, "ACTION": default_norm,
                                  **{str(k).upper(): str(v).upper() for k, v in norm.items()}},
        "gradient_checkpointing": False, "compile_model": False, "compile_mode": "max-autotune",
        "freeze_vision_encoder": False, "train_expert_only": False, "optimizer_lr": 2.5e-05,
        "optimizer_betas": [0.9, 0.95], "optimizer_eps": 1e-08, "optimizer_weight_decay": 0.01,
        "optimizer_grad_clip_norm": 1.0, "scheduler_warmup_steps": 1000, "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06, "tokenizer_max_length": config.max_token_len,
    }


def _config_json(config: Pi0Config, layout: str) -> dict[str, Any]:
    ours = {"pi0": config.to_dict()}
    if layout == "openpi":
        return {
            "action_dim": config.action_dim, "action_horizon": config.action_horizon,
            "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
            "precision": "float32", **ours,
        }
    return {
        "type": config.kind, "chunk_size": config.action_horizon, "n_action_steps": config.action_horizon,
        "max_state_dim": config.state_dim, "max_action_dim": config.action_dim, "proj_width": config.expert.width,
        "num_steps": config.num_steps, "tokenizer_max_length": config.max_token_len,
        "resize_imgs_with_padding": [config.vision.image_size] * 2, **ours,
    }


def file_tensors(state_dict: dict[str, torch.Tensor], config: Pi0Config, layout: str) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the tensors (names and count) a checkpoint of `layout` holds, including the
    unused lm_heads those formats carry (written as the tied embedding / zeros)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {LAYOUTS}")
    out: dict[str, torch.Tensor] = {}
    embed = state_dict["vlm.embed_tokens.weight"]
    for c, t in state_dict.items():
        if c == "vlm.embed_tokens.weight" and layout in ("openpi", "lerobot_legacy"):
            continue  # stored only as the (tied) lm_head
        out[to_file_key(c, layout)] = t.contiguous()
    pre = "model." if layout != "openpi" else ""
    zeros = torch.zeros(config.vlm.vocab_size, config.expert.width, dtype=embed.dtype, device=embed.device)
    if layout == "lerobot_legacy":
        out[pre + _PG + "paligemma.language_model.lm_head.weight"] = embed.contiguous()
        out[pre + _PG + "gemma_expert.model.embed_tokens.weight"] = zeros
        out[pre + _PG + "gemma_expert.lm_head.weight"] = zeros.clone()
    else:
        out[pre + _PG + "paligemma.lm_head.weight"] = embed.clone() if layout == "lerobot" else embed.contiguous()
        if layout == "lerobot":  # LeRobot builds the expert's (unused) lm_head with PaliGemma's vocabulary whatever
            # the model's, and loads strictly: any other shape and it keeps its random weights
            zeros = torch.zeros(PALIGEMMA_VOCAB, config.expert.width, dtype=embed.dtype, device=embed.device)
        out[pre + _PG + "gemma_expert.lm_head.weight"] = zeros
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


def save_checkpoint(state_dict: dict[str, torch.Tensor], config: Pi0Config, directory: str | os.PathLike,
                    layout: str = "openpi", max_shard_bytes: int | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write `directory/model.safetensors` (or shards + index) and config.json in `layout`.
    extra_config: fields kept in config.json beside ours (a LeRobot checkpoint's features, say)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = file_tensors(state_dict, config, layout)
    extra = dict(extra_config or {})
    if layout == "lerobot":  # LeRobot reads config.json strictly: everything of pi0's goes beside it
        fields = lerobot_config(config, extra)
        (d / "config.json").write_text(json.dumps(fields, indent=2))
        ours = {k: v for k, v in extra.items() if k not in fields}
        (d / PI0_CONFIG).write_text(json.dumps({**ours, "pi0": config.to_dict()}, indent=2))
    else:
        (d / PI0_CONFIG).unlink(missing_ok=True)
        (d / "config.json").write_text(json.dumps({**extra, **_config_json(config, layout)}, indent=2))
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
