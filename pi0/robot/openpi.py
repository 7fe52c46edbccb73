"""openpi's observation pipeline: a robot preset's keys and maps, normalisation with the checkpoint's stats,
openpi's image resize and prompt tokens (../shared/spec/serving_and_processing.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi0.checkpoint.info import CheckpointInfo
from pi0.errors import BadRequest, MissingKey
from pi0.model.config import Pi0Config
from pi0.model.features import features
from pi0.model.observation import Observation
from pi0.robot.assets import load_norm_stats
from pi0.robot.images import image_to_model, to_uint8_hwc
from pi0.robot.normalize import Normalizer
from pi0.robot.pipeline import Frame
from pi0.robot.presets import (
    PRESETS,
    RobotPreset,
    finite_vector,
    generic_preset,
    lookup,
)
from pi0.robot.tokenizer import PromptTokenizer, prompt_text


def resolve_preset(name: str | None, meta: dict[str, Any]) -> RobotPreset:
    """A preset by name; None: the one config.json records (`pi0 train --preset`), else `generic` from its features."""
    feats = features(meta)
    name = name or feats.robot_preset
    if name is None:
        if not feats.cameras:
            raise ValueError(f"choose a robot preset ({', '.join(PRESETS)}, generic): the checkpoint's config.json "
                             "describes no camera features")
        name = "generic"
    if name == "generic":
        return generic_preset(feats.cameras, feats.action, feats.state)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}, generic")
    return PRESETS[name]


class OpenpiPipeline:
    """Robot preset -> state map -> normalise -> images -> prompt tokens; model actions -> unnormalise -> the
    preset's action map. `state_len` / `action_dim`: the robot widths (checked against the checkpoint by
    `for_checkpoint`)."""

    def __init__(self, config: Pi0Config, preset: RobotPreset, normalizer: Normalizer | None, tokenizer: PromptTokenizer,
                 *, state_in_prompt: bool = True, default_prompt: str | None = None, state_len: int | None = None,
                 action_dim: int | None = None, stats_source: str = "none (inputs are used as given)"):
        self.config, self.preset, self.normalizer, self.tokenizer = config, preset, normalizer, tokenizer
        self.state_in_prompt = config.pi05 and state_in_prompt
        self.default_prompt = default_prompt
        self.state_len = state_len if state_len is not None else preset.state_len
        self.action_dim = action_dim or preset.action_dim or config.action_dim
        self.stats_source = stats_source
        self.slots = preset.cameras  # (robot key or None, required) per model camera
        self.cameras = [key for key, _ in self.slots]
        self.max_state: int | None = config.state_dim  # state values the model takes at most (None: any)

    @classmethod
    def for_checkpoint(cls, info: CheckpointInfo, *, preset: str | None, tokenizer: Path, asset_id: str | None = None,
                       state_in_prompt: bool | None = None, default_prompt: str | None = None) -> "OpenpiPipeline":
        """The pipeline of a checkpoint: its preset, its stats (pi0: z-score, pi0.5: quantiles, unless config.json's
        normalization_mapping says otherwise), its tokenizer; widths agreed between preset, features and stats."""
        cfg, feats = info.config, features(info.meta)
        robot = resolve_preset(preset, info.meta)
        default = "QUANTILES" if cfg.pi05 else "MEAN_STD"
        normalizer, source = load_norm_stats(info.files.root, asset_id, feats.normalization.get("STATE", default),
                                             feats.normalization.get("ACTION", default))
        state_len, action_dim = agreed_widths(cfg.state_dim, cfg.action_dim, robot, feats, normalizer, source)
        if state_in_prompt is None:
            state_in_prompt = feats.discrete_state_input
        return cls(cfg, robot, normalizer, PromptTokenizer(tokenizer, cfg.max_token_len), state_in_prompt=state_in_prompt,
                   default_prompt=default_prompt, state_len=state_len, action_dim=action_dim, stats_source=source)

    @property
    def metadata(self) -> dict[str, Any]:
        return {"preset": self.preset.name, "cameras": [c for c in self.cameras if c is not None],
                "state_keys": self.preset.state_keys, "state_in_prompt": self.state_in_prompt}

    # -- input side ---------------------------------------------------------------------------

    def _get(self, obs: dict[str, Any], key: str, required: bool = True) -> Any:
        """obs[key] (or the nested obs[a][b] for 'a/b'); a missing optional key gives None."""
        try:
            return lookup(obs, key)
        except KeyError:
            if not required:
                return None
            raise MissingKey(f"observation is missing '{key}' (preset {self.preset.name} expects: "
                             f"{self.preset.description or self.preset.state_keys})") from None

    def prepare(self, obs: dict[str, Any]) -> Observation:
        """A robot observation dict -> model-level Observation (batch 1). Everything is checked against what the
        checkpoint expects before any image is resized or any tensor made."""
        if not isinstance(obs, dict):
            raise BadRequest(f"an observation must be a dict, got {type(obs).__name__}")
        preset = self.preset
        cameras = [(key, None if key is None else self._get(obs, key, required)) for key, required in self.slots]
        images = [None if img is None else to_uint8_hwc(img, key) for key, img in cameras]
        if preset.name == "generic":
            known = {k for k in self.cameras if k is not None}
            unknown = sorted(k for k in obs if isinstance(k, str) and k.startswith("observation.images.") and k not in known)
            if unknown:
                raise BadRequest(f"{', '.join(unknown)}: not a camera of this checkpoint (its cameras: {sorted(known)}); "
                                 "rename the key or leave it out")
            if all(img is None for img in images):
                raise MissingKey(f"observation has none of this checkpoint's cameras {sorted(known)}: send at least one")
        state = np.concatenate([finite_vector(self._get(obs, k), k) for k in preset.state_keys])
        if self.state_len is not None and len(state) != self.state_len:
            raise BadRequest(f"{' + '.join(preset.state_keys)} has {len(state)} values; preset {preset.name} expects "
                             f"{self.state_len} (checked against the checkpoint's features and norm stats)")
        if self.max_state is not None and len(state) > self.max_state:
            raise BadRequest(f"state has {len(state)} values, the model takes at most {self.max_state}")
        prompt = prompt_text(obs.get("prompt", self.default_prompt), "prompt", "no default prompt is set")
        return self.frame_inputs(Frame(images, state, prompt))

    def state_and_images(self, frame: Frame) -> tuple[np.ndarray, list[np.ndarray]]:
        """A frame's state through the preset's map and the normalisation, and its images in the model's form (a
        missing camera: a zero image in [-1, 1])."""
        assert len(frame.images) == len(self.cameras), (len(frame.images), len(self.cameras))
        state = self.preset.state_in(np.array(frame.state, dtype=np.float32))
        if self.normalizer is not None:
            state = self.normalizer.state_in(state)
        size = self.config.vision.image_size
        images = [np.zeros((3, size, size), dtype=np.float32) - 1.0 if img is None else image_to_model(img, size)
                  for img in frame.images]
        return state, images

    def frame_inputs(self, frame: Frame) -> Observation:
        """Checked values -> the model's inputs: the preset's state map, normalisation, images (a missing camera
        masked), prompt tokens."""
        state, images = self.state_and_images(frame)
        tokens, token_mask = self.tokenizer(frame.prompt, state if self.state_in_prompt else None)
        padded = np.zeros(self.config.state_dim, dtype=np.float32)
        padded[: len(state)] = state
        return Observation(
            images=[torch.from_numpy(im)[None] for im in images],
            image_masks=[torch.tensor([img is not None]) for img in frame.images],
            tokens=torch.from_numpy(tokens)[None],
            token_masks=torch.from_numpy(token_mask)[None],
            state=torch.from_numpy(padded)[None],
        )

    # -- output side --------------------------------------------------------------------------

    def actions_out(self, actions: np.ndarray) -> np.ndarray:
        """Model actions [H, action_dim] -> robot actions [H, robot_dim] in robot units."""
        a = np.asarray(actions, dtype=np.float32)[:, : self.action_dim]
        if self.normalizer is not None:
            a = self.normalizer.actions_out(a)
        return self.preset.actions_out(a.copy()).astype(np.float32)

    def actions_in(self, actions: np.ndarray) -> np.ndarray:
        """Robot actions [H, robot_dim] -> the model's space: the preset's inverse map, then normalisation."""
        a = self.preset.actions_in(np.array(actions, dtype=np.float32))
        if self.normalizer is not None:
            a = self.normalizer.actions_in(a)
        return a.astype(np.float32)


def agreed_widths(state_max: int | None, action_max: int, preset: RobotPreset, feats: Any, normalizer: Normalizer | None,
                  source: str) -> tuple[int | None, int]:
    """(robot state values a request must carry (None: any up to the model's), robot action values answered), from
    the preset, the checkpoint's features and its norm stats, which must agree: a preset for another robot than the
    checkpoint's is refused here, before any request. state_max / action_max: the model's widths (None: any)."""
    stats = {"state": None, "actions": None}
    if normalizer is not None:
        stats = {k: getattr(normalizer, k).width if getattr(normalizer, k) is not None else None
                 for k in ("state", "actions")}

    def agree(what: str, model_width: int | None, sources: list[tuple[str, int | None]]) -> int | None:
        known = [(name, n) for name, n in sources if n]
        # norm stats padded to the model's width cover any robot width
        exact = [(name, n) for name, n in known if not (name.startswith("norm stats") and n == model_width)]
        widths = {n for _, n in exact}
        if len(widths) > 1:
            raise ValueError(f"{what} widths disagree: " + ", ".join(f"{name} {n}" for name, n in exact)
                             + f" (stats from {source}): choose the preset of the robot this checkpoint "
                             "was trained for (--preset), or its stats (--asset-id)")
        width = widths.pop() if widths else None
        if width is not None and model_width is not None and width > model_width:
            raise ValueError(f"{what}: {width} values, but the model takes at most {model_width}")
        return width

    state = agree("state", state_max, [(f"preset {preset.name}", preset.state_len),
                                           ("config.json input_features", feats.state),
                                           ("norm stats", stats["state"])])
    actions = agree("actions", action_max, [(f"preset {preset.name}", preset.action_dim),
                                                ("config.json output_features", feats.action),
                                                ("norm stats", stats["actions"])])
    return state, actions or action_max
