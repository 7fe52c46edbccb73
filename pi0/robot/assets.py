"""A policy's assets beside its weights, found, read and written in one place: norm stats (openpi's
`assets/<id>/norm_stats.json`, LeRobot's `*normalizer*.safetensors` / `stats.safetensors`) and the tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pi0.robot.normalize import Normalizer, Stats

OPENPI_TOKENIZER = "~/.cache/openpi/big_vision/paligemma_tokenizer.model"


TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")


def find_tokenizer(explicit: str | os.PathLike | None, checkpoint_dir: Path | None) -> Path:
    """--tokenizer PATH, else the checkpoint directory (and its assets/), else openpi's cache."""
    tried: list[str] = []
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    if checkpoint_dir is not None:
        for base in (checkpoint_dir, checkpoint_dir / "assets"):
            candidates += [base / n for n in TOKENIZER_NAMES]
    env = os.environ.get("PI0_TOKENIZER")
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path(OPENPI_TOKENIZER).expanduser())
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c
    raise FileNotFoundError(
        "no PaliGemma SentencePiece tokenizer found; looked at: " + ", ".join(tried) + ". Pass --tokenizer PATH "
        f"(the file is gs://big_vision/paligemma_tokenizer.model, ~4 MB; openpi caches it at {OPENPI_TOKENIZER})"
    )


FAST_TOKENIZER_DIRS = ("fast_tokenizer", "assets/fast_tokenizer")
FAST_HUB_ID = "physical-intelligence/fast"  # the universal FAST tokenizer openpi's and LeRobot's π0-FAST use


def find_fast_tokenizer(explicit: str | os.PathLike | None, checkpoint_dir: Path, meta: dict[str, Any]) -> Path:
    """A FAST tokenizer directory (`tokenizer.json` + `processor_config.json`): --fast-tokenizer PATH, else the
    checkpoint's `fast_tokenizer/`, else the local path config.json names (LeRobot's `action_tokenizer_name`), else
    $PI0_FAST_TOKENIZER, else that hub id (default physical-intelligence/fast) in the huggingface_hub cache."""
    name = str(meta.get("action_tokenizer_name") or FAST_HUB_ID)
    candidates = [Path(explicit).expanduser()] if explicit else []
    candidates += [checkpoint_dir / d for d in FAST_TOKENIZER_DIRS]
    candidates += [Path(name).expanduser(), checkpoint_dir / name]
    if os.environ.get("PI0_FAST_TOKENIZER"):
        candidates.append(Path(os.environ["PI0_FAST_TOKENIZER"]).expanduser())
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    candidates += sorted((hub.expanduser() / f"models--{name.replace('/', '--')}" / "snapshots").glob("*"))
    for c in candidates:
        if (c / "tokenizer.json").is_file() and (c / "processor_config.json").is_file():
            return c
    raise FileNotFoundError(
        "no FAST tokenizer found (a directory with tokenizer.json and processor_config.json); looked at: "
        + ", ".join(str(c) for c in candidates) + f". Pass --fast-tokenizer PATH: the released one is the hub's {name} "
        f"(`huggingface-cli download {name}` where a network is), or fit your own with `pi0 fast-tokenizer`")


def find_asset_stats(root: Path) -> dict[str, Path]:
    """openpi's norm stats under `root/assets`: asset id (which may be a nested path such as
    `physical-intelligence/libero`) -> its norm_stats.json."""
    assets = root / "assets"
    if not assets.is_dir():
        return {}
    return {f.parent.relative_to(assets).as_posix(): f for f in sorted(assets.rglob("norm_stats.json"))}


def read_norm_stats(path: Path) -> dict[str, Stats]:
    """openpi's norm_stats.json: {"norm_stats": {"state": {...}, "actions": {...}}} -> Stats per key."""
    d = json.loads(Path(path).read_text())
    d = d.get("norm_stats", d)
    return {k: Stats.from_dict(v) for k, v in d.items() if isinstance(v, dict)}


def load_norm_stats(checkpoint_dir: Path, asset_id: str | None, state_mode: str,
                    action_mode: str) -> tuple[Normalizer | None, str]:
    """openpi `assets/<asset_id>/norm_stats.json`, or LeRobot stats (`*normalizer*.safetensors` /
    `stats.safetensors` with `observation.state.mean`-style keys) stored beside the weights.
    Returns (normalizer or None, where the stats came from)."""
    assets = checkpoint_dir / "assets"
    found = find_asset_stats(checkpoint_dir)
    if asset_id is not None:
        if asset_id.strip("/") not in found:
            raise FileNotFoundError(f"no {assets}/{asset_id}/norm_stats.json (asset ids there: {sorted(found) or 'none'})")
        found = {asset_id: found[asset_id.strip("/")]}
    files = list(found.values())
    if len(files) > 1:
        raise ValueError(f"{assets} holds stats for several robots {sorted(found)}: pass --asset-id (asset_id=)")
    if files:
        stats = read_norm_stats(files[0])
        return Normalizer(stats.get("state"), stats.get("actions"), state_mode, action_mode), str(files[0])
    # LeRobot: policy_preprocessor_*_normalizer_processor.safetensors (state and action stats) and
    # policy_postprocessor_*_unnormalizer_processor.safetensors (action stats), keys 'feature.stat'
    lerobot = sorted(checkpoint_dir.glob("*normalizer*.safetensors"), key=lambda f: ("unnormalizer" in f.name, f.name))
    lerobot += sorted(checkpoint_dir.glob("stats.safetensors"))
    if lerobot:
        from safetensors.numpy import load_file

        t: dict[str, np.ndarray] = {}
        for f in lerobot:
            for k, v in load_file(str(f)).items():
                t.setdefault(k, v)

        def stats(prefix: str) -> Stats | None:
            d = {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}
            return Stats.from_dict(d) if d else None

        # LeRobot divides by (std + 1e-8)
        return (Normalizer(stats("observation.state"), stats("action"), state_mode, action_mode, eps=1e-8),
                ", ".join(str(f) for f in lerobot))
    return None, "none (inputs are used as given)"


def _stats_arrays(st: Stats) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(st, k), dtype=np.float32) for k in ("mean", "std", "q01", "q99")}


def write_assets(directory: Path, asset_id: str, state: Stats | None, actions: Stats, tokenizer: Path) -> None:
    """What `load_norm_stats` and `find_tokenizer` read back: the stats as openpi's assets/<asset_id>/norm_stats.json
    and as LeRobot's stats.safetensors, and the tokenizer as paligemma_tokenizer.model."""
    import torch
    from safetensors.torch import save_file

    asset = directory / "assets" / asset_id
    asset.mkdir(parents=True, exist_ok=True)
    norm: dict[str, Any] = {"actions": {k: v.tolist() for k, v in _stats_arrays(actions).items()}}
    if state is not None:
        norm["state"] = {k: v.tolist() for k, v in _stats_arrays(state).items()}
    (asset / "norm_stats.json").write_text(json.dumps({"norm_stats": norm}, indent=2))
    tensors = {f"action.{k}": torch.from_numpy(v) for k, v in _stats_arrays(actions).items()}
    if state is not None:
        tensors.update({f"observation.state.{k}": torch.from_numpy(v) for k, v in _stats_arrays(state).items()})
    save_file(tensors, str(directory / "stats.safetensors"))
    shutil.copy(tokenizer, directory / "paligemma_tokenizer.model")
