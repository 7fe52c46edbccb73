"""A LeRobot checkpoint's own processing pipeline, run the way LeRobot 0.6.1 runs it
(../shared/spec/lerobot_processing.md): the steps of its `policy_preprocessor.json` and
`policy_postprocessor.json`, in their order, with their configs and the stats of the files their
`state_file` names; images as LeRobot's policy treats them (float, `F.interpolate` bilinear without
antialias, clamp, centred padding); the model in between. All arithmetic in float32 torch, as LeRobot.

The observation dict uses LeRobot's names: `observation.images.<cam>` (CHW float in [0, 1], or HWC uint8 as
robots send), `observation.state`, `task` (`prompt` accepted too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi0.errors import BadRequest, MissingKey
from pi0.model.config import Pi0Config
from pi0.model.features import features
from pi0.model.observation import Observation
from pi0.robot.images import checked_image, resize_with_pad_float, to_float_chw
from pi0.robot.pipeline import Frame
from pi0.robot.tokenizer import prompt_text

PRE_STEPS = ("rename_observations_processor", "to_batch_processor", "pi0_new_line_processor", "tokenizer_processor",
             "device_processor", "relative_actions_processor", "normalizer_processor",
             "pi05_prepare_state_tokenizer_processor_step")
POST_STEPS = ("unnormalizer_processor", "absolute_actions_processor", "device_processor")
MODES = ("MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY")
_BOUNDS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


def is_lerobot_pipeline(root: Path) -> bool:
    return (root / "policy_preprocessor.json").is_file() and (root / "policy_postprocessor.json").is_file()


class Normalization:
    """LeRobot's normaliser / unnormaliser step: per feature, the mode of its type in `norm_map`, float32."""

    def __init__(self, config: dict[str, Any], stats: dict[str, torch.Tensor], source: Path):
        self.eps = float(config.get("eps", 1e-8))
        self.features = {k: str(v.get("type", "")).upper() for k, v in (config.get("features") or {}).items()}
        self.norm_map = {str(k).upper(): str(v).upper() for k, v in (config.get("norm_map") or {}).items()}
        for mode in self.norm_map.values():
            if mode not in MODES:
                raise ValueError(f"{source}: normalisation mode {mode!r} is not one of LeRobot's {', '.join(MODES)}")
        self.stats = stats
        self.source = source

    def mode(self, key: str) -> str:
        return self.norm_map.get(self.features.get(key, ""), "IDENTITY")

    def __call__(self, key: str, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        mode = self.mode(key)
        st = {k[len(key) + 1:]: v for k, v in self.stats.items() if k.startswith(key + ".")}
        if mode == "IDENTITY" or key not in self.features or not st:
            return x  # a key without stats passes unchanged
        if mode == "MEAN_STD":
            if "mean" not in st or "std" not in st:
                raise ValueError(f"{self.source}: MEAN_STD for {key} needs its mean and std stats")
            mean, std = st["mean"], st["std"]
            return x * std + mean if inverse else (x - mean) / (std + self.eps)
        lo_name, hi_name = _BOUNDS[mode]
        if lo_name not in st or hi_name not in st:
            raise ValueError(f"{self.source}: {mode} for {key} needs its {lo_name} and {hi_name} stats")
        lo, hi = st[lo_name], st[hi_name]
        denom = hi - lo
        denom = torch.where(denom == 0, torch.tensor(self.eps, dtype=denom.dtype), denom)
        if mode == "MIN_MAX":
            return (x + 1) / 2 * denom + lo if inverse else 2 * (x - lo) / denom - 1
        return (x + 1.0) * denom / 2.0 + lo if inverse else 2.0 * (x - lo) / denom - 1.0


def _read_stats(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"the pipeline names {path.name} as a step's state file, but {path} is missing")
    return {k: v.float() for k, v in load_file(str(path)).items()}


class LeRobotPipeline:
    """Pre-processor -> model inputs and model actions -> post-processor, for one LeRobot checkpoint."""

    pre_steps, post_steps = PRE_STEPS, POST_STEPS  # the steps this pipeline runs (its model's pipelines')

    def __init__(self, root: Path, config: Pi0Config, meta: dict[str, Any], tokenizer_path: str | os.PathLike,
                 default_prompt: str | None = None):
        import sentencepiece

        self.root, self.config = root, config
        self.pre = self._steps(root / "policy_preprocessor.json", self.pre_steps)
        self.post = self._steps(root / "policy_postprocessor.json", self.post_steps)
        feats = features(meta)
        self.cameras = list(feats.cameras)
        if not self.cameras:
            raise ValueError(f"{root}/config.json lists no VISUAL input_features: cannot tell the cameras")
        self.state_key, self.state_len = feats.state_key, feats.state  # the width the normaliser's stats cover
        self.max_state: int | None = getattr(config, "state_dim", None)  # None: the state is text (π0-FAST)
        if self.state_len is not None and self.max_state is not None and self.state_len > self.max_state:
            raise ValueError(f"{root}/config.json: {self.state_key} has {self.state_len} values, the model takes at "
                             f"most {self.max_state}")
        if feats.action is not None and feats.action > config.action_dim:
            raise ValueError(f"{root}/config.json: action has {feats.action} values, the model makes {config.action_dim}")
        self.action_dim = feats.action or config.action_dim
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.tokenizer_path = Path(tokenizer_path)
        self.default_prompt = default_prompt
        self.stats_source = "the checkpoint's LeRobot processors"

    def _steps(self, path: Path, known: tuple[str, ...]) -> list[tuple[str, dict[str, Any], Any]]:
        try:
            spec = json.loads(path.read_text())
            steps = spec["steps"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a LeRobot processor pipeline (needs 'steps'): {e}") from e
        out = []
        for i, step in enumerate(steps):
            name, cfg = step.get("registry_name"), step.get("config") or {}
            if name not in known:
                raise ValueError(f"{path}: step {i} '{name}' is not a step of LeRobot 0.6.1's {self.config.kind} "
                                 f"pipelines ({', '.join(known)}); pi0 cannot run this checkpoint's pipeline")
            if name in ("relative_actions_processor", "absolute_actions_processor") and cfg.get("enabled"):
                raise ValueError(f"{path}: step {i} '{name}' is enabled (relative actions); pi0 does not support it yet")
            if name == "device_processor" and cfg.get("float_dtype") not in (None, "float32"):
                raise ValueError(f"{path}: step {i} casts inputs to {cfg['float_dtype']}; pi0 runs this pipeline in float32 "
                                 "(choose the model dtype with --dtype instead)")
            state = None
            if name in ("normalizer_processor", "unnormalizer_processor"):
                state = Normalization(cfg, _read_stats(self.root / step["state_file"]) if step.get("state_file") else {}, path)
            out.append((name, cfg, state))
        return out

    @property
    def steps(self) -> dict[str, list[str]]:
        return {"preprocessor": [n for n, _, _ in self.pre], "postprocessor": [n for n, _, _ in self.post]}

    @property
    def metadata(self) -> dict[str, Any]:
        return {"preset": "lerobot", "cameras": self.cameras, "state_keys": [self.state_key],
                "expected_keys": self.expected_keys, "pipeline": self.steps}

    @property
    def expected_keys(self) -> list[str]:
        return self.cameras + ([self.state_key] if self.state_key else []) + ["task"]

    # -- pre-processor ----------------------------------------------------------------------------

    def tokenize(self, text: str, max_length: int, padding_side: str) -> tuple[np.ndarray, np.ndarray]:
        """The Hugging Face PaliGemma tokenizer's answer: <bos> + the text in one piece, the first
        max_length ids kept, padded with 0 to max_length."""
        ids = [self.sp.bos_id()] + self.sp.encode(text)
        ids = ids[:max_length]
        tokens = np.zeros(max_length, dtype=np.int64)
        mask = np.zeros(max_length, dtype=bool)
        sl = slice(0, len(ids)) if padding_side == "right" else slice(max_length - len(ids), max_length)
        tokens[sl], mask[sl] = ids, True
        return tokens, mask

    def prepare(self, obs: dict[str, Any]) -> Observation:
        """A raw LeRobot frame -> the model's Observation (batch 1). The frame is checked against the checkpoint's
        features (cameras, state width, the task) before any tensor is made."""
        if not isinstance(obs, dict):
            raise BadRequest(f"an observation must be a dict, got {type(obs).__name__}")
        obs = dict(obs)
        if "task" not in obs and "prompt" in obs:
            obs["task"] = obs.pop("prompt")
        if "task" not in obs and self.default_prompt is not None:
            obs["task"] = self.default_prompt
        for name, cfg, _ in self.pre:  # the names the checks below see are the renamed ones
            if name == "rename_observations_processor":
                for old, new in (cfg.get("rename_map") or {}).items():
                    if old in obs:
                        obs[new] = obs.pop(old)
        images = {k: checked_image(v, k, prefer_chw=True) for k, v in obs.items()
                  if isinstance(k, str) and k.startswith("observation.images.")}
        unknown = sorted(set(images) - set(self.cameras))
        if unknown:
            raise BadRequest(f"{', '.join(unknown)}: not a camera of this checkpoint (its cameras: {self.cameras}); "
                             "rename the key or leave it out")
        if not images:
            raise MissingKey(f"observation has none of this checkpoint's cameras {self.cameras}: at least one is needed")
        state = None
        if self.state_key:
            if self.state_key not in obs:
                raise MissingKey(f"observation is missing '{self.state_key}' (this checkpoint expects: "
                                 f"{self.expected_keys})")
            state = np.asarray(obs[self.state_key])
            if state.dtype.kind not in "uif" or state.ndim != 1:
                raise BadRequest(f"{self.state_key} must be a 1-D numeric array, got dtype {state.dtype} shape "
                                 f"{list(state.shape)}")
            if self.state_len is not None and len(state) != self.state_len:
                raise BadRequest(f"{self.state_key} has {len(state)} values; this checkpoint expects {self.state_len} "
                                 "(its config.json input_features)")
            if self.max_state is not None and len(state) > self.max_state:
                raise BadRequest(f"{self.state_key} has {len(state)} values; the model takes at most {self.max_state}")
            if not np.isfinite(state).all():
                raise BadRequest(f"{self.state_key} holds NaN or infinite values")
        self._task(obs)
        # checked: now the pipeline's steps
        frame: dict[str, Any] = {k: v for k, v in obs.items() if k not in images and k != self.state_key}
        frame.update({k: to_float_chw(v) for k, v in images.items()})
        if state is not None:
            frame[self.state_key] = torch.from_numpy(state.astype(np.float32))
        tokens = mask = None
        for name, cfg, norm in self.pre:
            if name == "pi0_new_line_processor":
                task = self._task(frame)
                frame["task"] = task if task.endswith("\n") else task + "\n"
            elif name == "normalizer_processor":
                for key in list(frame):
                    if isinstance(frame[key], torch.Tensor):
                        frame[key] = norm(key, frame[key])
            elif name in ("pi05_prepare_state_tokenizer_processor_step",
                          "pi0_fast_prepare_state_tokenizer_processor_step"):
                bins = np.digitize(frame[self.state_key].numpy(), np.linspace(-1, 1, 256 + 1)[:-1]) - 1
                clean = self._task(frame).strip().replace("_", " ").replace("\n", " ")
                answer = "Action: " if name.startswith("pi05") else ""  # π0-FAST's model answers "Action: " itself
                frame["task"] = f"Task: {clean}, State: {' '.join(map(str, bins))};\n{answer}"
            elif name == "tokenizer_processor":
                task_key = cfg.get("task_key", "task")
                if task_key != "task" and task_key not in frame:
                    frame[task_key] = frame.get("task")
                text = self._task(frame, task_key)
                tokens, mask = self.tokenize(text, int(cfg.get("max_length", self.config.max_token_len)),
                                             cfg.get("padding_side", "right"))
        if tokens is None:
            raise ValueError(f"{self.root}/policy_preprocessor.json has no tokenizer_processor step")
        return self._model_inputs(frame, tokens, mask)

    def _task(self, frame: dict[str, Any], key: str = "task") -> str:
        return prompt_text(frame.get(key), key, f"this checkpoint expects: {self.expected_keys}")

    def _images(self, frame: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The cameras as LeRobot's policy feeds them: the present ones in the checkpoint's order, resized with
        padding into [-1, 1], then the absent ones as -1 images with their masks off. Each [1, 3, S, S], [1]."""
        size = self.config.vision.image_size
        present = [k for k in self.cameras if k in frame]
        if not present:
            raise MissingKey(f"observation has none of this checkpoint's cameras {self.cameras}: at least one is needed")
        images = [resize_with_pad_float(frame[k], size) * 2.0 - 1.0 for k in present]
        images += [torch.full((3, size, size), -1.0) for k in self.cameras if k not in frame]
        masks = [True] * len(present) + [False] * (len(self.cameras) - len(present))
        return [im[None] for im in images], [torch.tensor([m]) for m in masks]

    def _model_inputs(self, frame: dict[str, Any], tokens: np.ndarray, mask: np.ndarray) -> Observation:
        images, masks = self._images(frame)
        state = torch.zeros(self.config.state_dim)
        if self.state_key:
            s = frame[self.state_key].float()
            if len(s) > self.config.state_dim:
                raise BadRequest(f"{self.state_key} has {len(s)} values; the model takes at most {self.config.state_dim}")
            state[: len(s)] = s
        return Observation(images, masks, torch.from_numpy(tokens)[None], torch.from_numpy(mask)[None], state[None])

    # -- post-processor ---------------------------------------------------------------------------

    def frame_inputs(self, frame: Frame) -> Observation:
        """A dataset frame -> the model's inputs, through the same steps as a robot's observation."""
        assert len(frame.images) == len(self.cameras), (len(frame.images), len(self.cameras))
        obs: dict[str, Any] = {k: img for k, img in zip(self.cameras, frame.images) if img is not None}
        if self.state_key:
            obs[self.state_key] = frame.state
        obs["task"] = frame.prompt
        return self.prepare(obs)

    def actions_out(self, actions: np.ndarray) -> np.ndarray:
        """Model actions [H, 32] -> robot actions [H, action feature length], the post-processor's steps."""
        a = torch.from_numpy(np.asarray(actions, dtype=np.float32)[:, : self.action_dim].copy())
        for name, _, norm in self.post:
            if name == "unnormalizer_processor":
                a = norm("action", a, inverse=True)
        return a.numpy().astype(np.float32)

    def actions_in(self, actions: np.ndarray) -> np.ndarray:
        """Robot actions -> the model's space: the post-processor's unnormaliser inverted (LeRobot's training
        normalises the targets with the same stats)."""
        a = torch.from_numpy(np.array(actions, dtype=np.float32))
        for name, _, norm in reversed(self.post):
            if name == "unnormalizer_processor":
                a = norm("action", a)
        return a.numpy().astype(np.float32)


def describe(root: Path) -> dict[str, Any]:
    """What `pi0.Policy` will run for a checkpoint, from the files alone (for `pi0 inspect`)."""
    if not is_lerobot_pipeline(root):
        return {"convention": "openpi", "steps": "openpi's: resize_with_pad (PIL), uint8 images, cleaned prompt, "
                "norm_stats.json from assets/ (z-score for pi0, quantiles for pi0.5), or a robot preset"}
    out: dict[str, Any] = {"convention": "lerobot", "normalization": {}}
    for which in ("preprocessor", "postprocessor"):
        steps = json.loads((root / f"policy_{which}.json").read_text()).get("steps", [])
        out[which] = [s.get("registry_name") for s in steps]
        for s in steps:
            if s.get("registry_name") in ("normalizer_processor", "unnormalizer_processor"):
                out["normalization"][which] = (s.get("config") or {}).get("norm_map")
    return out
