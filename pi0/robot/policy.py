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

from pi0.backends.factory import load_from_info
from pi0.checkpoint.info import CheckpointInfo
from pi0.checkpoint.load import inspect_checkpoint
from pi0.errors import BadRequest, NoActions
from pi0.hardware import resolve_device, resolve_dtype
from pi0.model.fast_config import FastConfig
from pi0.model.features import features
from pi0.model.observation import Observation, concat_observations, sample_observation
from pi0.model.rtc import RTC, RTCDefaults
from pi0.robot.assets import find_tokenizer
from pi0.robot.fast import FastDecodeError
from pi0.robot.fast_pipeline import OpenpiFastPipeline
from pi0.robot.lerobot import LeRobotPipeline, is_lerobot_pipeline
from pi0.robot.lerobot_fast import LeRobotFastPipeline
from pi0.robot.openpi import OpenpiPipeline
from pi0.robot.pipeline import Frame, Pipeline


def make_pipeline(info: CheckpointInfo, *, preset: str | None = None, tokenizer: str | os.PathLike | None = None,
                  asset_id: str | None = None, state_in_prompt: bool | None = None,
                  default_prompt: str | None = None, fast_tokenizer: str | os.PathLike | None = None,
                  norm: str | None = None) -> Pipeline:
    """The pipeline a checkpoint is served with: a LeRobot checkpoint's own processors when it has them and no
    preset is asked for, else openpi's conventions with `preset` (None: the one config.json records, else
    `generic` from its features). π0-FAST likewise (a LeRobot checkpoint's own π0-FAST processors, else openpi's FAST
    conventions), with its FAST tokenizer and, for openpi's, the normalisation `norm` (None: the one the checkpoint
    records, else quantiles)."""
    root = info.files.root
    path = find_tokenizer(tokenizer, root)
    if isinstance(info.config, FastConfig):
        if state_in_prompt is False:
            raise ValueError("π0-FAST reads the state only from its prompt: state_in_prompt=False does not apply")
        if preset is None and is_lerobot_pipeline(root):
            if norm is not None:
                raise ValueError(f"{root} is a LeRobot checkpoint: its processors carry its normalisation; leave norm "
                                 "(--norm) out")
            return LeRobotFastPipeline(root, info.config, info.meta, path, fast_tokenizer=fast_tokenizer,
                                       default_prompt=default_prompt)
        return OpenpiFastPipeline.for_checkpoint(info, preset=preset, tokenizer=path, fast_tokenizer=fast_tokenizer,
                                                 asset_id=asset_id, norm=norm, default_prompt=default_prompt)
    if fast_tokenizer is not None or norm is not None:
        raise ValueError("fast_tokenizer and norm apply to π0-FAST checkpoints; this one is " + info.config.kind)
    if preset is None and is_lerobot_pipeline(root):
        return LeRobotPipeline(root, info.config, info.meta, path, default_prompt=default_prompt)
    return OpenpiPipeline.for_checkpoint(info, preset=preset, tokenizer=path, asset_id=asset_id,
                                         state_in_prompt=state_in_prompt, default_prompt=default_prompt)


class Policy:
    """Robot preset -> normalise -> images -> prompt tokens -> model -> unnormalise -> robot actions.

    checkpoint: directory, .safetensors or hub id (as `pi0.load_model`). preset: `libero`, `aloha`, `droid`,
    `metaworld`, `generic` (cameras and dims from the checkpoint's LeRobot features), or None: a LeRobot checkpoint's
    own processors, else the preset config.json records (`pi0 train --preset`), else `generic` when the checkpoint
    describes its features. seed: None draws fresh noise per call (openpi's behaviour); an int
    gives the same noise every call (reproducible answers). state_in_prompt: pi0.5 only; False is the
    `pi05_libero` choice of leaving the discretised state out of the prompt. dtype / device: "auto" picks
    bf16 where the machine runs it natively (else fp32) and a CUDA GPU when there is one
    (`self.dtype_reason` says why). action_horizon: override the checkpoint's (openpi Orbax checkpoints
    record none: 50 is assumed). progress: called with the fraction of the weights read (Orbax). download: fetch
    a hub id missing from the huggingface_hub cache (nothing is downloaded otherwise).

    π0-FAST checkpoints: the answer is decoded from greedy action tokens (no noise, seed, num_steps or RTC);
    fast_tokenizer: the FAST tokenizer's directory (None: the checkpoint's `fast_tokenizer/`, config.json's, or the
    hub cache's physical-intelligence/fast); norm: MEAN_STD / QUANTILES for a checkpoint that records no mode (one
    that does refuses another); decode_int8: the engine's decoding steps with weight-only int8 weights (half the
    bytes a token; `pi0.backends.engine.gemv`). A row whose tokens hold no chunk is answered with
    `pi0.errors.NoActions`."""

    def __init__(self, checkpoint: str | os.PathLike, *, preset: str | None = None, backend: str = "engine",
                 dtype: str | torch.dtype = "auto", device: str | torch.device = "auto", tokenizer: str | os.PathLike | None = None,
                 asset_id: str | None = None, state_in_prompt: bool | None = None, num_steps: int | None = None,
                 default_prompt: str | None = None, seed: int | None = None, action_horizon: int | None = None,
                 progress: Callable[[float], None] | None = None, rtc_defaults: RTCDefaults | None = None,
                 download: bool = False, fast_tokenizer: str | os.PathLike | None = None, norm: str | None = None,
                 decode_int8: bool = False):
        self.info = inspect_checkpoint(checkpoint, action_horizon=action_horizon, download=download)
        self.config = self.info.config
        self.pipeline: Pipeline = make_pipeline(self.info, preset=preset, tokenizer=tokenizer, asset_id=asset_id,
                                                state_in_prompt=state_in_prompt, default_prompt=default_prompt,
                                                fast_tokenizer=fast_tokenizer, norm=norm)
        self.fast = isinstance(self.config, FastConfig)  # decodes action tokens instead of flow steps
        self.state_len, self.action_dim = self.pipeline.state_len, self.pipeline.action_dim
        self.num_steps = num_steps
        self.seed = seed
        self.rtc_defaults = rtc_defaults or RTCDefaults()
        self.device = resolve_device(device)
        torch_dtype, self.dtype_reason = resolve_dtype(dtype, self.device)
        self.backend, self.dtype = backend, str(torch_dtype).replace("torch.", "")
        self.model = load_from_info(self.info, backend=backend, dtype=torch_dtype, device=self.device, progress=progress)
        if decode_int8:
            if not self.fast or not hasattr(self.model, "quantize_decoding"):
                raise ValueError(f"decode_int8 applies to π0-FAST on the engine backend; this is {self.config.kind} on "
                                 f"{backend}")
            self.model.quantize_decoding()

    @property
    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        shapes = features(self.info.meta).camera_shapes
        return {
            "model": cfg.kind, "action_horizon": cfg.action_horizon, "action_dim": self.action_dim,
            "state_len": self.state_len, "image_hw": list(next(iter(shapes.values()))[-2:]) if shapes else
            [cfg.vision.image_size] * 2,
            "backend": self.backend, "dtype": self.dtype, "device": str(self.device),
            "norm_stats": self.pipeline.stats_source, "rtc_defaults": dataclasses.asdict(self.rtc_defaults),
            **self.pipeline.metadata,
        }

    def prepare(self, obs: dict[str, Any]) -> Observation:
        """A robot observation dict -> model-level Observation (batch 1), through the checkpoint's pipeline. Everything
        is checked against what the checkpoint expects before any image is resized or any tensor made: BadRequest
        (MissingKey) names the offending key, what it should be and what came."""
        return self.pipeline.prepare(obs)

    def postprocess(self, actions: np.ndarray) -> np.ndarray:
        """Model actions [H, action_dim] -> robot actions [H, robot_dim] in robot units."""
        return self.pipeline.actions_out(actions)

    def warmup(self, batches: tuple[int, ...] = (1,)) -> float:
        """Pay one-time costs before the first robot asks: on a model whose calls run as buckets (the engine on a
        GPU: `pi0.backends.engine.graphs`), every bucket of the robot's cameras, each prompt length and these batch
        sizes is prepared (captured); otherwise one full call on a synthetic observation shaped like the robot's
        (compiling kernels). Returns its seconds."""
        t0 = time.perf_counter()
        if self.fast:  # the prefill and one decoding step, for each batch size
            for b in batches:
                frame = _warm_frame(self.pipeline, self.config.vision.image_size)
                obs = concat_observations([self.pipeline.frame_inputs(frame)] * b)
                self.model.generate(obs.images, obs.image_masks, obs.tokens, obs.token_masks,
                                    end_ids=self.pipeline.end_ids, max_steps=2)
            return time.perf_counter() - t0
        runner = getattr(self.model, "runner", None)
        if runner is not None:
            cameras = sum(c is not None for c in self.pipeline.cameras)
            runner.warm(cameras, self.config.max_token_len, batches, self.num_steps or self.config.num_steps)
            return time.perf_counter() - t0
        obs = sample_observation(self.config, num_cameras=len(self.pipeline.cameras),
                                 num_valid_tokens=self.config.max_token_len)
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
        out = self.infer_batch([obs], noise=None if noise is None else [noise])[0]
        if isinstance(out, NoActions):
            raise out
        return out

    def prepare_request(self, obs: dict[str, Any], noise: np.ndarray | torch.Tensor | None = None) -> Prepared:
        """One robot observation (with its optional "rtc") validated and turned into model inputs, before any
        model work: BadRequest names what is wrong. Cheap and thread-safe: a server prepares rows in parallel,
        off the model's thread. noise: [H, action_dim] (None: the policy's seed's, else fresh)."""
        if self.fast:
            if isinstance(obs, dict) and "rtc" in obs:
                raise BadRequest("'rtc' guides flow matching; this server runs π0-FAST, which decodes tokens: leave "
                                 "'rtc' out")
            if noise is not None:
                raise BadRequest("noise applies to flow matching; π0-FAST decodes greedily: leave it out")
            return Prepared(self.prepare(obs), None, None)
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
        if self.fast:
            return self._decode(inputs, t0)
        stages: dict[str, float] = {}
        actions = self.model.sample_actions(inputs, noise=torch.stack([r.noise for r in rows]), num_steps=self.num_steps,
                                            rtc=[r.rtc for r in rows], stages=stages)
        actions = actions.cpu().numpy()
        ms = (time.perf_counter() - t0) * 1000.0
        return [{"actions": self.postprocess(a), "model_actions": a.astype(np.float32),
                 "policy_timing": {"infer_ms": ms, "batch_size": len(rows), "stages_s": stages}} for a in actions]

    def _decode(self, inputs: Observation, t0: float) -> list[dict[str, Any] | NoActions]:
        """π0-FAST rows: greedy ids in one batch (each row stops at its end), each row's chunk decoded on its own; a
        row whose ids hold none is its FastDecodeError (a NoActions), the others answer as usual."""
        stages: dict[str, float] = {}
        ids = self.model.generate(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks,
                                  end_ids=self.pipeline.end_ids, stages=stages).cpu()
        ms = (time.perf_counter() - t0) * 1000.0
        out: list[dict[str, Any] | NoActions] = []
        for row in ids.tolist():
            try:
                chunk = self.pipeline.chunk(row)
            except FastDecodeError as e:
                out.append(e)
                continue
            timing = {"infer_ms": ms, "batch_size": len(ids), "stages_s": stages,
                      "tokens": _generated(row, self.pipeline.end_ids)}
            out.append({"actions": self.postprocess(chunk), "model_actions": chunk, "policy_timing": timing})
        return out

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
    """One request's model inputs: the observation (batch 1), its RTC guidance (or None) and its noise (None for
    π0-FAST, which decodes greedily)."""

    inputs: Observation
    rtc: RTC | None
    noise: torch.Tensor | None


def _warm_frame(pipeline: Pipeline, size: int) -> Frame:
    """A synthetic frame shaped like the robot's: every camera (size x size), its state width (none where any width
    goes), a short prompt."""
    rng = np.random.default_rng(0)
    images = [None if k is None else rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in pipeline.cameras]
    return Frame(images, np.zeros(pipeline.state_len or 0, dtype=np.float32), "warm up")


def _generated(row: list[int], end_ids: list[int]) -> int:
    """Ids a row generated up to and including its first end id."""
    return next((i + 1 for i, t in enumerate(row) if t in end_ids), len(row))
