"""Where a checkpoint's files are: a directory or file, shards, an Orbax params/ tree, openpi's download cache or
the huggingface_hub cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pi0.checkpoint.containers import READERS
from pi0.checkpoint.info import CheckpointFiles
from pi0.errors import CheckpointError


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
    for reader in READERS.values():  # a container that recognises its own directories (Orbax's params/ tree)
        if (files := reader.locate(p)) is not None:
            return files
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
