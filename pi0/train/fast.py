"""π0-FAST in `pi0 train`: its model size, its FAST tokenizer (given, the --init checkpoint's, or fitted on the
dataset's normalised chunks as `pi0 fast-tokenizer` fits one), the pipeline it is trained and served with (openpi's
FAST conventions), and its loss: the next-token cross-entropy of the answer `"Action: " tokens "|" EOS`, the prompt's
last position predicting its first token (openpi's objective), averaged over the batch's answer tokens (LeRobot's
reduction)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np
from torch import Tensor, nn

from pi0.data.dataset import LeRobotDataset
from pi0.data.mixture import DatasetMixture
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig
from pi0.model.observation import Observation
from pi0.robot.fast import FastTokenizer
from pi0.robot.fast_pipeline import SKIP_TOKENS, FastText, OpenpiFastPipeline
from pi0.robot.normalize import Normalizer
from pi0.robot.presets import RobotPreset

MODELS = ("pi0", "pi0_fast")  # what `pi0 train --model` builds from --size (pi0 covers pi0.5's sizes)


def fast_size_config(size: Pi0Config, text_vocab: int, fast_vocab: int, action_dim: int, horizon: int,
                     max_token_len: int | None = None) -> FastConfig:
    """π0-FAST at a pi0 size's vision and Gemma widths: the vocabulary holds the text tokenizer's ids, the 128 ids FAST
    skips and the FAST tokenizer's, so that no action token is also a text one."""
    return FastConfig(vision=size.vision, vlm=dataclasses.replace(size.vlm, vocab_size=text_vocab + SKIP_TOKENS + fast_vocab),
                      action_dim=action_dim, action_horizon=horizon,
                      max_token_len=max_token_len or max(size.max_token_len, 120))


def episode_chunks(actions: np.ndarray, episodes: np.ndarray, horizon: int, stride: int = 1) -> np.ndarray:
    """[N, D] actions in frame order, their episode of each frame -> [C, horizon, D]: every window of `horizon`
    consecutive frames of one episode starting every `stride` frames (none crosses an episode's end)."""
    out = []
    for ep in np.unique(episodes):
        rows = np.flatnonzero(episodes == ep)
        out += [actions[rows[i: i + horizon]] for i in range(0, len(rows) - horizon + 1, stride)]
    if not out:
        raise ValueError(f"no episode has {horizon} frames: lower the horizon")
    return np.stack(out)


def fit_on_dataset(ds: LeRobotDataset | DatasetMixture, to_model: Callable[[np.ndarray], np.ndarray], horizon: int,
                   vocab_size: int, scale: float = 10.0) -> FastTokenizer:
    """A FAST tokenizer fitted on every chunk of `horizon` frames of the dataset(s), mapped into the model's space."""
    parts = ds.datasets if isinstance(ds, DatasetMixture) else [ds]
    chunks = np.concatenate([episode_chunks(to_model(d.column("action").astype(np.float32).reshape(len(d), -1))
                                            .astype(np.float64), d.column("episode_index").reshape(-1), horizon)
                             for d in parts])
    return FastTokenizer.fit(chunks, scale=scale, vocab_size=vocab_size)


def fast_pipeline(config: FastConfig, robot: RobotPreset, normalizer: Normalizer, tokenizer: Path, *, mode: str,
                  state_len: int | None, action_dim: int, source: str, fast_dir: str | os.PathLike | None,
                  ds: LeRobotDataset | DatasetMixture, fast_vocab: int) -> OpenpiFastPipeline:
    """The pipeline π0-FAST trains and serves with: the FAST tokenizer from `fast_dir`, else fitted on the dataset."""
    if fast_dir is not None:
        fast = FastTokenizer.load(fast_dir)
    else:
        fast = fit_on_dataset(ds, lambda a: normalizer.actions_in(robot.actions_in(a)), config.action_horizon,
                              fast_vocab)
    text = FastText(tokenizer, config.max_token_len, config.vlm.vocab_size, fast.vocab_size)
    return OpenpiFastPipeline(config, robot, normalizer, text, fast, norm=mode, state_len=state_len,
                              action_dim=action_dim, stats_source=source, fast_source=str(fast_dir or "fitted"))


class FastLossModule(nn.Module):
    """π0-FAST's training loss as a forward pass: the answer tokens' cross-entropy, their mean over the batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, obs: Observation, action_tokens: Tensor, action_masks: Tensor) -> Tensor:
        ce = self.model.compute_loss(obs.images, obs.image_masks, obs.tokens, obs.token_masks, action_tokens,
                                     action_masks, first_from_prefix=True)  # [B, Ta], 0 on padding
        return ce.sum() / action_masks.sum().clamp(min=1)
