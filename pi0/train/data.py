"""A LeRobot dataset as training batches: each frame prepared by the checkpoint's own observation pipeline (the one
`pi0.Policy` serves it with), then augmented as openpi trains; the action chunk mapped into the model's space by
the same pipeline; batches made per step, ahead of the loop, by DataLoader workers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pi0.data.dataset import DatasetError, LeRobotDataset
from pi0.data.mixture import DatasetMixture
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig
from pi0.model.functional import sample_time
from pi0.model.observation import Observation
from pi0.robot.assets import load_norm_stats
from pi0.robot.normalize import Stats
from pi0.robot.pipeline import Frame, Pipeline
from pi0.robot.presets import RobotPreset
from pi0.train.schedule import batch_positions, epoch_order, sample_rng

STATE_KEY, ACTION_KEY = "observation.state", "action"


def augment(images: Tensor, wrist: bool, rng: np.random.Generator) -> Tensor:
    """One camera's image [3, S, S] in [-1, 1], augmented as openpi trains (its PyTorch port's ranges): a
    camera that is not a wrist camera gets a random 95 % crop resized back and a rotation of up to 5 degrees;
    every camera gets brightness x U(0.7, 1.3), contrast x U(0.6, 1.4) and saturation x U(0.5, 1.5), clamped
    to [0, 1] in [0, 1] space."""
    x = (images[None] + 1) / 2  # [1, 3, S, S] in [0, 1]
    if not wrist:
        s = 0.95
        tx, ty = rng.uniform(-(1 - s), 1 - s, 2)
        a = math.radians(rng.uniform(-5, 5))
        theta = torch.tensor([[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty]],
                             dtype=x.dtype)[None]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b, c, sat = rng.uniform(0.7, 1.3), rng.uniform(0.6, 1.4), rng.uniform(0.5, 1.5)
    x = (x * b).clamp(0, 1)
    x = ((x - x.mean()) * c + x.mean()).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    x = ((x - gray) * sat + gray).clamp(0, 1)
    return x[0] * 2 - 1


class TrainingData:
    """Samples of a LeRobot dataset as model inputs: frame `index`'s cameras in `cameras` order (None: an empty,
    masked slot), its state and task through `pipeline.frame_inputs` (exactly what `pi0.Policy` makes of the same
    observation), images augmented, the action chunk through `pipeline.actions_in`, zero-padded to the model's
    action width."""

    def __init__(self, dataset: LeRobotDataset | DatasetMixture, config: Pi0Config | FastConfig, cameras: list[str | None], pipeline: Pipeline,
                 augment: bool, seed: int):
        assert len(cameras) == len(pipeline.cameras), (len(cameras), len(pipeline.cameras))
        self.ds, self.config, self.cameras, self.pipeline = dataset, config, cameras, pipeline
        self.augment, self.seed = augment, seed
        self.action_dim = dataset.shape(ACTION_KEY)[0]
        self.has_state = STATE_KEY in dataset.features

    def __len__(self) -> int:
        return len(self.ds)

    def frame(self, item: dict[str, Any]) -> Frame:
        """A dataset item in the robot's units: images uint8 HWC in slot order, state, task."""
        images = [None if key is None else np.ascontiguousarray(item[key].transpose(1, 2, 0)) for key in self.cameras]
        state = np.asarray(item[STATE_KEY], dtype=np.float32) if self.has_state else np.zeros(0, dtype=np.float32)
        return Frame(images, state, item["task"])

    def sample(self, index: int, step: int, position: int) -> dict[str, Any]:
        """Frame `index` prepared, with the random draws of (step, position in the global batch)."""
        cfg = self.config
        rng = sample_rng(self.seed, step, position)
        item = self.ds[index]
        inputs = self.pipeline.frame_inputs(self.frame(item))
        images = [inputs.images[c][0] for c in range(len(self.cameras))]
        if self.augment:
            images = [img if key is None else augment(img, "wrist" in key, rng) for key, img in zip(self.cameras, images)]
        chunk = self.pipeline.actions_in(np.asarray(item[ACTION_KEY], dtype=np.float32))
        out = {"images": images, "masks": [bool(m[0]) for m in inputs.image_masks],
               "state": None if inputs.state is None else inputs.state[0].numpy(),
               "tokens": inputs.tokens[0].numpy(), "token_mask": inputs.token_masks[0].numpy()}
        if isinstance(cfg, FastConfig):  # the answer's tokens (the state is in the prompt)
            out["action_tokens"], out["action_masks"] = self.pipeline.action_tokens(chunk)
            return out
        actions = np.zeros((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        actions[:, : self.action_dim] = chunk
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        return {**out, "actions": actions, "noise": noise, "time": np.float32(sample_time(1, rng)[0])}


def collate(samples: list[dict[str, Any]]) -> tuple[Observation, dict[str, Tensor]]:
    """Samples -> the batch's Observation and its targets by name (the loss module's keyword arguments)."""
    n_cams = len(samples[0]["images"])
    obs = Observation(
        images=[torch.stack([s["images"][c] for s in samples]) for c in range(n_cams)],
        image_masks=[torch.tensor([s["masks"][c] for s in samples]) for c in range(n_cams)],
        tokens=torch.from_numpy(np.stack([s["tokens"] for s in samples])),
        token_masks=torch.from_numpy(np.stack([s["token_mask"] for s in samples])),
        state=None if samples[0]["state"] is None else torch.from_numpy(np.stack([s["state"] for s in samples])),
    )
    names = [k for k in ("actions", "noise", "time", "action_tokens", "action_masks") if k in samples[0]]
    return obs, {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in names}


class StepBatches(torch.utils.data.Dataset):
    """Item k = the prepared batch of step start + k for this process (so DataLoader workers build whole
    batches ahead of the training loop)."""

    def __init__(self, data: TrainingData, start: int, steps: int, batch: int, rank: int, world: int, seed: int):
        self.data, self.start, self.steps = data, start, steps
        self.batch, self.rank, self.world, self.seed = batch, rank, world, seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.steps - self.start

    def _index(self, position: int) -> int:
        if isinstance(self.data.ds, DatasetMixture) and self.data.ds.weights is not None:
            return self.data.ds.draw(self.seed, position)
        n = len(self.data)
        epoch, k = divmod(position, n)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.seed, epoch, n)}
        return int(self._orders[epoch][k])

    def __getitem__(self, k: int):
        step = self.start + k
        return collate([self.data.sample(self._index(p), step, p)
                        for p in batch_positions(step, self.batch, self.rank, self.world)])


def checkpoint_stats(root: Path, mode: str, s_dim: int | None, a_dim: int) -> tuple[Stats | None, Stats, str]:
    """A checkpoint's own state and action stats (in the model's units already), checked against the dataset's state
    and action widths: what `pi0 train --norm-stats checkpoint` normalises with. Returns (state, actions, source)."""
    normalizer, source = load_norm_stats(root, None, mode, mode)
    if normalizer is None or normalizer.actions is None:
        raise DatasetError(f"--norm-stats checkpoint: {root} holds no action stats ({source}); use --norm-stats dataset")
    for what, st, width in (("state", normalizer.state, s_dim), ("action", normalizer.actions, a_dim)):
        if width is not None and (st is None or len(st.mean) != width):
            have = "no stats" if st is None else f"stats for {len(st.mean)} values"
            raise DatasetError(f"--norm-stats checkpoint: {source} has {have} of {what}, the dataset's {what} has "
                               f"{width} values; use --norm-stats dataset")
    return normalizer.state if s_dim else None, normalizer.actions, f"{source} (the --init checkpoint's stats)"


def dataset_stats(ds: LeRobotDataset, key: str, to_model: Callable[[np.ndarray], np.ndarray] | None = None) -> Stats:
    """The dataset's meta/stats.json for `key`, or (absent there, or with `to_model`, a robot preset's map into the
    model's units, applied first) computed from the frames: mean, std, q01, q99."""
    if to_model is None and ds.stats and key in ds.stats and all(k in ds.stats[key] for k in ("mean", "std", "q01", "q99")):
        d = ds.stats[key]
        return Stats(*(np.asarray(d[k], dtype=np.float32).reshape(-1) for k in ("mean", "std", "q01", "q99")))
    x = ds.column(key).astype(np.float64).reshape(len(ds), -1)
    if to_model is not None:
        x = to_model(x.astype(np.float32)).astype(np.float64)
    return Stats(x.mean(0).astype(np.float32), x.std(0).astype(np.float32),
                 np.quantile(x, 0.01, axis=0).astype(np.float32), np.quantile(x, 0.99, axis=0).astype(np.float32))


def camera_keys(cameras: list[str] | None, checkpoint_cams: list[str] | None, ds: LeRobotDataset | DatasetMixture,
                robot: RobotPreset | None, fast: bool = False) -> list[str | None]:
    """The dataset's camera keys in the model's slot order (None: an empty slot): `cameras` (--cameras), else the
    checkpoint's, else the dataset's; with a robot preset, one per slot of the preset (its π0-FAST slots if `fast`)."""
    if cameras:
        keys = [None if k.lower() == "none" else k for k in cameras]
    elif checkpoint_cams:
        keys = list(checkpoint_cams)
    else:
        keys = list(ds.camera_keys)
    missing = [k for k in keys if k is not None and k not in ds.camera_keys]
    if missing:
        raise DatasetError(f"{ds.root}/meta/info.json has no camera {missing[0]!r} (the checkpoint or --cameras "
                           f"asks for {keys}; the dataset's cameras: {ds.camera_keys}); pass --cameras with "
                           "the dataset's camera keys in the checkpoint's camera order (none for an empty slot)")
    if not any(k is not None for k in keys):
        raise DatasetError(f"{ds.root}: no camera to train on (the dataset's cameras: {ds.camera_keys})")
    if robot is not None:
        slots = [k for k, _ in ((robot.fast_cameras or robot.cameras) if fast else robot.cameras)]
        if len(keys) > len(slots):
            raise DatasetError(f"{len(keys)} cameras {keys} for preset {robot.name}'s {len(slots)} camera slots "
                               f"{slots}: pass --cameras with one dataset key (or none) per slot, in that order")
        keys += [None] * (len(slots) - len(keys))
    return keys
