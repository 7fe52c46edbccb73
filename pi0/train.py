"""Fine-tuning: `pi0 train` (and `torchrun --nproc-per-node N -m pi0.train`) on a LeRobot v3 dataset, full or
LoRA, into a checkpoint that `pi0.load_model`, `pi0.Policy` and `pi0 serve` take as it is
(../shared/spec/training.md).

The loss is the reference model's `compute_loss` (LeRobot 0.6.1's, tested to 1e-5), averaged over the
dataset's real action dims. Inputs are prepared exactly as `pi0.Policy` prepares them at inference with the
saved checkpoint: openpi's resize-with-pad, normalisation with the saved stats (z-score for pi0, quantiles
for pi0.5), the same prompt tokens. Every random draw of a sample (noise, flow time, augmentation) comes from
a generator seeded by (seed, step, position in the global batch) and the data order from (seed, epoch), so a
resumed run continues bit for bit and N data-parallel processes follow one process's trajectory.

Output directory: `step-NNNNNN/` checkpoints (weights in openpi's layout + config.json, norm stats as openpi's
assets/<id>/norm_stats.json and LeRobot's stats.safetensors, the tokenizer, train_state.pt for resuming), a
`latest` link to the newest complete one, `train_log.jsonl` and `loss.png`. A checkpoint is written under a
temporary name and renamed when complete, so an interrupted run leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi0.config import Pi0Config, preset
from pi0.dataset import DatasetError, LeRobotDataset
from pi0.functional import sample_time
from pi0.hardware import peak_gpu_gib, peak_rss_gib, resolve_device, resolve_dtype
from pi0.lora import add_lora, merge_lora
from pi0.observation import Observation
from pi0.processing import Normalizer, PromptTokenizer, Stats, image_to_model, train_tokenizer

STATE_KEY, ACTION_KEY = "observation.state", "action"
TRAIN_STATE = "train_state.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainArgs:
    dataset: str
    out: str
    init: str | None = None  # a checkpoint to fine-tune
    download: bool = False  # fetch --init's hub id if it is not in the huggingface_hub cache
    size: str | None = None  # or a preset name / a Pi0Config JSON file: seeded random weights
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
    cameras: list[str] | None = None
    tokenizer: str | None = None
    tokenizer_vocab: int = 256
    action_horizon: int | None = None
    state_in_prompt: bool = True
    workers: int = 0
    log_every: int = 10
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule and randomness


def learning_rate(step: int, peak: float, warmup: int, total: int, final: float) -> float:
    """openpi's warmup-cosine (optax): linear from peak / (warmup + 1) to peak over `warmup` steps, then cosine
    to `final` at `total`. `step` counts from 0."""
    if step < warmup:
        init = peak / (warmup + 1)
        return init + (peak - init) * step / warmup
    span = max(1, total - warmup)
    frac = min(step - warmup, span) / span
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * frac))


def sample_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator of one sample's random draws: the same wherever (process, worker) it is made."""
    return np.random.default_rng([seed, step, position])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 << 20, epoch]).permutation(n)


def batch_positions(step: int, batch: int, rank: int, world: int) -> range:
    """This process's slice of the global batch of `step`: positions [step * batch + rank * batch / world, ...)."""
    per = batch // world
    start = step * batch + rank * per
    return range(start, start + per)


# ---------------------------------------------------------------------------------------------
# Images: openpi's training augmentations


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


# ---------------------------------------------------------------------------------------------
# Dataset -> model inputs


class TrainingData:
    """Samples of a LeRobot dataset as model inputs, prepared as pi0.Policy prepares a robot's observation for
    the saved checkpoint (generic preset): cameras in `cameras` order (None: an empty, masked slot), openpi's
    resize-with-pad, normalised state (pi0.5: also discretised into the prompt), normalised action chunk
    zero-padded to the model's action width."""

    def __init__(self, dataset: LeRobotDataset, config: Pi0Config, cameras: list[str | None], normalizer: Normalizer,
                 tokenizer: PromptTokenizer, state_in_prompt: bool, augment: bool, seed: int):
        self.ds, self.config, self.cameras = dataset, config, cameras
        self.normalizer, self.tokenizer = normalizer, tokenizer
        self.state_in_prompt = config.pi05 and state_in_prompt
        self.augment, self.seed = augment, seed
        self.action_dim = dataset.shape(ACTION_KEY)[0]
        self.has_state = STATE_KEY in dataset.features

    def __len__(self) -> int:
        return len(self.ds)

    def sample(self, index: int, step: int, position: int) -> dict[str, Any]:
        """Frame `index` prepared, with the random draws of (step, position in the global batch)."""
        cfg = self.config
        rng = sample_rng(self.seed, step, position)
        item = self.ds[index]
        size = cfg.vision.image_size
        images, masks = [], []
        for key in self.cameras:
            if key is None:
                images.append(torch.full((3, size, size), -1.0))
                masks.append(False)
                continue
            img = torch.from_numpy(image_to_model(np.ascontiguousarray(item[key].transpose(1, 2, 0)), size))
            if self.augment:
                img = augment(img, "wrist" in key, rng)
            images.append(img)
            masks.append(True)
        state = np.zeros(0, dtype=np.float32)
        if self.has_state:
            state = self.normalizer.state_in(np.asarray(item[STATE_KEY], dtype=np.float32))
        padded_state = np.zeros(cfg.state_dim, dtype=np.float32)
        padded_state[: len(state)] = state
        tokens, token_mask = self.tokenizer(item["task"], state if self.state_in_prompt else None)
        actions = np.zeros((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        actions[:, : self.action_dim] = self.normalizer.actions_in(np.asarray(item[ACTION_KEY], dtype=np.float32))
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        t = np.float32(sample_time(1, rng)[0])
        return {"images": images, "masks": masks, "state": padded_state, "tokens": tokens, "token_mask": token_mask,
                "actions": actions, "noise": noise, "time": t}


def collate(samples: list[dict[str, Any]]) -> tuple[Observation, Tensor, Tensor, Tensor]:
    n_cams = len(samples[0]["images"])
    obs = Observation(
        images=[torch.stack([s["images"][c] for s in samples]) for c in range(n_cams)],
        image_masks=[torch.tensor([s["masks"][c] for s in samples]) for c in range(n_cams)],
        tokens=torch.from_numpy(np.stack([s["tokens"] for s in samples])),
        token_masks=torch.from_numpy(np.stack([s["token_mask"] for s in samples])),
        state=torch.from_numpy(np.stack([s["state"] for s in samples])),
    )
    return (obs, torch.from_numpy(np.stack([s["actions"] for s in samples])),
            torch.from_numpy(np.stack([s["noise"] for s in samples])), torch.tensor([s["time"] for s in samples]))


class _StepBatches(torch.utils.data.Dataset):
    """Item k = the prepared batch of step start + k for this process (so DataLoader workers build whole
    batches ahead of the training loop)."""

    def __init__(self, data: TrainingData, start: int, steps: int, batch: int, rank: int, world: int, seed: int):
        self.data, self.start, self.steps = data, start, steps
        self.batch, self.rank, self.world, self.seed = batch, rank, world, seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.steps - self.start

    def _index(self, position: int) -> int:
        n = len(self.data)
        epoch, k = divmod(position, n)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.seed, epoch, n)}
        return int(self._orders[epoch][k])

    def __getitem__(self, k: int):
        step = self.start + k
        return collate([self.data.sample(self._index(p), step, p)
                        for p in batch_positions(step, self.batch, self.rank, self.world)])


# ---------------------------------------------------------------------------------------------
# Norm stats


def dataset_stats(ds: LeRobotDataset, key: str) -> Stats:
    """The dataset's meta/stats.json for `key`, or (absent there) computed from the frames: mean, std, q01, q99."""
    if ds.stats and key in ds.stats and all(k in ds.stats[key] for k in ("mean", "std", "q01", "q99")):
        d = ds.stats[key]
        return Stats(*(np.asarray(d[k], dtype=np.float32).reshape(-1) for k in ("mean", "std", "q01", "q99")))
    x = ds.column(key).astype(np.float64).reshape(len(ds), -1)
    return Stats(x.mean(0).astype(np.float32), x.std(0).astype(np.float32),
                 np.quantile(x, 0.01, axis=0).astype(np.float32), np.quantile(x, 0.99, axis=0).astype(np.float32))


def _stats_json(st: Stats) -> dict[str, list[float]]:
    return {k: getattr(st, k).tolist() for k in ("mean", "std", "q01", "q99")}


# ---------------------------------------------------------------------------------------------
# The trainer


class LossModule(nn.Module):
    """The model's training loss as a forward pass (what DistributedDataParallel wraps)."""

    def __init__(self, model: nn.Module, action_dim: int):
        super().__init__()
        self.model, self.action_dim = model, action_dim

    def forward(self, obs: Observation, actions: Tensor, noise: Tensor, time: Tensor) -> Tensor:
        loss = self.model.compute_loss(obs, actions, noise=noise, time=time)
        return loss[:, :, : self.action_dim].mean()  # LeRobot's reduction: the real action dims only


def _dist() -> tuple[int, int]:
    """(rank, world size) under torchrun (process group started here), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    def __init__(self, args: TrainArgs, log: Callable[[str], None] | None = None):
        self.args = args
        self.say = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.rank, self.world = _dist()
        if args.batch % self.world:
            raise ValueError(f"--batch {args.batch} must be a multiple of the {self.world} processes")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(args.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.dtype, self.dtype_reason = resolve_dtype(args.dtype, self.device)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"training runs in float32 or bfloat16 autocast, not {self.dtype}")
        self.ds = LeRobotDataset(args.dataset)
        self._model_and_config()
        self.ds.horizon = self.config.action_horizon  # samples carry the model's action chunk
        self._check_dataset()
        self._processing()
        self._trainable()
        self.start_step = 0
        self.history: list[dict[str, Any]] = []

    # -- set-up ---------------------------------------------------------------------------------

    def _model_and_config(self) -> None:
        import pi0

        a = self.args
        if (a.init is None) == (a.size is None):
            raise ValueError("give --init CKPT (a checkpoint to fine-tune) or --size NAME (random weights), not both")
        self.init_meta: dict[str, Any] = {}
        self.tokenizer_path: Path | None = Path(a.tokenizer) if a.tokenizer else None
        if a.init is not None:
            from pi0.checkpoint import inspect_checkpoint
            from pi0.processing import find_tokenizer

            info = inspect_checkpoint(a.init, action_horizon=a.action_horizon, download=a.download)
            self.init_meta = info.meta
            self.tokenizer_path = find_tokenizer(a.tokenizer, info.files.root)
            self.model = pi0.load_model(a.init, backend="reference", action_horizon=a.action_horizon,
                                        device=self.device)
            self.config = self.model.config
            return
        cfg = _size_config(a.size)
        if self.tokenizer_path is None:
            tasks = sorted(set(self.ds.tasks))
            prefix = self.out / "tokenizer"
            if self.rank == 0:
                train_tokenizer(tasks, prefix, a.tokenizer_vocab)
            _barrier(self.world)
            self.tokenizer_path = Path(str(prefix) + ".model")
        import sentencepiece

        vocab = sentencepiece.SentencePieceProcessor(model_file=str(self.tokenizer_path)).vocab_size()
        cfg = dataclasses.replace(  # the embedding table sized to the tokenizer
            cfg, vlm=dataclasses.replace(cfg.vlm, vocab_size=vocab), action_horizon=a.action_horizon or cfg.action_horizon,
            num_cameras=len(self._camera_keys(None)))
        self.config = cfg
        self.model = pi0.build_model(cfg, backend="reference", seed=a.seed, device=self.device)

    def _camera_keys(self, checkpoint_cams: list[str] | None) -> list[str | None]:
        a = self.args
        if a.cameras:
            keys = [None if k.lower() == "none" else k for k in a.cameras]
        elif checkpoint_cams:
            keys = list(checkpoint_cams)
        else:
            keys = list(self.ds.camera_keys)
        missing = [k for k in keys if k is not None and k not in self.ds.camera_keys]
        if missing:
            raise DatasetError(f"{self.ds.root}/meta/info.json has no camera {missing[0]!r} (the checkpoint or --cameras "
                               f"asks for {keys}; the dataset's cameras: {self.ds.camera_keys}); pass --cameras with "
                               "the dataset's camera keys in the checkpoint's camera order (none for an empty slot)")
        if not any(k is not None for k in keys):
            raise DatasetError(f"{self.ds.root}: no camera to train on (the dataset's cameras: {self.ds.camera_keys})")
        return keys

    def _check_dataset(self) -> None:
        cfg, ds = self.config, self.ds
        feats = self.init_meta.get("input_features") if isinstance(self.init_meta.get("input_features"), dict) else {}
        self.cameras = self._camera_keys([k for k in feats if k.startswith("observation.images.")] or None)
        if ACTION_KEY not in ds.features:
            raise DatasetError(f"{ds.root}/meta/info.json has no '{ACTION_KEY}' feature")
        a_dim = ds.shape(ACTION_KEY)[0]
        if a_dim > cfg.action_dim:
            raise DatasetError(f"{ds.root}/meta/info.json: '{ACTION_KEY}' has {a_dim} dims, the model takes at most "
                               f"{cfg.action_dim}")
        if STATE_KEY in ds.features and ds.shape(STATE_KEY)[0] > cfg.state_dim:
            raise DatasetError(f"{ds.root}/meta/info.json: '{STATE_KEY}' has {ds.shape(STATE_KEY)[0]} dims, the model "
                               f"takes at most {cfg.state_dim}")
        if STATE_KEY not in ds.features and not cfg.pi05:
            raise DatasetError(f"{ds.root}/meta/info.json has no '{STATE_KEY}' feature, which pi0 needs")
        empty = [i for i, t in enumerate(ds.tasks) if not t.strip()]
        if empty:
            raise DatasetError(f"{ds.root}/meta/tasks.parquet: task {empty[0]} is empty; every episode needs an "
                               "instruction (its prompt)")

    def _processing(self) -> None:
        cfg, ds, a = self.config, self.ds, self.args
        mode = "QUANTILES" if cfg.pi05 else "MEAN_STD"
        self.norm_mode = mode
        self.state_stats = dataset_stats(ds, STATE_KEY) if STATE_KEY in ds.features else None
        self.action_stats = dataset_stats(ds, ACTION_KEY)
        self.normalizer = Normalizer(self.state_stats, self.action_stats, mode, mode)
        self.tokenizer = PromptTokenizer(self.tokenizer_path, cfg.max_token_len)
        self.data = TrainingData(ds, cfg, self.cameras, self.normalizer, self.tokenizer, a.state_in_prompt, a.augment,
                                 a.seed)

    def _trainable(self) -> None:
        a, m = self.args, self.model
        m.train()
        if a.grad_checkpointing:
            m.gradient_checkpointing_()
        self.lora_names: list[str] = []
        dead = unreachable_modules(m)
        if a.lora:
            self.lora_names = add_lora(m, a.lora, a.lora_alpha, a.lora_targets, seed=a.seed, exclude=dead)
        else:
            m.requires_grad_(True)
            if a.freeze in ("vision", "vlm"):
                m.vision.requires_grad_(False)
            if a.freeze == "vlm":
                m.projector.requires_grad_(False)
                m.vlm.requires_grad_(False)
            elif a.freeze not in (None, "vision"):
                raise ValueError(f"--freeze {a.freeze!r}: choose vision or vlm")
        for name in dead:  # no gradient ever reaches them (and DDP insists every trainable parameter gets one)
            m.get_submodule(name).requires_grad_(False)
        self.trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        self.loss_module: nn.Module = LossModule(m, self.data.action_dim)
        if a.fsdp:
            if self.world == 1:
                raise ValueError("--fsdp shards the model across processes: start it under torchrun --nproc-per-node N")
            shard_model(m)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=a.weight_decay)
        self.ema = [p.detach().clone() for p in self.params] if a.ema else None

    # -- state: full (unsharded) state dicts through torch.distributed.checkpoint's API, so that one process,
    # DDP and FSDP save and resume alike (collective calls: every process makes them) ------------------------

    def _full_state(self) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # on a CPU these are the live tensors themselves: copy them, since the weights change after this call
        live = {t.data_ptr() for t in self.model.state_dict().values()}
        return {k: v.clone() if v.data_ptr() in live else v for k, v in state.items()}

    def _trainable_state(self) -> dict[str, Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self._full_state().items() if k in names}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def _swap_ema(self) -> None:
        """Exchange the EMA and the raw trainable weights in place."""
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

    def resume(self, step_dir: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(step_dir / TRAIN_STATE, map_location="cpu", weights_only=False)
        if state.get("ema") is not None:  # load the EMA into the parameters, keep it aside, then the raw weights
            self._load_state(state["ema"])
            self._swap_ema()
        if state.get("params") is not None:
            self._load_state(state["params"])
        else:  # a full fine-tune without EMA: the saved weights are the trained ones
            from pi0.checkpoint import inspect_checkpoint, load_state_dict

            self._load_state(load_state_dict(inspect_checkpoint(step_dir), torch.float32))
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.start_step = int(state["step"])
        log = self.out / LOG
        if log.is_file():
            self.history = [r for r in map(json.loads, log.read_text().splitlines()) if r["step"] <= self.start_step]

    # -- saving -----------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """step-NNNNNN/ written under a temporary name, renamed, `latest` pointed at it; old ones pruned.
        Every process takes part in gathering the state; process 0 writes."""
        from pi0.checkpoint import save_checkpoint
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = get_optimizer_state_dict(self.model, self.opt,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        raw = self._trainable_state() if self.ema is not None or self.lora_names else None
        ema = None
        if self.ema is not None:  # the saved weights are the EMA's
            self._swap_ema()
            ema = self._trainable_state()
        weights = merge_lora(self._full_state(), self.model)
        if self.ema is not None:
            self._swap_ema()
        final = self.out / f"step-{step:06d}"
        if self.rank != 0:
            return final
        tmp = self.out / f".step-{step:06d}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_checkpoint({k: v.float().contiguous() for k, v in weights.items()}, self.config, tmp, "openpi",
                        extra_config=self._config_fields(step))
        asset = tmp / "assets" / self.asset_id
        asset.mkdir(parents=True)
        norm = {"actions": _stats_json(self.action_stats)}
        if self.state_stats is not None:
            norm["state"] = _stats_json(self.state_stats)
        (asset / "norm_stats.json").write_text(json.dumps({"norm_stats": norm}, indent=2))
        lerobot_stats = {f"{ACTION_KEY}.{k}": torch.from_numpy(v) for k, v in _stats_arrays(self.action_stats).items()}
        if self.state_stats is not None:
            lerobot_stats.update({f"{STATE_KEY}.{k}": torch.from_numpy(v)
                                  for k, v in _stats_arrays(self.state_stats).items()})
        save_file(lerobot_stats, str(tmp / "stats.safetensors"))
        shutil.copy(self.tokenizer_path, tmp / "paligemma_tokenizer.model")
        torch.save({"step": step, "args": self.args.to_dict(), "optimizer": optimizer, "params": raw, "ema": ema},
                   tmp / TRAIN_STATE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        link = self.out / ".latest.partial"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final.name)
        os.replace(link, self.out / "latest")
        steps = sorted(self.out.glob("step-*"))
        for old in steps[: max(0, len(steps) - self.args.keep)]:
            shutil.rmtree(old)
        return final

    @property
    def asset_id(self) -> str:
        return Path(str(self.args.dataset).rstrip("/")).name or "dataset"

    def _config_fields(self, step: int) -> dict[str, Any]:
        """What config.json carries beside the model: the features pi0.Policy's generic preset reads (cameras in
        slot order, state, action width), the normalisation, and how the run was made."""
        ds = self.ds
        feats: dict[str, Any] = {}
        for key in self.cameras:
            if key is not None:
                h, w, c = ds.shape(key)
                feats[key] = {"type": "VISUAL", "shape": [c, h, w]}
        if STATE_KEY in ds.features:
            feats[STATE_KEY] = {"type": "STATE", "shape": list(ds.shape(STATE_KEY))}
        keep = {k: v for k, v in self.init_meta.items() if k not in ("pi0", "input_features", "output_features")}
        return {**keep, "input_features": feats,
                "output_features": {ACTION_KEY: {"type": "ACTION", "shape": list(ds.shape(ACTION_KEY))}},
                "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": self.norm_mode, "ACTION": self.norm_mode},
                "discrete_state_input": bool(self.args.state_in_prompt),
                "pi0_train": {"dataset": str(self.args.dataset), "step": step, "cameras": self.cameras,
                              "asset_id": self.asset_id, "args": self.args.to_dict()}}

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, callback: Callable[[int, dict[str, Any]], None] | None = None) -> Path | None:
        """Train from start_step to args.steps. Ctrl-C stops after the running step; the last complete
        checkpoint stays. Returns the last checkpoint written (None if none)."""
        a = self.args
        warmup = a.warmup if a.warmup is not None else min(1000, max(1, round(a.steps / 30)))
        final_lr = a.decay_lr if a.decay_lr is not None else a.lr / 10
        save_every = a.save_every or a.steps
        batches = _StepBatches(self.data, self.start_step, a.steps, a.batch, self.rank, self.world, a.seed)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=a.workers,
                                             persistent_workers=False, prefetch_factor=2 if a.workers else None)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        bar = TrainProgress(a.steps, self.start_step, a.progress and self.rank == 0)
        last: Path | None = None
        log = (self.out / LOG).open("w") if self.rank == 0 else None
        if log is not None:
            for r in self.history:
                log.write(json.dumps(r) + "\n")
        t_last, step = time.perf_counter(), self.start_step
        try:
            for step_batch in loader:
                obs, actions, noise, t = (x.to(self.device) if isinstance(x, Tensor) else x for x in step_batch)
                obs = obs.to(self.device, torch.float32)
                lr = learning_rate(step, a.lr, warmup, a.steps, final_lr)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = self.loss_module(obs, actions, noise, t)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, a.clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if self.ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - a.ema)
                step += 1
                loss_value = _mean_over_ranks(loss.detach(), self.world)
                now = time.perf_counter()
                rec = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                       "seconds": now - t_last, "samples_per_s": a.batch / (now - t_last),
                       "peak_rss_gib": peak_rss_gib()}
                if self.device.type == "cuda":
                    rec["peak_gpu_gib"] = peak_gpu_gib(self.device)
                t_last = now
                self.history.append(rec)
                if log is not None and (step % a.log_every == 0 or step == a.steps or step == self.start_step + 1):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.update(rec)
                if step % save_every == 0 or step == a.steps:
                    last = self.save(step)
                    _barrier(self.world)
                    if self.rank == 0:
                        plot_loss(self.history, self.out / "loss.png")
                if callback is not None:
                    callback(step, rec)
        except KeyboardInterrupt:
            self.say(f"pi0 train: interrupted after step {step}; the last complete checkpoint is "
                     f"{os.path.realpath(self.out / 'latest') if (self.out / 'latest').exists() else 'none'}")
        finally:
            bar.close()
            if log is not None:
                log.close()
        return last


def shard_model(model: nn.Module) -> None:
    """FSDP (fully_shard) over the processes: every module that holds parameters and is called becomes a unit
    (the reference model calls its Linear / norm modules inside shared-attention layers, not the layers), SigLIP
    as one unit for the patch and position embeddings it reads directly, and compute_loss runs the root's hooks."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    direct = {model.vision.patch_embedding, model.vision.position_embedding}
    for mod in reversed(list(model.modules())):
        if mod is not model and mod not in direct and any(True for _ in mod.parameters(recurse=False)):
            fully_shard(mod)
    fully_shard(model.vision)
    fully_shard(model)
    register_fsdp_forward_method(model, "compute_loss")


def unreachable_modules(model: nn.Module) -> list[str]:
    """Modules the loss never reaches: the suffix reads each VLM layer's keys and values, made from the layer's
    input, so the last VLM layer's attention output, post-attention norm and MLP, and the VLM's final norm,
    shape nothing the actions see."""
    last = f"vlm.layers.{len(model.vlm.layers) - 1}"
    return [f"{last}.self_attn.o_proj", f"{last}.post_attention_layernorm", f"{last}.mlp", "vlm.norm"]


def _stats_arrays(st: Stats) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(st, k), dtype=np.float32) for k in ("mean", "std", "q01", "q99")}


def _mean_over_ranks(x: Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _size_config(size: str) -> Pi0Config:
    """A preset name (tiny, tiny-pi05, pi0, pi05) or a JSON file holding a Pi0Config (as config.json's "pi0")."""
    p = Path(size)
    if p.suffix == ".json" or p.is_file():
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--size {size}: cannot read a Pi0Config JSON file ({e})") from e
        return Pi0Config.from_dict(d.get("pi0", d))
    return preset(size)


class TrainProgress:
    """A tqdm bar with the loss and throughput (a plain line per log step without tqdm or a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="pi0 train", unit="step", file=sys.stderr,
                                dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass

    def update(self, rec: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                 samples_s=f"{rec['samples_per_s']:.1f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and rec["step"] % 50 == 0:
            print(f"step {rec['step']}: loss {rec['loss']:.4f}, {rec['samples_per_s']:.1f} samples/s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    if len(loss) >= 20:
        k = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="a LeRobot v3 dataset: a directory or a hub repo id in the local cache")
    p.add_argument("--init", default=None, help="the checkpoint to fine-tune (any layout pi0 reads)")
    p.add_argument("--download", action="store_true", help="fetch --init's hub repo id if it is not in the "
                   "huggingface_hub cache (pi0 downloads nothing otherwise)")
    p.add_argument("--size", default=None, help="train from seeded random weights instead: tiny, tiny-pi05, pi0, pi05, "
                   "or a JSON file with a Pi0Config")
    p.add_argument("--out", help="output directory (checkpoints step-NNNNNN/, latest, train_log.jsonl, loss.png)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps in all (default 1000)")
    p.add_argument("--batch", type=int, default=8, help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=2.5e-5, help="peak learning rate (AdamW, betas 0.9 / 0.95)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default steps / 30, at most 1000)")
    p.add_argument("--decay-lr", type=float, default=None, help="learning rate at the last step, cosine decay "
                   "(default lr / 10)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping: the global norm")
    p.add_argument("--ema", type=float, default=None, help="keep an exponential moving average of the weights with "
                   "this decay (openpi: 0.99) and save it")
    p.add_argument("--lora", type=int, default=None, metavar="R", help="train rank-R adapters only, merged into the "
                   "saved weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default R: scale 1)")
    p.add_argument("--lora-targets", default="expert", help="expert (LeRobot's default: the expert's q/v and the "
                   "action/state/time projections), all (every VLM and expert projection) or a regex over module names")
    p.add_argument("--freeze", default=None, choices=["vision", "vlm"], help="full fine-tuning with SigLIP (vision) or "
                   "SigLIP, projector and the VLM (vlm) frozen")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimiser state "
                   "across the processes (FSDP) instead of replicating the model (DDP)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast where bf16 is native, fp32 master weights), "
                   "float32 or bfloat16")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no image augmentation")
    p.add_argument("--cameras", default=None, help="dataset camera keys in the model's camera order, comma-separated "
                   "(none: an empty slot); default: the checkpoint's, else the dataset's")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the --init checkpoint's; with --size "
                   "a small one is trained on the dataset's tasks)")
    p.add_argument("--tokenizer-vocab", type=int, default=256, help="vocabulary of that small tokenizer")
    p.add_argument("--action-horizon", type=int, default=None, help="actions per chunk (default: the checkpoint's)")
    p.add_argument("--no-state-in-prompt", dest="state_in_prompt", action="store_false",
                   help="pi0.5: leave the discretised state out of the prompt")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes preparing batches ahead")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", default=None, help="continue a run: its output directory (or one step directory)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    d = {k: v for k, v in vars(ns).items() if k in fields and v is not None}
    if isinstance(d.get("cameras"), str):
        d["cameras"] = [c.strip() for c in d["cameras"].split(",") if c.strip()]
    return TrainArgs(**d)


def resume_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / TRAIN_STATE).is_file():
        return p
    if (p / "latest" / TRAIN_STATE).is_file():
        return (p / "latest").resolve()
    raise FileNotFoundError(f"nothing to resume at {p}: no {TRAIN_STATE} there or under {p}/latest")


RESUME_MAY_CHANGE = ("steps", "progress")  # what --resume takes from the command line; the rest is the run's


def resume_conflicts(ns: argparse.Namespace, saved: dict[str, Any]) -> list[str]:
    """The options given with --resume (other than --steps and --quiet) that differ from the resumed run's."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = vars(parser.parse_args([]))
    fields = {f.name for f in dataclasses.fields(TrainArgs)} - set(RESUME_MAY_CHANGE)
    given = {k: v for k, v in vars(ns).items() if k in fields and v != default.get(k)}
    if isinstance(given.get("cameras"), str):
        given["cameras"] = [c.strip() for c in given["cameras"].split(",") if c.strip()]
    return [f"--{k.replace('_', '-')} {v} (the run has {saved.get(k)})" for k, v in given.items() if v != saved.get(k)]


def main(ns: argparse.Namespace) -> int:
    if ns.resume:
        step_dir = resume_dir(ns.resume)
        saved = torch.load(step_dir / TRAIN_STATE, map_location="cpu", weights_only=False)["args"]
        conflicts = resume_conflicts(ns, saved)
        if conflicts:
            raise ValueError(f"--resume continues {step_dir} as it was started; these options differ from it: "
                             f"{'; '.join(conflicts)}. Drop them (only --steps and --quiet may change), or start a "
                             "new run with --out")
        args = TrainArgs(**{**saved, "steps": ns.steps or saved["steps"], "progress": ns.progress})
        trainer = Trainer(args)
        trainer.resume(step_dir)
        trainer.say(f"pi0 train: resuming {args.out} at step {trainer.start_step} of {args.steps}")
    else:
        if not ns.dataset or not ns.out:
            raise ValueError("pi0 train needs --dataset and --out (or --resume DIR)")
        args = args_from_namespace(ns)
        trainer = Trainer(args)
    if trainer.rank == 0:
        lora = f", LoRA rank {args.lora} on {len(trainer.lora_names)} layers" if args.lora else ""
        trainer.say(f"pi0 train: {trainer.config.kind} {'from ' + args.init if args.init else 'size ' + str(args.size)}, "
                    f"{trainer.trainable:,} trainable parameters{lora}; dataset {trainer.ds.root} "
                    f"({len(trainer.ds)} frames, {trainer.ds.num_episodes} episodes, cameras {trainer.cameras}); "
                    f"{trainer.world} process(es), device {trainer.device}, {trainer.dtype_reason}")
    last = trainer.run()
    if trainer.rank == 0 and last is not None:
        trainer.say(f"pi0 train: saved {last} (serve it: pi0 serve --checkpoint {Path(args.out) / 'latest'})")
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m pi0.train", description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
