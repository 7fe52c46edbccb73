"""`pi0.Policy`: a robot's observation dict in, an action chunk in robot units out."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pi0.checkpoint import inspect_checkpoint
from pi0.config import features
from pi0.errors import BadRequest, MissingKey
from pi0.hardware import resolve_device, resolve_dtype
from pi0.lerobot_pipeline import LeRobotPipeline, is_lerobot_pipeline
from pi0.models import load_from_info
from pi0.observation import Observation, concat_observations, sample_observation
from pi0.processing import (
    PRESETS, PromptTokenizer, RobotPreset, finite_vector, find_tokenizer, generic_preset, image_to_model,
    load_norm_stats, lookup, prompt_text, to_uint8_hwc,
)
from pi0.rtc import RTC, SCHEDULES


@dataclass(frozen=True)
class RTCDefaults:
    """What a request's "rtc" map may leave out (`pi0 serve --rtc-horizon --rtc-schedule --rtc-max-guidance`),
    checked when made: a server whose defaults would make every RTC request fail does not start."""

    execution_horizon: int = 10
    schedule: str = "linear"
    max_guidance_weight: float = 10.0

    def __post_init__(self) -> None:
        h, beta = self.execution_horizon, self.max_guidance_weight
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"--rtc-horizon must be an integer >= 1 (how far into a new chunk the previous one still "
                             f"pulls), got {h!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--rtc-schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"--rtc-max-guidance must be a finite number > 0, got {beta!r}")


class Policy:
    """Robot preset -> normalise -> images -> prompt tokens -> model -> unnormalise -> robot actions.

    checkpoint: directory, .safetensors or hub id (as `pi0.load_model`). preset: `libero`, `aloha`, `droid`,
    `generic` (cameras and dims from the checkpoint's LeRobot features), or None to pick `generic` when the
    checkpoint describes its features. seed: None draws fresh noise per call (openpi's behaviour); an int
    gives the same noise every call (reproducible answers). state_in_prompt: pi0.5 only; False is the
    `pi05_libero` choice of leaving the discretised state out of the prompt. dtype / device: "auto" picks
    bf16 where the machine runs it natively (else fp32) and a CUDA GPU when there is one
    (`self.dtype_reason` says why). action_horizon: override the checkpoint's (openpi Orbax checkpoints
    record none: 50 is assumed). progress: called with the fraction of the weights read (Orbax). download: fetch
    a hub id missing from the huggingface_hub cache (nothing is downloaded otherwise)."""

    def __init__(self, checkpoint: str | os.PathLike, *, preset: str | None = None, backend: str = "engine",
                 dtype: str | torch.dtype = "auto", device: str | torch.device = "auto", tokenizer: str | os.PathLike | None = None,
                 asset_id: str | None = None, state_in_prompt: bool | None = None, num_steps: int | None = None,
                 default_prompt: str | None = None, seed: int | None = None, action_horizon: int | None = None,
                 progress: Callable[[float], None] | None = None, rtc_defaults: RTCDefaults | None = None,
                 download: bool = False):
        self.info = inspect_checkpoint(checkpoint, action_horizon=action_horizon, download=download)
        cfg = self.info.config
        self.config = cfg
        root = self.info.files.root
        self.pipeline: LeRobotPipeline | None = None
        if preset is None and is_lerobot_pipeline(root):
            # a LeRobot checkpoint runs its own processors, exactly (openpi checkpoints: openpi's conventions)
            self.pipeline = LeRobotPipeline(root, cfg, self.info.meta, find_tokenizer(tokenizer, root))
            self.preset, self.normalizer, self.stats_source = None, None, "the checkpoint's LeRobot processors"
        else:
            self.preset = self._resolve_preset(preset)
            self.tokenizer = PromptTokenizer(find_tokenizer(tokenizer, root), cfg.max_token_len)
            # pi0: z-score, pi0.5: quantiles, unless a LeRobot config.json says otherwise (normalization_mapping)
            default = "QUANTILES" if cfg.pi05 else "MEAN_STD"
            mapping = self.info.meta.get("normalization_mapping")
            mapping = {str(k).upper(): str(v).upper() for k, v in mapping.items()} if isinstance(mapping, dict) else {}
            self.normalizer, self.stats_source = load_norm_stats(
                root, asset_id, mapping.get("STATE", default), mapping.get("ACTION", default))
        if state_in_prompt is None:
            state_in_prompt = bool(self.info.meta.get("discrete_state_input", True))
        self.state_in_prompt = cfg.pi05 and state_in_prompt
        self.num_steps = num_steps
        self.default_prompt = default_prompt
        self.seed = seed
        self.rtc_defaults = rtc_defaults or RTCDefaults()
        self.device = resolve_device(device)
        torch_dtype, self.dtype_reason = resolve_dtype(dtype, self.device)
        self.backend, self.dtype = backend, str(torch_dtype).replace("torch.", "")
        self.model = load_from_info(self.info, backend=backend, dtype=torch_dtype, device=self.device, progress=progress)
        if self.pipeline is not None:
            self.action_dim = self.pipeline.action_dim
            self.state_len = self.pipeline.state_dim
            return
        self.state_len, self.action_dim = self._check_widths()

    def _resolve_preset(self, name: str | None) -> RobotPreset:
        feats = features(self.info.meta)
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

    def _check_widths(self) -> tuple[int | None, int]:
        """(robot state values a request must carry (None: any up to the model's), robot action values answered),
        from the preset, the checkpoint's features and its norm stats, which must agree: a preset for another robot
        than the checkpoint's is refused here, before any request."""
        cfg, preset, feats = self.config, self.preset, features(self.info.meta)
        stats = {"state": None, "actions": None}
        if self.normalizer is not None:
            stats = {k: getattr(self.normalizer, k).width if getattr(self.normalizer, k) is not None else None
                     for k in ("state", "actions")}

        def agree(what: str, model_width: int, sources: list[tuple[str, int | None]]) -> int | None:
            known = [(name, n) for name, n in sources if n]
            # norm stats padded to the model's width cover any robot width
            exact = [(name, n) for name, n in known if not (name.startswith("norm stats") and n == model_width)]
            widths = {n for _, n in exact}
            if len(widths) > 1:
                raise ValueError(f"{what} widths disagree: " + ", ".join(f"{name} {n}" for name, n in exact)
                                 + f" (stats from {self.stats_source}): choose the preset of the robot this checkpoint "
                                 "was trained for (--preset), or its stats (--asset-id)")
            width = widths.pop() if widths else None
            if width is not None and width > model_width:
                raise ValueError(f"{what}: {width} values, but the model takes at most {model_width}")
            return width

        state = agree("state", cfg.state_dim, [(f"preset {preset.name}", preset.state_len),
                                               ("config.json input_features", feats.state),
                                               ("norm stats", stats["state"])])
        actions = agree("actions", cfg.action_dim, [(f"preset {preset.name}", preset.action_dim),
                                                    ("config.json output_features", feats.action),
                                                    ("norm stats", stats["actions"])])
        return state, actions or cfg.action_dim

    @property
    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        shapes = features(self.info.meta).camera_shapes
        common = {
            "model": cfg.kind, "action_horizon": cfg.action_horizon, "action_dim": self.action_dim,
            "state_len": self.state_len, "image_hw": list(next(iter(shapes.values()))[-2:]) if shapes else
            [cfg.vision.image_size] * 2,
            "backend": self.backend, "dtype": self.dtype, "device": str(self.device), "norm_stats": self.stats_source,
            "rtc_defaults": dataclasses.asdict(self.rtc_defaults),
        }
        if self.pipeline is not None:
            return {**common, "preset": "lerobot", "cameras": self.pipeline.cameras,
                    "state_keys": [self.pipeline.state_key], "expected_keys": self.pipeline.expected_keys,
                    "pipeline": self.pipeline.steps}
        return {**common, "preset": self.preset.name, "cameras": [c for c, _ in self.preset.cameras],
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
        checkpoint expects before any image is resized or any tensor made: BadRequest (MissingKey) names the
        offending key, what it should be and what came."""
        if self.pipeline is not None:
            return self.pipeline.prepare(obs)
        if not isinstance(obs, dict):
            raise BadRequest(f"an observation must be a dict, got {type(obs).__name__}")
        preset = self.preset
        cameras = [(key, None if key is None else self._get(obs, key, required)) for key, required in preset.cameras]
        cameras = [(key, None if img is None else to_uint8_hwc(img, key)) for key, img in cameras]
        if preset.name == "generic":
            known = {k for k, _ in preset.cameras}
            unknown = sorted(k for k in obs if isinstance(k, str) and k.startswith("observation.images.") and k not in known)
            if unknown:
                raise BadRequest(f"{', '.join(unknown)}: not a camera of this checkpoint (its cameras: {sorted(known)}); "
                                 "rename the key or leave it out")
            if all(img is None for _, img in cameras):
                raise MissingKey(f"observation has none of this checkpoint's cameras {sorted(known)}: send at least one")
        state = np.concatenate([finite_vector(self._get(obs, k), k) for k in preset.state_keys])
        if self.state_len is not None and len(state) != self.state_len:
            raise BadRequest(f"{' + '.join(preset.state_keys)} has {len(state)} values; preset {preset.name} expects "
                             f"{self.state_len} (checked against the checkpoint's features and norm stats)")
        if len(state) > self.config.state_dim:
            raise BadRequest(f"state has {len(state)} values, the model takes at most {self.config.state_dim}")
        prompt = prompt_text(obs.get("prompt", self.default_prompt), "prompt", "no default prompt is set")
        # checked: now the work
        state = preset.state_in(state.copy())
        if self.normalizer is not None:
            state = self.normalizer.state_in(state)
        size = self.config.vision.image_size
        images = [np.zeros((3, size, size), dtype=np.float32) - 1.0 if img is None else image_to_model(img, size)
                  for _, img in cameras]  # a missing camera: a zero image in [-1, 1], masked
        tokens, token_mask = self.tokenizer(prompt, state if self.state_in_prompt else None)
        padded = np.zeros(self.config.state_dim, dtype=np.float32)
        padded[: len(state)] = state
        return Observation(
            images=[torch.from_numpy(im)[None] for im in images],
            image_masks=[torch.tensor([img is not None]) for _, img in cameras],
            tokens=torch.from_numpy(tokens)[None],
            token_masks=torch.from_numpy(token_mask)[None],
            state=torch.from_numpy(padded)[None],
        )

    # -- output side --------------------------------------------------------------------------

    def postprocess(self, actions: np.ndarray) -> np.ndarray:
        """Model actions [H, action_dim] -> robot actions [H, robot_dim] in robot units."""
        if self.pipeline is not None:
            return self.pipeline.postprocess(actions)
        a = np.asarray(actions, dtype=np.float32)[:, : self.action_dim]
        if self.normalizer is not None:
            a = self.normalizer.actions_out(a)
        return self.preset.actions_out(a.copy()).astype(np.float32)

    def warmup(self) -> float:
        """One full model call on a synthetic observation shaped like the robot's (all cameras, the full
        prompt length), so that one-time costs (compiling kernels) are paid before the first robot asks.
        Returns its seconds."""
        t0 = time.perf_counter()
        cams = len(self.pipeline.cameras) if self.pipeline is not None else len(self.preset.cameras)
        obs = sample_observation(self.config, num_cameras=cams, num_valid_tokens=self.config.max_token_len)
        self.model.sample_actions(obs, num_steps=self.num_steps)
        return time.perf_counter() - t0

    def rtc_from_request(self, request: Any) -> RTC:
        """A request's "rtc" map -> pi0.RTC, with this policy's defaults for the optional fields.
        Raises BadRequest naming the field that is wrong."""
        if not isinstance(request, dict):
            raise BadRequest(f"'rtc' must be a map with prev_actions and inference_delay, got {type(request).__name__}")
        request = {k.decode() if isinstance(k, bytes) else k: v for k, v in request.items()}
        unknown = set(request) - {"prev_actions", "inference_delay", "execution_horizon", "schedule", "max_guidance_weight"}
        if unknown:
            raise BadRequest(f"'rtc' has unknown fields {sorted(unknown)}: it takes prev_actions, inference_delay, "
                             "execution_horizon, schedule, max_guidance_weight")
        for key in ("prev_actions", "inference_delay"):
            if key not in request:
                raise BadRequest(f"'rtc' needs '{key}'")
        prev = np.asarray(request["prev_actions"])
        if prev.dtype.kind not in "fiu":
            raise BadRequest(f"rtc prev_actions must be a numeric array [T_prev, D_prev], got dtype {prev.dtype}")
        if prev.ndim != 2:
            raise BadRequest(f"rtc prev_actions must be [T_prev, D_prev] (rows of an earlier reply's model_actions), "
                             f"got shape {list(prev.shape)}")

        def integer(key: str, value: Any) -> int:
            if isinstance(value, (np.integer, int)) and not isinstance(value, (bool, np.bool_)):
                return int(value)
            raise BadRequest(f"rtc {key} must be an integer, got {value!r}")

        def number(key: str, value: Any) -> float:
            if isinstance(value, (np.integer, np.floating, int, float)) and not isinstance(value, (bool, np.bool_)):
                return float(value)
            raise BadRequest(f"rtc {key} must be a number, got {value!r}")

        def text(key: str, value: Any) -> str:
            if isinstance(value, (bytes, np.bytes_)):
                value = bytes(value).decode(errors="replace")
            if isinstance(value, (str, np.str_)):
                return str(value)
            raise BadRequest(f"rtc {key} must be a string, got {value!r}")

        d = self.rtc_defaults
        rtc = RTC(prev_actions=torch.from_numpy(prev.astype(np.float32))[None],
                  inference_delay=integer("inference_delay", request["inference_delay"]),
                  execution_horizon=integer("execution_horizon", request.get("execution_horizon", d.execution_horizon)),
                  schedule=text("schedule", request.get("schedule", d.schedule)),
                  max_guidance_weight=number("max_guidance_weight", request.get("max_guidance_weight",
                                                                                 d.max_guidance_weight)))
        try:
            rtc.validate(1, self.config.action_horizon, self.config.action_dim)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return rtc

    def infer(self, obs: dict[str, Any], *, noise: np.ndarray | torch.Tensor | None = None) -> dict[str, Any]:
        """One action chunk: {"actions": [H, robot_dim] in robot units, "model_actions": [H, action_dim]
        (model space, before unnormalisation: hand its unexecuted rows back as rtc prev_actions),
        "policy_timing"}. obs may carry "rtc" (see rtc_from_request). noise: [H, action_dim] float32 for a
        reproducible answer; else the policy's seed, else fresh noise."""
        return self.infer_batch([obs], noise=None if noise is None else [noise])[0]

    def prepare_request(self, obs: dict[str, Any], noise: np.ndarray | torch.Tensor | None = None) -> Prepared:
        """One robot observation (with its optional "rtc") validated and turned into model inputs, before any
        model work: BadRequest names what is wrong. Cheap and thread-safe: a server prepares rows in parallel,
        off the model's thread. noise: [H, action_dim] (None: the policy's seed's, else fresh)."""
        rtc = self.rtc_from_request(obs["rtc"]) if isinstance(obs, dict) and "rtc" in obs else None
        inputs = self.prepare(obs)
        cfg = self.config
        shape = (cfg.action_horizon, cfg.action_dim)
        if noise is not None:
            n = torch.as_tensor(np.asarray(noise, dtype=np.float32))
            if n.numel() != math.prod(shape) or n.shape[-2:] != shape:
                raise BadRequest(f"noise must be [{cfg.action_horizon}, {cfg.action_dim}], got {list(n.shape)}")
            n = n.reshape(shape)
        elif self.seed is not None:
            n = torch.randn((1, *shape), generator=torch.Generator().manual_seed(self.seed))[0]
        else:
            n = torch.randn(shape)
        return Prepared(inputs, rtc, n)

    def run_prepared(self, rows: list[Prepared]) -> list[dict[str, Any]]:
        """Prepared rows answered by one forward with a batch dimension; each row's answer equals the row
        answered alone (to fp32 rounding)."""
        t0 = time.perf_counter()
        inputs = concat_observations([r.inputs for r in rows])
        stages: dict[str, float] = {}
        actions = self.model.sample_actions(inputs, noise=torch.stack([r.noise for r in rows]), num_steps=self.num_steps,
                                            rtc=[r.rtc for r in rows], stages=stages)
        actions = actions.cpu().numpy()
        ms = (time.perf_counter() - t0) * 1000.0
        return [{"actions": self.postprocess(a), "model_actions": a.astype(np.float32),
                 "policy_timing": {"infer_ms": ms, "batch_size": len(rows), "stages_s": stages}} for a in actions]

    def infer_batch(self, observations: list[dict[str, Any]], *,
                    noise: list[np.ndarray | torch.Tensor | None] | None = None) -> list[dict[str, Any]]:
        """Several observations (robots, environments) in one forward with a batch dimension: rows may have
        different prompt lengths, masked cameras and their own "rtc"; each row's answer equals the same
        observation answered alone (to fp32 rounding). noise: one [H, action_dim] per row (None: the seed's,
        else fresh)."""
        if not isinstance(observations, (list, tuple)) or not observations:
            raise BadRequest("infer_batch needs a non-empty list of observations")
        if noise is not None and len(noise) != len(observations):
            raise BadRequest(f"{len(noise)} noise arrays for {len(observations)} observations: give one per row (or None)")
        return self.run_prepared([self.prepare_request(o, None if noise is None else noise[i])
                                  for i, o in enumerate(observations)])


@dataclass
class Prepared:
    """One request's model inputs: the observation (batch 1), its RTC guidance (or None) and its noise."""

    inputs: Observation
    rtc: RTC | None
    noise: torch.Tensor
