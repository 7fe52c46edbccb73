"""Key layouts: how each checkpoint format names the canonical tensors, and the config.json it carries.

The canonical names are the parameter names of `pi0.backends.reference.model.Pi0Reference`:

    vision.{patch_embedding,position_embedding,layers.N.*,post_layernorm}  projector.*
    vlm.{embed_tokens,layers.N.*,norm}  expert.{layers.N.*,norm}
    action_in_proj  action_out_proj  state_proj  action_time_mlp_{in,out}  (pi0.5: time_mlp_{in,out})

Each layout is one entry of `LAYOUTS` (../shared/spec/checkpoints.md): `openpi` (openpi-converted PyTorch, 777 /
812 tensors, the VLM embedding stored only as `paligemma.lm_head`), `lerobot` (`model.` prefix, 778 / 813) and
`lerobot_legacy` (`lerobot/pi0`, Feb 2025, the older transformers names), read and written. openpi's Orbax
checkpoints are another container (`pi0.checkpoint.orbax`), read. The lm_heads are never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from pi0.errors import CheckpointError
from pi0.model.fast_config import FastConfig
from pi0.model.config import Pi0Config

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



PI0_CONFIG = "pi0_config.json"


PALIGEMMA_VOCAB = 257_152  # beside a LeRobot-layout config.json: pi0's exact config and its other fields


@dataclass(frozen=True)
class Layout:
    """One key layout: its rules (file prefix -> canonical prefix; None: a tensor inference never reads), the
    prefix of the action heads, how a file of it is recognised, whether the VLM embedding is stored only as the
    (tied) lm_head, the unused tensors its files carry, and the config.json files written beside the weights."""

    name: str
    rules: list[tuple[str, str | None]]
    head_prefix: str
    recognise: Callable[[str], bool]  # a key only this layout (of those tried before it) has
    embed_as_lm_head: bool
    unused_tensors: Callable[[Pi0Config, torch.Tensor], dict[str, torch.Tensor]]
    config_files: Callable[[Pi0Config, dict[str, Any]], dict[str, dict[str, Any]]]


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


def _config_json(config: Pi0Config | FastConfig, layout: str) -> dict[str, Any]:
    ours = {"pi0": config.to_dict()}
    if isinstance(config, FastConfig):  # π0-FAST: openpi's Pi0FASTConfig fields; LeRobot's PI0FastConfig names
        if layout == "openpi":
            return {"model_type": "pi0_fast", "action_dim": config.action_dim, "action_horizon": config.action_horizon,
                    "max_token_len": config.max_token_len, "paligemma_variant": "gemma_2b", **ours}
        return {"type": "pi0_fast", "chunk_size": config.action_horizon, "n_action_steps": config.action_horizon,
                "max_action_dim": config.action_dim, "tokenizer_max_length": config.max_token_len,
                "max_decoding_steps": config.max_decoding_steps, **ours}
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


def _openpi_config(config: Pi0Config, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"config.json": {**extra, **_config_json(config, "openpi")}}


def _lerobot_legacy_config(config: Pi0Config, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"config.json": {**extra, **_config_json(config, "lerobot_legacy")}}


def _lerobot_config(config: Pi0Config | FastConfig, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """LeRobot reads config.json strictly: everything of pi0's goes beside it, in pi0_config.json."""
    if isinstance(config, FastConfig):
        return {"config.json": {**extra, **_config_json(config, "lerobot")}}
    fields = lerobot_config(config, extra)
    ours = {k: v for k, v in extra.items() if k not in fields}
    return {"config.json": fields, PI0_CONFIG: {**ours, "pi0": config.to_dict()}}


def _zeros(config: Pi0Config, embed: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    return torch.zeros(rows or config.vlm.vocab_size, config.expert.width, dtype=embed.dtype, device=embed.device)


def _openpi_unused(config: Pi0Config | FastConfig, embed: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(config, FastConfig):  # no expert
        return {_PG + "paligemma.lm_head.weight": embed.contiguous()}
    return {_PG + "paligemma.lm_head.weight": embed.contiguous(), _PG + "gemma_expert.lm_head.weight": _zeros(config, embed)}


def _lerobot_unused(config: Pi0Config | FastConfig, embed: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(config, FastConfig):  # LeRobot's pi0_fast keeps its lm_head as a tensor of its own
        return {"model." + _PG + "paligemma.lm_head.weight": embed.clone()}
    # LeRobot builds the expert's (unused) lm_head with PaliGemma's vocabulary whatever the model's, and loads
    # strictly: any other shape and it keeps its random weights
    return {"model." + _PG + "paligemma.lm_head.weight": embed.clone(),
            "model." + _PG + "gemma_expert.lm_head.weight": _zeros(config, embed, PALIGEMMA_VOCAB)}


def _lerobot_legacy_unused(config: Pi0Config | FastConfig, embed: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(config, FastConfig):
        raise ValueError("the lerobot_legacy layout (Feb 2025's lerobot/pi0) has no π0-FAST form: save pi0_fast as "
                         "openpi or lerobot")
    pre = "model." + _PG
    return {pre + "paligemma.language_model.lm_head.weight": embed.contiguous(),
            pre + "gemma_expert.model.embed_tokens.weight": _zeros(config, embed),
            pre + "gemma_expert.lm_head.weight": _zeros(config, embed)}


# in the order `detect_layout` tries them
LAYOUTS: dict[str, Layout] = {l.name: l for l in (
    Layout("lerobot_legacy", _RULES["lerobot_legacy"], "model.",
           lambda k: k.startswith(("model." + _PG + "paligemma.language_model.model.",
                                   "model." + _PG + "paligemma.vision_tower.")),
           True, _lerobot_legacy_unused, _lerobot_legacy_config),
    Layout("lerobot", _RULES["lerobot"], "model.", lambda k: k.startswith("model." + _PG), False, _lerobot_unused,
           _lerobot_config),
    Layout("openpi", _RULES["openpi"], "", lambda k: k.startswith(_PG), True, _openpi_unused, _openpi_config),
)}


def detect_layout(keys: Iterable[str], source: str = "checkpoint") -> str:
    keys = list(keys)
    for layout in LAYOUTS.values():
        if any(layout.recognise(k) for k in keys):
            return layout.name
    raise CheckpointError(
        f"{source} holds no pi0 tensors: expected names under 'paligemma_with_expert.' (openpi) or "
        f"'model.paligemma_with_expert.' (LeRobot); found {len(keys)} tensors such as {sorted(keys)[:3]}"
    )


def to_canonical(key: str, layout: str) -> str | None:
    """File key -> canonical key; None for a known unused tensor; raises KeyError for an unknown one."""
    spec = LAYOUTS[layout]
    for src, dst in spec.rules:
        if key.startswith(src):
            return None if dst is None else dst + key[len(src):]
    head = key[len(spec.head_prefix):] if key.startswith(spec.head_prefix) else None
    if head is not None and head.split(".")[0] in HEADS:
        return head
    raise KeyError(key)


def to_file_key(canonical: str, layout: str) -> str:
    """Canonical key -> the name it has in `layout` (embed_tokens -> its own name, not lm_head)."""
    spec = LAYOUTS[layout]
    rules = [(s, d) for s, d in spec.rules if d is not None and not d.startswith("lm_head:") and canonical.startswith(d)]
    if not rules:
        return spec.head_prefix + canonical
    src, dst = max(rules, key=lambda r: len(r[1]))  # the most specific rule
    return src + canonical[len(dst):]


def file_tensors(state_dict: dict[str, torch.Tensor], config: Pi0Config, layout: str) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the tensors (names and count) a checkpoint of `layout` holds, including the
    unused lm_heads those formats carry (written as the tied embedding / zeros)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    out: dict[str, torch.Tensor] = {}
    for c, t in state_dict.items():
        if c == "vlm.embed_tokens.weight" and spec.embed_as_lm_head:
            continue  # stored only as the (tied) lm_head
        out[to_file_key(c, layout)] = t.contiguous()
    out.update(spec.unused_tensors(config, state_dict["vlm.embed_tokens.weight"]))
    return out


def write_config_files(directory: Path, config: Pi0Config, layout: str, extra: dict[str, Any]) -> None:
    """The config.json (and, for LeRobot, pi0_config.json) of a checkpoint of `layout`; a stale pi0_config.json
    from another layout is removed."""
    files = LAYOUTS[layout].config_files(config, extra)
    if PI0_CONFIG not in files:
        (directory / PI0_CONFIG).unlink(missing_ok=True)
    for name, fields in files.items():
        (directory / name).write_text(json.dumps(fields, indent=2))
