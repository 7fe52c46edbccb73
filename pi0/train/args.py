"""What a training run is asked to do (`TrainArgs`): the options of `pi0 train`, saved with every checkpoint so that
`--resume` continues the same run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainArgs:
    """One run's options (`pi0 train --help` says each)."""

    dataset: str | list[str]  # one LeRobot v3 dataset, or several of one robot (mixed)
    out: str
    weights: list[float] | None = None  # per dataset: how often a sample comes from it (None: by size)
    init: str | None = None  # a checkpoint to fine-tune
    norm_stats: str = "dataset"  # dataset | checkpoint: the stats inputs and targets are normalised with
    download: bool = False  # fetch --init's hub id if it is not in the huggingface_hub cache
    size: str | None = None  # or a model size (pi0.model.config.SIZES) / a Pi0Config JSON file: seeded random weights
    model: str | None = None  # with --size: pi0 (pi0 / pi0.5 by size) or pi0_fast; None: pi0, or --init's family
    fast_tokenizer: str | None = None  # π0-FAST: its FAST tokenizer (None: --init's, else fitted on the dataset)
    fast_vocab: int = 1024  # π0-FAST: the vocabulary of a FAST tokenizer fitted here
    norm: str | None = None  # π0-FAST: QUANTILES | MEAN_STD (None: --init's record, else quantiles)
    steps: int = 1000
    batch: int = 8
    lr: float = 2.5e-5
    warmup: int | None = None  # default: steps / 30 (LeRobot's rescaling of openpi's 1000 of 30 000), at most 1000
    decay_lr: float | None = None  # cosine decay to this at the last step (default lr / 10)
    weight_decay: float = 0.01
    clip: float = 1.0
    ema: float | None = None
    lora: int | None = None
    lora_alpha: float | None = None
    lora_targets: str = "expert"
    freeze: str | None = None  # vision | vlm
    grad_checkpointing: bool = False
    fsdp: bool = False
    device: str = "auto"
    dtype: str = "auto"
    save_every: int | None = None
    keep: int = 2
    seed: int = 0
    augment: bool = True
    preset: str | None = None  # a robot preset whose keys and maps the data is prepared with (None: generic)
    cameras: list[str] | None = None
    tokenizer: str | None = None
    tokenizer_vocab: int = 256
    action_horizon: int | None = None
    state_in_prompt: bool = True
    workers: int = 0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.dataset, (list, tuple)) and len(self.dataset) == 1:
            self.dataset = self.dataset[0]  # one dataset: its path, as runs saved before mixtures say it

    @property
    def datasets(self) -> list[str]:
        return list(self.dataset) if isinstance(self.dataset, (list, tuple)) else [self.dataset]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
