"""Several LeRobot v3 datasets of one robot read as one (`pi0 train --dataset A --dataset B`): frames by a global
index over them in order, and, with weights, each sample's dataset drawn in proportion to its weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pi0.data.dataset import DatasetError, LeRobotDataset


class DatasetMixture:
    """LeRobot datasets with the same features and fps, as one dataset (the interface training reads: features,
    camera_keys, shape, tasks, column, len, items, horizon). weights: None (every frame once an epoch, as one long
    dataset), or one per dataset (`draw` picks a sample's dataset with probability weight / sum, then a frame)."""

    def __init__(self, datasets: list[LeRobotDataset], weights: list[float] | None = None):
        if not datasets:
            raise DatasetError("a mixture needs at least one dataset")
        first = datasets[0]
        # what training reads must agree (cameras, state, action); other features (a recorder's flags, DAgger's
        # action.policy) may differ and are not read
        used = [*first.camera_keys, *(k for k in ("observation.state", "action") if k in first.features)]
        for ds in datasets[1:]:
            mine = {k: (v["dtype"], tuple(v["shape"])) for k, v in first.features.items() if k in used}
            theirs = {k: (v["dtype"], tuple(v["shape"])) for k, v in ds.features.items() if k in used or
                      k in ds.camera_keys}
            if mine != theirs or ds.fps != first.fps:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise DatasetError(f"{ds.root} and {first.root} differ (fps {ds.fps} / {first.fps}; features {diff}): "
                                   "mix datasets of one robot")
        if weights is not None:
            if len(weights) != len(datasets) or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise DatasetError(f"weights {weights}: give one non-negative weight per dataset ({len(datasets)}), not all 0")
        self.datasets, self.weights = datasets, None if weights is None else [float(w) for w in weights]
        common = set.intersection(*(set(ds.features) for ds in datasets))
        self.features = {k: v for k, v in first.features.items() if k in common}
        self.camera_keys, self.fps = first.camera_keys, first.fps
        self.root: Path = first.root
        self.roots = [ds.root for ds in datasets]
        self.stats = None  # computed from the frames of all of them (`pi0.train.data.dataset_stats`)
        self.tasks = list(dict.fromkeys(t for ds in datasets for t in ds.tasks))
        self.offsets = np.cumsum([0] + [len(ds) for ds in datasets])

    @property
    def horizon(self) -> int | None:
        return self.datasets[0].horizon

    @horizon.setter
    def horizon(self, value: int | None) -> None:
        for ds in self.datasets:
            ds.horizon = value

    @property
    def num_episodes(self) -> int:
        return sum(ds.num_episodes for ds in self.datasets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.datasets[0].shape(key)

    def column(self, key: str) -> np.ndarray:
        return np.concatenate([ds.column(key) for ds in self.datasets])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < len(self):
            raise IndexError(f"frame {idx} of {len(self)}")
        i = int(np.searchsorted(self.offsets, idx, side="right")) - 1
        return self.datasets[i][int(idx - self.offsets[i])]

    def draw(self, seed: int, position: int) -> int:
        """The frame of sample `position` (global, over all steps) with weights: its dataset by weight, then a frame
        uniformly; the same wherever (process, worker, resumed run) it is drawn."""
        rng = np.random.default_rng([seed, 3 << 20, position])
        p = np.asarray(self.weights) / sum(self.weights)
        i = int(rng.choice(len(self.datasets), p=p))
        return int(self.offsets[i] + rng.integers(len(self.datasets[i])))
